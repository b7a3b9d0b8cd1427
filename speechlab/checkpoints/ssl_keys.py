"""The one parameter-name table of :class:`~speechlab.models.ssl_encoder.SSLEncoder`: ours <-> Hugging Face
(transformers' ``modeling_wavlm.py`` / ``modeling_hubert.py`` / ``modeling_wav2vec2.py``) <-> unilm / fairseq
(``wavlm/WavLM.py``, ``wav2vec2.py`` / ``hubert.py``), used by :mod:`speechlab.checkpoints.hf_ssl` (both ways) and
:mod:`speechlab.checkpoints.unilm` (import).

A row names one parameter in the three spellings, with placeholders: ``{i}`` a layer index, ``{p}`` ``weight`` or
``bias``, ``{proj}`` one of the attention projections, ``{g}`` / ``{v}`` the positional-conv weight norm's
magnitude / direction. The weight norm is read in both spellings (``weight_g`` / ``weight_v``: hub files and old
torch; ``parametrizations.weight.original0`` / ``original1``: new torch) and written in the one asked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = [
    "OURS",
    "HF",
    "UNILM",
    "KEY_TABLE",
    "CONFIG_TABLE",
    "rename",
    "rename_state_dict",
    "check_pos_conv_magnitude",
    "config_fields",
    "config_entries",
]

OURS, HF, UNILM = 0, 1, 2
POS_CONV_G = "encoder.pos_conv.conv.parametrizations.weight.original0"

# (ours, Hugging Face, unilm / fairseq); None: that format has no such spelling.
KEY_TABLE: list[tuple[str, str | None, str | None]] = [
    ("feature_encoder.conv_layers.{i}.conv.{p}", "feature_extractor.conv_layers.{i}.conv.{p}",
     "feature_extractor.conv_layers.{i}.0.{p}"),
    ("feature_encoder.conv_layers.{i}.norm.{p}", "feature_extractor.conv_layers.{i}.layer_norm.{p}",
     "feature_extractor.conv_layers.{i}.2.{p}"),  # unilm: GroupNorm of block 0
    ("feature_encoder.conv_layers.{i}.norm.{p}", None, "feature_extractor.conv_layers.{i}.2.1.{p}"),  # unilm: LN
    ("feature_norm.{p}", "feature_projection.layer_norm.{p}", "layer_norm.{p}"),
    ("feature_projection.{p}", "feature_projection.projection.{p}", "post_extract_proj.{p}"),
    ("mask_emb", "masked_spec_embed", "mask_emb"),
    ("encoder.pos_conv.conv.bias", "encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
    (POS_CONV_G, "encoder.pos_conv_embed.conv.{g}", "encoder.pos_conv.0.{g}"),
    ("encoder.pos_conv.conv.parametrizations.weight.original1", "encoder.pos_conv_embed.conv.{v}",
     "encoder.pos_conv.0.{v}"),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
    ("encoder.relative_position_bias.embedding.weight", "encoder.layers.0.attention.rel_attn_embed.weight",
     "encoder.layers.0.self_attn.relative_attention_bias.weight"),
    ("encoder.layers.{i}.attention.{proj}.{p}", "encoder.layers.{i}.attention.{proj}.{p}",
     "encoder.layers.{i}.self_attn.{proj}.{p}"),
    ("encoder.layers.{i}.attention.gate_proj.{p}", "encoder.layers.{i}.attention.gru_rel_pos_linear.{p}",
     "encoder.layers.{i}.self_attn.grep_linear.{p}"),
    ("encoder.layers.{i}.attention.gate_const", "encoder.layers.{i}.attention.gru_rel_pos_const",
     "encoder.layers.{i}.self_attn.grep_a"),
    ("encoder.layers.{i}.attention_norm.{p}", "encoder.layers.{i}.layer_norm.{p}",
     "encoder.layers.{i}.self_attn_layer_norm.{p}"),
    ("encoder.layers.{i}.feed_forward.fc1.{p}", "encoder.layers.{i}.feed_forward.intermediate_dense.{p}",
     "encoder.layers.{i}.fc1.{p}"),
    ("encoder.layers.{i}.feed_forward.fc2.{p}", "encoder.layers.{i}.feed_forward.output_dense.{p}",
     "encoder.layers.{i}.fc2.{p}"),
    ("encoder.layers.{i}.ffn_norm.{p}", "encoder.layers.{i}.final_layer_norm.{p}",
     "encoder.layers.{i}.final_layer_norm.{p}"),
]  # fmt: skip

# Config fields: (SSLEncoderConfig field, Hugging Face config.json key, unilm / fairseq cfg key, the default when
# the key is absent); None: the format does not store the field (unilm's conv_norm, relative bias and conv layers
# are read by unilm.config_from_unilm itself).
CONFIG_TABLE: list[tuple[str, str | None, str | None, Any]] = [
    ("conv_norm", "feat_extract_norm", None, "group"),
    ("conv_bias", "conv_bias", "conv_bias", False),
    ("hidden_size", "hidden_size", "encoder_embed_dim", 768),
    ("num_layers", "num_hidden_layers", "encoder_layers", 12),
    ("num_heads", "num_attention_heads", "encoder_attention_heads", 12),
    ("ffn_size", "intermediate_size", "encoder_ffn_embed_dim", 3072),
    ("layer_norm_first", "do_stable_layer_norm", "layer_norm_first", False),
    ("pos_conv_kernel", "num_conv_pos_embeddings", "conv_pos", 128),
    ("pos_conv_groups", "num_conv_pos_embedding_groups", "conv_pos_groups", 16),
    ("dropout", "hidden_dropout", "dropout", 0.1),
    ("attention_dropout", "attention_dropout", "attention_dropout", 0.1),
    ("activation_dropout", "activation_dropout", "activation_dropout", 0.0),
    ("feature_dropout", "feat_proj_dropout", "dropout_input", 0.0),
    ("layerdrop", "layerdrop", "encoder_layerdrop", 0.1),
    ("layer_norm_eps", "layer_norm_eps", None, 1e-5),
    ("num_buckets", "num_buckets", None, 320),
    ("max_distance", "max_bucket_distance", None, 800),  # HF class default 800 (= every release)
    ("mask_prob", None, "mask_prob", 0.65),
    ("mask_length", None, "mask_length", 10),
    ("normalize_waveform", None, "normalize", False),
    ("feature_grad_mult", None, "feature_grad_mult", 1.0),
]
_DEFAULT_OVERRIDES = {UNILM: {"layerdrop": 0.0}}  # fairseq's encoder_layerdrop default
WAVLM_ONLY = ("num_buckets", "max_distance")  # HF writes the bucket geometry for WavLM only


def config_fields(config: Mapping[str, Any], source: int) -> dict[str, Any]:
    """``SSLEncoderConfig`` keyword arguments from a ``source`` (``HF`` / ``UNILM``) config dict, each value cast
    to its default's type."""
    out = {}
    for row in CONFIG_TABLE:
        ours, theirs, default = row[OURS], row[source], row[-1]
        if theirs is None:
            continue
        default = _DEFAULT_OVERRIDES.get(source, {}).get(ours, default)
        value = config.get(theirs, default)
        out[ours] = value if isinstance(default, str) else type(default)(value)
    return out


