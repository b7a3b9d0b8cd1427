"""Safe checkpoint loading: nothing here ever unpickles arbitrary Python objects.

Two readers, both validating the file *before* any tensor memory is allocated:

* ``.safetensors`` — the JSON header is read and checked first (size, dtypes, shapes, byte offsets against the
  real file size, so truncated files and wrong shapes are refused without touching tensor data), then the tensors
  are loaded with ``safetensors``.
* ``.pt`` / ``.bin`` / ``.ckpt`` — ``torch.load(weights_only=True)`` (memory-mapped for zip-format files), which
  only rebuilds tensors and plain containers. A checkpoint that needs arbitrary unpickling (e.g. a fairseq training
  checkpoint holding an ``argparse.Namespace`` / OmegaConf config, or a crafted file whose pickle would run code) is
  refused with :class:`UnsafeCheckpointError`, naming the Python object it asked for.

Config values from any source are checked with :func:`check_config_limits` before a model is built, and
:func:`check_state_dict` lists missing / unexpected keys and shape / dtype mismatches in one error.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "TensorInfo",
    "read_safetensors_header",
    "load_safetensors",
    "load_torch_checkpoint",
    "check_state_dict",
    "check_config_limits",
    "tensor_infos",
    "read_json",
    "DEFAULT_CONFIG_LIMITS",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format itself caps headers at 100 MB
MAX_JSON_BYTES = 16 * 1024 * 1024

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be loaded; the message names the file and says what to do."""


class UnsafeCheckpointError(CheckpointError):
    """The file would need arbitrary unpickling (code execution) to load, so it was refused."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a tensor known without its data (from a safetensors header or a meta model)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return math.prod(self.shape) * itemsize


def _info(value: torch.Tensor | TensorInfo) -> TensorInfo:
    if isinstance(value, TensorInfo):
        return value
    return TensorInfo(tuple(value.shape), value.dtype)


def tensor_infos(module_or_state: torch.nn.Module | Mapping[str, Any]) -> dict[str, TensorInfo]:
    """Shapes/dtypes of a module's ``state_dict()`` (works on meta-device modules, so nothing is allocated)."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    return {
        name: _info(value) for name, value in state.items() if isinstance(value, torch.Tensor | TensorInfo)
    }


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """Read a small JSON object (e.g. ``config.json``), refusing huge or malformed files with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: {size} bytes is too large for a config file (limit {max_bytes}).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}). Re-export the checkpoint.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


# --------------------------------------------------------------------------------------------------- safetensors


def read_safetensors_header(
    path: str | os.PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a ``.safetensors`` header without reading tensor data.

    Checks: the 8-byte header length is sane and inside the file, the header is a JSON object, every dtype is
    known, every ``data_offsets`` range lies inside the file and matches ``prod(shape) * itemsize``. A file cut
    short (interrupted download / copy) fails here with a message saying so. ``max_header_bytes`` lets a format
    with small headers (codec token files) refuse a huge one before reading it.

    Returns ``(tensors, metadata)``: ``{name: TensorInfo}`` and the ``__metadata__`` string map.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: {file_size} bytes is too short for a safetensors file (truncated?)."
            )
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > max_header_bytes or header_size > file_size - 8:
            raise CheckpointError(
                f"{path}: header claims {header_size} bytes but the file has {file_size} (header length limit "
                f"{max_header_bytes}); the file is truncated or not a safetensors file. Re-download or re-export it."
            )
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header, not valid JSON ({err}).") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object).")

    data_size = file_size - 8 - header_size
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}.") from err
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}.")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}.")
        info = TensorInfo(tuple(shape), _SAFETENSORS_DTYPES[dtype_name])
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data offsets {[begin, end]}.")
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {list(shape)} {dtype_name} needs {info.nbytes} bytes but the "
                f"header gives {end - begin}; the file is corrupt."
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {end} of the data section but the file holds only "
                f"{data_size} data bytes; the file is truncated. Re-download or re-export it."
            )
        tensors[name] = info
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def load_safetensors(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    expected: Mapping[str, Any] | None = None,
    max_bytes: int | None = None,
    ignore_unexpected: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file after validating its header.

    Args:
        expected: optional ``{name: Tensor | TensorInfo}`` (e.g. from :func:`tensor_infos` on a meta model);
            keys, shapes and dtype kinds are compared *before* any data is read.
        max_bytes: refuse files whose tensors add up to more than this many bytes.
        ignore_unexpected: regexes of key names that may be present without being expected.
    """
    infos, _ = read_safetensors_header(path)
    total = sum(info.nbytes for info in infos.values())
    if max_bytes is not None and total > max_bytes:
        raise CheckpointError(
            f"{path}: tensors total {total / 1e9:.2f} GB, above the limit of {max_bytes / 1e9:.2f} GB."
        )
    if expected is not None:
        check_state_dict(infos, expected, source=str(path), ignore_unexpected=ignore_unexpected)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError types
        raise CheckpointError(f"{path}: could not read tensors ({err}).") from err


