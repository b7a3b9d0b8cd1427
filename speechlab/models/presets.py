"""Look up encoder presets by name, for configs and the CLI (``encoder: wavlm_tiny``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from speechlab.models import wavlm
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
    presets = encoder_presets()
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
