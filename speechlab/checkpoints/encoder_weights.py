"""Encoder weights for fine-tuning, from a speechlab Lightning checkpoint or any source ``speechlab.load`` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from speechlab.checkpoints import registry
from speechlab.checkpoints.safe_load import load_torch_checkpoint
from speechlab.models.ssl_encoder import SSLEncoder

__all__ = ["find_encoder", "load_encoder", "encoder_state_from_lightning", "load_encoder_state_dict"]


def find_encoder(model: nn.Module) -> SSLEncoder:
    """The :class:`SSLEncoder` inside ``model`` (the model itself, ``model.encoder``, or the first submodule)."""
    if isinstance(model, SSLEncoder):
        return model
    for name in ("encoder", "backbone"):
        candidate = getattr(model, name, None)
        if isinstance(candidate, SSLEncoder):
            return candidate
    for module in model.modules():
        if isinstance(module, SSLEncoder):
            return module
    raise TypeError(
        f"FeatureExtractor needs a model with an SSLEncoder backbone (WavLM / HuBERT / wav2vec2 / UniSpeech); "
        f"got {type(model).__name__}."
    )


def load_encoder(source: str) -> SSLEncoder:
    """The SSL encoder of any source ``speechlab.load`` reads (run folder, .ckpt, pretrained / HF dir, hub id, .pt)."""
    return find_encoder(registry.load(source))


def encoder_state_from_lightning(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Pick the ``SSLEncoder`` weights out of a task's state dict, whatever attribute path the task uses.

    The encoder is found by its conv feature encoder: every key sharing the prefix in front of
    ``feature_encoder.`` belongs to it (``model.encoder.`` for CTC, ``encoder.`` for pretraining tasks).
    """
    prefixes = {key.split("feature_encoder.")[0] for key in state_dict if "feature_encoder." in key}
    if len(prefixes) != 1:
        raise ValueError(
            f"{source}: expected exactly one SSL encoder in the checkpoint, found prefixes {sorted(prefixes)}; "
            "pass a checkpoint of a speechlab task that has one encoder"
        )
    prefix = prefixes.pop()
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def load_encoder_state_dict(source: str) -> dict[str, torch.Tensor]:
    """``SSLEncoder`` state dict from a Lightning ``.ckpt`` or any ``speechlab.load`` source (safe loading only)."""
    if Path(source).suffix == ".ckpt":
        checkpoint = load_torch_checkpoint(source)
        if "state_dict" not in checkpoint:
            raise ValueError(f"{source}: not a Lightning checkpoint (no 'state_dict' entry)")
        return encoder_state_from_lightning(checkpoint["state_dict"], source)
    model = registry.load(source)
    encoder = getattr(model, "encoder", model)
    return encoder.state_dict()
