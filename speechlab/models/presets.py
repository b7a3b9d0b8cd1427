"""Look up encoder presets by name, for configs and the CLI (``encoder: wavlm_tiny``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from speechlab.models import fbank_conformer, wavlm
from speechlab.models.fbank_conformer import FbankConformerConfig
from speechlab.models.ssl_encoder import SSLEncoderConfig


def encoder_presets() -> dict[str, Any]:
    """Every function in :mod:`speechlab.models.wavlm` that returns an ``SSLEncoderConfig``, by name."""
    presets = {}
    for name in dir(wavlm):
        fn = getattr(wavlm, name)
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == wavlm.__name__:
            if fn.__annotations__.get("return") in (SSLEncoderConfig, "SSLEncoderConfig"):
                presets[name] = fn
    return presets


def encoder_config(name: str, overrides: dict[str, Any] | None = None) -> SSLEncoderConfig:
    """``SSLEncoderConfig`` of preset ``name`` with ``overrides`` applied; unknown names/fields are clear errors."""
    return _configured(name, encoder_presets(), overrides)


def _configured(name: str, presets: dict[str, Any], overrides: dict[str, Any] | None) -> Any:
    if name not in presets:
        raise ValueError(f"unknown encoder preset {name!r}; choose one of: {', '.join(sorted(presets))}")
    config = presets[name]()
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(
            f"unknown encoder field(s) {unknown} for preset {name!r}; valid fields: {sorted(fields)}"
        )
    return dataclasses.replace(config, **(overrides or {}))


def ctc_encoder_presets() -> dict[str, Any]:
    """The SSL presets plus the CTC-only encoders of :mod:`speechlab.models.fbank_conformer`, by name."""
    presets = encoder_presets()
    presets["fbank_conformer_tiny"] = fbank_conformer.fbank_conformer_tiny
    presets["waveform_conformer_tiny"] = fbank_conformer.waveform_conformer_tiny
    return presets


def ctc_encoder_config(
    name: str, overrides: dict[str, Any] | None = None
) -> SSLEncoderConfig | FbankConformerConfig:
    """:func:`encoder_config` for CTC models, which may also use a non-SSL encoder (``fbank_conformer_tiny``)."""
    return _configured(name, ctc_encoder_presets(), overrides)
