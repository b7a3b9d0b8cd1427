"""Codec GAN training (SoundStream / EnCodec / DAC recipe) as a LightningModule with manual optimisation.

Each batch: random fixed-length crops -> codec forward (codebooks updated from valid frames) -> discriminator step
(hinge or least-squares on real vs detached fake) -> generator step (multi-scale mel L1 + feature matching +
adversarial + commitment/codebook + optional semantic distillation of RVQ level 0). Gradients are clipped per
optimiser (DAC: generator 1000, discriminator 10). An EMA copy of the generator (decoder averaged; encoder and
codebooks copied, so codes mean the same) is what validation and export use.

Note on ``trainer.max_steps``: Lightning counts every optimiser step, so once the adversarial phase starts one batch
is 2 steps (discriminator + generator).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechlab.checkpoints.pretrained_dir import save_pretrained
from speechlab.host_sync import to_device_async
from speechlab.models.codec import Codec, CodecConfig
from speechlab.models.registry import build_config
from speechlab.nn.discriminators import (
    CombinedDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)
from speechlab.nn.masks import valid_mask
from speechlab.nn.seanet import in_shared_layer_order
from speechlab.nn.spectral import MultiScaleMelLoss, si_sdr
from speechlab.optim import OptimConfig, build_optimizer, optimizer_order, reorder_optimizer_state
from speechlab.tasks.base import SpeechTask


@dataclass
class CodecLossConfig:
    """Loss weights. Defaults follow DAC (mel 15, feature matching 2, adversarial 1, commitment 0.25, codebook 1)."""

    mel: float = 15.0
    feature_matching: float = 2.0
    adversarial: float = 1.0
    commitment: float = 0.25
    codebook: float = 1.0
    waveform_l1: float = 0.0
    distill: float = 10.0  # used only with a teacher
    adversarial_kind: str = "hinge"  # "hinge" (EnCodec) | "ls" (DAC, LSGAN)

    def __post_init__(self) -> None:
        if self.adversarial_kind not in ("hinge", "ls"):
            raise ValueError(f"loss.adversarial_kind must be 'hinge' or 'ls', got {self.adversarial_kind!r}")


@dataclass
class DiscriminatorConfig:
    """MS-STFT discriminator (EnCodec) + multi-period discriminator (HiFi-GAN/DAC); empty tuple disables one."""

    stft_n_ffts: tuple[int, ...] = (2048, 1024, 512, 256, 128)
    stft_filters: int = 32
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    period_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)


def _default_optim() -> OptimConfig:
    return OptimConfig(
        lr=1e-4, betas=(0.8, 0.99), weight_decay=0.0, warmup_steps=0, decay="constant", eps=1e-8
    )


def random_crop(
    audio: Tensor, lengths: Tensor, segment: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One random ``segment``-sample window per item (zero-padded when shorter): ``(B, S) -> (B, segment)``."""
    b = audio.shape[0]
    room = (lengths - segment).clamp_min(0)
    # drawn on the CPU (a CPU generator), copied without making the host wait for the device
    draws = to_device_async(torch.rand(b, generator=generator), audio.device)
    start = (draws * (room + 1).float()).long().clamp_max(room)
    index = start[:, None] + torch.arange(segment, device=audio.device)[None]
    crop_lengths = (lengths - start).clamp(max=segment)
    valid = valid_mask(crop_lengths, segment)
    padded = F.pad(audio, (0, max(0, segment - audio.shape[1])))
    crop = padded.gather(1, index.clamp_max(padded.shape[1] - 1)) * valid
    return crop, crop_lengths


def _valid_mask(audio: Tensor, lengths: Tensor) -> Tensor:
    """(B, S) float: 1 at valid samples."""
    return valid_mask(lengths, audio.shape[1]).to(audio.dtype)


def _batch_audio(batch: Any) -> tuple[Tensor, Tensor]:
    """``(audio (B, S), lengths (B,))`` from a speechlab Batch, a dict or an (audio, lengths) tuple."""
    if hasattr(batch, "audio"):
        audio, lengths = batch.audio, batch.lengths
    elif isinstance(batch, dict):
        audio, lengths = batch["audio"], batch.get("lengths")
    else:
        audio, lengths = batch[0], batch[1] if len(batch) > 1 else None
    if lengths is None:
        lengths = torch.full((audio.shape[0],), audio.shape[-1], dtype=torch.long, device=audio.device)
    return audio, lengths.long()


