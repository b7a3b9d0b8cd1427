"""Span masking for masked prediction (wav2vec 2.0, Baevski et al. 2020, §3.1; used by HuBERT and WavLM alike),
vectorised over the batch. The steps are those of fairseq's ``compute_mask_indices`` (``mask_selection="static"``).

Per utterance with ``n`` valid frames:

1. ``num_spans = max(min_masks, int(mask_prob * n / mask_length + U[0, 1)))`` (probabilistic rounding);
2. ``num_spans`` distinct start frames drawn uniformly without replacement from ``[0, n - mask_length)``
   (at least one candidate start; ``num_spans`` is capped at the number of candidates);
3. frames ``[start, start + mask_length)`` are masked; spans may overlap; frames ``>= n`` (padding) are never masked;
4. optionally (``equalize=True``, fairseq's behaviour) every row is randomly sub-sampled to the smallest masked count
   in the batch, so all rows mask the same number of frames.

Expected masked fraction before equalisation: ``1 - (1 - mask_prob / mask_length) ** mask_length`` (~49 % for 0.65).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from speechlab.nn.masks import padding_mask, valid_mask


def _random_ranks(scores: Tensor) -> Tensor:
    """Rank (0 = smallest) of each entry along the last axis. scores: (B, T) float -> (B, T) int64."""
    order = scores.argsort(dim=-1)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def span_mask(
    shape_or_lengths: Sequence[int] | Tensor,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
    *,
    num_frames: int | None = None,
    equalize: bool = True,
) -> Tensor:
    """Sample span masks.

    Args:
        shape_or_lengths: ``(batch, frames)`` (every row fully valid) or a (batch,) int64 tensor of valid frames.
        mask_prob: expected fraction of span *starts* (0.65 wav2vec 2.0, 0.8 HuBERT).
        mask_length: span length in frames (10 = 200 ms).
        min_masks: minimum number of spans per utterance (2 in fairseq's pretraining).
        generator: torch.Generator for reproducible masks (must live on the lengths' device).
        num_frames: padded width T when lengths are given (default ``max(lengths)``).
        equalize: sub-sample every row to the same number of masked frames (fairseq); False keeps all spans.

    Returns:
        (batch, frames) bool, True = masked; padded frames are always False.
    """
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if isinstance(shape_or_lengths, Tensor):
        lengths = shape_or_lengths.long()
        width = int(
            num_frames if num_frames is not None else (lengths.max().item() if lengths.numel() else 0)
        )
    else:
        batch, width = (int(v) for v in shape_or_lengths)
        lengths = torch.full((batch,), width, dtype=torch.long)
    device = lengths.device
    batch = lengths.shape[0]
    if batch == 0 or width == 0 or mask_prob == 0.0:
        return torch.zeros(batch, width, dtype=torch.bool, device=device)

    lengths = lengths.clamp(max=width)
    num_starts = (lengths - mask_length).clamp(min=1)  # candidate starts [0, num_starts)
    noise = torch.rand(batch, generator=generator, device=device)
    num_spans = (mask_prob * lengths.float() / mask_length + noise).long().clamp(min=min_masks)
    num_spans = torch.minimum(num_spans, num_starts)
    num_spans = torch.where(lengths > 0, num_spans, torch.zeros_like(num_spans))

    scores = torch.rand(batch, width, generator=generator, device=device)
    scores = scores.masked_fill(padding_mask(num_starts, width), 2.0)  # invalid starts rank last
    starts = _random_ranks(scores) < num_spans[:, None]

    # frame t is masked iff a span starts in (t - mask_length, t]: a windowed count via cumulative sums.
    counts = starts.long().cumsum(-1)
    shifted = torch.nn.functional.pad(counts, (mask_length, 0))[:, :width]
    mask = (counts - shifted > 0) & valid_mask(lengths, width)

    if equalize:
        # the smallest count over rows with frames (over all rows when none has any), without a host read
        masked_per_row = mask.sum(-1)
        has_frames = lengths > 0
        target = torch.where(
            has_frames.any(),
            masked_per_row.masked_fill(~has_frames, width + 1).min(),
            masked_per_row.min(),
        )
        keep_scores = torch.rand(batch, width, generator=generator, device=device).masked_fill(~mask, 2.0)
        mask = mask & (_random_ranks(keep_scores) < target)
    return mask
