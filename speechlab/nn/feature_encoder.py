"""Convolutional waveform feature encoder shared by wav2vec 2.0, HuBERT, WavLM and UniSpeech.

wav2vec 2.0 (Baevski et al. 2020) §2 ("Feature encoder") and §4.2 (seven blocks of 512 channels, strides
(5, 2, 2, 2, 2, 2, 2), kernels (10, 3, 3, 3, 3, 2, 2): a 320-sample hop and a 400-sample receptive field).

Seven 1-D convolutions (no padding) turn 16 kHz audio into 50 Hz frames. Two normalisation layouts:

- ``"group"`` (Base models): only block 0 has a ``GroupNorm(C, C)``, i.e. a per-channel normalisation over *time*.
  Its statistics include padded samples, so a padded batch is not equal to running each utterance alone
  (docs/pitfalls.md, 1).
- ``"layer"`` (Large models): every block has a ``LayerNorm(C)`` over channels, per frame (padding-invariant).

Norms always run in fp32 (like fairseq's ``Fp32GroupNorm`` / ``Fp32LayerNorm``) and cast back to the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ConvSpec = tuple[int, int, int]  # (out_channels, kernel, stride)


def conv_output_lengths(lengths: Tensor, conv_layers: Sequence[ConvSpec]) -> Tensor:
    """Number of output frames of an unpadded conv stack.

    lengths: (batch,) int64 valid samples -> (batch,) int64 frames, ``L <- floor((L - k) / s) + 1`` per block,
    clamped at 0 (an input shorter than the receptive field gives 0 frames: 399 samples -> 0, 400 -> 1).
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        lengths = lengths.clamp(min=0)
    return lengths


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 (also under autocast), output in the input dtype.

    ``fixed_statistics``: ``(mean, var)``, each (channels,), to normalise with instead of the input's own
    statistics (one group per channel only): chunked extraction sets the whole file's statistics so that every
    window normalises exactly as the unchunked model does.
    """

    fixed_statistics: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.fixed_statistics is not None:
                mean, var = (t.to(x.device, torch.float32)[None, :, None] for t in self.fixed_statistics)
                out = (x.float() - mean) * torch.rsqrt(var + self.eps)
                out = out * self.weight[None, :, None] + self.bias[None, :, None]
            else:
                out = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis computed in fp32 (also under autocast), output in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


def _apply_norm(x: Tensor, kind: str, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Functional fp32 norm of a conv output x: (batch, channels, time), result in x's dtype."""
    if kind == "none":
        return x
    with torch.autocast(device_type=x.device.type, enabled=False):
        if kind == "group":
            out = F.group_norm(x.float(), x.shape[1], weight, bias, eps)
        else:
            out = F.layer_norm(x.float().transpose(1, 2), (x.shape[1],), weight, bias, eps).transpose(1, 2)
    return out.to(x.dtype)


class _NormGeluConv1d(torch.autograd.Function):
    """``conv1d(gelu(norm([first_conv](x))))`` saving only its input ``x`` for backward.

    The optional first conv, the norm and the GELU are recomputed in backward (under the forward's autocast state),
    so a training step stores one tensor per conv block instead of three, and none for block 0 when ``x`` is the
    waveform (block 0's output is the largest CNN activation; its conv has one input channel and is cheap to redo).
    """

    @staticmethod
    def forward(
        ctx,
        x,
        first_weight,
        first_bias,
        norm_weight,
        norm_bias,
        weight,
        bias,
        kind,
        eps,
        first_stride,
        stride,
    ):  # noqa: D102
        ctx.kind, ctx.eps, ctx.first_stride, ctx.stride = kind, eps, first_stride, stride
        ctx.has_bias = bias is not None
        ctx.autocast = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        )
        activation = _NormGeluConv1d.activation(ctx, x, first_weight, first_bias, norm_weight, norm_bias)
        ctx.save_for_backward(x, first_weight, first_bias, norm_weight, norm_bias, weight)
        return F.conv1d(activation, weight, bias, stride)

    @staticmethod
    def activation(ctx, x, first_weight, first_bias, norm_weight, norm_bias) -> Tensor:
        if first_weight is not None:
            x = F.conv1d(x, first_weight, first_bias, ctx.first_stride)
        return F.gelu(_apply_norm(x, ctx.kind, norm_weight, norm_bias, ctx.eps))

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        x, first_weight, first_bias, norm_weight, norm_bias, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        saved = (x, first_weight, first_bias, norm_weight, norm_bias)
        leaves = [
            t.detach().requires_grad_(need) if t is not None else None
            for t, need in zip(saved, needs, strict=False)
        ]
        device = x.device.type
        with (
            torch.enable_grad(),
            torch.autocast(device, dtype=ctx.autocast, enabled=ctx.autocast is not None),
        ):
            activation = _NormGeluConv1d.activation(ctx, *leaves)
        dtype = grad_out.dtype
        grad_act, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out,
            activation.detach().to(dtype),
            weight.to(dtype),
            [weight.shape[0]] if ctx.has_bias else None,
            [ctx.stride],
            [0],
            [1],
            False,
            [0],
            1,
            [any(needs[:5]), needs[5], ctx.has_bias and needs[6]],
        )
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(activation, wanted, grad_act.to(activation.dtype)) if wanted else ())
        leaf_grads = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return (*leaf_grads, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None)


