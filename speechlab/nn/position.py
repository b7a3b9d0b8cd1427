"""Position information for the Transformers: wav2vec 2.0's convolutional relative positional embedding
(Baevski et al. 2020, §2 and §4.2) and WavLM's relative position bias (Chen et al. 2022, §III-A), bucketed like
T5's (Raffel et al. 2020, §2.1), for the SSL encoder; rotary embeddings (RoPE, Su et al. 2021) for the codec's.

- :class:`ConvPositionalEmbedding`: grouped Conv1d (kernel 128, 16 groups) with weight norm over ``dim=2`` (one
  magnitude per kernel tap, ``g`` of shape (1, 1, K)), "same" padding that drops the last frame for even kernels,
  then GELU. Used by wav2vec 2.0, HuBERT, WavLM and UniSpeech.
- :func:`relative_position_buckets` and :class:`RelativePositionBias`: WavLM's bidirectional T5-style log buckets
  (320 buckets, max distance 800 in every released checkpoint: docs/pitfalls.md, 7) and the (heads, T, T) bias built
  from the layer-0 table.
- :func:`rotary_embedding`: RoPE on queries / keys by absolute frame index (the rotate-half layout of GPT-NeoX and
  Mimi), so attention scores depend only on the distance between frames and a stream can continue at any offset.

bf16 on CPU: oneDNN in torch 2.11 returns wrong values for bf16 grouped conv1d with few channels per group on
CPUs with native bf16 (AVX512-BF16 / AMX): relative error > 1 for 4-12 channels per group and kernel 16 or 128,
correct for >= 16 channels per group (Base: 48, Large: 64) and with ``torch.backends.mkldnn`` off; the backward
pass is correct. :func:`cpu_bf16_grouped_conv_is_unsafe` names the geometry, and the positional conv runs it in
fp32 under autocast (``tests/test_bf16.py`` checks the upstream behaviour and the workaround).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relative_position_buckets(
    relative_positions: Tensor, num_buckets: int = 320, max_distance: int = 800
) -> Tensor:
    """Bucket index of ``r = key - query`` (T5's bidirectional log buckets, Raffel et al. 2020 §2.1).

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


def rotary_embedding(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """RoPE: x: (batch, heads, T, head_dim), positions: (T,) absolute frame indices -> same shape as x.

    The first and second halves of the head channels are the two coordinates of ``head_dim // 2`` planes, rotated
    by ``position * base ** (-i / (head_dim // 2))``; an odd last channel is left as it is.
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half :]], dim=-1)


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
            # never an inference tensor (a validation step under inference_mode would otherwise leave one that
            # a later training step cannot save for backward)
            with torch.inference_mode(False):
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

    def distance_bias(self, length: int) -> Tensor:
        """-> (heads, 2T - 1) ungated bias per distance: ``distance_bias(T)[h, d + T - 1] == forward(T)[h, i, i + d]``
        (what FlexAttention's ``score_mod`` reads; O(heads x T) instead of O(heads x T^2))."""
        device = self.embedding.weight.device
        key = (-length, str(device))  # negative: a separate entry from the (T, T) index of the same length
        buckets = self._index_cache.get(key)
        if buckets is None:
            with torch.inference_mode(False):  # as in _distance_index
                distances = torch.arange(-(length - 1), length, device=device)
                buckets = relative_position_buckets(distances, self.num_buckets, self.max_distance)
            if len(self._index_cache) > 8:
                self._index_cache.clear()
            self._index_cache[key] = buckets
        return F.embedding(buckets, self.embedding.weight).t()


# Smallest channels-per-group count measured correct for bf16 grouped conv1d under CPU autocast (see above).
_CPU_BF16_SAFE_CHANNELS_PER_GROUP = 16


def cpu_bf16_grouped_conv_is_unsafe(x: Tensor, conv: nn.Conv1d) -> bool:
    """Whether ``conv(x)`` would hit the oneDNN bf16 grouped-conv bug: CPU bf16 autocast, grouped, < 16 ch/group."""
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and conv.groups > 1
        and conv.in_channels // conv.groups < _CPU_BF16_SAFE_CHANNELS_PER_GROUP
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


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
        x = x.transpose(1, 2)
        if cpu_bf16_grouped_conv_is_unsafe(x, self.conv):
            with torch.autocast("cpu", enabled=False):
                out = self.conv(x.float())
        else:
            out = self.conv(x)
        if self.remove_last:
            out = out[:, :, :-1]
        return F.gelu(out).transpose(1, 2)
