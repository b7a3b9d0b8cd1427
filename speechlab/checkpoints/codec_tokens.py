"""Codec token files: one utterance's codes and what they mean, in a safetensors file.

Token file (``<id>.tokens.safetensors``): one safetensors tensor ``codes: (n_q, frames)`` (int16 when the codebook
fits, else int32) and a string header (safetensors ``__metadata__``) that says what the codes mean::

    format = "speechlab-codec-tokens", format_version = "1", sample_rate, frame_rate, n_q, codebook_size,
    codebook_hash (16 hex digits of sha256 over the code -> vector tables), model_version, num_samples

A pre-tokenised dataset therefore stays checkable: decoding with another codec (different hash / rate) is refused.
Reading never trusts the file: the safetensors header is validated by :mod:`speechlab.checkpoints.safe_load` (size,
JSON, dtypes, shapes, byte offsets against the file size; here with a 64 KiB header limit), then every header field's
type and range, the one integer tensor's shape and the code values are checked before use; any violation raises
:class:`TokenFileError` naming the file. Written by ``speechlab encode``, read by ``speechlab decode``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from speechlab.atomic import atomic_write
from speechlab.checkpoints.safe_load import CheckpointError, load_safetensors, read_safetensors_header

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TokenFileError",
    "TokenInfo",
    "load_tokens",
    "read_token_header",
    "save_tokens",
]

FORMAT = "speechlab-codec-tokens"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
_CODE_DTYPES = (torch.int16, torch.int32, torch.int64)


class TokenFileError(ValueError):
    """A token file is missing, corrupt, hostile, or made by an incompatible codec."""


@dataclass(frozen=True)
class TokenInfo:
    """What a token file's codes mean."""

    sample_rate: int
    frame_rate: float
    n_q: int
    codebook_size: int
    codebook_hash: str
    model_version: str
    num_samples: int | None = None  # length of the encoded audio (to trim the decoded tail)

    @classmethod
    def for_codec(cls, codec, n_q: int, num_samples: int | None = None) -> TokenInfo:
        return cls(
            sample_rate=int(codec.sample_rate),
            frame_rate=float(codec.frame_rate),
            n_q=int(n_q),
            codebook_size=int(codec.codebook_size),
            codebook_hash=codec.codebook_hash(),
            model_version=codec.model_version(),
            num_samples=num_samples,
        )

    def check_compatible(self, codec, source: str = "tokens") -> None:
        """Raise :class:`TokenFileError` unless ``codec`` can decode these codes."""
        problems = []
        if self.sample_rate != codec.sample_rate:
            problems.append(f"sample_rate {self.sample_rate} != codec {codec.sample_rate}")
        if abs(self.frame_rate - codec.frame_rate) > 1e-6:
            problems.append(f"frame_rate {self.frame_rate} != codec {codec.frame_rate}")
        if self.codebook_size != codec.codebook_size:
            problems.append(f"codebook_size {self.codebook_size} != codec {codec.codebook_size}")
        if self.n_q > codec.num_quantizers:
            problems.append(f"n_q {self.n_q} > codec's {codec.num_quantizers} levels")
        if self.codebook_hash != codec.codebook_hash():
            problems.append(f"codebook_hash {self.codebook_hash} != codec {codec.codebook_hash()}")
        if problems:
            raise TokenFileError(
                f"{source}: made by a different codec ({'; '.join(problems)}) -> decode with the codec that "
                f"encoded them ({self.model_version}), or pass --force to decode anyway"
            )


def save_tokens(path: str | os.PathLike, codes: Tensor, info: TokenInfo) -> Path:
    """Write ``codes: (n_q, frames)`` with ``info`` as the header (atomically: temp file + rename)."""
    path = Path(path)
    if codes.dim() != 2 or codes.shape[0] != info.n_q:
        raise ValueError(f"codes must be (n_q={info.n_q}, frames), got shape {tuple(codes.shape)}")
    dtype = torch.int16 if info.codebook_size <= 2**15 else torch.int32
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "sample_rate": str(info.sample_rate),
        "frame_rate": repr(float(info.frame_rate)),
        "n_q": str(info.n_q),
        "codebook_size": str(info.codebook_size),
        "codebook_hash": info.codebook_hash,
        "model_version": info.model_version,
        "num_samples": "" if info.num_samples is None else str(info.num_samples),
    }
    with atomic_write(path) as tmp:
        save_file({"codes": codes.detach().to("cpu", dtype).contiguous()}, str(tmp), metadata=meta)
    return path