class ConvBlock(nn.Module):
    """Conv1d -> [norm] -> GELU.  x: (batch, in_channels, time) -> (batch, out_channels, time')."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, norm: str, bias: bool):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=kernel, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm_kind = norm
        if norm == "group":
            self.norm: nn.Module | None = Fp32GroupNorm(out_channels, out_channels, affine=True)
        elif norm == "layer":
            self.norm = Fp32LayerNorm(out_channels)
        elif norm == "none":
            self.norm = None
        else:
            raise ValueError(f"ConvBlock norm must be 'group', 'layer' or 'none', got {norm!r}")

    def normalize(self, x: Tensor) -> Tensor:
        """The block's norm (or identity) on the conv output x: (batch, channels, time)."""
        if self.norm_kind == "layer":
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        if self.norm_kind == "group":
            return self.norm(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.normalize(self.conv(x)))


class ConvFeatureEncoder(nn.Module):
    """Raw waveform -> CNN features.

    Args:
        conv_layers: (channels, kernel, stride) per block, e.g. ``[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2``.
        norm: ``"group"`` (GroupNorm in block 0 only) or ``"layer"`` (LayerNorm in every block).
        bias: conv bias (False for HuBERT / WavLM, True for wav2vec 2.0 Large and UniSpeech).
    """

    def __init__(self, conv_layers: Sequence[ConvSpec], norm: str = "group", bias: bool = False):
        super().__init__()
        if norm not in ("group", "layer"):
            raise ValueError(f"conv_norm must be 'group' (Base) or 'layer' (Large), got {norm!r}")
        self.conv_specs = [tuple(int(v) for v in spec) for spec in conv_layers]
        blocks = []
        in_channels = 1
        for i, (channels, kernel, stride) in enumerate(self.conv_specs):
            block_norm = norm if (norm == "layer" or i == 0) else "none"
            blocks.append(ConvBlock(in_channels, channels, kernel, stride, block_norm, bias))
            in_channels = channels
        self.conv_layers = nn.ModuleList(blocks)
        self.out_channels = in_channels

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """lengths: (batch,) samples -> (batch,) frames."""
        return conv_output_lengths(lengths, self.conv_specs)

    @torch.no_grad()
    def block0_statistics(self, waveform: Tensor, segment_frames: int = 16000) -> tuple[Tensor, Tensor]:
        """Per-channel mean and (biased) variance over time of conv 0's output on a whole waveform (samples,),
        computed ``segment_frames`` conv-0 frames at a time (bounded memory), in float64 sums.

        These are the statistics block 0's GroupNorm of a Base model computes on the unchunked input.
        """
        conv = self.conv_layers[0].conv
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        frames = (waveform.numel() - kernel) // stride + 1
        if frames < 1:
            raise ValueError(f"{waveform.numel()} samples is shorter than conv 0's kernel ({kernel})")
        total = torch.zeros(conv.out_channels, dtype=torch.float64)
        squares = torch.zeros(conv.out_channels, dtype=torch.float64)
        for start in range(0, frames, segment_frames):
            end = min(frames, start + segment_frames)
            piece = waveform[start * stride : (end - 1) * stride + kernel].to(
                conv.weight.device, torch.float32
            )
            out = F.conv1d(piece[None, None], conv.weight.float(), conv.bias, stride)[0].double().cpu()
            total += out.sum(-1)
            squares += out.square().sum(-1)
        mean = total / frames
        return mean.float(), (squares / frames - mean.square()).clamp_min(0.0).float()

    def forward(self, audio: Tensor) -> Tensor:
        """audio: (batch, samples) float -> features (batch, channels, frames).

        Same maths as chaining the blocks; with autograd on, each norm + GELU is fused with the following conv so
        that only the raw outputs of convs 1..6 are stored (about 80 % less CNN activation memory in a training step).
        In fp32 block 0 (conv, norm, GELU) is recomputed in backward too, so its output, the largest activation, is
        not stored. Under bf16 autocast block 0 runs as plain autograd instead: recomputing it there (the bf16 conv
        and the fp32 norm with its casts) cost ~0.25 s of a 2.5 s WavLM Base training step on a native-bf16 CPU
        (benchmarks/wavlm.py), and its stored activations are half the fp32 size.
        """
        first = self.conv_layers[0].conv
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not training:
            x = first(audio.unsqueeze(1))
            for previous, block in zip(self.conv_layers[:-1], self.conv_layers[1:], strict=True):
                x = block.conv(F.gelu(previous.normalize(x)))
            return F.gelu(self.conv_layers[-1].normalize(x))
        bf16 = torch.is_autocast_enabled(audio.device.type) and (
            torch.get_autocast_dtype(audio.device.type) == torch.bfloat16
        )
        start = 0
        if bf16:  # block 0 stored, not recomputed; the fused chain starts at block 1's conv
            x = self.conv_layers[1].conv(self.conv_layers[0](audio.unsqueeze(1)))
            start = 1
        else:
            x = audio.unsqueeze(1)
        for index in range(start, len(self.conv_layers) - 1):
            previous, conv = self.conv_layers[index], self.conv_layers[index + 1].conv
            norm = previous.norm
            norm_weight, norm_bias = (norm.weight, norm.bias) if norm is not None else (None, None)
            fused_first = (first.weight, first.bias, first.stride[0]) if index == 0 else (None, None, 1)
            x = _NormGeluConv1d.apply(
                x, fused_first[0], fused_first[1], norm_weight, norm_bias, conv.weight, conv.bias,
                previous.norm_kind, norm.eps if norm is not None else 0.0, fused_first[2], conv.stride[0],
            )  # fmt: skip
        return F.gelu(self.conv_layers[-1].normalize(x))