# --------------------------------------------------------------------------------------------------- torch.load

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_torch_checkpoint(path: str | os.PathLike, *, max_bytes: int | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors; never falls back to full unpickling.

    Zip-format files (everything ``torch.save`` wrote since torch 1.6) are memory-mapped, so tensor storage is not
    copied into RAM until used. Raises :class:`UnsafeCheckpointError` when the pickle references anything beyond
    tensors and plain containers, and :class:`CheckpointError` for truncated or non-checkpoint files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"{path}: {size / 1e9:.2f} GB is above the limit of {max_bytes / 1e9:.2f} GB.")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with path.open("rb") as handle:
            magic = handle.read(2)
        if magic[:1] != b"\x80" and magic[:2] != b"PK":
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (no zip archive or pickle header found). "
                "If it was being downloaded or copied, the file is probably truncated."
            )
        if magic[:2] == b"PK":
            raise CheckpointError(f"{path}: the zip archive is incomplete (truncated file). Re-download it.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        match = _UNSUPPORTED_GLOBAL.search(str(err))
        what = f"the Python object {match.group(1)!r}" if match else "arbitrary Python objects"
        raise UnsafeCheckpointError(
            f"{path}: refused to load. The file asks to unpickle {what}, and unpickling can run arbitrary code, "
            "so speechlab only loads tensors and plain containers (torch.load(weights_only=True)). If you trust "
            "the file, re-save just its weights and a plain-dict config in a separate, trusted Python session "
            "(torch.save({'cfg': dict(cfg), 'model': state_dict}, 'clean.pt')) or convert it to safetensors."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path}: could not read the checkpoint ({type(err).__name__}: {err}). The file is probably "
            "truncated or corrupt; re-download or re-export it."
        ) from err


# --------------------------------------------------------------------------------------------------- checks


def check_state_dict(
    found: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    source: str,
    ignore_unexpected: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
) -> None:
    """Compare a checkpoint's tensors with a model's; raise one :class:`CheckpointError` listing every problem.

    Values may be tensors or :class:`TensorInfo`. Floating tensors may differ in float precision (they are cast
    on load); a floating parameter stored as an integer tensor (or vice versa) is an error. A found floating
    tensor holding NaN/inf (a diverged or damaged checkpoint) is an error too: a model built from it would turn
    every input into NaN features, silently.
    """
    found_i = {k: _info(v) for k, v in found.items()}
    expected_i = {k: _info(v) for k, v in expected.items()}
    skip_unexp = [re.compile(p) for p in ignore_unexpected]
    skip_miss = [re.compile(p) for p in ignore_missing]
    missing = [k for k in expected_i if k not in found_i and not any(p.fullmatch(k) for p in skip_miss)]
    unexpected = [k for k in found_i if k not in expected_i and not any(p.fullmatch(k) for p in skip_unexp)]
    mismatched = []
    for key in expected_i.keys() & found_i.keys():
        want, have = expected_i[key], found_i[key]
        if want.shape != have.shape:
            mismatched.append(f"{key}: checkpoint {list(have.shape)} vs model {list(want.shape)}")
        elif want.dtype.is_floating_point != have.dtype.is_floating_point:
            mismatched.append(f"{key}: checkpoint dtype {have.dtype} vs model {want.dtype}")
    nonfinite = [
        f"{key} ({int((~torch.isfinite(value)).sum())} of {value.numel()})"
        for key, value in found.items()
        if key in expected_i
        and isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.device.type != "meta"
        and not bool(torch.isfinite(value).all())
    ]
    if not (missing or unexpected or mismatched or nonfinite):
        return
    lines = [f"{source}: checkpoint does not match the model built from its config."]
    if nonfinite and not (missing or unexpected or mismatched):
        lines = [f"{source}: checkpoint weights hold NaN/inf values."]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mismatches", mismatched),
        ("tensors with NaN/inf values", nonfinite),
    ):
        if items:
            shown = sorted(items)[:20]
            more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
            lines.append(f"  {len(items)} {title}: " + ", ".join(shown) + more)
    if missing or unexpected or mismatched:
        lines.append(
            "  Check that config.json belongs to these weights (family, sizes, conv_norm, layer count)."
        )
    if nonfinite:
        lines.append(
            "  The weights are corrupt (training diverged or the file is damaged): use an earlier checkpoint or "
            "re-download / re-export this one."
        )
    raise CheckpointError("\n".join(lines))