def distillation_loss(student: Tensor, teacher: Tensor, frame_lengths: Tensor) -> Tensor:
    """SpeechTokenizer's D-axis loss: mean over valid frames of ``-log sigmoid(cos(student, teacher))``.

    ``student: (B, T, D)``, ``teacher: (B, T', D)`` (resampled to T frames by linear interpolation when T' != T).
    """
    if teacher.shape[1] != student.shape[1]:
        teacher = F.interpolate(
            teacher.transpose(1, 2), size=student.shape[1], mode="linear", align_corners=False
        ).transpose(1, 2)
    cos = F.cosine_similarity(student.float(), teacher.float().detach(), dim=-1)  # (B, T)
    valid = valid_mask(frame_lengths.to(student.device), student.shape[1]).float()
    return -(F.logsigmoid(cos) * valid).sum() / valid.sum().clamp_min(1)


class CodecTask(SpeechTask):
    """Train a :class:`~speechlab.models.codec.Codec` adversarially.

    Args:
        codec: preset name (``codec_16khz``, ``codec_16khz_low_rate``, ``codec_16khz_causal``, ``codec_tiny``,
            ``codec_mini``) or a :class:`CodecConfig`.
        codec_overrides: CodecConfig fields to change on top of the preset.
        loss: loss weights and adversarial loss kind.
        discriminator: discriminator architecture.
        optim: generator optimiser (default DAC: AdamW 1e-4, betas 0.8/0.99, constant).
        discriminator_optim: discriminator optimiser (default: same as ``optim``).
        segment_seconds: random crop length for training (DAC 0.38 s, EnCodec 1 s).
        grad_clip_generator / grad_clip_discriminator: gradient-norm clipping (DAC 1000 / 10).
        generator_ema: decay of the generator's EMA copy used for validation/export (0 disables), warmed up as
            ``min(generator_ema, (1 + n) / (10 + n))`` after ``n`` batches.
        adversarial_start_step: batches trained on reconstruction only before the GAN starts.
        teacher: frozen ``teacher(audio (B, S), lengths (B,)) -> hidden states (B, T, D)`` for semantic distillation
            of RVQ level 0 (SpeechTokenizer / Mimi); ``teacher_dim`` = D.
        val_n_q: extra codebook counts to validate at besides all levels.
        seed: seed of the training crops.
    """

    checkpoint_monitor = ("val/mel_distance", "min")

    def __init__(
        self,
        codec: str | CodecConfig = "codec_16khz",
        codec_overrides: dict[str, Any] | None = None,
        loss: CodecLossConfig | None = None,
        discriminator: DiscriminatorConfig | None = None,
        optim: OptimConfig | None = None,
        discriminator_optim: OptimConfig | None = None,
        segment_seconds: float = 1.0,
        grad_clip_generator: float = 1000.0,
        grad_clip_discriminator: float = 10.0,
        generator_ema: float = 0.999,
        adversarial_start_step: int = 0,
        teacher: nn.Module | None = None,
        teacher_dim: int | None = None,
        val_n_q: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(optim=optim or _default_optim())
        self.save_hyperparameters(ignore=["teacher"])
        self.automatic_optimization = False
        overrides = dict(codec_overrides or {})
        if teacher is not None:
            if teacher_dim is None:
                raise ValueError("model.teacher_dim (the teacher's hidden size) is required with a teacher")
            overrides["semantic_dim"] = teacher_dim
        config = build_config("codec", codec, overrides)
        self.loss_config = loss or CodecLossConfig()
        self.disc_config = discriminator or DiscriminatorConfig()
        self.disc_optim_config = discriminator_optim or self.optim_config
        self.codec = Codec(config)
        self.discriminator = CombinedDiscriminator(
            tuple(self.disc_config.stft_n_ffts),
            self.disc_config.stft_filters,
            tuple(self.disc_config.periods),
            tuple(self.disc_config.period_channels),
        )
        self.mel_loss = MultiScaleMelLoss(config.sample_rate)
        self.ema_decay = generator_ema
        self.codec_ema = None
        if generator_ema > 0:
            self.codec_ema = copy.deepcopy(self.codec).requires_grad_(False)
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        self.segment = max(
            config.hop_length,
            round(segment_seconds * config.sample_rate / config.hop_length) * config.hop_length,
        )
        self.grad_clip_generator = grad_clip_generator
        self.grad_clip_discriminator = grad_clip_discriminator
        self.adversarial_start_step = adversarial_start_step
        self.val_n_q = sorted(set(val_n_q or []))
        self.batches_seen = 0
        self._crop_generator = torch.Generator().manual_seed(seed)

    def train(self, mode: bool = True) -> CodecTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no dropout, ever
        return self

    # ------------------------------------------------------------------------------------------------ optimisers
    def configure_optimizers(self) -> list:
        total = self.optim_config.total_steps or max(1, int(self.trainer.estimated_stepping_batches))
        gen = build_optimizer(self.codec.named_parameters(), self.optim_config, total_steps=total)
        disc = build_optimizer(
            self.discriminator.named_parameters(), self.disc_optim_config, total_steps=total
        )
        return [gen, disc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["codec_batches_seen"] = self.batches_seen
        checkpoint["codec_crop_rng"] = self._crop_generator.get_state()
        # the frozen teacher is supplied at construction, not stored
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get("optimizer_states")
        if states:  # a run written while the latent Transformer had the shared layer's parameter order
            named = list(self.codec.named_parameters())
            written = optimizer_order(in_shared_layer_order(named), self.optim_config)
            renumbered = reorder_optimizer_state(
                states[0], written, optimizer_order(named, self.optim_config)
            )
            if renumbered is not None:
                states[0] = renumbered
        self.batches_seen = int(checkpoint.get("codec_batches_seen", 0))
        if "codec_crop_rng" in checkpoint:
            self._crop_generator.set_state(checkpoint["codec_crop_rng"])
        if self.teacher is not None:
            for key, value in self.teacher.state_dict().items():
                checkpoint["state_dict"].setdefault("teacher." + key, value)

    # -------------------------------------------------------------------------------------------------- training
    def _teacher_states(self, audio: Tensor, lengths: Tensor) -> Tensor:
        with torch.no_grad():
            hidden = self.teacher(audio, lengths)
        if isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        if hasattr(hidden, "last_hidden_state"):
            hidden = hidden.last_hidden_state
        return hidden

    def generator_losses(
        self, audio: Tensor, lengths: Tensor, out: Any, recon: Tensor, use_gan: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Every generator loss for one codec output; returns (weighted total, unweighted parts)."""
        w = self.loss_config
        parts = {"mel": self.mel_loss(recon, audio, lengths), "commitment": out.rvq.commitment_loss}
        total = w.mel * parts["mel"] + w.commitment * parts["commitment"]
        if self.codec.config.codebook_dim is not None:
            parts["codebook"] = out.rvq.codebook_loss
            total = total + w.codebook * parts["codebook"]
        if w.waveform_l1:
            valid = _valid_mask(audio, lengths)
            parts["waveform_l1"] = ((recon - audio).abs() * valid).sum() / valid.sum().clamp_min(1)
            total = total + w.waveform_l1 * parts["waveform_l1"]
        if self.teacher is not None and out.semantic is not None:
            teacher = self._teacher_states(audio, lengths)
            parts["distill"] = distillation_loss(out.semantic, teacher, out.frame_lengths)
            total = total + w.distill * parts["distill"]
        if use_gan:
            fake_logits, fake_feats = self.discriminator(recon)
            with torch.no_grad():
                _, real_feats = self.discriminator(audio)
            parts["adversarial"] = generator_adversarial_loss(fake_logits, w.adversarial_kind)
            parts["feature_matching"] = feature_matching_loss(real_feats, fake_feats)
            total = (
                total + w.adversarial * parts["adversarial"] + w.feature_matching * parts["feature_matching"]
            )
        return total, parts

    def training_step(self, batch: Any, batch_idx: int) -> None:
        audio, lengths = _batch_audio(batch)
        if audio.shape[0] == 0:
            if self.trainer.world_size > 1:  # the codebook updates are collectives: a rank cannot sit one out
                raise RuntimeError(
                    "CodecTask: every item of a training batch failed to load on this rank under DDP; the codec "
                    "cannot skip a batch there. Clean the manifest first (speechlab check-manifest)."
                )
            self.skip_empty_batch()
            return
        audio, lengths = random_crop(audio, lengths, self.segment, self._crop_generator)
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        use_gan = self.batches_seen >= self.adversarial_start_step

        out = self.codec(audio, lengths)  # one generator pass per batch (codebooks update here)
        recon = out.audio * _valid_mask(audio, lengths)
        if use_gan:
            real_logits, _ = self.discriminator(audio)
            fake_logits, _ = self.discriminator(recon.detach())
            d_loss = discriminator_loss(real_logits, fake_logits, self.loss_config.adversarial_kind)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self.clip_gradients(opt_d, self.grad_clip_discriminator, "norm")
            opt_d.step()
            sched_d.step()
            self.log("train/d_loss", d_loss.detach(), prog_bar=True)

        total, parts = self.generator_losses(audio, lengths, out, recon, use_gan)
        if self.check_finite_loss(total) is not None:
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(total)
            self.clip_gradients(opt_g, self.grad_clip_generator, "norm")
            opt_g.step()
            sched_g.step()
            self._update_ema()
        self.batches_seen += 1
        self.log("train/loss", total.detach(), prog_bar=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "mel")
        self._log_codebooks(out.rvq)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.codec_ema is None:
            return
        # warm-up (TensorFlow's ExponentialMovingAverage num_updates): decay min(d, (1 + n) / (10 + n)), so the copy
        # forgets the random init within the first few hundred updates. Without it a 200-batch run exports
        # 0.99^200 = 13 % random init in every weight; a 400k-batch run is unaffected past its first ~10k batches.
        decay = min(self.ema_decay, (1 + self.batches_seen) / (10 + self.batches_seen))
        weight = 1 - decay
        if (
            self.last_step_skipped is not None
        ):  # on-device skip (SpeechTask): a skipped update moves no EMA either
            weight = (~self.last_step_skipped).float() * weight
        # Only the decoder side is averaged. The encoder and quantizer are copied: the codebooks (already running
        # averages) are fit to the live encoder's latent, and an averaged encoder's latent lands elsewhere (mini
        # recipe, 300 batches: held-out codebook usage 0.92 with the live encoder, 0.79 with an averaged one).
        for (name, ema_p), p in zip(self.codec_ema.named_parameters(), self.codec.parameters(), strict=True):
            if name.startswith(("decoder.", "decoder_transformer.")):
                ema_p.lerp_(p.detach(), weight)
            else:
                ema_p.copy_(p.detach())
        for ema_b, b in zip(self.codec_ema.buffers(), self.codec.buffers(), strict=True):
            ema_b.copy_(b)

    def _log_codebooks(self, rvq) -> None:
        """Per-level codebook health every step: batch usage, perplexity, dead-code replacements."""
        for i in range(rvq.usage.shape[0]):
            self.log(f"codebook/usage_l{i}", rvq.usage[i])
            self.log(f"codebook/perplexity_l{i}", rvq.perplexity[i])
            self.log(f"codebook/replaced_l{i}", rvq.replaced[i])

    # ------------------------------------------------------------------------------------------------ evaluation
    def eval_codec(self) -> Codec:
        """The weights used for validation and export: the EMA generator when enabled."""
        return self.codec_ema if self.codec_ema is not None else self.codec

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @torch.no_grad()
    def _evaluate(self, batch: Any, stage: str) -> None:
        audio, lengths = _batch_audio(batch)
        if audio.shape[0] == 0:
            return
        codec = self.eval_codec().eval()
        n_qs = [*self.val_n_q, None]
        for n_q in n_qs:
            codes, frame_lengths = codec.encode(audio, lengths, n_q=n_q)
            recon = codec.decode(codes, frame_lengths)[:, : audio.shape[1]]
            suffix = "" if n_q is None else f"_nq{n_q}"
            mel = self.mel_loss(recon, audio, lengths)
            sdr = si_sdr(recon, audio, lengths).mean()
            self.log(
                f"{stage}/mel_distance{suffix}",
                mel,
                batch_size=audio.shape[0],
                sync_dist=True,
                prog_bar=n_q is None,
            )
            self.log(f"{stage}/si_sdr{suffix}", sdr, batch_size=audio.shape[0], sync_dist=True)

    def export_pretrained(self, directory: str | Path) -> Path:
        """Write the evaluation weights (EMA generator) as a speechlab pretrained codec directory; ``fit`` with the
        standard callbacks (:class:`speechlab.train.ExportPretrained`) does it into ``<default_root_dir>/pretrained``."""
        return save_pretrained(copy.deepcopy(self.eval_codec()).cpu(), directory, family="codec")
