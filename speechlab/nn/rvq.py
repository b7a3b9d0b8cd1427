"""Residual vector quantization (SoundStream / EnCodec / DAC) with padding-aware codebook statistics.

Two codebook flavours per level:

* ``ema`` (EnCodec, Mimi): codebook is a buffer updated by exponential moving averages of assignment counts and
  assigned-vector sums (decay 0.99, Laplace smoothing 1e-5); k-means initialisation on the first training batch;
  codes whose EMA count falls below ``dead_code_threshold`` are replaced by random vectors of the current batch.
  With ``dead_code_ratio`` set (Mimi/Moshi's ``threshold_usage_ratio``) the threshold is that fraction of the count a
  code gets under uniform use (valid frames per batch / codebook size) instead, so it does not depend on the batch
  size: EnCodec's absolute 2 is 43 % of uniform at its 4800 frames per batch for 1024 codes, but above uniform when a
  batch has fewer than 2 frames per code, and then every code is "dead" and re-drawn every step.
  One straight-through estimator on the summed output (audiocraft's fix of encodec issue #25).
* ``factorized`` (DAC, "Improved RVQGAN"): the latent is projected to a small ``codebook_dim``, the nearest code is
  found by cosine similarity (L2-normalised lookup), and the codebook is a parameter trained by the codebook loss;
  per-level straight-through in the projected space so the projections get gradients.

Padding: every statistic (EMA, k-means, dead-code sampling, losses, usage) only sees valid frames of items whose
quantizer-dropout budget includes that level. Padded frames never move a codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from speechlab.host_sync import host_reads_are_free
from speechlab.nn.kmeans import lloyd_kmeans
from speechlab.nn.masks import valid_mask


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CodebookLevel(nn.Module):
    """One RVQ level. Works on flattened frames ``(N, dim)`` with a validity mask ``(N,)``."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_iters: int = 50,
        dead_code_threshold: float = 2.0,
        dead_code_ratio: float | None = None,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.factorized = codebook_dim is not None
        self.decay = decay
        self.epsilon = epsilon
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.dead_code_ratio = dead_code_ratio
        cdim = codebook_dim if codebook_dim is not None else dim
        if self.factorized:
            self.in_proj = nn.Linear(dim, cdim)
            self.out_proj = nn.Linear(cdim, dim)
            self.codebook = nn.Parameter(torch.randn(codebook_size, cdim))
        else:
            self.register_buffer("embed", torch.randn(codebook_size, cdim) * 0.1)
            self.register_buffer("embed_avg", self.embed.clone())
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized_seen = False  # host copy of ``initialized`` once it is True (see is_initialized)

    def is_initialized(self) -> bool:
        """Whether the codebook is initialised. Read on the host until it is (the first training batch), then
        remembered: ``initialized`` only goes from False to True, so later steps need no device read."""
        if not self._initialized_seen:
            self._initialized_seen = bool(self.initialized)
        return self._initialized_seen

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_seen = False  # the loaded buffer decides again

    # --- lookup -----------------------------------------------------------------------------------------------
    def table(self) -> Tensor:
        """The code vectors in lookup space: ``(K, codebook_dim)``."""
        return self.codebook if self.factorized else self.embed

    def project_in(self, x: Tensor) -> Tensor:
        return self.in_proj(x) if self.factorized else x

    def project_out(self, z: Tensor) -> Tensor:
        return self.out_proj(z) if self.factorized else z

    def nearest(self, z: Tensor) -> Tensor:
        """``z: (N, codebook_dim)`` -> codes ``(N,)`` int64 (cosine for factorized, Euclidean otherwise)."""
        table = self.table().detach().float()
        z = z.detach().float()
        if self.factorized:
            return (F.normalize(z, dim=-1) @ F.normalize(table, dim=-1).T).argmax(dim=-1)
        return (2 * z @ table.T - table.pow(2).sum(1)[None]).argmax(dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        """``codes: (...)`` -> ``(..., dim)``."""
        return self.project_out(F.embedding(codes, self.table()))

    # --- training-time codebook maintenance -------------------------------------------------------------------
    @torch.no_grad()
    def init_kmeans(self, z: Tensor) -> None:
        """Initialise the codebook from valid lookup-space vectors ``z: (N, codebook_dim)``."""
        z = z.float()
        if self.factorized:
            z = F.normalize(z, dim=-1)
        centres = (
            lloyd_kmeans(z, self.codebook_size, self.kmeans_iters) if z.shape[0] > 0 else self.table().float()
        )
        if _distributed():
            dist.broadcast(centres, src=0)
        dist2 = z.pow(2).sum(1, keepdim=True) - 2 * z @ centres.T + centres.pow(2).sum(1)[None]
        counts = torch.bincount(dist2.argmin(1), minlength=self.codebook_size).float() if z.shape[0] else None
        if counts is not None and _distributed():
            dist.all_reduce(counts)
        if self.factorized:
            self.codebook.data.copy_(centres)
        else:
            self.embed.copy_(centres)
            self.embed_avg.copy_(centres * (counts if counts is not None else 1.0)[:, None])
        if counts is not None:
            self.cluster_size.copy_(counts)
        self.initialized.fill_(True)
        self._initialized_seen = True

    @torch.no_grad()
    def update(self, z: Tensor, codes: Tensor, rows: Tensor | None = None) -> Tensor:
        """EMA statistics from ``z: (N, codebook_dim)``, ``codes: (N,)`` over the rows where ``rows: (N,)`` bool is
        True (None: all rows); returns #codes replaced. A fixed-size computation: invalid rows add zeros, where
        selecting the valid rows (``z[rows]``) or ``bincount`` would read a size on the host."""
        z = z.float()
        if rows is None:
            weights, valid_z = torch.ones_like(codes, dtype=z.dtype), z
        else:  # torch.where, not a product: a non-finite padded row must add nothing either
            weights, valid_z = rows.to(z.dtype), torch.where(rows[:, None], z, 0.0)
        counts = torch.zeros(self.codebook_size, device=z.device).index_add_(0, codes, weights)
        sums = torch.zeros(self.codebook_size, z.shape[1], device=z.device).index_add_(0, codes, valid_z)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        if not self.factorized:
            self.embed_avg.lerp_(sums, 1 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (
                (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
            )
            self.embed.copy_(self.embed_avg / smoothed[:, None])
        return self.replace_dead_codes(z, rows)

    def dead_threshold(self) -> tuple[Tensor | float, Tensor | float]:
        """(EMA count under which a code is dead, EMA count a replaced code starts with).

        Absolute (EnCodec): ``dead_code_threshold`` for both. Relative (Mimi): ``dead_code_ratio`` x the uniform
        count, and a replaced code starts at the uniform count (Mimi's ``replaced_usage_ratio`` 1) so it is not
        re-drawn at the next step before it had a chance to be used.
        """
        if self.dead_code_ratio is None:
            return self.dead_code_threshold, self.dead_code_threshold
        uniform = self.cluster_size.sum() / self.codebook_size
        return self.dead_code_ratio * uniform, uniform

    @torch.no_grad()
    def replace_dead_codes(self, z: Tensor, rows: Tensor | None = None) -> Tensor:
        """Codes whose EMA usage < threshold (:meth:`dead_threshold`) get a random vector of this batch (EnCodec's
        expiry), drawn from the rows of ``z`` where ``rows`` is True (None: all).

        Where host reads are free (CPU) the valid rows are selected and the step ends early when nothing is dead;
        on an accelerator the same draw is a fixed-size one (valid rows sampled by ``multinomial``, nothing
        replaced when no code is dead or no row is valid), so no count is read on the host.
        """
        threshold, restart = self.dead_threshold()
        dead = self.cluster_size < threshold
        if rows is not None and host_reads_are_free(z):
            z, rows = z[rows], None
        if rows is None:
            num_dead = dead.sum()
            if num_dead == 0 or z.shape[0] == 0:
                return num_dead.new_zeros(())
            pick = torch.randint(0, z.shape[0], (self.codebook_size,), device=z.device)
        else:
            any_valid = rows.any()
            dead = dead & any_valid
            num_dead = dead.sum()
            # with no valid row the weights are uniform (multinomial needs a positive sum); nothing is replaced then
            weights = rows.float() + (~any_valid).float()
            pick = torch.multinomial(weights, self.codebook_size, replacement=True)
        samples = z[pick]
        if self.factorized:
            samples = F.normalize(samples, dim=-1)
        if _distributed():
            dist.broadcast(samples, src=0)
        mask = dead[:, None]
        if self.factorized:
            self.codebook.data.copy_(torch.where(mask, samples, self.codebook.data))
        else:
            self.embed.copy_(torch.where(mask, samples, self.embed))
            self.embed_avg.copy_(torch.where(mask, samples * restart, self.embed_avg))
        self.cluster_size.copy_(
            torch.where(dead, torch.as_tensor(restart).to(self.cluster_size), self.cluster_size)
        )
        return num_dead


@dataclass
class RVQOutput:
    quantized: Tensor  # (B, D, T) sum of the active levels (straight-through in training)
    codes: Tensor  # (B, n_q, T) int64
    commitment_loss: Tensor  # scalar
    codebook_loss: Tensor  # scalar (factorized codebooks only; 0 for EMA)
    level_mask: Tensor  # (B, n_q) bool: level used for this item (quantizer dropout)
    first_level: Tensor  # (B, D, T) level-0 output, for semantic distillation
    usage: Tensor  # (n_q,) fraction of codes used in this batch (valid frames)
    perplexity: Tensor  # (n_q,) exp(entropy) of this batch's code histogram
    replaced: Tensor  # (n_q,) dead codes replaced this step


class ResidualVectorQuantizer(nn.Module):
    """``num_quantizers`` levels, each quantizing the residual of the previous ones.

    ``dead_code_ratio``: see the module docstring (None: EnCodec's absolute ``dead_code_threshold``).
    ``quantizer_dropout``: fraction of batch items that get a random budget ``n_q ~ U{1..N}`` in training (DAC
    uses 0.5; the rest use all levels), so any prefix of levels decodes.
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int = 8,
        codebook_size: int = 1024,
        codebook_dim: int | None = None,
        decay: float = 0.99,
        kmeans_iters: int = 50,
        dead_code_threshold: float = 2.0,
        quantizer_dropout: float = 0.5,
        dead_code_ratio: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.quantizer_dropout = quantizer_dropout
        self.levels = nn.ModuleList(
            CodebookLevel(
                dim,
                codebook_size,
                codebook_dim,
                decay,
                kmeans_iters=kmeans_iters,
                dead_code_threshold=dead_code_threshold,
                dead_code_ratio=dead_code_ratio,
            )
            for _ in range(num_quantizers)
        )
        self.factorized = codebook_dim is not None

    def _check_n_q(self, n_q: int | None) -> int:
        n_q = self.num_quantizers if n_q is None else int(n_q)
        if not 1 <= n_q <= self.num_quantizers:
            raise ValueError(f"n_q must be in [1, {self.num_quantizers}], got {n_q}")
        return n_q

    def forward(self, x: Tensor, frame_lengths: Tensor | None = None, n_q: int | None = None) -> RVQOutput:
        """``x: (B, D, T)``; ``frame_lengths: (B,)``. In training mode codebooks are updated from valid frames."""
        b, d, t = x.shape
        n_q = self._check_n_q(n_q)
        device = x.device
        frames = x.transpose(1, 2).reshape(b * t, d)
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
        if frame_lengths is not None:
            valid = valid_mask(frame_lengths, t)
        budget = torch.full((b,), n_q, device=device)
        if self.training and self.quantizer_dropout > 0:
            num_drop = int(b * self.quantizer_dropout)
            if num_drop:
                budget[:num_drop] = torch.randint(1, n_q + 1, (num_drop,), device=device)
        level_mask = valid_mask(budget, n_q)  # (B, n_q): the first budget[b] levels

        residual = frames
        total = torch.zeros_like(frames)
        codes_all, commit, cbloss = [], [], []
        usage, perplexity, replaced = [], [], []
        first_level = None
        zero = x.new_zeros(())
        for i, level in enumerate(self.levels[:n_q]):
            rows = (valid & level_mask[:, i : i + 1]).reshape(-1)  # (B*T,)
            z = level.project_in(residual)
            if self.training and not level.is_initialized():  # the first training batch only
                level.init_kmeans(z.detach()[rows])
            codes = level.nearest(z)
            z_q = F.embedding(codes, level.table())
            weight = rows.to(z.dtype)[:, None]
            denom = (rows.sum() * z.shape[1]).clamp_min(1)
            if self.factorized:
                commit.append(((z - z_q.detach()).pow(2) * weight).sum() / denom)
                cbloss.append(((z_q - z.detach()).pow(2) * weight).sum() / denom)
                out = level.project_out(z + (z_q - z).detach() if self.training else z_q)
            else:
                commit.append(((residual - z_q.detach()).pow(2) * weight).sum() / denom)
                out = z_q.detach() if self.training else z_q
            out = out * level_mask[:, i].repeat_interleave(t)[:, None].to(out.dtype)
            if i == 0:
                # straight-through for the EMA flavour too, so a distillation loss on level 0 reaches the encoder
                first_level = (
                    out if self.factorized or not self.training else residual + (out - residual).detach()
                )
            if self.training:
                with torch.no_grad():  # histogram of the valid rows' codes, fixed-size (no codes[rows])
                    hist = torch.zeros(level.codebook_size, device=device).index_add_(0, codes, rows.float())
                    prob = hist / hist.sum().clamp_min(1)
                    usage.append((hist > 0).float().mean())
                    perplexity.append(torch.exp(-(prob * prob.clamp_min(1e-10).log()).sum()))
                    replaced.append(level.update(z.detach(), codes, rows).float())
            total = total + out
            residual = residual - out.detach() if not self.factorized else residual - out
            codes_all.append(codes.view(b, t))
        if not self.factorized and self.training:
            total = frames + (total - frames).detach()  # one straight-through for the whole stack
        quantized = total.view(b, t, d).transpose(1, 2)
        first = first_level.view(b, t, d).transpose(1, 2)
        if frame_lengths is not None:
            pad = (~valid)[:, None, :]
            quantized = quantized.masked_fill(pad, 0.0)
            first = first.masked_fill(pad, 0.0)
        codes = torch.stack(codes_all, dim=1)
        stats = [torch.stack(s) if s else x.new_zeros(n_q) for s in (usage, perplexity, replaced)]
        return RVQOutput(
            quantized=quantized,
            codes=codes,
            commitment_loss=torch.stack(commit).mean() if commit else zero,
            codebook_loss=torch.stack(cbloss).mean() if cbloss else zero,
            level_mask=level_mask,
            first_level=first,
            usage=stats[0],
            perplexity=stats[1],
            replaced=stats[2],
        )

    @torch.no_grad()
    def encode(self, x: Tensor, frame_lengths: Tensor | None = None, n_q: int | None = None) -> Tensor:
        """Inference lookup (no statistics): ``x: (B, D, T)`` -> codes ``(B, n_q, T)`` int64."""
        n_q = self._check_n_q(n_q)
        b, d, t = x.shape
        residual = x.transpose(1, 2).reshape(b * t, d)
        codes_all = []
        for level in self.levels[:n_q]:
            codes = level.nearest(level.project_in(residual))
            residual = residual - level.decode(codes)
            codes_all.append(codes.view(b, t))
        return torch.stack(codes_all, dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """``codes: (B, n_q, T)`` (any prefix of the levels) -> ``(B, D, T)``."""
        n_q = self._check_n_q(codes.shape[1])
        out = None
        for i in range(n_q):
            q = self.levels[i].decode(codes[:, i])  # (B, T, D)
            out = q if out is None else out + q
        return out.transpose(1, 2)

    def codebook_state(self) -> list[Tensor]:
        """Every tensor that defines the code -> vector mapping (for a token file's codebook hash)."""
        tensors = []
        for level in self.levels:
            tensors.append(level.table())
            if level.factorized:
                tensors += [level.out_proj.weight, level.out_proj.bias]
        return [t.detach() for t in tensors]
