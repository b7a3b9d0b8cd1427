"""Named config presets of every model family, and config dataclasses from plain dicts.

A preset is a function returning a config dataclass, registered for its family by :func:`preset`::

    @preset("ssl_encoder")
    def wavlm_tiny() -> SSLEncoderConfig: ...

:func:`build_config` is the one lookup for configs (YAML keys such as ``encoder: wavlm_tiny`` +
``encoder_overrides``, ``model: unispeech_tiny`` + ``model_overrides``, ``codec`` + ``codec_overrides``):

=================  ==========================================================================================
family             presets (module)
=================  ==========================================================================================
``ssl_encoder``    ``wavlm_base``, ``wavlm_base_plus``, ``wavlm_large``, ``hubert_base``, ``wav2vec2_base``,
                   ``wavlm_tiny``, ``tiny_encoder`` (:mod:`speechlab.models.wavlm`)
``conformer``      ``fbank_conformer_tiny``, ``waveform_conformer_tiny`` (:mod:`speechlab.models.fbank_conformer`)
``ctc_encoder``    the union of ``ssl_encoder`` and ``conformer``: every encoder a CTC model (or WavLM-style
                   pretraining) can use
``unispeech``      ``unispeech_tiny``, ``unispeech_base``, ``unispeech_large``, ``unispeech_fbank_tiny``
                   (:mod:`speechlab.models.unispeech`)
``codec``          ``codec_16khz``, ``codec_16khz_low_rate``, ``codec_16khz_causal``, ``codec_tiny``, ``codec_mini``
                   (:mod:`speechlab.models.codec`)
=================  ==========================================================================================

Unknown families, presets and fields are one-line ``ValueError`` naming the valid ones. :func:`config_from_dict`
is the inverse of ``dataclasses.asdict`` for these configs (``config.json``, checkpoint hyper-parameters).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["preset", "presets", "families", "build_config", "apply_overrides", "config_from_dict"]

# families made of other families: one name for "any of these presets", not a second table
UNIONS: dict[str, tuple[str, ...]] = {"ctc_encoder": ("ssl_encoder", "conformer")}

_PRESETS: dict[str, dict[str, Callable[[], Any]]] = {}


def preset(family: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: register a function (no required arguments, returns a config dataclass) as a preset of
    ``family`` under the function's name."""

    def register(function: Callable[[], Any]) -> Callable[[], Any]:
        table = _PRESETS.setdefault(family, {})
        if function.__name__ in table and table[function.__name__] is not function:
            raise ValueError(f"preset {function.__name__!r} of family {family!r} is defined twice")
        table[function.__name__] = function
        return function

    return register


def _tables() -> dict[str, dict[str, Callable[[], Any]]]:
    # filled when the package is imported: speechlab/models/__init__.py imports every module that defines presets
    return _PRESETS


def families() -> list[str]:
    """Every family name (unions included), sorted."""
    return sorted({*_tables(), *UNIONS})


def presets(family: str) -> dict[str, Callable[[], Any]]:
    """``{name: preset function}`` of ``family`` (a union: of its members)."""
    tables = _tables()
    members = UNIONS.get(family, (family,))
    if any(member not in tables for member in members):
        raise ValueError(f"unknown model family {family!r}; choose one of: {', '.join(families())}")
    return {name: function for member in members for name, function in tables[member].items()}


def build_config(family: str, name: str | Any, overrides: dict[str, Any] | None = None) -> Any:
    """The config of preset ``name`` of ``family`` with ``overrides`` applied (see :func:`apply_overrides`).

    ``name`` may also be a config dataclass itself (a deep copy gets the overrides). Unknown families, presets
    and fields raise ``ValueError`` listing the valid ones.
    """
    if dataclasses.is_dataclass(name) and not isinstance(name, type):
        config = copy.deepcopy(name)
    else:
        table = presets(family)
        if name not in table:
            raise ValueError(f"unknown {family} preset {name!r}; choose one of: {', '.join(sorted(table))}")
        config = table[name]()
    return apply_overrides(config, overrides, what=f"{family} preset {name!r}")


def apply_overrides(
    config: Any, overrides: dict[str, Any] | None, *, what: str = "config", prefix: str = ""
) -> Any:
    """``dataclasses.replace(config, **overrides)``, validated: unknown fields are a ``ValueError`` listing the
    valid ones. A field holding a dataclass (UniSpeech's ``encoder``) takes a dict of overrides of its own fields,
    validated the same way, or a whole dataclass instance, which replaces it."""
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {type(config).__name__} field(s) {[prefix + k for k in unknown]} for {what}; "
            f"valid fields: {sorted(fields)}"
        )
    values = dict(overrides)
    for key, value in overrides.items():
        current = getattr(config, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            values[key] = apply_overrides(current, value, what=what, prefix=f"{prefix}{key}.")
    return dataclasses.replace(config, **values)


# ----------------------------------------------------------------------------------------------- from plain dicts


def _coerce(value: Any, hint: Any, field: str, source: str) -> Any:
    """Turn a JSON value back into the annotated type (lists -> tuples, nested dataclasses)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], field, source) if len(non_none) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value, source=source, prefix=f"{field}.")
    if origin in (list, tuple) and isinstance(value, list | tuple):
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) == len(value):
            return tuple(_coerce(v, a, field, source) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, field, source) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class ConfigError(ValueError):
    """A stored config that does not fit its dataclass (unknown fields, invalid values); names its source."""


def config_from_dict(cls: type, data: dict[str, Any], *, source: str = "config", prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from a dict; unknown fields are an error naming them (never silently dropped).

    Raises :class:`ConfigError` (a ``ValueError``) naming ``source``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown {cls.__name__} field(s) {[prefix + k for k in unknown]}; this config was written "
            f"by a different speechlab version or for another model family. Known fields: {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints.get(k, Any), prefix + k, source) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: invalid {cls.__name__}: {err}") from err
