"""SEANet-style convolutional encoder/decoder (SoundStream / EnCodec lineage) and a small latent Transformer.

Every convolution pads explicitly, either causally (all padding on the left, EnCodec's streaming layout) or
symmetrically, always with zeros. Zero padding plus masking the padded tail after every block makes a padded batch
give exactly the frames of each utterance alone (reflect padding, EnCodec's default, cannot).

Streaming (causal models only): every module's ``forward`` takes an optional ``cache`` dict. When given, the module
reads its left context from ``cache[self.stream_key]`` (zeros at the start) and writes the new context back, so
feeding a signal chunk by chunk gives the same output as one whole-signal call. Chunks must be whole multiples of the
module stack's total stride (the codec model buffers the rest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``lengths: (B,)`` -> ``(B, max_len)`` bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _mask_tail(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Zero ``x: (B, C, T)`` beyond each item's length (no-op without lengths)."""
    if lengths is None:
        return x
    return x * lengths_to_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)


def fold_weight_norm(module: nn.Module) -> nn.Module:
    """Fold every weight-norm parametrization of ``module`` into a plain ``weight`` (for inference/export)."""
    for sub in module.modules():
        if parametrize.is_parametrized(sub, "weight"):
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
    return module


class SConv1d(nn.Module):
    """Conv1d with explicit zero padding: causal (left only) or centred; optional weight norm; streamable.

    Output length for input length ``n`` is ``ceil(n / stride)`` when ``kernel_size >= stride`` and ``n`` is a
    multiple of ``stride`` (the only case the SEANet stacks use).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        causal: bool = False,
        norm: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, bias=bias)
        self.conv = weight_norm(conv) if norm else conv
        self.causal = causal
        self.stride = stride
        self.pad_total = (kernel_size - 1) * dilation - (stride - 1)
        self.stream_key = ""

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        """``x: (B, C_in, T)`` -> ``(B, C_out, T // stride)``."""
        if cache is not None:
            if not self.causal:
                raise RuntimeError("streaming needs a causal model (CodecConfig.causal=True)")
            if self.pad_total > 0:
                prev = cache.get(self.stream_key)
                if prev is None:
                    prev = x.new_zeros(x.shape[0], x.shape[1], self.pad_total)
                x = torch.cat([prev, x], dim=-1)
                cache[self.stream_key] = x[..., x.shape[-1] - self.pad_total :]
            return self.conv(x)
        if self.causal:
            x = F.pad(x, (self.pad_total, 0))
        else:
            right = self.pad_total // 2
            x = F.pad(x, (self.pad_total - right, right))
        return self.conv(x)


class SConvTranspose1d(nn.Module):
    """Transposed conv upsampling by ``stride``; output length is exactly ``T * stride``.

    Causal: the ``kernel_size - stride`` overhang is trimmed on the right (streaming carries it into the next chunk);
    non-causal: trimmed symmetrically.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        causal: bool = False,
        norm: bool = True,
    ) -> None:
        super().__init__()
        conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.convtr = weight_norm(conv) if norm else conv
        self.causal = causal
        self.stride = stride
        self.trim = kernel_size - stride
        self.stream_key = ""

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        """``x: (B, C_in, T)`` -> ``(B, C_out, T * stride)``."""
        if cache is not None:
            if not self.causal:
                raise RuntimeError("streaming needs a causal model (CodecConfig.causal=True)")
            y = F.conv_transpose1d(x, self.convtr.weight, None, stride=self.stride)
            tail = cache.get(self.stream_key)
            if tail is not None:
                y = torch.cat([y[..., : self.trim] + tail, y[..., self.trim :]], dim=-1)
            cache[self.stream_key] = y[..., y.shape[-1] - self.trim :]
            y = y[..., : y.shape[-1] - self.trim]
            bias = self.convtr.bias
            return y if bias is None else y + bias[None, :, None]
        y = self.convtr(x)
        if self.trim == 0:
            return y
        if self.causal:
            return y[..., : y.shape[-1] - self.trim]
        right = self.trim // 2
        return y[..., self.trim - right : y.shape[-1] - right]


class ResidualUnit(nn.Module):
    """ELU -> dilated conv (k, dim -> dim/compress) -> ELU -> 1x1 conv back; identity skip (Mimi's true_skip)."""

    def __init__(
        self, dim: int, kernel_size: int, dilation: int, compress: int, causal: bool, norm: bool
    ) -> None:
        super().__init__()
        hidden = max(dim // compress, 1)
        self.conv1 = SConv1d(dim, hidden, kernel_size, dilation=dilation, causal=causal, norm=norm)
        self.conv2 = SConv1d(hidden, dim, 1, causal=causal, norm=norm)

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x), cache)), cache)


