"""Hugging Face UniSpeech -> speechlab (config and weights), for fine-tuning and parity tests.

Accepts the state dict of ``UniSpeechModel`` (backbone only, no prefix), ``UniSpeechForPreTraining`` (``unispeech.``
backbone + ``quantizer``, ``project_q``, ``project_hid``, ``ctc_proj``) or ``UniSpeechForCTC`` (``unispeech.`` +
``lm_head``), from a ``save_pretrained`` directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).

The backbone keys and config fields are mapped by :mod:`speechlab.checkpoints.hf_ssl` (shared with WavLM / HuBERT /
wav2vec 2.0); this module adds the UniSpeech heads: ``quantizer.{codevectors,weight_proj}``, ``project_q``,
``project_hid`` -> ``final_proj`` (Linear(proj_codevector_dim -> hidden), docs/pitfalls.md, 9), ``ctc_proj``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from speechlab.checkpoints import hf_files
from speechlab.checkpoints.hf_ssl import config_from_hf as ssl_config_from_hf
from speechlab.checkpoints.hf_ssl import state_dict_from_hf as ssl_state_dict_from_hf
from speechlab.checkpoints.safe_load import (
    CheckpointError,
    read_json,
)
from speechlab.models.unispeech import UniSpeech, UniSpeechConfig

__all__ = [
    "config_from_hf",
    "convert_state_dict",
    "encoder_state_from_hf",
    "load_hf_unispeech",
    "read_hf_directory",
]


def _get(hf: Mapping[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key, default)
    return default if value is None else value


def config_from_hf(hf: Mapping[str, Any]) -> UniSpeechConfig:
    """Map a HF ``UniSpeechConfig`` (``config.json`` dict or ``to_dict()``) to ours; unsupported choices raise.

    The backbone goes through :func:`speechlab.checkpoints.hf_ssl.config_from_hf`; span masking is set to the
    UniSpeech pretraining value (p 0.5, length 10), since HF's ``mask_time_prob`` is fine-tuning SpecAugment.
    """
    hf = dict(hf)
    hf.setdefault("model_type", "unispeech")
    try:
        encoder = ssl_config_from_hf(hf)
    except ValueError as err:
        raise CheckpointError(f"HF UniSpeech config: {err}") from err
    encoder = dataclasses.replace(encoder, mask_prob=0.5, mask_length=10)
    return UniSpeechConfig(
        encoder=encoder,
        num_codevector_groups=int(_get(hf, "num_codevector_groups", 2)),
        num_codevectors_per_group=int(_get(hf, "num_codevectors_per_group", 320)),
        codevector_dim=int(_get(hf, "codevector_dim", 256)),
        proj_codevector_dim=int(_get(hf, "proj_codevector_dim", 256)),
        quantizer_dropout=float(_get(hf, "feat_quantizer_dropout", 0.0)),
        num_ctc_classes=int(_get(hf, "num_ctc_classes", 80)),
        final_dropout=float(_get(hf, "final_dropout", 0.1)),
        swap_prob=float(_get(hf, "replace_prob", 0.5)),
    )


def encoder_state_from_hf(hf_state: Mapping[str, Tensor], config: UniSpeechConfig) -> dict[str, Tensor]:
    """Backbone weights only, as an ``SSLEncoder`` state dict (``unispeech.`` prefix optional; heads ignored)."""
    if config.is_fbank:
        raise CheckpointError(
            "a Hugging Face / fairseq UniSpeech checkpoint has a wav2vec 2.0 backbone and cannot initialise the fbank "
            "Conformer one (unispeech_fbank_tiny); use unispeech_tiny / unispeech_base / unispeech_large"
        )
    out = ssl_state_dict_from_hf(dict(hf_state), config.encoder)
    if not out:
        raise CheckpointError(
            "no UniSpeech backbone keys found (expected feature_extractor.*, encoder.* ...)"
        )
    return out


def convert_state_dict(hf_state: Mapping[str, Tensor], config: UniSpeechConfig) -> dict[str, Tensor]:
    """HF UniSpeech state dict (any of the three classes) -> our ``UniSpeech`` state dict (possibly partial:
    a ``UniSpeechModel`` file has no quantizer / heads; check with ``load_state_dict(strict=False)``)."""
    out = {f"encoder.{k}": v for k, v in encoder_state_from_hf(hf_state, config).items()}
    heads = {
        "quantizer.codevectors": "quantizer.codevectors",
        "quantizer.weight_proj.weight": "quantizer.weight_proj.weight",
        "quantizer.weight_proj.bias": "quantizer.weight_proj.bias",
        "project_q.weight": "project_q.weight",
        "project_q.bias": "project_q.bias",
        "project_hid.weight": "final_proj.weight",
        "project_hid.bias": "final_proj.bias",
        "ctc_proj.weight": "ctc_proj.weight",
        "ctc_proj.bias": "ctc_proj.bias",
    }
    for source, target in heads.items():
        if source in hf_state:
            out[target] = hf_state[source]
    return out


def read_hf_directory(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """``(config dict, state dict)`` of a HF ``save_pretrained`` directory, read without unpickling code."""
    path = Path(path)
    config = read_json(path / "config.json")
    if config.get("model_type") not in (None, "unispeech"):
        raise CheckpointError(
            f"{path / 'config.json'}: model_type={config.get('model_type')!r}, expected 'unispeech'. "
            "For WavLM / wav2vec 2.0 directories use their own importers."
        )
    return hf_files.read_hf_directory(path)


def load_hf_unispeech(path: str | os.PathLike, *, require_heads: bool = False) -> UniSpeech:
    """Build our ``UniSpeech`` from a HF UniSpeech directory.

    Backbone weights must all be present. With ``require_heads`` the quantizer / project_q / final_proj / ctc_proj
    must be too (``UniSpeechForPreTraining``); otherwise missing heads keep their fresh initialisation, which is
    what fine-tuning from a ``UniSpeechModel`` checkpoint needs.
    """
    hf_config, hf_state = read_hf_directory(path)
    config = config_from_hf(hf_config)
    model = UniSpeech(config)
    state = convert_state_dict(hf_state, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    backbone_missing = [k for k in missing if k.startswith("encoder.") and k != "encoder.mask_emb"]
    head_missing = [k for k in missing if not k.startswith("encoder.")]
    if backbone_missing or unexpected or (require_heads and head_missing):
        raise CheckpointError(
            f"{path}: weights do not match the config: missing {backbone_missing + (head_missing if require_heads else [])}"
            f", unexpected {list(unexpected)}. Is this a UniSpeech checkpoint saved by transformers?"
        )
    return model
