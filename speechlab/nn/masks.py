"""Padding masks from lengths: the one place a padded batch's valid / padded positions are computed.

Two polarities, both (batch, max_len) bool, on the lengths' device:

- :func:`valid_mask`: True at real positions (``t < lengths[b]``), for sums and means over real frames or samples;
- :func:`padding_mask`: True at padded positions (``t >= lengths[b]``), what attention and ``masked_fill`` take
  (the ``padding_mask`` of :class:`speechlab.models.ssl_encoder.SSLEncoderOutput` and of ``Batch``).

Tensor ops only: no host read, so they are free on an accelerator.
"""

from __future__ import annotations

import torch
from torch import Tensor


def valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """lengths: (batch,) int valid positions -> (batch, max_len) bool, True where ``t < lengths[b]``.

    Lengths above ``max_len`` mark the whole row valid; zero or negative ones mark none.
    """
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """lengths: (batch,) int valid positions -> (batch, max_len) bool, True where ``t >= lengths[b]`` (padding)."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]
