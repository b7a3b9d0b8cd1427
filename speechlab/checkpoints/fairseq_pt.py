"""Reader for original fairseq / unilm checkpoint files (``WavLM-Base+.pt``: a dict with ``cfg`` and ``model``).

Read with ``torch.load(weights_only=True)`` (memory-mapped), the cfg checked against size limits (fairseq names
included) and its ``conv_feature_layers`` expression bounded before it is expanded, then converted by
:mod:`speechlab.checkpoints.unilm` and the weights checked against the model's shapes. A file that turns out to
be a Lightning checkpoint (a ``.ckpt`` renamed ``.pt``) is handed to :mod:`speechlab.checkpoints.lightning_ckpt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from speechlab.checkpoints import registry, unilm
from speechlab.checkpoints.hf_dir import build_checked_encoder
from speechlab.checkpoints.pretrained_dir import config_to_dict
from speechlab.checkpoints.safe_load import (
    DEFAULT_CONFIG_LIMITS,
    CheckpointError,
    check_config_limits,
    load_torch_checkpoint,
)

__all__ = ["SUFFIXES", "detect", "read", "read_fairseq_checkpoint"]

SUFFIXES = (".pt", ".pth", ".bin")
_FAIRSEQ_LIMITS = {"encoder_layers": 256, "encoder_embed_dim": 16384, "encoder_ffn_embed_dim": 65536,
                   "encoder_attention_heads": 256, "conv_pos": 1024}  # fmt: skip


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def read(path: Path) -> nn.Module:
    checkpoint = load_torch_checkpoint(path)
    if isinstance(checkpoint, dict) and "pytorch-lightning_version" in checkpoint:  # a .ckpt renamed .pt
        # the Lightning reader (through the registry: reading a fairseq file must not import Lightning)
        lightning_ckpt = registry.reader("lightning_ckpt").implementation()
        if lightning_ckpt.is_lightning_checkpoint(checkpoint):
            return lightning_ckpt.read_checkpoint(checkpoint, str(path))
    return read_fairseq_checkpoint(checkpoint, path)


def read_fairseq_checkpoint(checkpoint: Any, path: Path) -> nn.Module:
    """unilm WavLM / fairseq HuBERT / wav2vec2 checkpoint dict -> SSLEncoder, validated before it is built."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "cfg" not in checkpoint:
        found = (
            sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        )
        raise CheckpointError(
            f"{path}: expected a fairseq/unilm checkpoint (a dict with 'cfg' and 'model'), found {found}. "
            "speechlab pretrained directories and Hugging Face directories are loaded by passing the directory."
        )
    cfg = checkpoint["cfg"]
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: 'cfg' must be a plain dict, found {type(cfg).__name__}.")
    model_cfg = cfg["model"] if isinstance(cfg.get("model"), dict) else cfg
    check_config_limits(model_cfg, source=str(path), limits={**DEFAULT_CONFIG_LIMITS, **_FAIRSEQ_LIMITS})
    # conv_feature_layers is bounded while it is parsed (unilm.parse_conv_feature_layers)
    try:
        config = unilm.config_from_unilm(cfg)
        check_config_limits(config_to_dict(config), source=str(path))
        state = unilm.state_dict_from_unilm(checkpoint["model"], config)
    except (KeyError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot convert the fairseq/unilm checkpoint: {err}") from err
    return build_checked_encoder(config, state, str(path))
