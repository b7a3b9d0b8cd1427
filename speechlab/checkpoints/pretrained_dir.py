"""speechlab's pretrained directory: ``config.json`` + ``model.safetensors`` (+ tokenizer files) + ``README.md``.

Layout::

    my-model/
      config.json          {"family": "wavlm", "speechlab_version": "0.1.0", "config": {every hyperparameter},
                            "tokenizer": {"class": "speechlab.data.text.CharTokenizer"} (optional)}
      model.safetensors    the model's state_dict (plain tensors, no pickle)
      README.md            short model card
      (tokenizer files)    written by the tokenizer's own save method

Families map a name to a config dataclass + model class (:data:`FAMILIES`, :func:`register_family`): the SSL
backbones (``wavlm``, ``hubert``, ``wav2vec2``, ``ssl_encoder``), ``fbank_conformer``, ``ctc``, ``unispeech``,
``codec``; this module imports their classes (checkpoints sit above models).
Loading validates config values, builds the model on the meta device to learn the expected tensor shapes, checks the
safetensors header against them (missing / unexpected keys, shape mismatches: one error listing all), and only then
allocates and loads.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import speechlab
from speechlab.atomic import atomic_write, write_text
from speechlab.checkpoints.safe_load import (
    CheckpointError,
    check_config_limits,
    check_state_dict,
    load_safetensors,
    read_json,
    tensor_infos,
)
from speechlab.models import registry
from speechlab.models.codec import Codec, CodecConfig
from speechlab.models.ctc import CTCConfig, CTCModel
from speechlab.models.fbank_conformer import FbankConformerConfig, FbankConformerEncoder
from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig
from speechlab.models.unispeech import UniSpeech, UniSpeechConfig

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "register_family",
    "family_classes",
    "config_to_dict",
    "config_from_dict",
    "build_model",
    "save_pretrained",
    "load_pretrained",
    "load_pretrained_codec",
    "read_pretrained_config",
    "load_tokenizer",
    "is_pretrained_dir",
    "atomic_write",
    "speechlab_version",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_SSL = (SSLEncoderConfig, SSLEncoder)
# family -> (config class, model class); the model class takes the config as its only constructor argument
FAMILIES: dict[str, tuple[type, type]] = {
    "wavlm": _SSL,
    "hubert": _SSL,
    "wav2vec2": _SSL,
    "ssl_encoder": _SSL,
    "unispeech": (UniSpeechConfig, UniSpeech),
    "codec": (CodecConfig, Codec),
    "ctc": (CTCConfig, CTCModel),
    "fbank_conformer": (FbankConformerConfig, FbankConformerEncoder),
}


def register_family(name: str, config_cls: type, model_cls: type) -> None:
    """Register a model family for save/load: ``register_family("my_model", MyConfig, MyModel)``.
    The model class must take the config as its only constructor argument and keep it as ``model.config``."""
    FAMILIES[name] = (config_cls, model_cls)


def family_classes(family: str, *, source: str = "") -> tuple[type, type]:
    """``(config_cls, model_cls)`` of a registered family; unknown names are a clear error."""
    entry = FAMILIES.get(family)
    if entry is None:
        where = f"{source}: " if source else ""
        raise CheckpointError(
            f"{where}unknown model family {family!r}; known families: {', '.join(sorted(FAMILIES))}. "
            "Upgrade speechlab or register the family with speechlab.checkpoints.pretrained_dir.register_family."
        )
    return entry


def speechlab_version() -> str:
    """Installed speechlab version (package metadata, else ``speechlab.__version__``, else ``"0+unknown"``)."""
    try:
        return importlib.metadata.version("speechlab")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(speechlab, "__version__", "0+unknown"))


# --------------------------------------------------------------------------------------------------- config <-> json


def config_to_dict(config: Any) -> dict[str, Any]:
    """Every field of a config dataclass as JSON-ready values (tuples become lists)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"expected a config dataclass, got {type(config).__name__}")
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any], *, source: str = "config", prefix: str = "") -> Any:
    """:func:`speechlab.models.registry.config_from_dict` (unknown fields and invalid values are errors naming
    them), reported as a :class:`CheckpointError`."""
    try:
        return registry.config_from_dict(cls, data, source=source, prefix=prefix)
    except ValueError as err:
        raise CheckpointError(str(err)) from err


def build_model(family: str, config: Any, *, source: str = "") -> nn.Module:
    """Instantiate a registered family's model from a config dataclass or dict (validated against limits)."""
    config_cls, model_cls = family_classes(family, source=source)
    if isinstance(config, dict):
        check_config_limits(config, source=source or family)
        config = config_from_dict(config_cls, config, source=source or family)
    else:
        check_config_limits(config_to_dict(config), source=source or family)
    return model_cls(config)


