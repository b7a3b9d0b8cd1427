"""Fused and recomputing kernels: the speed and memory tricks, apart from the reference blocks.

The blocks in :mod:`speechlab.nn.feature_encoder`, :mod:`speechlab.nn.transformer` and :mod:`speechlab.nn.attention`
(the last two shared by the SSL encoder and the codec's latent Transformer) define the maths in plain PyTorch; where
this module has a faster form of the same computation they call it when :func:`enabled` (the one switch, on by
default) says so. Each function here equals its plain block in values and
gradients (``tests/test_fused.py``: fp32 and bf16 autocast); switching off changes speed and memory, not results
beyond float rounding.

- :func:`conv_feature_encoder` (training): the conv feature encoder with each norm + GELU fused into the following
  conv by :class:`NormGeluConv1d`, which stores only its input and recomputes norm and GELU in backward: about 80 %
  less CNN activation memory in a training step.
- :func:`time_major_conv_chain` (CPU: bf16 autocast, and fp32 inference of LayerNorm CNNs; :func:`runs_time_major`):
  the conv feature encoder with its activations in time-major memory, where oneDNN's convolutions are faster and a
  LayerNorm over channels needs no transpose.
- :func:`gelu_linear` (training): ``linear(gelu(pre))`` storing only ``pre`` (:class:`GeluLinear`): one
  (batch, T, ffn) tensor per layer less.
- :func:`qkv_heads` (inference): the q, k, v projections as one GEMM on the concatenated weights (in training
  three GEMMs are cheaper: the concatenated weight would be saved for backward in every layer).

The switch is a process-wide setting, like ``torch.backends.cudnn.enabled``, and not a config field: it is no
property of a model, so configs, ``config.json`` files and checkpoints neither store nor need it. Set it with
:func:`set_enabled` or, for a block of code, ``with fused.use(False): ...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_enabled = True


def enabled() -> bool:
    """Whether the blocks use the fused kernels of this module (default True)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Switch the fused kernels on or off for the whole process."""
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def use(flag: bool) -> Iterator[None]:
    """``with use(False): ...`` runs the plain blocks inside the block, then restores the previous setting."""
    previous = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def for_training(*params: Tensor) -> bool:
    """Whether a training-only kernel applies now: switched on, autograd recording and a parameter trained."""
    return _enabled and torch.is_grad_enabled() and any(p.requires_grad for p in params)


def for_inference(*params: Tensor) -> bool:
    """Whether an inference-only kernel applies now: switched on and no gradient wanted for ``params``."""
    return _enabled and not (torch.is_grad_enabled() and any(p.requires_grad for p in params))


# --------------------------------------------------------------------------- conv feature encoder


def _apply_norm(x: Tensor, kind: str, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Functional fp32 norm of a conv output x: (batch, channels, time), result in x's dtype (``kind`` is a
    ``ConvBlock.norm_kind``: the same maths as ``Fp32GroupNorm`` / ``Fp32LayerNorm``)."""
    if kind == "none":
        return x
    with torch.autocast(device_type=x.device.type, enabled=False):
        if kind == "group":
            out = F.group_norm(x.float(), x.shape[1], weight, bias, eps)
        else:
            out = F.layer_norm(x.float().transpose(1, 2), (x.shape[1],), weight, bias, eps).transpose(1, 2)
    return out.to(x.dtype)


class NormGeluConv1d(torch.autograd.Function):
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
        activation = NormGeluConv1d.activation(ctx, x, first_weight, first_bias, norm_weight, norm_bias)
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
            activation = NormGeluConv1d.activation(ctx, *leaves)
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


def conv_feature_encoder(blocks: Sequence[nn.Module], audio: Tensor) -> Tensor:
    """The chain of ``ConvBlock`` s (conv -> [norm] -> GELU) on audio (batch, samples) -> (batch, channels, frames),
    with each norm + GELU fused into the next conv (:class:`NormGeluConv1d`), for a training step.

    In fp32 block 0 (conv, norm, GELU) is recomputed in backward too, so its output, the largest activation, is not
    stored. Under bf16 autocast block 0 runs as plain autograd instead: recomputing it there (the bf16 conv and the
    fp32 norm with its casts) cost ~0.25 s of a 2.5 s WavLM Base training step on a native-bf16 CPU
    (benchmarks/wavlm.py), and its stored activations are half the fp32 size. (On the CPU under bf16 the encoder runs
    :func:`time_major_conv_chain` instead.)
    """
    first = blocks[0].conv
    bf16 = torch.is_autocast_enabled(audio.device.type) and (
        torch.get_autocast_dtype(audio.device.type) == torch.bfloat16
    )
    start = 0
    if bf16 and len(blocks) > 1:  # block 0 stored, not recomputed; the fused chain starts at block 1's conv
        x = blocks[1].conv(blocks[0](audio.unsqueeze(1)))
        start = 1
    else:
        x = audio.unsqueeze(1)
    for index in range(start, len(blocks) - 1):
        previous, conv = blocks[index], blocks[index + 1].conv
        norm = previous.norm
        norm_weight, norm_bias = (norm.weight, norm.bias) if norm is not None else (None, None)
        fused_first = (first.weight, first.bias, first.stride[0]) if index == 0 else (None, None, 1)
        x = NormGeluConv1d.apply(
            x, fused_first[0], fused_first[1], norm_weight, norm_bias, conv.weight, conv.bias,
            previous.norm_kind, norm.eps if norm is not None else 0.0, fused_first[2], conv.stride[0],
        )  # fmt: skip
    if start == 0 and len(blocks) == 1:  # nothing to fuse into: one plain block
        return blocks[0](x)
    return F.gelu(blocks[-1].normalize(x))


