"""Hugging Face UniSpeech -> speechlab (config and weights), for fine-tuning and parity tests.

Accepts the state dict of ``UniSpeechModel`` (backbone only, no prefix), ``UniSpeechForPreTraining`` (``unispeech.``
backbone + ``quantizer``, ``project_q``, ``project_hid``, ``ctc_proj``) or ``UniSpeechForCTC`` (``unispeech.`` +
``lm_head``), from a ``save_pretrained`` directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).

Key map (spec §9.3): ``feature_extractor.conv_layers.i.{conv,layer_norm}`` -> ``encoder.feature_encoder.conv_layers.i.
{conv,norm}``; ``feature_projection.layer_norm`` -> ``encoder.feature_norm``; ``feature_projection.projection`` ->
``encoder.feature_projection``; ``masked_spec_embed`` -> ``encoder.mask_emb``; ``encoder.pos_conv_embed.conv`` ->
``encoder.encoder.pos_conv.conv`` (both weight-norm spellings: ``weight_g/weight_v`` and
``parametrizations.weight.original0/1``); per layer ``layer_norm`` -> ``attention_norm``, ``final_layer_norm`` ->
``ffn_norm``, ``feed_forward.intermediate_dense/output_dense`` -> ``feed_forward.fc1/fc2``; heads
``quantizer.{codevectors,weight_proj}``, ``project_q``, ``project_hid`` -> ``final_proj``, ``ctc_proj``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from speechlab.checkpoints.safe_load import (
    CheckpointError,
    load_safetensors,
    load_torch_checkpoint,
    read_json,
)
from speechlab.models.ssl_encoder import SSLEncoderConfig
from speechlab.models.unispeech import UniSpeech, UniSpeechConfig

__all__ = [
    "config_from_hf",
    "convert_state_dict",
    "encoder_state_from_hf",
    "load_hf_unispeech",
    "read_hf_directory",
]

_LAYER_RENAMES = (
    (r"\.layer_norm\.", ".attention_norm."),
    (r"\.final_layer_norm\.", ".ffn_norm."),
    (r"\.feed_forward\.intermediate_dense\.", ".feed_forward.fc1."),
    (r"\.feed_forward\.output_dense\.", ".feed_forward.fc2."),
)


def _get(hf: Mapping[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key, default)
    return default if value is None else value


def config_from_hf(hf: Mapping[str, Any]) -> UniSpeechConfig:
    """Map a HF ``UniSpeechConfig`` (``config.json`` dict or ``to_dict()``) to ours; unsupported choices raise."""
    for key in ("hidden_act", "feat_extract_activation"):
        if _get(hf, key, "gelu") != "gelu":
            raise CheckpointError(f"HF config {key}={hf[key]!r} is not supported (speechlab uses GELU)")
    if _get(hf, "add_adapter", False):
        raise CheckpointError("HF config add_adapter=True is not supported (no adapter layers in speechlab)")
    conv_dim = list(_get(hf, "conv_dim", [512] * 7))
    conv_kernel = list(_get(hf, "conv_kernel", [10, 3, 3, 3, 3, 2, 2]))
    conv_stride = list(_get(hf, "conv_stride", [5, 2, 2, 2, 2, 2, 2]))
    if not len(conv_dim) == len(conv_kernel) == len(conv_stride):
        raise CheckpointError(
            f"HF config conv_dim/conv_kernel/conv_stride lengths differ: {len(conv_dim)}/{len(conv_kernel)}/"
            f"{len(conv_stride)}"
        )
    norm = _get(hf, "feat_extract_norm", "group")
    if norm not in ("group", "layer"):
        raise CheckpointError(f"HF config feat_extract_norm={norm!r}; expected 'group' or 'layer'")
    encoder = SSLEncoderConfig(
        conv_layers=[
            (int(c), int(k), int(s)) for c, k, s in zip(conv_dim, conv_kernel, conv_stride, strict=True)
        ],
        conv_norm=norm,
        conv_bias=bool(_get(hf, "conv_bias", False)),
        hidden_size=int(_get(hf, "hidden_size", 768)),
        num_layers=int(_get(hf, "num_hidden_layers", 12)),
        num_heads=int(_get(hf, "num_attention_heads", 12)),
        ffn_size=int(_get(hf, "intermediate_size", 3072)),
        layer_norm_first=bool(_get(hf, "do_stable_layer_norm", False)),
        pos_conv_kernel=int(_get(hf, "num_conv_pos_embeddings", 128)),
        pos_conv_groups=int(_get(hf, "num_conv_pos_embedding_groups", 16)),
        dropout=float(_get(hf, "hidden_dropout", 0.1)),
        attention_dropout=float(_get(hf, "attention_dropout", 0.1)),
        activation_dropout=float(_get(hf, "activation_dropout", 0.1)),
        feature_dropout=float(_get(hf, "feat_proj_dropout", 0.0)),
        layerdrop=float(_get(hf, "layerdrop", 0.1)),
        mask_prob=float(_get(hf, "mask_time_prob", 0.05)),
        mask_length=int(_get(hf, "mask_time_length", 10)),
        layer_norm_eps=float(_get(hf, "layer_norm_eps", 1e-5)),
    )
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


def _backbone_key(key: str) -> str | None:
    """HF ``UniSpeechModel`` key (no prefix) -> our ``SSLEncoder`` key, or None if it is not a backbone key."""
    if key == "masked_spec_embed":
        return "mask_emb"
    if key.startswith("feature_extractor.conv_layers."):
        return "feature_encoder." + key[len("feature_extractor.") :].replace(".layer_norm.", ".norm.")
    if key.startswith("feature_projection.layer_norm."):
        return "feature_norm." + key.rsplit(".", 1)[1]
    if key.startswith("feature_projection.projection."):
        return "feature_projection." + key.rsplit(".", 1)[1]
    if key.startswith("encoder.pos_conv_embed.conv."):
        tail = key[len("encoder.pos_conv_embed.conv.") :]
        tail = {
            "weight_g": "parametrizations.weight.original0",
            "weight_v": "parametrizations.weight.original1",
        }.get(tail, tail)
        return "encoder.pos_conv.conv." + tail
    if key.startswith("encoder.layer_norm."):
        return key
    if key.startswith("encoder.layers."):
        for pattern, replacement in _LAYER_RENAMES:
            key = re.sub(pattern, replacement, key)
        return key
    return None


def encoder_state_from_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Backbone weights only, as an ``SSLEncoder`` state dict (for ``CTCModel.encoder`` or ``UniSpeech.encoder``).

    Accepts keys with or without the ``unispeech.`` prefix; heads are ignored.
    """
    out = {}
    for key, value in hf_state.items():
        bare = key[len("unispeech.") :] if key.startswith("unispeech.") else key
        mapped = _backbone_key(bare)
        if mapped is not None:
            out[mapped] = value
    if not out:
        raise CheckpointError(
            "no UniSpeech backbone keys found (expected feature_extractor.*, encoder.* ...)"
        )
    return out


