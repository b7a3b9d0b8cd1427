"""wav2vec 2.0 / UniSpeech contrastive objective (wav2vec 2.0, Baevski et al. 2020, §3.2, eq. 3-4).

For every masked frame t the context vector c_t must pick its own quantized target y_t among K distractors drawn
uniformly from the other (non-padded) frames of the same utterance:
``L = -log softmax_k(cos(c_t, [y_t, ỹ_1..ỹ_K]) / κ)[0]``, κ = 0.1, summed over masked frames.
Distractors that are identical to the positive (same code vectors) get logit -inf, as in fairseq.
The diversity loss (G·V - perplexity) / (G·V) pushes the codebooks to be used evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from speechlab.nn.masks import padding_mask


def sample_negatives(
    frame_mask: Tensor, lengths: Tensor, num_negatives: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw distractor frames for each masked frame, from the same utterance, never the positive, never padding.

    frame_mask: (B, T) bool, True at frames that get a contrastive prediction (must lie inside ``lengths``).
    lengths: (B,) int64 valid frames per utterance.
    Returns ``(indices, valid)``: indices (M, K) int64 flat indices into the (B·T) frames, M = frame_mask.sum(), rows
    in ``frame_mask.nonzero()`` order; valid (M, K) bool, False only for utterances with fewer than 2 frames (no
    distractor exists; such indices point at the positive and must be ignored).
    """
    batch, frames = frame_mask.shape
    lengths = lengths.to(frame_mask.device)
    if bool((frame_mask & padding_mask(lengths, frames)).any()):
        raise ValueError(
            "sample_negatives: frame_mask marks padded frames (t >= lengths[b]); mask only real frames."
        )
    rows, positions = frame_mask.nonzero(as_tuple=True)
    pool = (lengths[rows] - 1).clamp(min=0)  # candidates: the other len-1 frames of the utterance
    uniform = torch.rand(rows.numel(), num_negatives, generator=generator, device=frame_mask.device)
    drawn = (uniform * pool[:, None]).long()
    drawn = torch.minimum(drawn, (pool[:, None] - 1).clamp(min=0))  # guard against rand() rounding to pool
    drawn = drawn + (drawn >= positions[:, None]).long()  # skip the positive itself
    valid = (pool > 0)[:, None].expand_as(drawn)
    drawn = torch.where(valid, drawn, positions[:, None])
    return rows[:, None] * frames + drawn, valid


def contrastive_logits(
    context: Tensor,
    positives: Tensor,
    negatives: Tensor,
    *,
    temperature: float = 0.1,
    negative_valid: Tensor | None = None,
) -> Tensor:
    """Cosine-similarity logits, positive first.

    context: (M, D) transformer outputs at masked frames; positives: (M, D) their targets; negatives: (M, K, D).
    negative_valid: (M, K) bool or None. Returns (M, 1 + K) float32 = cos / temperature, with -inf for distractors
    equal to the positive or marked invalid.
    """
    candidates = torch.cat([positives[:, None], negatives], dim=1).float()
    logits = F.cosine_similarity(context.float()[:, None], candidates, dim=-1) / temperature
    duplicate = (negatives == positives[:, None]).all(-1)
    if negative_valid is not None:
        duplicate = duplicate | ~negative_valid
    return torch.cat([logits[:, :1], logits[:, 1:].masked_fill(duplicate, float("-inf"))], dim=1)


def info_nce(logits: Tensor, reduction: str = "sum") -> Tensor:
    """Cross-entropy with target index 0 over (M, 1 + K) logits; ``reduction`` as in F.cross_entropy."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def diversity_loss(prob_perplexity: Tensor, num_codevectors: int) -> Tensor:
    """(G·V - perplexity) / (G·V): 0 when every entry of every group is used equally, → 1 when one entry is used."""
    return (num_codevectors - prob_perplexity) / num_codevectors


@dataclass
class ContrastiveOutput:
    """loss: scalar InfoNCE summed over masked frames; num_frames: M; accuracy: fraction of frames whose positive has
    the highest logit (ties count as wrong, as in fairseq); logits: (M, 1 + K)."""

    loss: Tensor
    num_frames: int
    accuracy: Tensor
    logits: Tensor


def contrastive_loss(
    context: Tensor,
    targets: Tensor,
    frame_mask: Tensor,
    lengths: Tensor,
    *,
    num_negatives: int = 100,
    temperature: float = 0.1,
    generator: torch.Generator | None = None,
) -> ContrastiveOutput:
    """InfoNCE over masked frames with in-utterance distractors.

    context: (B, T, D) transformer outputs; targets: (B, T, D) projected quantized vectors of all frames (positives
    and distractor pool); frame_mask: (B, T) bool masked frames; lengths: (B,) valid frames.
    """
    batch, frames, dim = targets.shape
    negative_index, negative_valid = sample_negatives(frame_mask, lengths, num_negatives, generator=generator)
    flat_targets = targets.reshape(batch * frames, dim)
    negatives = flat_targets[negative_index]  # (M, K, D)
    logits = contrastive_logits(
        context[frame_mask],
        targets[frame_mask],
        negatives,
        temperature=temperature,
        negative_valid=negative_valid,
    )
    loss = info_nce(logits, reduction="sum")
    with torch.no_grad():
        best_negative = logits[:, 1:].max(-1).values if num_negatives > 0 else logits[:, 0] - 1
        accuracy = (logits[:, 0] > best_negative).float().mean() if logits.numel() else logits.new_zeros(())
    return ContrastiveOutput(loss=loss, num_frames=int(logits.shape[0]), accuracy=accuracy, logits=logits)