def _int_field(meta: dict, key: str, low: int, high: int, path: Path) -> int:
    value = meta.get(key)
    if not isinstance(value, str) or not re.fullmatch(r"\d{1,12}", value):
        raise TokenFileError(f"{path}: header field {key!r} must be a decimal integer, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise TokenFileError(f"{path}: header field {key!r} = {number} is outside [{low}, {high}]")
    return number


def read_token_header(path: str | os.PathLike) -> tuple[TokenInfo, tuple[int, int]]:
    """Validate a token file's header without loading the codes -> (info, codes shape)."""
    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"{path}: token file not found")
    try:
        tensors, meta = read_safetensors_header(path, max_header_bytes=MAX_HEADER_BYTES)
    except CheckpointError as err:
        raise TokenFileError(f"{err} (not a speechlab token file, or a corrupt one)") from None
    if not meta:
        raise TokenFileError(f"{path}: missing or malformed metadata; not a speechlab token file")
    if meta.get("format") != FORMAT:
        raise TokenFileError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = _int_field(meta, "format_version", 1, 10**6, path)
    if version > FORMAT_VERSION:
        raise TokenFileError(
            f"{path}: token format version {version} is newer than this speechlab's "
            f"{FORMAT_VERSION} -> upgrade speechlab"
        )
    sample_rate = _int_field(meta, "sample_rate", 1, 768_000, path)
    n_q = _int_field(meta, "n_q", 1, 4096, path)
    codebook_size = _int_field(meta, "codebook_size", 2, 2**31 - 1, path)
    try:
        frame_rate = float(meta.get("frame_rate", ""))
    except ValueError:
        frame_rate = math.nan
    if not (math.isfinite(frame_rate) and 0 < frame_rate <= sample_rate):
        raise TokenFileError(
            f"{path}: header field 'frame_rate' = {meta.get('frame_rate')!r} is not in (0, sample_rate]"
        )
    codebook_hash = meta.get("codebook_hash", "")
    if not re.fullmatch(r"[0-9a-f]{16}", codebook_hash):
        raise TokenFileError(
            f"{path}: header field 'codebook_hash' must be 16 hex digits, got {codebook_hash!r}"
        )
    model_version = meta.get("model_version", "")
    if not 0 < len(model_version) <= 200:
        raise TokenFileError(
            f"{path}: header field 'model_version' must be a non-empty string (<= 200 chars)"
        )
    num_samples = None
    if meta.get("num_samples"):
        num_samples = _int_field(meta, "num_samples", 0, 10**12, path)
    if set(tensors) != {"codes"}:
        raise TokenFileError(f"{path}: expected exactly one tensor 'codes', found {sorted(tensors)}")
    codes = tensors["codes"]
    if codes.dtype not in _CODE_DTYPES:
        raise TokenFileError(f"{path}: tensor 'codes' must be int16/int32/int64 integers, got {codes.dtype}")
    if len(codes.shape) != 2 or codes.shape[0] != n_q:
        raise TokenFileError(
            f"{path}: tensor 'codes' must have shape [n_q={n_q}, frames], got {list(codes.shape)}"
        )
    frames = codes.shape[1]
    if num_samples is not None and frames < math.floor(num_samples * frame_rate / sample_rate):
        raise TokenFileError(f"{path}: {frames} frames cannot cover num_samples={num_samples}")
    info = TokenInfo(sample_rate, frame_rate, n_q, codebook_size, codebook_hash, model_version, num_samples)
    return info, (n_q, frames)


def load_tokens(path: str | os.PathLike) -> tuple[Tensor, TokenInfo]:
    """Read and validate a token file -> ``codes (n_q, frames) int64``, :class:`TokenInfo`."""
    path = Path(path)
    info, shape = read_token_header(path)
    try:
        codes = load_safetensors(path)["codes"].long()
    except CheckpointError as err:
        raise TokenFileError(str(err)) from None
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= info.codebook_size):
        raise TokenFileError(
            f"{path}: codes outside [0, {info.codebook_size}) "
            f"(min {int(codes.min())}, max {int(codes.max())}); the file is corrupt"
        )
    return codes, info