def runs_time_major(audio: Tensor, blocks: Sequence[nn.Module]) -> bool:
    """Whether the conv feature encoder is faster as :func:`time_major_conv_chain` here: on the CPU, under bf16
    autocast (training and inference) and, for a LayerNorm CNN (Large), in fp32 inference too (no transposes around
    its norms). Not in fp32 training (:func:`conv_feature_encoder` stores less) nor on other devices (not measured)."""
    if not _enabled or audio.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return True
    return blocks[0].norm_kind == "layer" and for_inference(
        *(p for block in blocks for p in block.parameters())
    )


def time_major_conv_chain(
    blocks: Sequence[nn.Module], audio: Tensor, block0_statistics: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """The chain of ``ConvBlock`` s on audio (batch, samples) -> (batch, channels, frames) with the activations stored
    time-major (strides (frames x channels, 1, channels)), where :func:`runs_time_major` says it is faster
    (``block0_statistics`` as in :meth:`ConvBlock.normalize`).

    Each conv runs as a conv2d over (batch, channels, 1, time) in ``channels_last`` memory, the layout oneDNN's bf16
    kernels are fastest in, and a LayerNorm over channels needs no transpose there. Block 0's GroupNorm (Base) stays
    channel-major (its backward is ~6x slower on ``channels_last`` memory) and runs on the bf16 conv output directly:
    PyTorch's CPU kernel keeps the statistics in fp32, so it computes what ``Fp32GroupNorm`` does without the two fp32
    copies. (The same mixed-dtype call for LayerNorm is not used: its weight and bias gradients came out ~20 % off in
    torch 2.11, docs/pitfalls.md, 10.) Plain autograd, nothing recomputed: bf16 activations are half the fp32 size.
    Forward + backward of the WavLM Base CNN on 4 x 4 s, AMX CPU, 2 threads: 0.67 s, against 1.03 s for the
    recomputing channel-major chain and 0.94 s for transformers; Large's LayerNorm CNN 0.98 s against 2.56 s.
    Inference on 4 x 10 s: 0.77 s against 1.16 s for the plain blocks and 1.04 s for transformers; Large's CNN in
    fp32 1.29 s against 2.28 s.
    The output's ``transpose(1, 2)`` (batch, frames, channels) is contiguous.
    """
    x, start = audio[:, None, None, :], 0  # (batch, 1, 1, samples)
    if blocks[0].norm_kind == "group":  # GroupNorm's backward is ~6x slower on channels_last memory
        x, norm = blocks[0].conv(audio.unsqueeze(1)), blocks[0].norm
        if block0_statistics is not None:
            x = blocks[0].normalize(x, block0_statistics)
        else:
            with torch.autocast("cpu", enabled=False):  # bf16 in and out, fp32 statistics
                x = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        x, start = F.gelu(x.unsqueeze(2).contiguous(memory_format=torch.channels_last)), 1
    for index in range(start, len(blocks)):
        conv = blocks[index].conv
        x = F.conv2d(
            x.contiguous(memory_format=torch.channels_last),
            conv.weight.unsqueeze(2),
            conv.bias,
            stride=(1, conv.stride[0]),
        )
        statistics = block0_statistics if index == 0 else None  # a LayerNorm block 0 refuses them
        x = F.gelu(blocks[index].normalize(x, statistics))
    return x.squeeze(2)


# --------------------------------------------------------------------------- Transformer


class GeluLinear(torch.autograd.Function):
    """``linear(gelu(pre))`` that saves only ``pre`` (the GELU is recomputed in backward): one (B, T, F) tensor
    per layer less in a training step."""

    @staticmethod
    def forward(ctx, pre: Tensor, weight: Tensor, bias: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(pre, weight)
        return F.linear(F.gelu(pre), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        pre, weight = ctx.saved_tensors
        dtype = grad_out.dtype
        activation = F.gelu(pre).to(dtype).flatten(0, -2)
        grad_flat = grad_out.flatten(0, -2)
        grad_pre = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_act = (grad_flat @ weight.to(dtype)).view(pre.shape)
            grad_pre = torch.ops.aten.gelu_backward(grad_act.to(pre.dtype), pre)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_flat.t() @ activation
        if ctx.needs_input_grad[2]:
            grad_bias = grad_flat.sum(0)
        return grad_pre, grad_weight, grad_bias


def gelu_linear(pre: Tensor, linear: nn.Linear) -> Tensor:
    """``linear(gelu(pre))`` for pre: (..., in_features) -> (..., out_features), storing only ``pre``."""
    return GeluLinear.apply(pre, linear.weight, linear.bias)


def qkv_heads(
    x: Tensor, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """x: (batch, T, D) -> q, k, v, each (batch, heads, T, D / heads), from one GEMM on the concatenated weights."""
    batch, length, dim = x.shape
    weight = torch.cat([q_proj.weight, k_proj.weight, v_proj.weight])
    bias = None if q_proj.bias is None else torch.cat([q_proj.bias, k_proj.bias, v_proj.bias])
    qkv = F.linear(x, weight, bias).view(batch, length, 3, num_heads, dim // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v