def convert_state_dict(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF UniSpeech state dict (any of the three classes) -> our ``UniSpeech`` state dict (possibly partial:
    a ``UniSpeechModel`` file has no quantizer / heads; check with ``load_state_dict(strict=False)``)."""
    out = {f"encoder.{k}": v for k, v in encoder_state_from_hf(hf_state).items()}
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
    if (path / "model.safetensors").is_file():
        state = load_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = load_torch_checkpoint(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin found next to config.json")
    return config, dict(state)


def load_hf_unispeech(path: str | os.PathLike, *, require_heads: bool = False) -> UniSpeech:
    """Build our ``UniSpeech`` from a HF UniSpeech directory.

    Backbone weights must all be present. With ``require_heads`` the quantizer / project_q / final_proj / ctc_proj
    must be too (``UniSpeechForPreTraining``); otherwise missing heads keep their fresh initialisation, which is
    what fine-tuning from a ``UniSpeechModel`` checkpoint needs.
    """
    hf_config, hf_state = read_hf_directory(path)
    model = UniSpeech(config_from_hf(hf_config))
    state = convert_state_dict(hf_state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    backbone_missing = [k for k in missing if k.startswith("encoder.") and k != "encoder.mask_emb"]
    head_missing = [k for k in missing if not k.startswith("encoder.")]
    if backbone_missing or unexpected or (require_heads and head_missing):
        raise CheckpointError(
            f"{path}: weights do not match the config: missing {backbone_missing + (head_missing if require_heads else [])}"
            f", unexpected {list(unexpected)}. Is this a UniSpeech checkpoint saved by transformers?"
        )
    return model
