"""Hugging Face WavLM / HuBERT / wav2vec 2.0 backbones <-> :class:`SSLEncoder` (config and state dict).

The names are those of transformers' ``modeling_wavlm.py`` / ``modeling_hubert.py`` / ``modeling_wav2vec2.py``
(``feature_extractor.conv_layers.*``, ``encoder.layers.*.attention.*``, ``encoder.pos_conv_embed.conv``).

- :func:`config_from_hf` / :func:`config_to_hf`: ``config.json`` dict <-> :class:`SSLEncoderConfig`.
- :func:`state_dict_from_hf` / :func:`state_dict_to_hf`: parameter names and the positional-conv weight norm, which
  HF files spell either ``weight_g``/``weight_v`` (hub files, old torch) or
  ``parametrizations.weight.original0``/``original1`` (new torch); both are read, ``g`` must have shape (1, 1, K)
  (weight norm over ``dim=2``).
- :func:`load_hf_directory`: a ``save_pretrained`` directory (read by :mod:`speechlab.checkpoints.hf_files`) ->
  :class:`SSLEncoder`. :func:`export_hf_wavlm`: ours -> a directory ``transformers.WavLMModel.from_pretrained`` loads
  with identical outputs.

The HF hidden-state convention equals ours (see :mod:`speechlab.nn.transformer`). HF's ``mask_time_prob`` is the
fine-tuning SpecAugment probability, not the pretraining mask probability, so it is not mapped to ``mask_prob``;
exports write HF's default 0.05 so that ``masked_spec_embed`` exists in the HF model.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from speechlab.checkpoints.hf_files import read_do_normalize, read_hf_directory
from speechlab.checkpoints.ssl_keys import (
    HF,
    OURS,
    check_pos_conv_magnitude,
    config_entries,
    config_fields,
    rename_state_dict,
)
from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig

MODEL_PREFIXES = ("wavlm.", "hubert.", "wav2vec2.", "unispeech_sat.", "unispeech.")
BACKBONE_ROOTS = ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed")
SUPPORTED_MODEL_TYPES = ("wavlm", "hubert", "wav2vec2", "unispeech", "unispeech-sat")


def config_from_hf(hf_config: dict, *, normalize_waveform: bool | None = None) -> SSLEncoderConfig:
    """HF ``config.json`` dict of a WavLM / HuBERT / wav2vec2 (/ UniSpeech) model -> :class:`SSLEncoderConfig`.

    ``normalize_waveform`` lives in HF's *preprocessor* config (``do_normalize``); pass it (or use
    :func:`load_hf_directory`, which reads ``preprocessor_config.json``). Default: ``hf_config.get("do_normalize",
    False)``.
    """
    model_type = hf_config.get("model_type", "wavlm")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    for key, expected in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu")):
        if hf_config.get(key, "gelu") != expected:
            raise ValueError(f"config.json {key}={hf_config[key]!r} is not supported (only 'gelu')")
    if hf_config.get("conv_pos_batch_norm", False):
        raise ValueError("config.json conv_pos_batch_norm=true (batch-norm positional conv) is not supported")
    if not hf_config.get("feat_proj_layer_norm", True):
        raise ValueError(
            "config.json feat_proj_layer_norm=false is not supported (speechlab always has the feature LN)"
        )
    if hf_config.get("add_adapter", False):
        raise ValueError("config.json add_adapter=true (adapter layers) is not supported")
    conv_dim = hf_config.get("conv_dim", [512] * 7)
    conv_kernel = hf_config.get("conv_kernel", [10, 3, 3, 3, 3, 2, 2])
    conv_stride = hf_config.get("conv_stride", [5, 2, 2, 2, 2, 2, 2])
    if not len(conv_dim) == len(conv_kernel) == len(conv_stride):
        raise ValueError("config.json conv_dim, conv_kernel and conv_stride must have the same length")
    if normalize_waveform is None:
        normalize_waveform = bool(hf_config.get("do_normalize", False))
    return SSLEncoderConfig(
        conv_layers=[
            (int(c), int(k), int(s)) for c, k, s in zip(conv_dim, conv_kernel, conv_stride, strict=True)
        ],
        relative_position_bias=model_type == "wavlm",
        normalize_waveform=normalize_waveform,
        **config_fields(hf_config, HF),
    )


def config_to_hf(config: SSLEncoderConfig, model_type: str = "wavlm") -> dict:
    """:class:`SSLEncoderConfig` -> HF ``config.json`` dict for ``WavLMConfig`` / ``HubertConfig`` / ``Wav2Vec2Config``."""
    architectures = {"wavlm": "WavLMModel", "hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model"}
    if model_type not in architectures:
        raise ValueError(f"model_type must be one of {sorted(architectures)}, got {model_type!r}")
    if (model_type == "wavlm") != config.relative_position_bias:
        raise ValueError(
            f"model_type {model_type!r} needs relative_position_bias={model_type == 'wavlm'} "
            f"(WavLM has the gated relative bias, HuBERT / wav2vec2 do not)"
        )
    out = {
        "architectures": [architectures[model_type]],
        "model_type": model_type,
        "conv_dim": [c for c, _, _ in config.conv_layers],
        "conv_kernel": [k for _, k, _ in config.conv_layers],
        "conv_stride": [s for _, _, s in config.conv_layers],
        "num_feat_extract_layers": len(config.conv_layers),
        "feat_extract_activation": "gelu",
        "hidden_act": "gelu",
        **config_entries(config, HF, wavlm=model_type == "wavlm"),
        "mask_time_prob": 0.05,  # HF fine-tuning SpecAugment default; keeps masked_spec_embed in the HF model
        "mask_time_length": config.mask_length,
        "do_normalize": config.normalize_waveform,  # informational; HF reads it from preprocessor_config.json
    }
    if model_type == "hubert":
        out["feat_proj_layer_norm"] = True
    return out


def _split_hf_prefix(key: str) -> str:
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def state_dict_from_hf(state_dict: dict[str, Tensor], config: SSLEncoderConfig) -> dict[str, Tensor]:
    """HF backbone (or ``*ForCTC`` etc.: the ``wavlm.``/``hubert.``/``wav2vec2.`` prefix is stripped) -> ours.

    Head parameters (``lm_head``, ``projector``, quantizer, ...) are ignored; an unrecognised *backbone* key is an
    error. Missing keys are reported by ``SSLEncoder.load_state_dict(strict=True)``.
    """
    backbone = {}
    for key, value in state_dict.items():
        key = _split_hf_prefix(key)
        if key.startswith(BACKBONE_ROOTS):
            backbone[key] = value
    out = rename_state_dict(backbone, HF, OURS, unknown=_unknown_hf_key)
    check_pos_conv_magnitude(out, config.pos_conv_kernel, "positional conv")
    return out


def _unknown_hf_key(key: str) -> KeyError:
    return KeyError(f"unexpected backbone key {key!r} in the Hugging Face state dict (not a known parameter)")


def state_dict_to_hf(
    state_dict: dict[str, Tensor], config: SSLEncoderConfig, *, weight_norm_keys: str = "weight_g"
) -> dict[str, Tensor]:
    """Ours -> HF ``WavLMModel``/``HubertModel``/``Wav2Vec2Model`` keys (no prefix).

    weight_norm_keys: ``"weight_g"`` (``weight_g``/``weight_v``, the spelling of hub files, read by every transformers
    version) or ``"parametrizations"`` (``parametrizations.weight.original0/1``, what new torch saves).
    """
    if weight_norm_keys not in ("weight_g", "parametrizations"):
        raise ValueError(
            f"weight_norm_keys must be 'weight_g' or 'parametrizations', got {weight_norm_keys!r}"
        )
    return rename_state_dict(
        state_dict,
        OURS,
        HF,
        unknown=lambda key: KeyError(f"speechlab key {key!r} has no Hugging Face equivalent"),
        weight_norm_keys=weight_norm_keys,
    )


def load_hf_directory(directory: str | Path) -> SSLEncoder:
    """A Hugging Face ``save_pretrained`` directory of a WavLM / HuBERT / wav2vec2 model -> :class:`SSLEncoder`."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory / 'config.json'} not found: not a Hugging Face model directory")
    hf_config, hf_state = read_hf_directory(directory)
    config = config_from_hf(hf_config, normalize_waveform=read_do_normalize(directory))
    model = SSLEncoder(config)
    weights = state_dict_from_hf(hf_state, config)
    if "mask_emb" not in weights:  # HF drops masked_spec_embed when mask_time_prob = mask_feature_prob = 0
        weights["mask_emb"] = model.mask_emb.detach().clone()
    model.load_state_dict(weights, strict=True)
    return model


def export_hf_wavlm(
    encoder: SSLEncoder, directory: str | Path, *, weight_norm_keys: str = "weight_g"
) -> Path:
    """Write ``config.json``, ``preprocessor_config.json`` and ``model.safetensors`` for ``WavLMModel``
    (or ``HubertModel``/``Wav2Vec2Model``-style HuBERT when the encoder has no relative bias)."""
    from safetensors.torch import save_file

    config = encoder.config
    model_type = "wavlm" if config.relative_position_bias else "hubert"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(config, model_type)
    hf_config.pop("do_normalize")
    hf_config["torch_dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    preprocessor = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "do_normalize": config.normalize_waveform,
        "return_attention_mask": True,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    tensors = state_dict_to_hf(encoder.state_dict(), config, weight_norm_keys=weight_norm_keys)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return directory
