"""WavLM / HuBERT masked-prediction pre-training (HuBERT, Hsu et al. 2021, §III-B; WavLM, Chen et al. 2022, §III-B).

One step: (train only) mix the batch with noise or another utterance (:class:`UtteranceMixer`) -> span-mask the
encoder frames -> ``SSLEncoder`` -> ``final_proj`` (D -> final_dim) -> cosine similarity with one embedding per unit
/ ``logit_temp`` (0.1) -> cross-entropy against the *clean* utterance's k-means units at masked, non-padded frames
(unmasked frames with ``pred_nomask_weight``, 0 by default) + ``feature_penalty_weight`` x mean(CNN features^2).
As in fairseq, the summed loss is divided by the number of masked frames (the penalty is scaled by that count
first, so it stays a per-frame quantity).

Unit ids are the k-means cluster ids ``0..num_classes-1`` as written by ``speechlab kmeans`` (no fairseq
dictionary offset; converting a fairseq head means dropping its first 4 label-embedding rows, docs/pitfalls.md, 3).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechlab.augment.mixing import MixingConfig, UtteranceMixer
from speechlab.checkpoints.pretrained_dir import save_pretrained
from speechlab.data.collate import UNIT_PAD
from speechlab.host_sync import host_reads_are_free
from speechlab.models.fbank_conformer import FbankConformerConfig
from speechlab.models.registry import build_config
from speechlab.models.wavlm import UnitPredictionHead, WavLM, WavLMConfig
from speechlab.nn.masking import span_mask
from speechlab.nn.masks import padding_mask
from speechlab.optim import OptimConfig
from speechlab.tasks.base import SpeechTask

log = logging.getLogger(__name__)

__all__ = [
    "WavLMPretrainTask",
    "UnitPredictionHead",
    "align_units",
    "prediction_metrics",
    "wavlm_config",
    "upgrade_wavlm_pretrain_state",
    "is_wavlm_pretrain_state",
    "load_pretrained_encoder",
]


def wavlm_config(hparams: dict[str, Any]) -> WavLMConfig:
    """The :class:`WavLMConfig` of a task's hyper-parameters (``encoder`` preset of the ``ctc_encoder`` family +
    ``encoder_overrides``, ``num_classes``, ``final_dim``, ``logit_temp``; the task's defaults where absent)."""
    return WavLMConfig(
        encoder=build_config(
            "ctc_encoder", hparams.get("encoder", "wavlm_tiny"), hparams.get("encoder_overrides")
        ),
        num_classes=int(hparams.get("num_classes", 100)),
        final_dim=int(hparams.get("final_dim", 256)),
        logit_temp=float(hparams.get("logit_temp", 0.1)),
    )


# Checkpoints written before the task held a WavLM model kept its two parts at the top: encoder.* and head.*
_LEGACY_PREFIXES = ("encoder.", "head.")


def upgrade_wavlm_pretrain_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The one place old ``WavLMPretrainTask`` checkpoints are read: their ``encoder.*`` / ``head.*`` keys become
    today's ``model.encoder.*`` / ``model.head.*`` (other keys, and an up-to-date state, are returned as they are)."""
    return {("model." + k if k.startswith(_LEGACY_PREFIXES) else k): v for k, v in state.items()}


def is_wavlm_pretrain_state(keys: Iterable[str]) -> bool:
    """Whether a Lightning state dict's keys are a ``WavLMPretrainTask``'s (either layout)."""
    keys = set(upgrade_wavlm_pretrain_state(dict.fromkeys(keys)))
    return "model.head.label_embeddings" in keys and any(k.startswith("model.encoder.") for k in keys)


def align_units(units: Tensor, num_frames: int, frame_lengths: Tensor, stride: int = 1) -> Tensor:
    """Unit targets aligned to the encoder frames: (B, U) padded with -100 -> (B, num_frames).

    ``stride``: units per encoder frame (encoder hop / unit hop); encoder frame ``t`` takes unit ``stride * t``,
    as HuBERT does for labels at a higher rate than its frames (fairseq ``label_rate``). Rows are then cropped or
    padded with -100 to ``num_frames``; frames at or beyond ``frame_lengths`` (padding) are set to -100 too. The
    k-means units of ``speechlab kmeans`` have exactly the 50 Hz encoders' frame count, so cropping only matters
    for units computed another way (or audio cropped by ``max_seconds``).
    """
    if stride > 1:
        units = units[:, ::stride]
    batch, length = units.shape
    if length >= num_frames:
        aligned = units[:, :num_frames]
    else:
        aligned = F.pad(units, (0, num_frames - length), value=UNIT_PAD)
    padded = padding_mask(frame_lengths.to(units.device), num_frames)
    return aligned.masked_fill(padded, UNIT_PAD)


