"""Codec token files and the ``speechlab encode`` / ``speechlab decode`` commands.

Token file (``<id>.tokens.safetensors``): one utterance, one safetensors tensor ``codes: (n_q, frames)`` (int16 when
the codebook fits, else int32) and a string header (safetensors ``__metadata__``) that says what the codes mean::

    format = "speechlab-codec-tokens", format_version = "1", sample_rate, frame_rate, n_q, codebook_size,
    codebook_hash (16 hex digits of sha256 over the code -> vector tables), model_version, num_samples

A pre-tokenised dataset therefore stays checkable: decoding with another codec (different hash / rate) is refused.
Reading never trusts the file: header size, JSON, every field's type and range, tensor dtype/shape/offsets and the
code values are checked before use, and any violation raises :class:`TokenFileError` naming the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from speechlab.atomic import atomic_write

FORMAT = "speechlab-codec-tokens"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
_DTYPES = {"I16": (torch.int16, 2), "I32": (torch.int32, 4), "I64": (torch.int64, 8)}


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
    from safetensors.torch import save_file

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


def read_token_header(path: str | os.PathLike) -> tuple[TokenInfo, tuple[int, int], str, int]:
    """Validate a token file's header without loading the codes -> (info, shape, dtype name, data offset)."""
    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"{path}: token file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TokenFileError(f"{path}: too short to be a token file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
            raise TokenFileError(
                f"{path}: header length {header_len} is invalid (file {size} bytes, limit {MAX_HEADER_BYTES}); "
                "the file is corrupt or not a speechlab token file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenFileError(f"{path}: header is not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise TokenFileError(f"{path}: header must be a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
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
    if set(header) != {"codes"}:
        raise TokenFileError(f"{path}: expected exactly one tensor 'codes', found {sorted(header)}")
    entry = header["codes"]
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        raise TokenFileError(f"{path}: tensor 'codes' must be one of {sorted(_DTYPES)} integers")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(s, int) and s >= 0 for s in shape)
        or shape[0] != n_q
    ):
        raise TokenFileError(f"{path}: tensor 'codes' must have shape [n_q={n_q}, frames], got {shape}")
    itemsize = _DTYPES[entry["dtype"]][1]
    expected = shape[0] * shape[1] * itemsize
    if offsets != [0, expected] or 8 + header_len + expected != size:
        raise TokenFileError(
            f"{path}: tensor data offsets {offsets} disagree with shape {shape} and file size "
            f"{size}; the file is truncated or corrupt"
        )
    if (
        num_samples is not None
        and frame_rate
        and shape[1] < math.floor(num_samples * frame_rate / sample_rate)
    ):
        raise TokenFileError(f"{path}: {shape[1]} frames cannot cover num_samples={num_samples}")
    info = TokenInfo(sample_rate, frame_rate, n_q, codebook_size, codebook_hash, model_version, num_samples)
    return info, (shape[0], shape[1]), entry["dtype"], 8 + header_len


def load_tokens(path: str | os.PathLike) -> tuple[Tensor, TokenInfo]:
    """Read and validate a token file -> ``codes (n_q, frames) int64``, :class:`TokenInfo`."""
    path = Path(path)
    info, shape, dtype_name, offset = read_token_header(path)
    dtype, itemsize = _DTYPES[dtype_name]
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(shape[0] * shape[1] * itemsize)
    codes = (
        torch.frombuffer(bytearray(data), dtype=dtype).view(shape).long()
        if data
        else torch.zeros(shape, dtype=torch.long)
    )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= info.codebook_size):
        raise TokenFileError(
            f"{path}: codes outside [0, {info.codebook_size}) "
            f"(min {int(codes.min())}, max {int(codes.max())}); the file is corrupt"
        )
    return codes, info


# ------------------------------------------------------------------------------------------------------- models
def load_codec(source: str | os.PathLike, device: str = "cpu"):
    """A speechlab codec directory or a transformers EnCodec/DAC directory -> an object with encode/decode."""
    from speechlab.checkpoints.hf_codec import HFCodec, is_hf_codec_dir
    from speechlab.checkpoints.pretrained_dir import is_pretrained_dir
    from speechlab.models.codec import Codec

    if is_pretrained_dir(source):
        return Codec.from_pretrained(source, device=device)
    if is_hf_codec_dir(source):
        return HFCodec.from_pretrained(source, device=device)
    raise FileNotFoundError(
        f"{source}: not a codec directory; expected a speechlab codec (config.json with family 'codec', from "
        "CodecTask.export_pretrained / Codec.save_pretrained) or a transformers EnCodec/DAC directory"
    )


def _input_items(args: argparse.Namespace) -> list[dict]:
    from speechlab.data.manifest import read_manifest

    if args.manifest:
        return read_manifest(args.manifest, on_error="raise")
    folder = Path(args.input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--input-dir {folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))
    if not files:
        raise FileNotFoundError(f"--input-dir {folder}: no .wav/.flac/.ogg/.mp3 files found")
    return [{"id": str(p.relative_to(folder).with_suffix("")), "audio": str(p.resolve())} for p in files]


