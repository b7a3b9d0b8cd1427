"""Multi-head self-attention, the one of the package: the SSL encoder's (WavLM's optional gated relative position
bias, WavLM, Chen et al. 2022, §III-A) and the codec's latent Transformer's (RoPE, a causal sliding-window mask, a
streaming key/value cache), one module with the position scheme and the projection layout as options.

The gate follows the released code (what the checkpoints expect), not the paper (docs/pitfalls.md, 5): for head h
and query frame i,

    u = gate_proj(x[b, i, head h])            # Linear(head_dim, 8), x = the attention *input* (not the projected q)
    a, b = sigmoid(u.view(2, 4).sum(-1))      # two gate logits, each the sum of 4 outputs
    gate = a * (b * gate_const[h] - 1) + 2    # in (1, 2) when gate_const = 1 (its init)
    logits[b, h, i, j] = q_i . k_j / sqrt(head_dim) + gate[b, h, i] * position_bias[h, i, j]   (-inf at padded keys)

The ungated position bias is built once from the layer-0 table and shared by every layer. Two backends for it:

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` with the gated bias as an additive float mask in
  the query's dtype (no hand-written softmax, no copy of the bias per batch element before gating); ``position_bias``
  is (heads, T, T). The mask is one (batch, heads, T, T) tensor per layer. On the CPU with attention dropout (training)
  SDPA has no fused kernel and falls back to its math path, which measured ~9 % of a bf16 WavLM Base training step
  slower than the same attention written out (:func:`eager_attention`: matmul, softmax, dropout, matmul), so there
  the written-out form runs.
- ``"flex"``: FlexAttention with a ``score_mod`` that adds ``gate[b, h, i] * distance_bias[h, j - i + T - 1]`` and
  -inf at padded keys inside the kernel; ``position_bias`` is the per-distance (heads, 2T - 1) table. Only the gate
  (batch, heads, T) and that table exist as tensors: no (batch, heads, T, T) bias. Compiled on CUDA (eager
  FlexAttention materialises the scores); eager on the CPU, where FlexAttention has no backward pass (so there it is
  for inference and for checking it against ``"sdpa"``). It has no attention-probability dropout either, so
  :func:`resolve_attention_backend` picks it only where that dropout is off.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechlab.nn import fused
from speechlab.nn.position import rotary_embedding

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """softmax(q kᵀ / sqrt(d) + mask) v with dropout on the probabilities: what SDPA computes, written out.

    q, k, v: (batch, heads, T, head_dim); mask: additive float (broadcast to (batch, heads, T, T)) or bool
    (True = attend), or None. Returns (batch, heads, T, head_dim).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(F.dropout(scores.softmax(-1), dropout_p), v)


def flex_attention_available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``, torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _can_compile_for_cuda() -> bool:
    """Whether torch.compile can build the FlexAttention kernel for CUDA here (it needs Triton)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def resolve_attention_backend(
    backend: str, device: torch.device, gated: bool, dropout: float, training: bool
) -> str:
    """``"sdpa"`` or ``"flex"`` for one forward pass.

    ``"auto"``: FlexAttention on CUDA for the gated relative bias when attention dropout is inactive (FlexAttention
    has none), else SDPA. ``"flex"`` asked for explicitly where it cannot run (training with dropout, or a backward
    pass on the CPU) is an error rather than a silent change of the model.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    dropout_active = training and dropout > 0.0
    if backend == "auto":
        use_flex = gated and device.type == "cuda" and not dropout_active and flex_attention_available()
        return "flex" if use_flex and _can_compile_for_cuda() else "sdpa"
    if backend == "flex":
        if not gated:
            return "sdpa"  # nothing to compute in the kernel: SDPA's padding mask is as cheap
        if dropout_active:
            raise ValueError(
                f"attention_backend='flex' has no attention dropout, but attention_dropout={dropout} in training: "
                "set attention_dropout to 0 or use attention_backend 'auto' / 'sdpa'"
            )
        if not flex_attention_available():
            raise ValueError(
                "attention_backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)"
            )
    return backend


