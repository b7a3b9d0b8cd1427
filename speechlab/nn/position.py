"""Position information for the SSL Transformer (spec §1.4 and §2.2).

- :class:`ConvPositionalEmbedding`: grouped Conv1d (kernel 128, 16 groups) with weight norm over ``dim=2`` (one
  magnitude per kernel tap, ``g`` of shape (1, 1, K)), "same" padding that drops the last frame for even kernels,
  then GELU. Used by wav2vec 2.0, HuBERT, WavLM and UniSpeech.
- :func:`relative_position_buckets` and :class:`RelativePositionBias`: WavLM's bidirectional T5-style log buckets
  (320 buckets, max distance 800 in every released checkpoint) and the (heads, T, T) bias built from the layer-0 table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relative_position_buckets(
    relative_positions: Tensor, num_buckets: int = 320, max_distance: int = 800
) -> Tensor:
    """Bucket index of ``r = key - query`` (spec §2.2).

    Half of the buckets for r <= 0 (offset 0), half for r > 0 (offset ``num_buckets // 2``); within each half the
    first ``num_buckets // 4`` distances are exact, larger ones are log-spaced up to ``max_distance`` and saturate.
    relative_positions: any shape, int64 -> same shape int64 in [0, num_buckets).
    """
    half = num_buckets // 2
    max_exact = half // 2
    offset = (relative_positions > 0).long() * half
    distance = relative_positions.abs()
    # clamp_min(1) only keeps log() finite for the exact range, where the value is not used.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + log_ratio * (half - max_exact)).long().clamp(max=half - 1)
    return offset + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """WavLM relative position bias table (the layer-0 ``Embedding(num_buckets, heads)``), ungated.

    ``forward(T)`` returns (heads, T, T) with ``bias[h, i, j] = table[bucket(j - i), h]``. The bucket index depends
    only on ``j - i``, so it is computed once per length for the 2T-1 distinct distances and cached.
    """

    def __init__(self, num_heads: int, num_buckets: int = 320, max_distance: int = 800):
        super().__init__()
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)
        nn.init.xavier_normal_(self.embedding.weight)
        self._index_cache: dict[tuple[int, str], Tensor] = {}

    def _distance_index(self, length: int, device: torch.device) -> Tensor:
        """(T, T) int64 index into the 2T-1 per-distance buckets; cached per (T, device)."""
        key = (length, str(device))
        cached = self._index_cache.get(key)
        if cached is None:
            positions = torch.arange(length, device=device)
            distances = torch.arange(-(length - 1), length, device=device)
            buckets = relative_position_buckets(distances, self.num_buckets, self.max_distance)
            cached = buckets[positions[None, :] - positions[:, None] + (length - 1)]
            if len(self._index_cache) > 8:  # bounded: bucketed batches reuse a handful of lengths
                self._index_cache.clear()
            self._index_cache[key] = cached
        return cached

    def forward(self, length: int) -> Tensor:
        """-> (heads, T, T) ungated bias in the table's dtype."""
        index = self._distance_index(length, self.embedding.weight.device)
        return F.embedding(index, self.embedding.weight).permute(2, 0, 1)


class ConvPositionalEmbedding(nn.Module):
    """x: (batch, frames, dim) -> GELU(SamePad(WeightNorm(Conv1d)(x))) of the same shape (added by the caller)."""

    def __init__(self, dim: int, kernel_size: int = 128, groups: int = 16):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"hidden_size ({dim}) must be divisible by pos_conv_groups ({groups})")
        conv = nn.Conv1d(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * dim)))
        nn.init.zeros_(conv.bias)
        # dim=2: the magnitude g has shape (1, 1, kernel): one scalar per kernel tap (what checkpoints store).
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove_last = kernel_size % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x.transpose(1, 2))
        if self.remove_last:
            out = out[:, :, :-1]
        return F.gelu(out).transpose(1, 2)
