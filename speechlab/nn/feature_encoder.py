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

from speechlab.nn import fused

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

    ``statistics``: ``(mean, var)``, each (channels,), to normalise with instead of the input's own statistics (one
    group per channel only): chunked extraction passes the whole file's statistics so that every window normalises
    exactly as the unchunked model does.
    """

    def forward(self, x: Tensor, statistics: tuple[Tensor, Tensor] | None = None) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if statistics is not None:
                mean, var = (t.to(x.device, torch.float32)[None, :, None] for t in statistics)
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

    def normalize(self, x: Tensor, statistics: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The block's norm (or identity) on the conv output x: (batch, channels, time) (or (batch, channels, 1,
        time), as :func:`speechlab.nn.fused.time_major_conv_chain` runs it); ``statistics`` (GroupNorm only, 3-d x):
        the per-channel ``(mean, var)`` to use instead of x's own (see :class:`Fp32GroupNorm`)."""
        if statistics is not None and self.norm_kind != "group":
            raise ValueError(
                f"fixed normalisation statistics need a GroupNorm block, this one has {self.norm_kind!r}"
            )
        if self.norm_kind == "layer":
            return self.norm(x.movedim(1, -1)).movedim(-1, 1)
        if self.norm_kind == "group":
            return self.norm(x, statistics)
        return x

    def forward(self, x: Tensor, statistics: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return F.gelu(self.normalize(self.conv(x), statistics))


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

    def forward(self, audio: Tensor, block0_statistics: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """audio: (batch, samples) float -> features (batch, channels, frames): the chain of :class:`ConvBlock` s.

        ``block0_statistics``: ``(mean, var)`` (channels,) for block 0's GroupNorm instead of the batch's own (Base
        models; :meth:`block0_statistics` of a whole file, for chunked extraction). With
        :func:`speechlab.nn.fused.enabled` the same maths runs as :func:`speechlab.nn.fused.time_major_conv_chain`
        where that memory order is faster (:func:`speechlab.nn.fused.runs_time_major`), else in a training step as
        :func:`speechlab.nn.fused.conv_feature_encoder` (norm + GELU recomputed in backward: less memory).
        """
        if fused.runs_time_major(audio, self.conv_layers):
            return fused.time_major_conv_chain(self.conv_layers, audio, block0_statistics)
        if block0_statistics is None and fused.for_training(*self.parameters()):
            return fused.conv_feature_encoder(self.conv_layers, audio)
        x = self.conv_layers[0](audio.unsqueeze(1), block0_statistics)
        for block in self.conv_layers[1:]:
            x = block(x)
        return x