def _meta_model(family: str, config: Any, source: str) -> nn.Module | None:
    """Build on the meta device (no memory) to learn the expected shapes; None if the model cannot be built there."""
    try:
        with torch.device("meta"):
            return build_model(family, config, source=source)
    except CheckpointError:
        raise
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------- atomic writes


def _write_text(path: Path, text: str) -> None:
    write_text(path, text)


# --------------------------------------------------------------------------------------------------- save / load


def _codec_card(codec: Codec) -> str:
    c = codec.config
    return (
        f"# speechlab codec\n\n{c.sample_rate} Hz mono, hop {c.hop_length} ({c.frame_rate:g} Hz frames), "
        f"{c.num_quantizers} x {c.codebook_size} codes ({c.bitrate() / 1000:g} kbps at full n_q), "
        f"{'causal/streaming' if c.causal else 'non-causal'}. Codebook hash `{codec.codebook_hash()}`.\n\n"
        "```python\nfrom speechlab.checkpoints.pretrained_dir import load_pretrained_codec\n"
        "codec = load_pretrained_codec(path)\n"
        "codes, frame_lengths = codec.encode(audio, lengths)\naudio = codec.decode(codes, frame_lengths)\n```\n"
    )


def _model_card(family: str, config: dict[str, Any], num_params: int, version: str, name: str) -> str:
    backbone = config.get("encoder") if isinstance(config.get("encoder"), dict) else config
    size = {k: backbone[k] for k in ("num_layers", "hidden_size", "num_heads", "ffn_size") if k in backbone}
    sizes = ", ".join(f"{k}={v}" for k, v in size.items())
    if family == "ctc":
        return (
            f"# {name}\n\n"
            f"A speechlab **CTC** speech recognition model ({num_params / 1e6:.2f} M parameters"
            f"{', ' + sizes if sizes else ''}, {config.get('vocab_size')} units), saved by speechlab {version}.\n\n"
            "```python\nimport speechlab\n\n"
            f'transcriber = speechlab.Transcriber(speechlab.load("{name}"))\n'
            'print(transcriber(["a.wav"])[0].text)\n```\n\n'
            "or `speechlab transcribe --model DIR a.wav`. Files: `config.json` (family + every hyperparameter), "
            "`model.safetensors` (weights), `units.json` (the unit inventory; `spm.model` for sentencepiece). "
            "Training data, licence and evaluation results: add them here.\n"
        )
    return (
        f"# {name}\n\n"
        f"A speechlab **{family}** model ({num_params / 1e6:.2f} M parameters{', ' + sizes if sizes else ''}), "
        f"saved by speechlab {version}.\n\n"
        "```python\nimport speechlab\n\n"
        f'model = speechlab.load("{name}")\n'
        "features = speechlab.FeatureExtractor(model)(waveform)  # waveform: (samples,) float32, 16 kHz\n```\n\n"
        "Files: `config.json` (family + every hyperparameter), `model.safetensors` (weights). "
        "Training data, licence and evaluation results: add them here.\n"
    )


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    family: str,
    tokenizer: Any = None,
    config: Any = None,
    model_card: str | None = None,
) -> Path:
    """Write ``model`` as a speechlab pretrained directory (see module docstring). Returns the directory.

    Args:
        family: registered family name (``"wavlm"``, ``"hubert"``, ``"wav2vec2"``, ...), stored in config.json.
        tokenizer: optional object with ``save_pretrained(directory)`` or ``save(directory)``; its class is
            recorded so :func:`load_tokenizer` can restore it.
        config: the config dataclass; default ``model.config``.
        model_card: README.md text; default a short generated card.
    """
    family_classes(family)  # unknown family -> clear error before writing anything
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)  # a CTC model carries its unit inventory
    if family == "ctc" and tokenizer is None:
        raise ValueError("save_pretrained(family='ctc'): the model has no tokenizer; pass tokenizer=...")
    config = config if config is not None else getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise ValueError(f"save_pretrained: {type(model).__name__} has no config dataclass; pass config=...")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    version = speechlab_version()

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_write(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "family": family, "speechlab_version": version})

    record: dict[str, Any] = {
        "family": family,
        "speechlab_version": version,
        "config": config_to_dict(config),
    }
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(directory)
        elif hasattr(tokenizer, "save"):
            tokenizer.save(directory)
        else:
            raise TypeError(f"tokenizer {type(tokenizer).__name__} has neither save_pretrained() nor save()")
        cls = type(tokenizer)
        record["tokenizer"] = {"class": f"{cls.__module__}.{cls.__qualname__}"}

    num_params = sum(t.numel() for t in state.values())
    if model_card is None and isinstance(model, Codec):
        model_card = _codec_card(model)
    card = model_card or _model_card(family, record["config"], num_params, version, directory.name)
    _write_text(directory / "README.md", card)

    # config.json last: its presence marks a complete directory
    _write_text(directory / CONFIG_NAME, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return directory


def is_pretrained_dir(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a speechlab config.json (``family`` + ``speechlab_version``)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        data = read_json(path)
    except CheckpointError:
        return False
    return "family" in data and "speechlab_version" in data


def read_pretrained_config(directory: str | os.PathLike) -> tuple[str, Any]:
    """``(family, config dataclass)`` from ``directory/config.json``, validated (limits, known fields)."""
    path = Path(directory) / CONFIG_NAME
    data = read_json(path)
    for key in ("family", "config"):
        if key not in data:
            raise CheckpointError(
                f"{path}: missing field {key!r}; this is not a speechlab pretrained directory."
            )
    family, values = data["family"], data["config"]
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: field 'config' must be an object.")
    config_cls, _ = family_classes(family, source=str(path))
    check_config_limits(values, source=str(path))
    return family, config_from_dict(config_cls, values, source=str(path))


def load_pretrained(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", max_bytes: int | None = None
) -> nn.Module:
    """Load a speechlab pretrained directory; returns the model in eval mode on ``device``.

    Raises :class:`CheckpointError` naming the file for: missing files, bad config values, truncated weights,
    missing / unexpected keys and shape mismatches (all listed in one message).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory.")
    family, config = read_pretrained_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(
            f"{weights}: missing; a pretrained directory needs {WEIGHTS_NAME} next to config.json."
        )
    meta = _meta_model(family, config, str(directory))
    expected = tensor_infos(meta) if meta is not None else None
    state = load_safetensors(weights, expected=expected, max_bytes=max_bytes)
    model = build_model(family, config, source=str(directory))
    load_state_checked(model, state, source=str(weights))
    if hasattr(model, "tokenizer"):  # CTC models: restore the unit inventory saved next to the weights
        model.tokenizer = load_tokenizer(directory)
        size = getattr(model.tokenizer, "vocab_size", None)
        if size is not None and size != getattr(config, "vocab_size", size):
            raise CheckpointError(
                f"{directory}: the saved tokenizer has {size} units but the model head has {config.vocab_size}; "
                "the tokenizer files do not belong to these weights."
            )
    return model.to(device).eval()


def load_pretrained_codec(
    directory: str | os.PathLike, device: str | torch.device = "cpu", fold: bool = True
) -> Codec:
    """A codec directory written by :func:`save_pretrained` (``family="codec"``), eval mode; ``fold``: weight
    norm folded into plain weights for inference (the directory keeps the parametrization, to resume training)."""
    model = load_pretrained(directory, device=device)
    if not isinstance(model, Codec):
        raise CheckpointError(f"{directory}: holds a {type(model).__name__}, not a speechlab codec")
    return model.fold_weight_norm() if fold else model


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with the one-message error of :func:`check_state_dict`."""
    check_state_dict(state, model.state_dict(), source=source)
    model.load_state_dict(state, strict=True)


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved with the model, or None. Only classes inside the ``speechlab`` package are restored."""
    data = read_json(Path(directory) / CONFIG_NAME)
    spec = data.get("tokenizer")
    if not spec:
        return None
    qualname = str(spec.get("class", ""))
    module_name, _, cls_name = qualname.rpartition(".")
    if not module_name.startswith("speechlab."):
        raise CheckpointError(
            f"{directory}: tokenizer class {qualname!r} is outside speechlab; refusing to import it."
        )
    module = importlib.import_module(module_name)
    cls: Callable[..., Any] = getattr(module, cls_name)
    for loader in ("from_pretrained", "load"):
        if hasattr(cls, loader):
            return getattr(cls, loader)(Path(directory))
    if hasattr(module, "load_tokenizer"):  # speechlab.data.text: one loader for every tokenizer kind
        return module.load_tokenizer(Path(directory))
    raise CheckpointError(f"{directory}: tokenizer class {qualname} has no loader (from_pretrained / load).")


# --------------------------------------------------------------------------------------------------- reader


def detect(path: Path) -> bool:
    """Reader hook (:mod:`speechlab.checkpoints.registry`): a directory with a speechlab ``config.json``."""
    return path.is_dir() and is_pretrained_dir(path)


def read(path: Path) -> nn.Module:
    """Reader hook: :func:`load_pretrained` (every registered family; CTC models get their tokenizer)."""
    return load_pretrained(path)