def config_entries(config: Any, target: int, *, wavlm: bool) -> dict[str, Any]:
    """The ``target`` config keys of ``config`` (an ``SSLEncoderConfig``) that :data:`CONFIG_TABLE` maps."""
    return {
        row[target]: getattr(config, row[OURS])
        for row in CONFIG_TABLE
        if row[target] is not None and (wavlm or row[OURS] not in WAVLM_ONLY)
    }


WEIGHT_NORM_SPELLINGS = {
    "weight_g": ("weight_g", "weight_v"),
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
}
_PLACEHOLDERS = {
    "i": r"(?P<i>\d+)",
    "p": r"(?P<p>weight|bias)",
    "proj": r"(?P<proj>q_proj|k_proj|v_proj|out_proj)",
    "g": "(?:" + "|".join(re.escape(g) for g, _ in WEIGHT_NORM_SPELLINGS.values()) + ")",
    "v": "(?:" + "|".join(re.escape(v) for _, v in WEIGHT_NORM_SPELLINGS.values()) + ")",
}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    return re.compile(
        "".join(re.escape(part) if n % 2 == 0 else _PLACEHOLDERS[part] for n, part in enumerate(parts))
    )


_PATTERNS = [tuple(None if t is None else _pattern(t) for t in row) for row in KEY_TABLE]


def rename(key: str, source: int, target: int, *, weight_norm_keys: str = "parametrizations") -> str | None:
    """``key`` spelled in ``source`` (``OURS`` / ``HF`` / ``UNILM``) -> its spelling in ``target``; None when no
    row matches. ``weight_norm_keys`` picks the weight-norm spelling written (``weight_g`` or
    ``parametrizations``; ours is always ``parametrizations``)."""
    g, v = WEIGHT_NORM_SPELLINGS[weight_norm_keys]
    for row, patterns in zip(KEY_TABLE, _PATTERNS, strict=True):
        pattern, template = patterns[source], row[target]
        match = pattern.fullmatch(key) if pattern is not None and template is not None else None
        if match is not None:
            return template.format(g=g, v=v, **match.groupdict())
    return None


def rename_state_dict(
    state_dict: Mapping[str, Tensor],
    source: int,
    target: int,
    *,
    unknown: Callable[[str], Exception],
    weight_norm_keys: str = "parametrizations",
) -> dict[str, Tensor]:
    """Every key of ``state_dict`` renamed from ``source`` to ``target``; a key no row knows raises
    ``unknown(key)`` (the caller says which file and what to do)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        renamed = rename(key, source, target, weight_norm_keys=weight_norm_keys)
        if renamed is None:
            raise unknown(key)
        out[renamed] = value
    return out


def check_pos_conv_magnitude(state_dict: Mapping[str, Tensor], pos_conv_kernel: int, name: str) -> None:
    """The positional conv's weight-norm magnitude (our keys) must be (1, 1, K): weight norm over ``dim=2``."""
    g = state_dict.get(POS_CONV_G)
    if g is not None and tuple(g.shape) != (1, 1, pos_conv_kernel):
        raise ValueError(
            f"{name} weight-norm magnitude has shape {tuple(g.shape)}, expected "
            f"(1, 1, {pos_conv_kernel}) (weight norm over dim=2)"
        )
