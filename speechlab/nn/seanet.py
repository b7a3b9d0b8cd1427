"""SEANet-style convolutional encoder/decoder (SoundStream / EnCodec lineage) and the codec's latent Transformer.

Every convolution pads explicitly, either causally (all padding on the left, EnCodec's streaming layout) or
symmetrically, always with zeros. Zero padding plus masking the padded tail after every block makes a padded batch
give exactly the frames of each utterance alone (reflect padding, EnCodec's default, cannot).

Streaming (causal models only): every module's ``forward`` takes an optional ``cache`` dict. When given, the module
reads its left context from ``cache[self.stream_key]`` (zeros at the start) and writes the new context back, so
feeding a signal chunk by chunk gives the same output as one whole-signal call. Chunks must be whole multiples of the
module stack's total stride (the codec model buffers the rest).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from speechlab.nn.masks import valid_mask
from speechlab.nn.transformer import TransformerLayer


def _mask_tail(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Zero ``x: (B, C, T)`` beyond each item's length (no-op without lengths)."""
    if lengths is None:
        return x
    return x * valid_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)


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
# Small Transformer at the latent frame rate (Mimi-style): the shared TransformerLayer with RoPE, layer scale, a
# sliding-window causal mask and a streaming KV cache.

# The codec layers' tensor names on disk (pretrained directories, Lightning checkpoints), written before the codec
# used the shared TransformerLayer, by the shared layer's names: state_dict() writes the saved names and
# load_state_dict() reads either, so every codec file written before or after loads as it is.
_SAVED_LAYER_NAMES = (
    ("attention_norm.", "norm1."),
    ("attention.qkv_proj.", "qkv."),
    ("attention.out_proj.", "out."),
    ("ffn_norm.", "norm2."),
    ("feed_forward.fc1.", "mlp.0."),
    ("feed_forward.fc2.", "mlp.2."),
    ("attention_scale", "scale1"),
    ("ffn_scale", "scale2"),
)
# The blocks of a layer in the order the codec registered them before it used the shared layer (each norm before the
# block it feeds; the shared layer registers it after). Registration order is parameter order, and AdamW's saved
# state is matched to the parameters by position: in the shared layer's order, a run saved before would resume with
# norm2's moments on the MLP biases (a shape error at the first step, or silently wrong when ffn_dim == dim).
_SAVED_BLOCK_ORDER = ("attention_norm", "attention", "ffn_norm", "feed_forward")
# The shared layer's own order, which the codec's runs written while it had it (from 7d31800 until this order was
# restored) hold their optimiser state in: read through in_shared_layer_order.
_SHARED_BLOCK_ORDER = ("attention", "attention_norm", "feed_forward", "ffn_norm")