DEFAULT_CONFIG_LIMITS: dict[str, int] = {
    # generous upper bounds: 4x the largest public speech SSL models; anything above is a corrupt or hostile file
    "hidden_size": 16384,
    "num_layers": 256,
    "num_heads": 256,
    "ffn_size": 65536,
    "pos_conv_kernel": 1024,
    "num_buckets": 100000,
    "max_distance": 1000000,
    "vocab_size": 1000000,
    "channels": 16384,
    "kernel": 4096,
    "stride": 4096,
    # Hugging Face config.json names
    "num_hidden_layers": 256,
    "num_attention_heads": 256,
    "intermediate_size": 65536,
    "conv_dim": 16384,
    "conv_kernel": 4096,
    "conv_stride": 4096,
    "num_conv_pos_embeddings": 1024,
    "max_bucket_distance": 1000000,
}
MAX_PARAMETERS = 20_000_000_000


def check_config_limits(
    values: Mapping[str, Any],
    *,
    source: str,
    limits: Mapping[str, int] = DEFAULT_CONFIG_LIMITS,
    max_parameters: int = MAX_PARAMETERS,
) -> None:
    """Refuse absurd sizes before a model is built (and memory allocated).

    Every integer field whose name is in ``limits`` must lie in ``[0, limit]`` (searched recursively through
    nested dicts / lists, e.g. ``conv_layers``). A rough transformer parameter estimate
    ``12 * num_layers * hidden_size**2`` is also checked against ``max_parameters``.
    """

    def visit(obj: Any, where: str) -> None:
        if isinstance(obj, Mapping):
            for key, value in obj.items():
                field = f"{where}.{key}" if where else str(key)
                if key in limits:
                    values = value if isinstance(value, list | tuple) else [value]
                    for v in values:
                        if (
                            isinstance(v, int | float)
                            and not isinstance(v, bool)
                            and not (0 <= v <= limits[key])
                        ):
                            raise CheckpointError(
                                f"{source}: config field {field}={value} is outside [0, {limits[key]}]; the config "
                                "is corrupt or not a speech model config."
                            )
                visit(value, field)
        elif isinstance(obj, list | tuple):
            for i, item in enumerate(obj):
                visit(item, f"{where}[{i}]")

    def estimate(obj: Mapping[str, Any]) -> None:
        layers = obj.get("num_layers", obj.get("num_hidden_layers"))
        width = obj.get("hidden_size")
        if isinstance(layers, int) and isinstance(width, int):
            size = 12 * layers * width * width
            if size > max_parameters:
                raise CheckpointError(
                    f"{source}: num_layers={layers}, hidden_size={width} means ~{size / 1e9:.1f} B parameters, "
                    f"above the limit of {max_parameters / 1e9:.0f} B; refusing to allocate it."
                )
        for value in obj.values():  # nested model configs (a CTC model's encoder, UniSpeech's backbone)
            if isinstance(value, Mapping):
                estimate(value)

    visit(values, "")
    estimate(values)
