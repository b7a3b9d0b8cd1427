"""Reader for Lightning ``.ckpt`` files of speechlab tasks: the model a run trained, ready to use.

=========================  =============================================================================
task                       what ``read`` gives
=========================  =============================================================================
``CTCTask``                :class:`~speechlab.models.ctc.CTCModel` with ``.tokenizer`` (the checkpoint's
                           ``tokenizer_files``) and the architecture of its ``encoder_config``
``WavLMPretrainTask``      the encoder of its :class:`~speechlab.models.wavlm.WavLM` (``SSLEncoder``, or
                           ``FbankConformerEncoder``; the unit prediction head is for pretraining only)
``UniSpeechTask``          :class:`~speechlab.models.unispeech.UniSpeech` (backbone = ``model.encoder``)
``CodecTask``              :class:`~speechlab.models.codec.Codec`: the EMA generator when the run kept one
                           (what validation and export use), else the trained generator
=========================  =============================================================================

The task is named by the checkpoint's ``hyper_parameters._class_path`` (written by ``speechlab fit``) or, for
checkpoints from ``build_trainer``, recognised by the parameter names of its state dict. The file is read with
``torch.load(weights_only=True)``; the architecture comes from plain values in the checkpoint (preset names and
overrides, ``encoder_config``), is checked against the config limits, built on the meta device and compared with
the stored tensors (one error listing missing / unexpected keys and shape mismatches) before anything is loaded.
Nothing is instantiated from the checkpoint's class paths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechlab.checkpoints.pretrained_dir import config_from_dict, config_to_dict
from speechlab.checkpoints.safe_load import (
    CheckpointError,
    check_config_limits,
    check_state_dict,
    load_torch_checkpoint,
    tensor_infos,
)
from speechlab.data.text import tokenizer_from_files
from speechlab.models.codec import Codec, CodecConfig
from speechlab.models.ctc import CTCConfig, CTCModel, encoder_config_from_dict
from speechlab.models.registry import build_config
from speechlab.models.unispeech import UniSpeech
from speechlab.models.wavlm import WavLM
from speechlab.tasks.unispeech import unispeech_config
from speechlab.tasks.wavlm_pretrain import is_wavlm_pretrain_state, upgrade_wavlm_pretrain_state, wavlm_config

__all__ = ["detect", "read", "read_checkpoint", "is_lightning_checkpoint", "task_kind", "TASK_CLASSES"]

TASK_CLASSES = {
    "speechlab.tasks.ctc.CTCTask": "ctc",
    "speechlab.tasks.wavlm_pretrain.WavLMPretrainTask": "wavlm_pretrain",
    "speechlab.tasks.unispeech.UniSpeechTask": "unispeech",
    "speechlab.tasks.codec.CodecTask": "codec",
}


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".ckpt"


def read(path: Path) -> nn.Module:
    checkpoint = load_torch_checkpoint(path)
    if not is_lightning_checkpoint(checkpoint):
        found = (
            sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        )
        raise CheckpointError(
            f"{path}: not a Lightning checkpoint (expected 'state_dict' and 'pytorch-lightning_version', found "
            f"{found}). A fairseq/unilm checkpoint should be named .pt."
        )
    return read_checkpoint(checkpoint, str(path))


def is_lightning_checkpoint(checkpoint: Any) -> bool:
    return (
        isinstance(checkpoint, dict)
        and "state_dict" in checkpoint
        and "pytorch-lightning_version" in checkpoint
    )


def task_kind(checkpoint: dict, source: str = "checkpoint") -> str:
    """Which speechlab task wrote ``checkpoint``: ``ctc``, ``wavlm_pretrain``, ``unispeech`` or ``codec``."""
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path") if isinstance(hparams, dict) else None
    if class_path in TASK_CLASSES:
        return TASK_CLASSES[class_path]
    keys = set(checkpoint["state_dict"])
    if "tokenizer_files" in checkpoint and "model.head.weight" in keys:
        return "ctc"
    if any(k.startswith("codec.") for k in keys):
        return "codec"
    if "model.quantizer.codevectors" in keys or "model.ctc_proj.weight" in keys:
        return "unispeech"
    if is_wavlm_pretrain_state(keys):
        return "wavlm_pretrain"
    prefixes = sorted({k.split(".")[0] for k in keys})
    raise CheckpointError(
        f"{source}: a Lightning checkpoint of an unknown task ({class_path or 'no _class_path'}, parameters under "
        f"{prefixes}); speechlab.load reads checkpoints of {', '.join(TASK_CLASSES)}."
    )


def read_checkpoint(checkpoint: dict, source: str) -> nn.Module:
    """The usable model inside an already loaded (``weights_only``) Lightning checkpoint dict."""
    kind = task_kind(checkpoint, source)
    hparams = checkpoint.get("hyper_parameters") or {}
    try:
        return _BUILDERS[kind](checkpoint, hparams, source)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"{source}: cannot rebuild the {kind} model from this checkpoint: {err}"
        ) from err


def _sub_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _build_and_load(make: Callable[[], nn.Module], state: dict[str, Tensor], source: str) -> nn.Module:
    """Build on the meta device (nothing allocated), compare shapes, then build for real and load strictly."""
    try:
        with torch.device("meta"):
            expected = tensor_infos(make())
    except CheckpointError:
        raise
    except Exception:  # a model that cannot be built on the meta device: compare after building it
        expected = None
    if expected is not None:
        check_state_dict(state, expected, source=source)
    model = make()
    if expected is None:
        check_state_dict(state, model.state_dict(), source=source)
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------------------ per task


def _ctc(checkpoint: dict, hparams: dict, source: str) -> nn.Module:
    values = checkpoint.get("encoder_config")
    files = checkpoint.get("tokenizer_files")
    if not isinstance(values, dict) or not isinstance(files, dict):
        raise CheckpointError(f"{source}: a CTC checkpoint without 'encoder_config' and 'tokenizer_files'.")
    check_config_limits(values, source=source)
    try:
        encoder = encoder_config_from_dict(values, source=source)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    state = _sub_state(checkpoint["state_dict"], "model.")
    head = state.get("head.weight")
    if head is None:
        raise CheckpointError(f"{source}: no model.head.weight in the CTC checkpoint.")
    config = CTCConfig(encoder, int(head.shape[0]), float(hparams.get("head_dropout", 0.1)))
    check_config_limits(config_to_dict(config), source=source)
    try:  # in memory, only units.json / spm.model accepted: a crafted name cannot reach the file system
        tokenizer = tokenizer_from_files(files, source)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: the stored tokenizer cannot be read ({err}).") from err
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{source}: the stored tokenizer has {tokenizer.vocab_size} units but the CTC head {config.vocab_size}."
        )
    model = _build_and_load(lambda: CTCModel(config), state, source)
    model.tokenizer = tokenizer
    return model


def _wavlm_pretrain(checkpoint: dict, hparams: dict, source: str) -> nn.Module:
    """The encoder of the pretraining model (the prediction head is for pretraining only), checked with it."""
    config = wavlm_config(hparams)
    check_config_limits(config_to_dict(config), source=source)
    state = _sub_state(upgrade_wavlm_pretrain_state(checkpoint["state_dict"]), "model.")
    return _build_and_load(lambda: WavLM(config), state, source).encoder


def _unispeech(checkpoint: dict, hparams: dict, source: str) -> nn.Module:
    state = _sub_state(checkpoint["state_dict"], "model.")
    ctc = state.get("ctc_proj.weight")
    if ctc is None:
        raise CheckpointError(f"{source}: no model.ctc_proj.weight in the UniSpeech checkpoint.")
    config = unispeech_config(
        hparams.get("model", "unispeech_tiny"),
        int(ctc.shape[0]),
        hparams.get("model_overrides"),
        hparams.get("encoder_overrides"),
    )
    check_config_limits(config_to_dict(config), source=source)
    return _build_and_load(lambda: UniSpeech(config), state, source)


def _codec(checkpoint: dict, hparams: dict, source: str) -> nn.Module:
    codec = hparams.get("codec", "codec_16khz")
    if isinstance(codec, dict):
        check_config_limits(codec, source=source)
        codec = config_from_dict(CodecConfig, codec, source=source)
    elif not isinstance(codec, str):
        raise CheckpointError(
            f"{source}: hyper_parameters.codec is a {type(codec).__name__}, not a preset name."
        )
    overrides = dict(hparams.get("codec_overrides") or {})
    if hparams.get("teacher_dim"):
        overrides["semantic_dim"] = int(hparams["teacher_dim"])
    try:
        config = build_config("codec", codec, overrides)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}.") from err
    check_config_limits(config_to_dict(config), source=source)
    state = checkpoint["state_dict"]
    prefix = "codec_ema." if any(k.startswith("codec_ema.") for k in state) else "codec."
    return _build_and_load(lambda: Codec(config), _sub_state(state, prefix), source)


_BUILDERS: dict[str, Callable[[dict, dict, str], nn.Module]] = {
    "ctc": _ctc,
    "wavlm_pretrain": _wavlm_pretrain,
    "unispeech": _unispeech,
    "codec": _codec,
}
