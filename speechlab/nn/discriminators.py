"""GAN discriminators for codec training.

* :class:`MultiScaleSTFTDiscriminator` — EnCodec's MS-STFTD: per scale a complex STFT (real and imaginary parts as
  two channels, window w, hop w/4) fed to a 2-D conv stack strided on frequency with time dilations 1/2/4.
* :class:`MultiPeriodDiscriminator` — HiFi-GAN/DAC MPD: the waveform folded into ``(frames, period)`` grids, 2-D
  convs with kernel (5, 1) stride (3, 1) so each period's phase is judged separately.

Both return ``(logits, features)``: one logit map per sub-discriminator and, for each, the list of its intermediate
feature maps (for feature matching).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


def _leaky_conv_stack(
    x: Tensor, convs: nn.ModuleList, post: nn.Module, slope: float
) -> tuple[Tensor, list[Tensor]]:
    """``post(x)`` after every conv + leaky ReLU of ``convs``, and each of those activations (the feature maps)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), slope)
        features.append(x)
    return post(x), features


class DiscriminatorBank(nn.Module):
    """Sub-discriminators behind one call: ``audio: (B, S)`` -> (each one's logits, each one's feature-map list)."""

    def __init__(self, discriminators: Iterable[nn.Module]) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(discriminators)

    def forward(self, audio: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        outs = [d(audio) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


class STFTDiscriminator(nn.Module):
    """One MS-STFTD scale. ``audio: (B, S)`` -> logits ``(B, 1, frames', freq')`` and feature maps."""

    def __init__(self, n_fft: int, filters: int = 32, max_filters: int = 256, slope: float = 0.2) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop = n_fft // 4
        self.slope = slope
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        chans = [2, filters]
        self.convs = nn.ModuleList([weight_norm(nn.Conv2d(2, filters, (3, 9), padding=(1, 4)))])
        for dilation in (1, 2, 4):
            c_in, c_out = chans[-1], min(chans[-1] * 2, max_filters)
            self.convs.append(
                weight_norm(
                    nn.Conv2d(
                        c_in, c_out, (3, 9), stride=(1, 2), dilation=(dilation, 1), padding=(dilation, 4)
                    )
                )
            )
            chans.append(c_out)
        self.convs.append(weight_norm(nn.Conv2d(chans[-1], chans[-1], (3, 3), padding=(1, 1))))
        self.post = weight_norm(nn.Conv2d(chans[-1], 1, (3, 3), padding=(1, 1)))

    def forward(self, audio: Tensor) -> tuple[Tensor, list[Tensor]]:
        with torch.autocast(device_type=audio.device.type, enabled=False):
            spec = torch.stft(audio.float(), self.n_fft, self.hop, window=self.window, return_complex=True)
        x = torch.view_as_real(spec).permute(0, 3, 2, 1)  # (B, 2, frames, freq)
        return _leaky_conv_stack(x, self.convs, self.post, self.slope)


class MultiScaleSTFTDiscriminator(DiscriminatorBank):
    def __init__(self, n_ffts: tuple[int, ...] = (2048, 1024, 512, 256, 128), filters: int = 32) -> None:
        super().__init__(STFTDiscriminator(n, filters) for n in n_ffts)


class PeriodDiscriminator(nn.Module):
    """One MPD period. ``audio: (B, S)`` -> logits ``(B, 1, frames', period)``."""

    def __init__(
        self, period: int, channels: tuple[int, ...] = (32, 128, 512, 1024, 1024), slope: float = 0.1
    ):
        super().__init__()
        self.period = period
        self.slope = slope
        chans = [1, *channels]
        self.convs = nn.ModuleList(
            weight_norm(
                nn.Conv2d(
                    chans[i],
                    chans[i + 1],
                    (5, 1),
                    stride=(3 if i < len(channels) - 1 else 1, 1),
                    padding=(2, 0),
                )
            )
            for i in range(len(channels))
        )
        self.post = weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, audio: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, s = audio.shape
        pad = (-s) % self.period
        if pad:
            audio = F.pad(audio, (0, pad), mode="reflect" if pad < s else "constant")
        x = audio.view(b, 1, -1, self.period)
        return _leaky_conv_stack(x, self.convs, self.post, self.slope)


class MultiPeriodDiscriminator(DiscriminatorBank):
    def __init__(
        self,
        periods: tuple[int, ...] = (2, 3, 5, 7, 11),
        channels: tuple[int, ...] = (32, 128, 512, 1024, 1024),
    ) -> None:
        super().__init__(PeriodDiscriminator(p, channels) for p in periods)


class CombinedDiscriminator(nn.Module):
    """MS-STFTD and/or MPD behind one call. ``audio: (B, S)`` -> all logits and feature lists."""

    def __init__(
        self,
        stft_n_ffts: tuple[int, ...] = (2048, 1024, 512, 256, 128),
        stft_filters: int = 32,
        periods: tuple[int, ...] = (2, 3, 5, 7, 11),
        period_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024),
    ) -> None:
        super().__init__()
        self.parts = nn.ModuleList()
        if stft_n_ffts:
            self.parts.append(MultiScaleSTFTDiscriminator(tuple(stft_n_ffts), stft_filters))
        if periods:
            self.parts.append(MultiPeriodDiscriminator(tuple(periods), tuple(period_channels)))
        if not self.parts:
            raise ValueError("CombinedDiscriminator needs stft_n_ffts or periods")

    def forward(self, audio: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        logits, features = [], []
        for part in self.parts:
            lg, ft = part(audio)
            logits += lg
            features += ft
        return logits, features


def discriminator_loss(real: list[Tensor], fake: list[Tensor], kind: str = "hinge") -> Tensor:
    """Mean over sub-discriminators. ``kind``: "hinge" (EnCodec) or "ls" (LSGAN, DAC)."""
    total = real[0].new_zeros(())
    for r, f in zip(real, fake, strict=True):
        if kind == "hinge":
            total = total + F.relu(1 - r).mean() + F.relu(1 + f).mean()
        elif kind == "ls":
            total = total + (r - 1).pow(2).mean() + f.pow(2).mean()
        else:
            raise ValueError(f"adversarial loss kind must be 'hinge' or 'ls', got {kind!r}")
    return total / len(real)


def generator_adversarial_loss(fake: list[Tensor], kind: str = "hinge") -> Tensor:
    total = fake[0].new_zeros(())
    for f in fake:
        total = total + (F.relu(1 - f).mean() if kind == "hinge" else (f - 1).pow(2).mean())
    return total / len(fake)


def feature_matching_loss(real: list[list[Tensor]], fake: list[list[Tensor]]) -> Tensor:
    """EnCodec's relative feature matching: L1(real, fake) / mean|real| per map, averaged over all maps."""
    total, count = real[0][0].new_zeros(()), 0
    for rs, fs in zip(real, fake, strict=True):
        for r, f in zip(rs, fs, strict=True):
            r = r.detach()
            total = total + (r - f).abs().mean() / r.abs().mean().clamp_min(1e-8)
            count += 1
    return total / max(count, 1)