def gated_flex_attention(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, distance_bias: Tensor, padding_mask: Tensor | None
) -> Tensor:
    """FlexAttention with WavLM's gated relative bias computed in the kernel.

    q, k, v: (batch, heads, T, head_dim); gate: (batch, heads, T) float; distance_bias: (heads, 2T - 1) float,
    ``distance_bias[h, d + T - 1]`` for ``d = key - query``; padding_mask: (batch, T) bool, True at padded keys.
    Returns (batch, heads, T, head_dim), what SDPA gives with the materialised mask of :class:`MultiHeadSelfAttention`.
    """
    from torch.nn.attention.flex_attention import flex_attention

    offset = q.shape[-2] - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        score = score + (gate[b, h, q_idx] * distance_bias[h, kv_idx - q_idx + offset]).to(score.dtype)
        if padding_mask is not None:
            score = torch.where(padding_mask[b, kv_idx], -float("inf"), score)
        return score

    return flex_attention(q, k, v, score_mod=score_mod)


@functools.cache
def _compiled_gated_flex_attention():
    return torch.compile(gated_flex_attention)


def _run_gated_flex_attention(q, k, v, gate, distance_bias, padding_mask) -> Tensor:
    if q.device.type == "cuda":
        return _compiled_gated_flex_attention()(q, k, v, gate, distance_bias, padding_mask)
    with warnings.catch_warnings():  # eager off CUDA, by design (see the module docstring)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return gated_flex_attention(q, k, v, gate, distance_bias, padding_mask)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention: the one attention of the package (the SSL encoder's and the codec's).

    Args:
        dim: model width D. num_heads: H (head_dim = D / H). dropout: attention-probability dropout.
        gated_relative_bias: add WavLM's gate parameters (``gate_proj`` Linear(head_dim, 8), ``gate_const`` (1,H,1,1))
            and gate the ``position_bias`` given to :meth:`forward`.
        rotary: rotate q and k by their frame positions (RoPE, :func:`speechlab.nn.position.rotary_embedding`).
        bias: biases in the q/k/v and output projections.
        packed_qkv: one ``qkv_proj`` Linear(D, 3D) (rows q, k, v) instead of ``q_proj`` / ``k_proj`` / ``v_proj``
            (the separate ones are the HF-compatible SSL layout; in inference they run as one GEMM,
            :func:`speechlab.nn.fused.qkv_heads`, when fused kernels are on).
        init_std: normal init of the projection weights (biases 0), as wav2vec 2.0 / BERT; None keeps PyTorch's.

    ``stream_key`` names this layer's keys and values in a streaming cache (see :meth:`forward`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dropout: float = 0.0,
        gated_relative_bias: bool = False,
        *,
        rotary: bool = False,
        bias: bool = True,
        packed_qkv: bool = False,
        init_std: float | None = 0.02,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.rotary = rotary
        self.packed_qkv = packed_qkv
        self.stream_key = ""
        if packed_qkv:
            self.qkv_proj = nn.Linear(dim, 3 * dim, bias=bias)
            projections = [self.qkv_proj]
        else:
            self.q_proj = nn.Linear(dim, dim, bias=bias)
            self.k_proj = nn.Linear(dim, dim, bias=bias)
            self.v_proj = nn.Linear(dim, dim, bias=bias)
            projections = [self.q_proj, self.k_proj, self.v_proj]
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        if init_std is not None:
            for proj in (*projections, self.out_proj):
                nn.init.normal_(proj.weight, std=init_std)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        self.gated_relative_bias = gated_relative_bias
        if gated_relative_bias:
            self.gate_proj = nn.Linear(self.head_dim, 8)
            self.gate_const = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def gate(self, x: Tensor) -> Tensor:
        """x: (batch, T, D) attention input -> gate (batch, heads, T, 1) float32, in (1, 2) when gate_const = 1."""
        batch, length, _ = x.shape
        # sum-of-4 then linear == linear with the 4 rows summed: one (head_dim -> 2) projection per head.
        weight = self.gate_proj.weight.view(2, 4, self.head_dim).sum(1)
        bias = self.gate_proj.bias.view(2, 4).sum(1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            heads = x.float().view(batch, length, self.num_heads, self.head_dim)
            logits = F.linear(heads, weight.float(), bias.float())  # (B, T, H, 2)
            a, b = torch.sigmoid(logits).permute(0, 2, 1, 3).unbind(-1)  # (B, H, T) each
            gate = a * (b * self.gate_const.view(1, self.num_heads, 1) - 1.0) + 2.0
        return gate.unsqueeze(-1)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (batch, T, D) -> q, k, v, each (batch, heads, T, head_dim)."""
        batch, length, _ = x.shape
        if self.packed_qkv:
            qkv = self.qkv_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if fused.for_inference(self.q_proj.weight):
            return fused.qkv_heads(x, *projections, self.num_heads)  # one GEMM
        q, k, v = (
            proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for proj in projections
        )
        return q, k, v

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
        backend: str = "sdpa",
        *,
        attn_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """x: (batch, T, D) -> (batch, T, D).

        padding_mask: (batch, T_keys) bool, True at padded keys. position_bias: ungated, only used when
        ``gated_relative_bias``: (heads, T, T) for ``backend="sdpa"``, the per-distance (heads, 2T - 1) table for
        ``"flex"`` (see the module docstring). attn_mask (SDPA only): bool broadcastable to (batch, heads, T, T_keys),
        True where a query may attend. positions: (T,) frame indices for RoPE (default ``arange(T)``). cache: a
        streaming state dict; the keys and values of earlier chunks (``cache[stream_key + ".k" / ".v"]``) are
        prepended to this chunk's, and all of them are stored back (the caller trims them to its window).
        """
        batch, length, _ = x.shape
        q, k, v = self.project(x)  # (B, H, T, hd) each
        if self.rotary:
            positions = torch.arange(length, device=x.device) if positions is None else positions
            q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
        if cache is not None:
            k, v = _extend_kv_cache(cache, self.stream_key, k, v)

        if backend == "flex" and self.gated_relative_bias and position_bias is not None:
            if attn_mask is not None:
                raise ValueError(
                    "attn_mask needs attention backend 'sdpa' (FlexAttention here masks padding only)"
                )
            gate = self.gate(x).squeeze(-1)  # (B, H, T) fp32
            out = _run_gated_flex_attention(q, k, v, gate, position_bias.float(), padding_mask)
        else:
            mask = self._sdpa_mask(x, q.dtype, padding_mask, position_bias, attn_mask)
            dropout = self.dropout if self.training else 0.0
            if dropout > 0.0 and q.device.type == "cpu":
                out = eager_attention(q, k, v, mask, dropout)  # SDPA would take its slower math path here
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.dim))

    def _sdpa_mask(
        self,
        x: Tensor,
        dtype: torch.dtype,
        padding_mask: Tensor | None,
        position_bias: Tensor | None,
        attn_mask: Tensor | None,
    ) -> Tensor | None:
        """The mask SDPA takes: the gated bias as an additive float (batch, heads, T, T_keys) mask, -inf where no
        attention goes; without a bias a bool one, True = attend; None when everything attends everything."""
        if not (self.gated_relative_bias and position_bias is not None):
            if padding_mask is None:
                return attn_mask
            keys = ~padding_mask[:, None, None, :]
            return keys if attn_mask is None else keys & attn_mask
        # (B, H, T, T): one tensor, no copy of the bias per batch element before gating
        mask = self.gate(x).to(dtype) * position_bias.to(dtype).unsqueeze(0)
        if padding_mask is not None:
            mask = mask.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        if attn_mask is not None:
            mask = mask.masked_fill(~attn_mask, float("-inf"))
        return mask


def _extend_kv_cache(cache: dict[str, Tensor], key: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values (batch, heads, T, head_dim) with the cached ones of earlier chunks prepended; stores them."""
    past_k, past_v = cache.get(key + ".k"), cache.get(key + ".v")
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    cache[key + ".k"], cache[key + ".v"] = k, v
    return k, v