def _renamed_layer_key(key: str, prefix: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """``prefix + "layers.<i>." + name`` with name's leading part renamed by the first matching (from, to) pair."""
    if not key.startswith(prefix + "layers."):
        return key
    layer, _, name = key[len(prefix) + len("layers.") :].partition(".")
    for old, new in pairs:
        if name == old or (old.endswith(".") and name.startswith(old)):
            return f"{prefix}layers.{layer}.{new}{name[len(old) :]}"
    return key


def _register_in_saved_order(layer: TransformerLayer) -> None:
    """Re-register ``layer``'s blocks in ``_SAVED_BLOCK_ORDER`` (after construction: no random draw moves)."""
    for name in _SAVED_BLOCK_ORDER:
        block = getattr(layer, name)
        delattr(layer, name)
        setattr(layer, name, block)  # appended: the blocks end up last, in this order


def in_shared_layer_order(named_parameters: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """``named_parameters`` of a module holding :class:`LatentTransformer` s, reordered as they came while its
    layers had the shared layer's order (``_SHARED_BLOCK_ORDER``): to read the optimiser state of runs written then
    (:func:`speechlab.optim.reorder_optimizer_state`)."""

    def layer(name: str) -> str | None:
        match = re.match(r"(.*\.)?layers\.\d+\.", name)
        return match.group(0) if match else None

    def rank(name: str) -> int:  # a layer's own scales (-1) come first in both orders
        block = name[len(layer(name)) :].partition(".")[0]
        return _SHARED_BLOCK_ORDER.index(block) if block in _SHARED_BLOCK_ORDER else -1

    reordered: list[tuple[str, Tensor]] = []
    for prefix, run in itertools.groupby(named_parameters, key=lambda item: layer(item[0])):
        items = list(run)
        reordered += items if prefix is None else sorted(items, key=lambda item: rank(item[0]))  # stable
    return reordered


def _rename_in_place(state: dict[str, Tensor], prefix: str, pairs: tuple[tuple[str, str], ...]) -> None:
    items = [(_renamed_layer_key(key, prefix, pairs), value) for key, value in state.items()]
    state.clear()
    state.update(items)  # same order as before


def _write_saved_names(
    module: nn.Module, state: dict[str, Tensor], prefix: str, local_metadata: dict
) -> None:
    """State-dict post-hook: the shared layer's names -> the saved ones (module-level, so the model pickles)."""
    _rename_in_place(state, prefix, _SAVED_LAYER_NAMES)


def _read_saved_names(module: nn.Module, state: dict[str, Tensor], prefix: str, *args) -> None:
    """Load-state-dict pre-hook: the saved names -> the shared layer's (names already in that form pass)."""
    _rename_in_place(state, prefix, tuple((saved, name) for name, saved in _SAVED_LAYER_NAMES))


class LatentTransformer(nn.Module):
    """Residual Transformer on ``(B, D, T)`` latents: pre-LN :class:`~speechlab.nn.transformer.TransformerLayer` s
    with RoPE, layer scale (init 0.01), bias-free attention projections and a GELU MLP, as Mimi.

    ``causal``: each frame attends to itself and the ``context - 1`` frames before it (a sliding window, so the
    streaming KV cache stays bounded); otherwise full bidirectional attention over the valid frames.
    """

    def __init__(
        self, dim: int, num_layers: int, num_heads: int, ffn_dim: int, causal: bool, context: int = 250
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"transformer dim {dim} must be divisible by num_heads {num_heads}")
        self.causal = causal
        self.context = context
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim,
                num_heads,
                ffn_dim,
                dropout=0.0,
                attention_dropout=0.0,
                layer_norm_first=True,
                rotary=True,
                layer_scale=0.01,
                attention_bias=False,
                packed_qkv=True,
                init_std=None,
            )
            for _ in range(num_layers)
        )
        for i, layer in enumerate(self.layers):
            layer.attention.stream_key = f"transformer.{i}"
            _register_in_saved_order(layer)
        self.register_state_dict_post_hook(_write_saved_names)
        self.register_load_state_dict_pre_hook(_read_saved_names)

    def forward(self, x: Tensor, frame_lengths: Tensor | None = None, cache: dict | None = None) -> Tensor:
        """``x: (B, D, T)`` -> ``(B, D, T)``; padded frames never influence valid ones.

        ``cache``: streaming state (causal only), holding the frame offset and each layer's last ``context - 1``
        keys and values.
        """
        t = x.shape[-1]
        offset, past = 0, 0
        if cache is not None:
            if not self.causal:
                raise RuntimeError("streaming needs a causal model (CodecConfig.causal=True)")
            offset = int(cache.get("transformer.offset", torch.zeros((), dtype=torch.long)))
            past = 0 if not self.layers else cache.get("transformer.0.k", x.new_zeros(1, 1, 0, 1)).shape[2]
        positions = torch.arange(offset, offset + t, device=x.device)
        key_positions = torch.arange(offset - past, offset + t, device=x.device)
        mask = None
        if self.causal:
            distance = positions[:, None] - key_positions[None, :]
            mask = ((distance >= 0) & (distance < self.context))[None, None]  # (1, 1, T, T_keys)
        if frame_lengths is not None:
            key_valid = valid_mask(frame_lengths, key_positions.shape[0])[:, None, None, :]
            mask = key_valid if mask is None else mask & key_valid
        h = x.transpose(1, 2)
        for layer in self.layers:
            h = layer(h, attn_mask=mask, positions=positions, cache=cache)
        if cache is not None:
            cache["transformer.offset"] = torch.tensor(offset + t)
            keep = self.context - 1
            for layer in self.layers:
                for name in (layer.attention.stream_key + ".k", layer.attention.stream_key + ".v"):
                    cache[name] = cache[name][:, :, max(cache[name].shape[2] - keep, 0) :]
        return _mask_tail(h.transpose(1, 2), frame_lengths)