def run_encode(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speechlab.audio import load_audio
    from speechlab.data.manifest import output_names, write_manifest

    torch.set_num_threads(args.threads) if args.threads else None
    codec = load_codec(args.model, args.device)
    n_q = args.n_q or codec.num_quantizers
    items = _input_items(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names([str(item["id"]) for item in items], source=args.manifest or args.input_dir)
    order = sorted(range(len(items)), key=lambda i: float(items[i].get("duration") or 0.0))
    batch_size = args.batch_size if not hasattr(codec, "kind") else 1  # HF codecs are not padding-invariant
    written: dict[int, dict] = {}
    with tqdm(total=len(items), desc="encode", unit="utt") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            clips = []
            for i in idx:
                item = items[i]
                offset = float(item.get("offset", 0.0))
                duration = float(item["duration"]) if "offset" in item else None
                clips.append(load_audio(item["audio"], codec.sample_rate, offset=offset, duration=duration))
            lengths = torch.tensor([c.shape[0] for c in clips])
            audio = torch.zeros(len(clips), int(lengths.max()))
            for row, clip in enumerate(clips):
                audio[row, : clip.shape[0]] = clip
            try:
                codes, frame_lengths = codec.encode(audio.to(args.device), lengths.to(args.device), n_q=n_q)
            except ValueError as err:  # e.g. a non-finite latent: name the items, write nothing for them
                ids = [str(items[i]["id"]) for i in idx]
                raise ValueError(f"{args.model}: encoding ids {ids}: {err}") from err
            for row, i in enumerate(idx):
                name = names[i]
                frames = int(frame_lengths[row])
                info = TokenInfo.for_codec(codec, n_q, int(lengths[row]))
                path = save_tokens(out_dir / f"{name}.tokens.safetensors", codes[row, :, :frames].cpu(), info)
                record = dict(items[i])
                record["tokens"] = str(path.resolve())
                record["token_frames"] = frames
                if args.units:
                    record["units"] = " ".join(map(str, codes[row, 0, :frames].tolist()))
                written[i] = record
            bar.update(len(idx))
    manifest = write_manifest(out_dir / "manifest.jsonl", [written[i] for i in range(len(items))])
    print(
        f"wrote {len(items)} token files ({n_q} x {codec.codebook_size} codes at {codec.frame_rate:g} Hz) and "
        f"{manifest}"
    )
    return 0


def run_decode(args: argparse.Namespace) -> int:
    import soundfile as sf
    from tqdm import tqdm

    from speechlab.data.manifest import output_names

    torch.set_num_threads(args.threads) if args.threads else None
    codec = load_codec(args.model, args.device)
    if args.manifest:
        with open(args.manifest, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        root = Path(args.manifest).resolve().parent
        paths = []
        for number, rec in enumerate(records, 1):
            if "tokens" not in rec:
                raise TokenFileError(
                    f"{args.manifest}:{number}: no 'tokens' field (write it with speechlab encode)"
                )
            p = Path(rec["tokens"])
            paths.append((str(rec.get("id", p.stem)), p if p.is_absolute() else root / p))
    else:
        folder = Path(args.tokens_dir)
        files = sorted(folder.rglob("*.tokens.safetensors"))
        if not files:
            raise FileNotFoundError(f"--tokens-dir {folder}: no *.tokens.safetensors files")
        # the id keeps the sub-folder: a/x and b/x are different utterances
        paths = [(p.relative_to(folder).as_posix()[: -len(".tokens.safetensors")], p) for p in files]
    names = output_names([item_id for item_id, _ in paths], source=args.manifest or args.tokens_dir)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (_, path) in tqdm(zip(names, paths, strict=True), total=len(paths), desc="decode", unit="utt"):
        codes, info = load_tokens(path)
        if not args.force:
            info.check_compatible(codec, str(path))
        audio = codec.decode(codes[None].to(args.device))[0].cpu()
        if info.num_samples is not None:
            audio = audio[: info.num_samples]
        wav = out_dir / f"{name}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, audio.clamp(-1, 1).numpy(), codec.sample_rate)
    print(f"wrote {len(paths)} wav files to {out_dir}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab encode`` and ``speechlab decode``."""
    enc = subparsers.add_parser(
        "encode",
        help="audio (manifest or folder) -> codec token files + a manifest",
        description="Encode every utterance of a manifest or folder into <id>.tokens.safetensors files (codes "
        "(n_q, frames) + a header naming the codec), and write <output-dir>/manifest.jsonl with a 'tokens' field.",
    )
    src = enc.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="JSON Lines manifest of the audio to encode")
    src.add_argument("--input-dir", help="folder searched recursively for .wav/.flac/.ogg/.mp3 files")
    enc.add_argument(
        "--model", required=True, help="speechlab codec directory or transformers EnCodec/DAC dir"
    )
    enc.add_argument("--output-dir", required=True, help="where token files and manifest.jsonl are written")
    enc.add_argument("--n-q", type=int, default=None, help="codebooks to keep (default: all the codec has)")
    enc.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="utterances per forward pass, sorted by length "
        "(speechlab codecs give the same codes at any batch size; HF codecs always use 1)",
    )
    enc.add_argument(
        "--units",
        action="store_true",
        help="also write level-0 codes as a space-separated "
        "'units' field (frame-level targets for SSL training)",
    )
    enc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    enc.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    enc.set_defaults(func=run_encode)

    dec = subparsers.add_parser(
        "decode",
        help="codec token files -> wav files",
        description="Decode token files back to audio with the codec that made them (the header's codebook hash, "
        "sample rate and frame rate are checked against the model).",
    )
    src = dec.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest written by 'speechlab encode' (its 'tokens' field)")
    src.add_argument("--tokens-dir", help="folder searched recursively for *.tokens.safetensors")
    dec.add_argument("--model", required=True, help="the codec directory that encoded the tokens")
    dec.add_argument("--output-dir", required=True, help="where <id>.wav files are written")
    dec.add_argument(
        "--force", action="store_true", help="decode even if the token header names another codec"
    )
    dec.add_argument("--device", default="cpu", help="torch device (default cpu)")
    dec.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    dec.set_defaults(func=run_decode)
