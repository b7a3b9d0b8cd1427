"""Gumbel-softmax product quantizer (wav2vec 2.0, Baevski et al. 2020, §2; used as is by UniSpeech).

The input feature vector is projected to ``groups × entries`` logits. Each group picks one entry of its own codebook
(hard straight-through Gumbel-softmax in training, argmax in eval) and the chosen entries of all groups are
concatenated into one code vector. The codebook usage perplexity feeds the diversity loss.

State-dict names follow Hugging Face (``weight_proj``, ``codevectors`` of shape (1, G·V, dim/G)), so HF and fairseq
checkpoints (``quantizer.vars``) load without reshaping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# UniSpeech / wav2vec 2.0 Large: τ anneals from 2 to 0.1 by 0.999995 per step (Base: to 0.5)
LARGE_TEMPERATURE = (2.0, 0.1, 0.999995)


def check_quantizer_arguments(
    num_groups: int, codevector_dim: int, temperature: tuple[float, float, float], owner: str
) -> None:
    """Raise a ValueError naming ``owner`` unless the code vector splits evenly into ``num_groups`` parts and
    ``temperature`` = (max, min, decay) is a schedule: 0 < min <= max, 0 < decay <= 1."""
    if num_groups < 1 or codevector_dim % num_groups != 0:
        raise ValueError(
            f"{owner}: codevector_dim={codevector_dim} must be divisible by the {num_groups} codebook groups: "
            "each group contributes codevector_dim / groups values."
        )
    if len(temperature) != 3:
        raise ValueError(f"{owner}: temperature must be (max, min, decay), got {tuple(temperature)}")
    maximum, minimum, decay = temperature
    if not 0.0 < minimum <= maximum:
        raise ValueError(f"{owner}: temperature needs 0 < min <= max, got max={maximum}, min={minimum}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"{owner}: the temperature decay must be in (0, 1], got {decay}")


def gumbel_temperature(step: int, maximum: float, minimum: float, decay: float) -> float:
    """Annealed Gumbel temperature τ = max(maximum · decay^step, minimum) (fairseq ``set_num_updates``)."""
    return max(maximum * decay ** max(int(step), 0), minimum)


@dataclass
class QuantizerOutput:
    """Result of one quantizer call on features of shape (..., input_dim).

    codevectors: (..., codevector_dim) selected entries, concatenated over groups (straight-through in training).
    indices: (..., G) int64 selected entry per group.
    prob_perplexity: scalar, Σ_g exp(H(mean over valid frames of softmax(logits_g))) — what the diversity loss uses.
    code_perplexity: scalar, the same with hard one-hot assignments (how many entries are really used).
    """

    codevectors: Tensor
    indices: Tensor
    prob_perplexity: Tensor
    code_perplexity: Tensor


def _perplexity(probs: Tensor, valid: Tensor | None) -> Tensor:
    """probs: (N, G, V); valid: (N,) bool or None -> scalar Σ_g exp(entropy of the average distribution)."""
    if valid is not None:
        weights = valid.to(probs.dtype)
        average = (probs * weights[:, None, None]).sum(0) / weights.sum().clamp(min=1.0)
    else:
        average = probs.mean(0)
    entropy = -torch.special.xlogy(average, average).sum(-1)
    return entropy.exp().sum()


class GumbelProductQuantizer(nn.Module):
    """Gumbel-softmax product quantizer.

    input_dim: size of the features to quantize (the 512-d CNN features).
    num_groups (G), num_entries (V): G codebooks of V entries each (G·V = 640 code vectors).
    codevector_dim: size of the concatenated code vector (each entry has codevector_dim / G values).
    temperature: (max, min, decay), τ(step) = max(max · decay^step, min); defaults = UniSpeech / wav2vec 2.0 Large.

    ``forward(features (..., input_dim), valid_mask (...) bool | None, generator=None) -> QuantizerOutput``.
    Call ``set_step(global_step)`` every training step to anneal the temperature (it is not automatic).
    """

    def __init__(
        self,
        input_dim: int,
        num_groups: int = 2,
        num_entries: int = 320,
        codevector_dim: int = 768,
        temperature: tuple[float, float, float] = LARGE_TEMPERATURE,
    ) -> None:
        super().__init__()
        check_quantizer_arguments(num_groups, codevector_dim, temperature, "GumbelProductQuantizer")
        self.num_groups = num_groups
        self.num_entries = num_entries
        self.schedule = tuple(float(t) for t in temperature)
        self.weight_proj = nn.Linear(input_dim, num_groups * num_entries)
        self.codevectors = nn.Parameter(
            torch.empty(1, num_groups * num_entries, codevector_dim // num_groups)
        )
        self.temperature = self.schedule[0]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fairseq / HF init: logits projection N(0, 1) with zero bias, codebook U[0, 1).
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        nn.init.uniform_(self.codevectors)

    @property
    def num_codevectors(self) -> int:
        """G·V, the normaliser of the diversity loss."""
        return self.num_groups * self.num_entries

    def set_step(self, step: int) -> float:
        """Set τ from the optimiser step count; returns the new temperature."""
        self.temperature = gumbel_temperature(step, *self.schedule)
        return self.temperature

    def forward(
        self, features: Tensor, valid_mask: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> QuantizerOutput:
        """features: (..., input_dim); valid_mask: (...) bool, True at real (non-padded) frames, used only for the
        perplexities (padded frames are still quantized, their vectors are simply never used as targets)."""
        leading = features.shape[:-1]
        logits = self.weight_proj(features).float().reshape(-1, self.num_groups, self.num_entries)
        valid = valid_mask.reshape(-1) if valid_mask is not None else None

        soft = logits.softmax(-1)
        if self.training:
            # Hard Gumbel-softmax with a straight-through estimator: one-hot forward, soft gradient backward.
            gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
            sample = ((logits + gumbel) / self.temperature).softmax(-1)
            indices = sample.argmax(-1)
            hard = torch.zeros_like(sample).scatter_(-1, indices[..., None], 1.0)
            assignment = hard - sample.detach() + sample
        else:
            indices = logits.argmax(-1)
            hard = torch.zeros_like(logits).scatter_(-1, indices[..., None], 1.0)
            assignment = hard

        codebook = self.codevectors.reshape(self.num_groups, self.num_entries, -1)
        vectors = torch.einsum("ngv,gvd->ngd", assignment.to(codebook.dtype), codebook)
        return QuantizerOutput(
            codevectors=vectors.reshape(*leading, -1),
            indices=indices.reshape(*leading, self.num_groups),
            prob_perplexity=_perplexity(soft, valid),
            code_perplexity=_perplexity(hard.detach(), valid),
        )