def prediction_metrics(logits: Tensor, targets: Tensor, frame_mask: Tensor) -> dict[str, Tensor]:
    """Accuracy of unit prediction on masked and on unmasked frames.

    logits: (B, T, C); targets: (B, T) int64 with -100 where there is no target (padding); frame_mask: (B, T) bool.
    Returns ``acc_masked``, ``acc_unmasked`` (NaN when there is no such frame), ``n_masked``, ``n_unmasked``.
    """
    valid = targets != UNIT_PAD
    correct = (logits.argmax(-1) == targets) & valid
    out = {}
    for name, where in (("masked", frame_mask & valid), ("unmasked", ~frame_mask & valid)):
        count = where.sum()
        out[f"n_{name}"] = count
        out[f"acc_{name}"] = (
            (correct & where).sum().float() / count if count > 0 else torch.tensor(float("nan"))
        )
    return out


class WavLMPretrainTask(SpeechTask):
    """Masked unit prediction through utterance mixing (WavLM) — HuBERT when ``mixing`` is None.

    Args:
        encoder: encoder preset name (``wavlm_tiny``, ``wavlm_base``, ``wavlm_base_plus``, ``wavlm_large``, ...),
            or ``fbank_conformer_tiny`` (log-mel + Conformer at 25 Hz, the mini recipe's CPU model; its masking
            defaults are WavLM's 0.8 / 10 frames unless set).
        encoder_overrides: config fields of the preset to change, e.g. ``{"feature_grad_mult": 0.1}``.
        num_classes: number of k-means clusters of the units (100 for MFCC iteration 1, 500 later).
        final_dim: projection size of the prediction head (256 Base, 768 Large).
        logit_temp: cosine-similarity temperature (0.1).
        mask_prob, mask_length: span masking (None: the encoder preset's values; HuBERT/WavLM use 0.8 / 10).
        pred_masked_weight, pred_nomask_weight: loss weights of masked / unmasked frames (1 / 0).
        feature_penalty_weight: weight of mean(CNN features^2) (10 for Base, as HuBERT).
        mixing: utterance mixing (training batches only); None = no mixing (plain HuBERT).
        units_hop: samples per unit of the manifests' units (320: ``speechlab kmeans``'s 50 Hz); an encoder with a
            hop of k x ``units_hop`` predicts every k-th unit.
        mixing_seed: seed of the mixing draws; each training micro-batch mixes with a generator seeded from
            (mixing_seed, global rank, epoch, batch index), so resumed runs mix exactly as uninterrupted ones.
        optim: optimiser + schedule (:class:`speechlab.optim.OptimConfig`).
    """

    checkpoint_monitor = ("val/loss", "min")

    def __init__(
        self,
        encoder: str = "wavlm_tiny",
        encoder_overrides: dict[str, Any] | None = None,
        num_classes: int = 100,
        final_dim: int = 256,
        logit_temp: float = 0.1,
        mask_prob: float | None = None,
        mask_length: int | None = None,
        pred_masked_weight: float = 1.0,
        pred_nomask_weight: float = 0.0,
        feature_penalty_weight: float = 10.0,
        mixing: MixingConfig | None = None,
        mixing_seed: int = 0,
        units_hop: int = 320,
        optim: OptimConfig | None = None,
        max_nonfinite_steps: int = 20,
    ) -> None:
        # dicts (from a checkpoint, see on_save_checkpoint) or dataclasses (from the CLI / Python)
        optim = OptimConfig(**optim) if isinstance(optim, dict) else optim
        mixing = MixingConfig(**mixing) if isinstance(mixing, dict) else mixing
        super().__init__(optim=optim, max_nonfinite_steps=max_nonfinite_steps)
        self.save_hyperparameters()
        self.model = WavLM(wavlm_config(self.hparams))
        self.encoder_config = self.model.config.encoder
        self.mask_prob = getattr(self.encoder_config, "mask_prob", 0.8) if mask_prob is None else mask_prob
        self.mask_length = (
            getattr(self.encoder_config, "mask_length", 10) if mask_length is None else mask_length
        )
        encoder_hop = self.model.hop
        if units_hop < 1 or encoder_hop % units_hop != 0:
            raise ValueError(
                f"units_hop={units_hop}: the encoder's hop ({encoder_hop} samples) must be a whole multiple of it"
            )
        self.units_stride = encoder_hop // units_hop
        self.mixing_config = mixing
        self.mixer: UtteranceMixer | None = None
        self._units_checked = False

    @property
    def encoder(self) -> nn.Module:
        """The model's encoder (what fine-tuning and feature extraction keep)."""
        return self.model.encoder

    @property
    def head(self) -> UnitPredictionHead:
        return self.model.head

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"] = upgrade_wavlm_pretrain_state(checkpoint["state_dict"])  # resume an old run

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # plain containers only, so the checkpoint loads with torch.load(weights_only=True)
        hparams = checkpoint.get("hyper_parameters")
        if hparams:
            checkpoint["hyper_parameters"] = {
                k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in hparams.items()
            }

    def export_pretrained(self, directory: str | Path) -> Path:
        """Write the encoder (what fine-tuning and feature extraction use) as a speechlab pretrained directory;
        family ``wavlm`` with the gated relative position bias, else ``hubert`` (``fbank_conformer`` for that
        encoder)."""
        if isinstance(self.encoder_config, FbankConformerConfig):
            family = "fbank_conformer"
        else:
            family = "wavlm" if self.encoder_config.relative_position_bias else "hubert"
        return save_pretrained(self.encoder, directory, family=family)

    def setup(self, stage: str) -> None:
        if self.mixing_config is not None and self.mixer is None:
            rank = getattr(self.trainer, "global_rank", 0) if self._trainer is not None else 0
            self.mixer = UtteranceMixer.from_config(self.mixing_config, seed=self.hparams.mixing_seed + rank)
            self.mixer.to(self.device)
            log.info(
                "utterance mixing on: %s (%d noise clips)", self.mixing_config, self.mixer.num_noise_clips
            )

    def _mixing_generator(self, batch_idx: int) -> torch.Generator:
        """This micro-batch's mixing RNG, a function of (mixing_seed, rank, epoch, batch index) only.

        The batch index counts micro-batches (under gradient accumulation every micro-batch of one update mixes
        differently, which a seed from ``global_step`` would not), and a resumed run mixes exactly as the
        uninterrupted one did, with no generator state to save in the checkpoint.
        """
        trainer = self._trainer
        rank = trainer.global_rank if trainer is not None else 0
        epoch = trainer.current_epoch if trainer is not None else 0
        entropy = [self.hparams.mixing_seed % 2**32, rank, epoch, batch_idx]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.Generator().manual_seed(seed)

    # -- the step ----------------------------------------------------------------------------------------------
    def compute_loss(
        self, audio: Tensor, lengths: Tensor, units: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Masked prediction loss of the (already mixed) audio against the clean units.

        audio: (B, S) float32; lengths: (B,) int64; units: (B, T_units) int64 padded with -100.
        Returns ``loss`` and the logged quantities.
        """
        frame_lengths = self.encoder.frame_lengths(lengths)
        num_frames = self.encoder.num_frames(audio.shape[1])
        if generator is None and not host_reads_are_free(frame_lengths):
            # training on an accelerator: draw the mask there (its global RNG), no copy of the lengths to the host
            frame_mask = span_mask(frame_lengths, self.mask_prob, self.mask_length, num_frames=num_frames)
        else:  # the CPU generator (validation's fixed masks) needs the lengths on the CPU
            frame_mask = span_mask(
                frame_lengths.cpu(),
                self.mask_prob,
                self.mask_length,
                num_frames=num_frames,
                generator=generator,
            ).to(audio.device)
        logits, out = self.model(audio, lengths, frame_mask=frame_mask)  # logits: (B, T, C) fp32
        targets = align_units(units, num_frames, out.frame_lengths, self.units_stride)
        if not self._units_checked and int(targets.max()) >= self.hparams.num_classes:
            raise ValueError(
                f"unit id {int(targets.max())} >= num_classes={self.hparams.num_classes}: set model.num_classes "
                "to the k-means cluster count of the manifest's units"
            )
        self._units_checked = True
        valid = targets != UNIT_PAD
        masked = frame_mask & valid
        unmasked = ~frame_mask & valid
        n_masked = masked.sum()
        n_unmasked = unmasked.sum()
        # Every frame goes through the head and the losses are masked sums: a fixed-size computation, where
        # ``hidden[masked]`` would read the number of masked frames on the host (a device sync). The head's extra
        # work on unmasked frames is under 1 % of a step. Cross-entropy is 0 at UNIT_PAD (its ignore_index).
        frame_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(
            targets
        )
        loss_masked = torch.where(masked, frame_loss, 0.0).sum()
        loss_unmasked = torch.where(unmasked, frame_loss, 0.0).sum()
        weight_u = self.hparams.pred_nomask_weight
        normaliser = n_masked.clamp(min=1).float()
        penalty = out.feature_penalty.float()
        total = (
            self.hparams.pred_masked_weight * loss_masked
            + self.hparams.feature_penalty_weight * penalty * normaliser
        )
        if weight_u > 0:
            total = total + weight_u * loss_unmasked
        with torch.no_grad():
            correct = logits.argmax(-1) == targets
            acc_m = (correct & masked).sum().float() / normaliser
            acc_u = (correct & unmasked).sum().float() / n_unmasked.clamp(min=1)
        return {
            "loss": total / normaliser,
            "loss_masked": loss_masked.detach() / normaliser,
            "loss_unmasked": loss_unmasked.detach() / n_unmasked.clamp(min=1),
            "feature_penalty": penalty.detach(),
            "acc_masked": acc_m,
            "acc_unmasked": acc_u,
            "masked_fraction": n_masked.float() / (n_masked + n_unmasked).clamp(min=1),
        }

    def _check_batch(self, batch: Any) -> None:
        if batch.units is None:
            raise ValueError(
                "WavLMPretrainTask needs unit targets: set data.units_field: units and point the data module at "
                "manifests written by `speechlab kmeans`"
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if len(batch) == 0:
            return self.skip_empty_batch()
        self._check_batch(batch)
        audio, lengths = batch.audio, batch.lengths
        if self.mixer is not None:
            audio, lengths, _ = self.mixer.mix(audio, lengths, generator=self._mixing_generator(batch_idx))
        results = self.compute_loss(audio, lengths, batch.units)
        self._log("train", results, len(batch))
        return self.check_finite_loss(results["loss"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if len(batch) == 0:
            return
        self._check_batch(batch)
        # a fixed mask per batch index: validation numbers are comparable from one epoch to the next
        generator = torch.Generator().manual_seed(batch_idx)
        results = self.compute_loss(batch.audio, batch.lengths, batch.units, generator=generator)
        self._log("val", results, len(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if len(batch) == 0:
            return
        self._check_batch(batch)
        generator = torch.Generator().manual_seed(batch_idx)
        self._log(
            "test",
            self.compute_loss(batch.audio, batch.lengths, batch.units, generator=generator),
            len(batch),
        )

    def _log(self, stage: str, results: dict[str, Tensor], batch_size: int) -> None:
        for name, value in results.items():
            self.log(
                f"{stage}/{name}",
                value.detach().float(),
                prog_bar=name in ("loss", "acc_masked"),
                batch_size=batch_size,
                sync_dist=stage != "train",
            )


def load_pretrained_encoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The encoder (``SSLEncoder``, or ``FbankConformerEncoder``) of a ``WavLMPretrainTask`` Lightning checkpoint
    (weights only, no unpickling of code; either key layout, see :func:`upgrade_wavlm_pretrain_state`).

    The checkpoint's ``hyper_parameters`` give the preset and overrides; ``state_dict`` the weights.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickled objects we do not allow, or a corrupt file
        raise ValueError(f"{path}: cannot read as a weights-only Lightning checkpoint ({err})") from err
    hparams = ckpt.get("hyper_parameters") or {}
    if "encoder" not in hparams or "state_dict" not in ckpt:
        raise ValueError(
            f"{path}: not a WavLMPretrainTask checkpoint (no hyper_parameters.encoder / state_dict)"
        )
    model = WavLM(wavlm_config(hparams))
    prefix = "model."
    state = upgrade_wavlm_pretrain_state(ckpt["state_dict"])
    model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return model.encoder
