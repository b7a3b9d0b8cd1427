"""Numeric config values checked at the boundary: NaN, inf, a negative size or a wrong type name the field.

``max_batch_seconds: .nan`` in a YAML would otherwise make every comparison false (no batch ever full, or every
utterance over budget), and ``num_layers: -1`` would build an empty ``ModuleList`` without complaint.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_number"]


def check_number(
    field: str,
    value: Any,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``field`` unless ``value`` is a finite number (an int if ``integer``) with
    ``value >= minimum``, ``value > above`` and ``value <= maximum`` (each bound only when given); ``None`` passes
    when ``optional``."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise ValueError(f"{field} must be {kind}, got {value!r} ({type(value).__name__})")
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    wanted = f"{kind} {' and '.join(bounds)}".strip() if bounds else f"a finite {kind[2:]}"
    if not math.isfinite(value) or (
        (minimum is not None and value < minimum)
        or (above is not None and value <= above)
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"{field} must be {wanted}, got {value!r}")
