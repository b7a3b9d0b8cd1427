"""Spectral reconstruction losses for codecs, always computed in fp32 (also under bf16 autocast).

* :class:`MultiScaleMelLoss` — DAC's multi-scale mel distance (7 windows 32..2048, n_mels 5..320, log10 magnitude
  clamped at 1e-5, L1) with an optional EnCodec-style L1-on-linear-mel term.
* :class:`MultiResolutionSTFTLoss` — spectral convergence + log-magnitude L1 (Parallel WaveGAN), used as a metric.

Both take optional ``lengths`` so padded tails contribute nothing.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn

from speechlab.nn.masks import valid_mask


def _frame_mask(lengths: Tensor | None, num_frames: int, hop: int) -> Tensor | None:
    """(B, 1, frames) float: 1 where the (centred) STFT frame's centre lies inside the signal."""
    if lengths is None:
        return None
    inside = torch.div(lengths + hop - 1, hop, rounding_mode="floor")  # centre t * hop < length iff t < this
    return valid_mask(inside, num_frames).float()[:, None, :]


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1)


class MultiScaleMelLoss(nn.Module):
    """Sum over scales of ``log_weight * L1(log10 mel) + linear_weight * L1(mel)``, averaged per scale.

    ``pred, target: (B, S)``; ``lengths: (B,)`` valid samples. Scales follow DAC (window w, hop w/4).
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        windows: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048),
        n_mels: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320),
        log_weight: float = 1.0,
        linear_weight: float = 0.0,
        clamp: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(windows) != len(n_mels):
            raise ValueError(f"windows ({len(windows)}) and n_mels ({len(n_mels)}) must have the same length")
        self.hops = [w // 4 for w in windows]
        self.mels = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate,
                n_fft=w,
                win_length=w,
                hop_length=w // 4,
                n_mels=m,
                power=1.0,
                f_min=0.0,
                f_max=sample_rate / 2,
                norm="slaney",
                mel_scale="slaney",
                center=True,
            )
            for w, m in zip(windows, n_mels, strict=True)
        )
        self.log_weight = log_weight
        self.linear_weight = linear_weight
        self.clamp = clamp

    def forward(self, pred: Tensor, target: Tensor, lengths: Tensor | None = None) -> Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            total = pred.new_zeros(())
            for mel, hop in zip(self.mels, self.hops, strict=True):
                mp, mt = mel(pred), mel(target)  # (B, n_mels, frames)
                mask = _frame_mask(lengths, mp.shape[-1], hop)
                if self.log_weight:
                    diff = (mp.clamp_min(self.clamp).log10() - mt.clamp_min(self.clamp).log10()).abs()
                    total = total + self.log_weight * _masked_mean(diff, mask)
                if self.linear_weight:
                    total = total + self.linear_weight * _masked_mean((mp - mt).abs(), mask)
            return total


class MultiResolutionSTFTLoss(nn.Module):
    """Mean over resolutions of spectral convergence + L1 log magnitude. ``pred, target: (B, S)``."""

    def __init__(
        self, fft_sizes: tuple[int, ...] = (512, 1024, 2048), hops: tuple[int, ...] = (128, 256, 512)
    ) -> None:
        super().__init__()
        self.specs = nn.ModuleList(
            torchaudio.transforms.Spectrogram(n_fft=n, hop_length=h, power=1.0, center=True)
            for n, h in zip(fft_sizes, hops, strict=True)
        )
        self.hops = list(hops)

    def forward(self, pred: Tensor, target: Tensor, lengths: Tensor | None = None) -> Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            total = pred.new_zeros(())
            for spec, hop in zip(self.specs, self.hops, strict=True):
                sp, st = spec(pred), spec(target)
                mask = _frame_mask(lengths, sp.shape[-1], hop)
                if mask is not None:
                    sp, st = sp * mask, st * mask
                convergence = torch.linalg.vector_norm(st - sp, dim=(1, 2)) / torch.linalg.vector_norm(
                    st, dim=(1, 2)
                ).clamp_min(1e-7)
                log_mag = (st.clamp_min(1e-7).log() - sp.clamp_min(1e-7).log()).abs()
                total = total + convergence.mean() + _masked_mean(log_mag, mask)
            return total / len(self.specs)


def si_sdr(pred: Tensor, target: Tensor, lengths: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Scale-invariant SDR in dB per item: ``pred, target: (B, S)`` -> ``(B,)``. Means are removed first."""
    pred, target = pred.float(), target.float()
    mask = torch.ones_like(target)
    if lengths is not None:
        mask = valid_mask(lengths, target.shape[-1]).float()
    count = mask.sum(-1, keepdim=True).clamp_min(1)
    pred = (pred - (pred * mask).sum(-1, keepdim=True) / count) * mask
    target = (target - (target * mask).sum(-1, keepdim=True) / count) * mask
    scale = (pred * target).sum(-1, keepdim=True) / (target.pow(2).sum(-1, keepdim=True) + eps)
    projection = scale * target
    noise = pred - projection
    return 10 * torch.log10((projection.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))
