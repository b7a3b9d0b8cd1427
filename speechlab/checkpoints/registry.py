"""The checkpoint reader registry behind ``speechlab.load``: one reader per on-disk format, asked in order.

Each reader lives in its own module of :mod:`speechlab.checkpoints` and provides two functions:

* ``detect(path: Path) -> bool`` — cheap: looks at the path, its suffix or a small ``config.json``, never at
  tensor data;
* ``read(path: Path) -> nn.Module`` — the model, loaded safely (``torch.load(weights_only=True)`` or validated
  safetensors, config values checked against limits and shapes checked before weights are loaded).

The built-in readers, in the order they are asked:

=================  ===================================================================================
``run_dir``        a training run folder (``trainer.default_root_dir``): its best checkpoint, else last.ckpt
``pretrained_dir`` a speechlab pretrained directory (``config.json`` with ``family``), every family
``hf_dir``         a Hugging Face directory: WavLM / HuBERT / wav2vec2 / UniSpeech (+ ``*ForCTC``), EnCodec / DAC
``lightning_ckpt`` a Lightning ``.ckpt`` of any speechlab task (CTC, WavLM pretraining, UniSpeech, codec)
``fairseq_pt``     an original fairseq / unilm ``.pt`` (``{"cfg", "model"}``)
=================  ===================================================================================

A new format is one module with ``detect`` and ``read`` plus one :func:`register_reader` call.

:func:`load` is the whole reading path behind ``speechlab.load`` (a Hugging Face hub id is first fetched into the
local cache, see :func:`resolve`), so code below the API (fine-tuning initialisation) reads any source the same way.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from speechlab.checkpoints.hf_dir import HF_MODEL_TYPES
from speechlab.checkpoints.safe_load import CheckpointError, read_json

__all__ = ["Reader", "register_reader", "readers", "reader", "find_reader", "read", "resolve", "load"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class Reader:
    """A checkpoint format: ``module`` holds its ``detect(path)`` and ``read(path)`` (imported when first used).

    ``suffixes``: when given, only files with one of these suffixes are asked, so that recognising any other
    source never imports the module (the Lightning reader imports Lightning).
    """

    name: str
    module: str
    description: str
    suffixes: tuple[str, ...] = ()

    def detect(self, path: Path) -> bool:
        if self.suffixes and not (path.suffix.lower() in self.suffixes and path.is_file()):
            return False
        return bool(self.implementation().detect(path))

    def read(self, path: Path) -> nn.Module:
        return self.implementation().read(path)

    def implementation(self) -> Any:
        """The reader's module (imported now if it was not yet)."""
        return importlib.import_module(self.module)


_READERS: list[Reader] = [
    Reader(
        "run_dir", "speechlab.checkpoints.run_dir", "a training run folder (best checkpoint, else last.ckpt)"
    ),
    Reader("pretrained_dir", "speechlab.checkpoints.pretrained_dir", "a speechlab pretrained directory"),
    Reader("hf_dir", "speechlab.checkpoints.hf_dir", "a Hugging Face model directory"),
    Reader(
        "lightning_ckpt",
        "speechlab.checkpoints.lightning_ckpt",
        "a Lightning .ckpt of a speechlab task",
        suffixes=(".ckpt",),
    ),
    Reader(
        "fairseq_pt",
        "speechlab.checkpoints.fairseq_pt",
        "a fairseq / unilm .pt checkpoint",
        suffixes=(".pt", ".pth", ".bin"),
    ),
]


def register_reader(
    name: str, module: str, description: str, *, before: str | None = None, suffixes: tuple[str, ...] = ()
) -> None:
    """Add (or replace) a reader; ``before`` names the reader it is asked ahead of (default: asked last);
    ``suffixes`` (optional) the only file suffixes it is asked about."""
    global _READERS
    kept = [r for r in _READERS if r.name != name]
    reader = Reader(name, module, description, suffixes)
    if before is None:
        kept.append(reader)
    else:
        names = [r.name for r in kept]
        if before not in names:
            raise ValueError(f"register_reader: no reader named {before!r}; readers: {names}")
        kept.insert(names.index(before), reader)
    _READERS = kept


def readers() -> list[Reader]:
    """The registered readers, in the order ``find_reader`` asks them."""
    return list(_READERS)


def reader(name: str) -> Reader:
    """The registered reader called ``name``."""
    for candidate in _READERS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no checkpoint reader named {name!r}; readers: {[r.name for r in _READERS]}")


def find_reader(path: str | os.PathLike) -> Reader:
    """The first reader that recognises ``path``; otherwise a :class:`CheckpointError` saying what was found."""
    path = Path(path)
    for reader in _READERS:
        if reader.detect(path):
            return reader
    raise CheckpointError(_unrecognised(path))


def read(path: str | os.PathLike) -> nn.Module:
    """Load ``path`` with the reader that recognises it."""
    path = Path(path)
    return find_reader(path).read(path)


def load(
    source: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> nn.Module:
    """Read ``source``: a local path (any registered format) or a Hugging Face hub id (see :func:`resolve`)."""
    return read(resolve(source, revision=revision, cache_dir=cache_dir))


def resolve(
    source: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """``source`` as a local path: an existing path as is, else a hub id downloaded (or found in the cache)."""
    path = Path(source)
    if path.exists():
        return path
    return _snapshot(str(source), revision=revision, cache_dir=cache_dir)


def _snapshot(repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    """Download (or find in the cache) a hub model; weights only as safetensors / .bin / .pt, never code."""
    if not _HUB_ID.match(repo_id) or repo_id.count("/") > 1:
        raise CheckpointError(
            f"{repo_id}: no such file or directory, and not a valid Hugging Face hub id (expected 'org/name')."
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError(f"{repo_id}: not a local path, and huggingface_hub is not installed.") from err
    patterns = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "pytorch_model*.bin"]
    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    errors = []
    for local_only in (False, True):
        try:
            return Path(snapshot_download(repo_id, local_files_only=local_only, **kwargs))
        except Exception as err:  # network errors, offline mode, missing repo: try the cache, then explain
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise CheckpointError(
        f"{repo_id}: not a local path, could not be downloaded from the Hugging Face hub and is not in the local "
        f"cache ({errors[-1]}). Check the id and your connection, or download it once with network access "
        "(or pass a local directory)."
    )


def _unrecognised(path: Path) -> str:
    formats = "; ".join(f"{r.description} ({r.name})" for r in _READERS)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            return (
                f"{path}: no config.json and no checkpoints/ folder; expected a speechlab pretrained directory, "
                f"a Hugging Face model directory (config.json + model.safetensors) or a training run folder. "
                f"Readable formats: {formats}."
            )
        config = read_json(config_path)
        model_type = config.get("model_type")
        if model_type is None:
            return (
                f"{config_path}: neither a speechlab config (no 'family') nor a Hugging Face config (no "
                "'model_type')."
            )
        return (
            f"{config_path}: unsupported model_type {model_type!r}; speechlab.load reads "
            f"{', '.join(HF_MODEL_TYPES)} Hugging Face checkpoints."
        )
    if path.is_file():
        return (
            f"{path}: unsupported checkpoint file type {path.suffix!r}; expected a Lightning .ckpt, a fairseq/unilm "
            ".pt/.pth/.bin file or a directory (speechlab pretrained, Hugging Face, or a training run folder)."
        )
    return f"{path}: no such file or directory."