@dataclass
class SEANetConfig:
    """SEANet stack. ``ratios`` are the encoder's strides in order (the decoder reverses them)."""

    channels: int = 1
    dimension: int = 128  # latent size
    n_filters: int = 32  # channels after the first conv; doubled at every stride
    ratios: list[int] = field(default_factory=lambda: [2, 4, 5, 8])
    n_residual_layers: int = 1
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    causal: bool = False
    max_channels: int = 1024  # channel width cap (keeps the deepest block affordable on CPU)

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    def widths(self) -> list[int]:
        """Channel width at each resolution: input conv, then after every stride."""
        return [min(self.n_filters * 2**i, self.max_channels) for i in range(len(self.ratios) + 1)]


def _assign_stream_keys(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if isinstance(module, (SConv1d, SConvTranspose1d)):
            module.stream_key = name


class SEANetEncoder(nn.Module):
    """``audio: (B, channels, S)`` -> ``latent: (B, dimension, S // hop)`` (S a multiple of hop)."""

    def __init__(self, config: SEANetConfig, norm: bool = True) -> None:
        super().__init__()
        c = config
        widths = c.widths()
        self.config = c
        self.conv_in = SConv1d(c.channels, widths[0], c.kernel_size, causal=c.causal, norm=norm)
        self.blocks = nn.ModuleList()
        for i, stride in enumerate(c.ratios):
            units = nn.ModuleList(
                ResidualUnit(
                    widths[i], c.residual_kernel_size, c.dilation_base**j, c.compress, c.causal, norm
                )
                for j in range(c.n_residual_layers)
            )
            down = SConv1d(widths[i], widths[i + 1], 2 * stride, stride=stride, causal=c.causal, norm=norm)
            self.blocks.append(nn.ModuleDict({"units": units, "down": down}))
        self.conv_out = SConv1d(widths[-1], c.dimension, c.last_kernel_size, causal=c.causal, norm=norm)
        _assign_stream_keys(self)

    def forward(self, audio: Tensor, lengths: Tensor | None = None, cache: dict | None = None) -> Tensor:
        """``lengths: (B,)`` valid samples; positions past them are zeroed at every resolution."""
        x = _mask_tail(self.conv_in(audio, cache), lengths)
        for block, stride in zip(self.blocks, self.config.ratios, strict=True):
            for unit in block["units"]:
                x = _mask_tail(unit(x, cache), lengths)
            x = block["down"](F.elu(x), cache)
            lengths = (
                None if lengths is None else torch.div(lengths + stride - 1, stride, rounding_mode="floor")
            )
            x = _mask_tail(x, lengths)
        return _mask_tail(self.conv_out(F.elu(x), cache), lengths)


class SEANetDecoder(nn.Module):
    """``latent: (B, dimension, T)`` -> ``audio: (B, channels, T * hop)``."""

    def __init__(self, config: SEANetConfig, norm: bool = True) -> None:
        super().__init__()
        c = config
        widths = c.widths()[::-1]
        ratios = c.ratios[::-1]
        self.config = c
        self.conv_in = SConv1d(c.dimension, widths[0], c.kernel_size, causal=c.causal, norm=norm)
        self.blocks = nn.ModuleList()
        for i, stride in enumerate(ratios):
            up = SConvTranspose1d(widths[i], widths[i + 1], 2 * stride, stride, causal=c.causal, norm=norm)
            units = nn.ModuleList(
                ResidualUnit(
                    widths[i + 1], c.residual_kernel_size, c.dilation_base**j, c.compress, c.causal, norm
                )
                for j in range(c.n_residual_layers)
            )
            self.blocks.append(nn.ModuleDict({"up": up, "units": units}))
        self.conv_out = SConv1d(widths[-1], c.channels, c.last_kernel_size, causal=c.causal, norm=norm)
        _assign_stream_keys(self)

    def forward(
        self, latent: Tensor, frame_lengths: Tensor | None = None, cache: dict | None = None
    ) -> Tensor:
        lengths = frame_lengths
        x = _mask_tail(self.conv_in(latent, cache), lengths)
        for block, stride in zip(self.blocks, self.config.ratios[::-1], strict=True):
            x = block["up"](F.elu(x), cache)
            lengths = None if lengths is None else lengths * stride
            x = _mask_tail(x, lengths)
            for unit in block["units"]:
                x = _mask_tail(unit(x, cache), lengths)
        return _mask_tail(self.conv_out(F.elu(x), cache), lengths)


# ------------------------------------------------------------------------------------------------------------------
# Small Transformer at the latent frame rate (Mimi-style), with RoPE, padding mask and a streaming KV cache.


def _rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding. ``x: (B, H, T, Dh)``, ``positions: (T,)`` absolute frame indices."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half :]], dim=-1)


class TransformerLayer(nn.Module):
    """Pre-LN self-attention + GELU MLP with layer scale (init 0.01, as Mimi)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, layer_scale: float = 0.01) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"transformer dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.scale1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.scale2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.stream_key = ""

    def forward(
        self, x: Tensor, positions: Tensor, attn_mask: Tensor | None, cache: dict[str, Tensor] | None = None
    ) -> Tensor:
        """``x: (B, T, D)``; ``attn_mask``: bool (B or 1, 1, T, T_keys), True = may attend."""
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k = _rope(q, positions), _rope(k, positions)
        if cache is not None:
            past_k, past_v = cache.get(self.stream_key + ".k"), cache.get(self.stream_key + ".v")
            if past_k is not None:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            cache[self.stream_key + ".k"], cache[self.stream_key + ".v"] = k, v
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.scale1 * self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.scale2 * self.mlp(self.norm2(x))


class LatentTransformer(nn.Module):
    """Residual Transformer on ``(B, D, T)`` latents.

    ``causal``: each frame attends to itself and the ``context - 1`` frames before it (a sliding window, so the
    streaming KV cache stays bounded); otherwise full bidirectional attention over the valid frames.
    """

    def __init__(
        self, dim: int, num_layers: int, num_heads: int, ffn_dim: int, causal: bool, context: int = 250
    ):
        super().__init__()
        self.causal = causal
        self.context = context
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))
        for i, layer in enumerate(self.layers):
            layer.stream_key = f"transformer.{i}"

    def forward(self, x: Tensor, frame_lengths: Tensor | None = None, cache: dict | None = None) -> Tensor:
        """``x: (B, D, T)`` -> ``(B, D, T)``; padded frames never influence valid ones."""
        t = x.shape[-1]
        offset, past = 0, 0
        if cache is not None:
            if not self.causal:
                raise RuntimeError("streaming needs a causal model (CodecConfig.causal=True)")
            offset = int(cache.get("transformer.offset", torch.zeros((), dtype=torch.long)))
            past = 0 if not self.layers else cache.get("transformer.0.k", x.new_zeros(1, 1, 0, 1)).shape[2]
        positions = torch.arange(offset, offset + t, device=x.device)
        key_pos = torch.arange(offset - past, offset + t, device=x.device)
        mask = None
        if self.causal:
            rel = positions[:, None] - key_pos[None, :]
            mask = ((rel >= 0) & (rel < self.context))[None, None]  # (1, 1, T, T_keys)
        if frame_lengths is not None:
            key_valid = lengths_to_mask(frame_lengths, key_pos.shape[0])[:, None, None, :]
            mask = key_valid if mask is None else mask & key_valid
        h = x.transpose(1, 2)
        for layer in self.layers:
            h = layer(h, positions, mask, cache)
        if cache is not None:
            cache["transformer.offset"] = torch.tensor(offset + t)
            keep = self.context - 1
            for layer in self.layers:
                for kv in (".k", ".v"):
                    cached = cache[layer.stream_key + kv]
                    cache[layer.stream_key + kv] = cached[:, :, max(cached.shape[2] - keep, 0) :]
        return _mask_tail(h.transpose(1, 2), frame_lengths)
