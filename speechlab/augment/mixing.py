"""WavLM utterance mixing (denoising pre-training), applied to a padded batch on its device.

With probability ``mix_prob`` each primary utterance gets an interfering segment added: either a noise clip
(probability ``noise_prob``, SNR ~ U(snr_range) dB) or a segment of *another* utterance of the batch (energy
ratio ~ U(energy_ratio_range) dB). The segment covers at most ``max_overlap`` of the primary's valid length and
sits at a uniformly random position. Targets are untouched: the model has to predict the clean primary's units
(WavLM, Chen et al. 2022, §III-B; the released training code is microsoft/UniSpeech's ``utterance_mixing_dataset.py``).

Deliberate differences from the reference training code (docs/pitfalls.md, 4):

- the partner is never the primary itself, and it is taken from the *clean* batch (no chains of mixtures);
- powers: the primary's over its valid samples, the interferer's over the segment actually added, so the SNR /
  energy ratio that was drawn is exactly the one achieved (the reference uses whole-clip powers);
- padded batches are supported (padding stays exactly zero); the reference crops every batch to its shortest
  utterance instead. Input normalisation (Large) happens afterwards, inside the encoder.

Everything is vectorised over the batch: index tensors gather the segments from the batch and the noise bank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from speechlab.data.manifest import load_item_audio, read_manifest
from speechlab.host_sync import to_device_async
from speechlab.nn.masks import valid_mask


@dataclass
class MixingConfig:
    """Hyper-parameters of :class:`UtteranceMixer` (the task config of the reference: 0.5 / 0.5)."""

    mix_prob: float = 0.5
    noise_prob: float = 0.5
    snr_range: tuple[float, float] = (-5.0, 20.0)
    energy_ratio_range: tuple[float, float] = (-5.0, 5.0)
    max_overlap: float = 0.5
    noise_manifest: str | None = None


@dataclass
class MixingInfo:
    """What the mixer did to each utterance (for tests and logging). All tensors are (batch,), on the batch's device.

    kind: 0 = clean, 1 = speech partner, 2 = noise. source: partner row or noise-clip index (-1 if clean).
    start / length: the mixed region of the primary in samples. source_start: first sample taken from the
    source (noise clips are looped, so it is taken modulo the clip length). level_db: the drawn SNR (noise) or
    energy ratio (speech) in dB, NaN when clean. scale: the gain applied to the interfering segment.
    """

    kind: Tensor
    source: Tensor
    start: Tensor
    length: Tensor
    source_start: Tensor
    level_db: Tensor
    scale: Tensor


def load_noise_bank(manifest: str | Path, sample_rate: int = 16000) -> list[Tensor]:
    """Read every clip of a noise manifest once: returns a list of (samples,) float32 tensors.

    Silent or empty clips are dropped (they could not reach any SNR); raises ``ValueError`` if none is left.
    """
    items = read_manifest(manifest)
    clips = []
    for item in items:
        audio = load_item_audio(item, sample_rate)  # like the data loader: an item's segment
        if audio.numel() > 0 and float(audio.abs().max()) > 0:
            clips.append(audio)
    if not clips:
        raise ValueError(
            f"noise manifest {manifest}: no non-silent clip found; point it at a folder of noise audio"
        )
    return clips


class UtteranceMixer(nn.Module):
    """Mix each utterance of a batch with noise or with a segment of another utterance (WavLM denoising).

    Args:
        noise: a noise manifest path, a list of (samples,) tensors, or None (speech-only mixing).
        mix_prob: probability that an utterance gets mixed at all.
        noise_prob: given a mix, probability of the noise branch (vs another utterance). Ignored without noise.
        snr_range: (low, high) dB, uniform; SNR = 10 log10(P_primary / P_noise_segment).
        energy_ratio_range: (low, high) dB, uniform; ratio = 10 log10(P_primary / P_partner_segment).
        max_overlap: the interfering segment covers at most this fraction of the primary's valid samples.
        seed: seeds the mixer's own ``torch.Generator`` (CPU; draws are per utterance, so cheap) for
            reproducible mixing. None: use torch's global RNG.
        sample_rate: used to load the noise manifest.

    Call: ``mixer(audio, lengths) -> (mixed_audio, lengths)``; ``mixer.mix(...)`` also returns a :class:`MixingInfo`.
    """

    def __init__(
        self,
        noise: str | Path | Sequence[Tensor] | None = None,
        mix_prob: float = 0.5,
        noise_prob: float = 0.5,
        snr_range: tuple[float, float] = (-5.0, 20.0),
        energy_ratio_range: tuple[float, float] = (-5.0, 5.0),
        max_overlap: float = 0.5,
        seed: int | None = None,
        sample_rate: int = 16000,
    ) -> None:
        super().__init__()
        for name, value in (("mix_prob", mix_prob), ("noise_prob", noise_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"UtteranceMixer: {name} must be in [0, 1], got {value}")
        if not 0.0 < max_overlap <= 1.0:
            raise ValueError(f"UtteranceMixer: max_overlap must be in (0, 1], got {max_overlap}")
        for name, rng in (("snr_range", snr_range), ("energy_ratio_range", energy_ratio_range)):
            if len(rng) != 2 or rng[0] > rng[1]:
                raise ValueError(f"UtteranceMixer: {name} must be (low, high) with low <= high, got {rng}")
        self.mix_prob = float(mix_prob)
        self.noise_prob = float(noise_prob)
        self.snr_range = (float(snr_range[0]), float(snr_range[1]))
        self.energy_ratio_range = (float(energy_ratio_range[0]), float(energy_ratio_range[1]))
        self.max_overlap = float(max_overlap)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

        if isinstance(noise, (str, Path)):
            clips = load_noise_bank(noise, sample_rate)
        else:
            clips = [torch.as_tensor(c, dtype=torch.float32).flatten() for c in (noise or [])]
            clips = [c for c in clips if c.numel() > 0]
        # One flat buffer + offsets: a looped crop of clip n is bank[offset[n] + (start + k) % length[n]].
        bank = torch.cat(clips) if clips else torch.zeros(0)
        clip_lengths = torch.tensor([c.numel() for c in clips], dtype=torch.long)
        offsets = torch.cumsum(clip_lengths, 0) - clip_lengths
        self.register_buffer("noise_bank", bank, persistent=False)
        self.register_buffer("noise_lengths", clip_lengths, persistent=False)
        self.register_buffer("noise_offsets", offsets, persistent=False)

    @classmethod
    def from_config(
        cls, config: MixingConfig, seed: int | None = None, sample_rate: int = 16000
    ) -> UtteranceMixer:
        """Build from a :class:`MixingConfig` (noise loaded from ``config.noise_manifest`` when set)."""
        return cls(
            noise=config.noise_manifest,
            mix_prob=config.mix_prob,
            noise_prob=config.noise_prob,
            snr_range=tuple(config.snr_range),
            energy_ratio_range=tuple(config.energy_ratio_range),
            max_overlap=config.max_overlap,
            seed=seed,
            sample_rate=sample_rate,
        )

    @property
    def num_noise_clips(self) -> int:
        return int(self.noise_lengths.numel())

    def _uniform(self, batch: int, generator: torch.Generator | None) -> Tensor:
        return torch.rand(batch, generator=generator, dtype=torch.float64)

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """audio: (batch, samples) float, zero-padded; lengths: (batch,) valid samples (None: all valid)."""
        mixed, lengths, _ = self.mix(audio, lengths)
        return mixed, lengths

    @torch.no_grad()
    def mix(
        self, audio: Tensor, lengths: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, MixingInfo]:
        """Like ``forward``, also returning what was done. ``generator`` overrides the mixer's own."""
        if audio.dim() != 2:
            raise ValueError(
                f"UtteranceMixer: audio must be (batch, samples), got shape {tuple(audio.shape)}"
            )
        batch, num_samples = audio.shape
        device = audio.device
        if lengths is None:
            lengths = torch.full((batch,), num_samples, dtype=torch.long, device=device)
        gen = generator if generator is not None else self.generator

        # --- per-utterance draws (CPU generator, then moved: reproducible on any device) ---
        # Everything below runs on the batch's device: the draws go there (an asynchronous host-to-device copy),
        # the lengths never come back to the host (that would be a device sync in every training step).
        draws = to_device_async(torch.stack([self._uniform(batch, gen) for _ in range(7)]), device)
        u_mix, u_kind, u_len, u_pos, u_src, u_src_start, u_level = draws.unbind(0)
        lengths = lengths.to(device)
        lengths_long = lengths.detach().long()
        do_mix = u_mix < self.mix_prob
        has_noise = self.num_noise_clips > 0
        if has_noise:
            use_noise = do_mix & (u_kind < self.noise_prob)
        else:
            use_noise = torch.zeros(batch, dtype=torch.bool, device=device)
        use_speech = do_mix & ~use_noise
        if batch < 2:  # nobody to mix with
            use_speech = torch.zeros_like(use_speech)

        # partner: another row of the batch, never the primary itself (offset 1..B-1 modulo B)
        rows = torch.arange(batch, device=device)
        partner = (rows + 1 + (u_src * max(batch - 1, 1)).long().clamp(max=max(batch - 2, 0))) % max(batch, 1)
        noise_idx = (u_src * max(self.num_noise_clips, 1)).long().clamp(max=max(self.num_noise_clips - 1, 0))

        # segment length: 1 .. floor(max_overlap * primary length), and within the partner for speech
        max_len = torch.floor(lengths_long.double() * self.max_overlap).long()
        max_len = torch.where(use_speech, torch.minimum(max_len, lengths_long[partner]), max_len)
        seg_len = torch.ceil(u_len * max_len.double()).long().clamp(min=1)
        seg_len = torch.where(max_len > 0, torch.minimum(seg_len, max_len), torch.zeros_like(seg_len))
        start = (u_pos * (lengths_long - seg_len + 1).double()).long().clamp(min=0)
        start = torch.minimum(start, (lengths_long - seg_len).clamp(min=0))
        speech_src_start = (u_src_start * (lengths_long[partner] - seg_len + 1).clamp(min=1).double()).long()
        noise_len_sel = (
            self.noise_lengths[noise_idx] if has_noise else torch.ones(batch, dtype=torch.long, device=device)
        )
        noise_src_start = (u_src_start * noise_len_sel.double()).long()
        source_start = torch.where(use_noise, noise_src_start, speech_src_start)

        low_snr, high_snr = self.snr_range
        low_er, high_er = self.energy_ratio_range
        level_db = torch.where(
            use_noise, low_snr + u_level * (high_snr - low_snr), low_er + u_level * (high_er - low_er)
        )
        active = (use_noise | use_speech) & (seg_len > 0)
        kind = torch.where(use_noise, 2, torch.where(use_speech, 1, 0)) * active
        level_db = torch.where(active, level_db, torch.full_like(level_db, math.nan))

        # --- vectorised gather of the interfering segments, (batch, samples) ---
        offset = torch.arange(num_samples, device=device)[None, :] - start[:, None]  # position in segment
        in_segment = (offset >= 0) & (offset < seg_len[:, None]) & active[:, None]
        offset = offset.clamp(min=0)
        speech_index = (partner * num_samples + speech_src_start)[:, None] + offset
        speech_index = speech_index.clamp(max=batch * num_samples - 1)
        if has_noise:
            clip_len = self.noise_lengths[noise_idx][:, None]
            noise_index = self.noise_offsets[noise_idx][:, None] + (
                (noise_src_start[:, None] + offset) % clip_len
            )
            # two gathers + a select: never copy the (possibly large) noise bank
            segment = torch.where(
                use_noise[:, None],
                self.noise_bank[noise_index].to(audio.dtype),
                audio.reshape(-1)[speech_index],
            )
        else:
            segment = audio.reshape(-1)[speech_index]
        segment = segment * in_segment

        # --- gains: P_primary over valid samples, P_segment over the added samples ---
        valid = valid_mask(lengths, num_samples)
        power_primary = (audio.double() ** 2 * valid).sum(1) / lengths.clamp(min=1).double()
        power_segment = (segment.double() ** 2).sum(1) / seg_len.clamp(min=1).double()
        target = power_segment * torch.pow(10.0, level_db / 10.0)
        scale = torch.where(
            active & (power_segment > 0), torch.sqrt(power_primary / target.clamp(min=1e-30)), 0.0
        )
        mixed = audio + (scale[:, None] * segment).to(audio.dtype)
        source = torch.where(use_noise, noise_idx, torch.where(use_speech, partner, -1))
        info = MixingInfo(
            kind=kind,
            source=torch.where(active, source, -1),
            start=torch.where(active, start, 0),
            length=torch.where(active, seg_len, 0),
            source_start=torch.where(active, source_start, 0),
            level_db=level_db,
            scale=scale.to(torch.float64),
        )
        return mixed, lengths, info
