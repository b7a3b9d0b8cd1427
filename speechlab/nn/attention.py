"""Multi-head self-attention with WavLM's optional gated relative position bias (spec §2.3).

The gate follows the released code (what the checkpoints expect), not the paper: for head h and query frame i,

    u = gate_proj(x[b, i, head h])            # Linear(head_dim, 8), x = the attention *input* (not the projected q)
    a, b = sigmoid(u.view(2, 4).sum(-1))      # two gate logits, each the sum of 4 outputs
    gate = a * (b * gate_const[h] - 1) + 2    # in (1, 2) when gate_const = 1 (its init)
    logits[b, h, i, j] = q_i . k_j / sqrt(head_dim) + gate[b, h, i] * position_bias[h, i, j]   (-inf at padded keys)

The ungated ``position_bias`` (heads, T, T) is built once from the layer-0 table and shared by every layer. The
attention itself runs in :func:`torch.nn.functional.scaled_dot_product_attention` with the gated bias as an additive
float mask in the query's dtype (no hand-written softmax, no copy of the bias per batch element before gating).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with separate q/k/v projections (HF-compatible weights), fused into one GEMM for inference.

    Args:
        dim: model width D. num_heads: H (head_dim = D / H). dropout: attention-probability dropout.
        gated_relative_bias: add WavLM's gate parameters (``gate_proj`` Linear(head_dim, 8), ``gate_const`` (1,H,1,1)).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, gated_relative_bias: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.normal_(proj.weight, std=0.02)
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

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> Tensor:
        """x: (batch, T, D); padding_mask: (batch, T) bool, True at padded frames; position_bias: (heads, T, T)
        ungated (only used when ``gated_relative_bias``). Returns (batch, T, D)."""
        batch, length, _ = x.shape
        if torch.is_grad_enabled() and self.q_proj.weight.requires_grad:
            # Training: three GEMMs sharing the saved input (a concatenated weight would be saved per layer too).
            q, k, v = (
                proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
        else:
            # Inference: one fused GEMM.
            weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            qkv = F.linear(x, weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd) each

        mask: Tensor | None = None
        if self.gated_relative_bias and position_bias is not None:
            gate = self.gate(x).to(q.dtype)
            mask = gate * position_bias.to(q.dtype).unsqueeze(0)  # (B, H, T, T): one tensor, no batch repeat
            if padding_mask is not None:
                mask = mask.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        elif padding_mask is not None:
            mask = ~padding_mask[:, None, None, :]  # bool, True = attend

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.dim))
