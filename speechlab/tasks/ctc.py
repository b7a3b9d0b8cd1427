"""CTC speech recognition (training from scratch or fine-tuning a pretrained encoder) with WER/CER/PER via jiwer."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speechlab.checkpoints.encoder_weights import load_encoder, load_encoder_state_dict
from speechlab.checkpoints.pretrained_dir import save_pretrained
from speechlab.host_sync import host_reads_are_free
from speechlab.metrics import error_counts
from speechlab.models.ctc import CTCModel, ctc_greedy_decode, encoder_config_from_dict
from speechlab.models.registry import build_config
from speechlab.models.ssl_encoder import SSLEncoderConfig
from speechlab.nn.masking import span_mask
from speechlab.nn.masks import valid_mask
from speechlab.optim import OptimConfig, build_optimizer
from speechlab.tasks.base import SpeechTask

__all__ = ["CTCTask", "ctc_feasible", "error_counts", "CTC_TOO_LONG", "CTC_TOO_LONG_REMEDY"]

log = logging.getLogger(__name__)


class CTCTask(SpeechTask):
    """Train ``CTCModel`` with CTC loss; validate with greedy decoding and jiwer error rates.

    The unit inventory (characters, sentencepiece pieces or phonemes) comes from the data module's tokenizer
    and is stored inside every checkpoint, so a checkpoint alone can transcribe.

    Args:
        encoder: encoder preset name (see :mod:`speechlab.models.wavlm`), e.g. ``wavlm_tiny`` or ``wavlm_base``, or
            ``fbank_conformer_tiny`` (fbank + torchaudio Conformer, :mod:`speechlab.models.fbank_conformer`).
        encoder_overrides: fields of the preset's config to change (``{"num_layers": 4}``).
        mask_prob, mask_length: SpecAugment-style time masking with the learned mask embedding (training only).
        init_from: pretrained encoder to fine-tune: a Lightning ``.ckpt`` of any speechlab task, or any source
            ``speechlab.load`` accepts (our pretrained dir, Hugging Face dir, fairseq/unilm ``.pt``).
        freeze_feature_encoder: keep the conv feature encoder frozen for the whole run.
        freeze_encoder_steps: train only the CTC head for this many optimiser steps, then everything.
        layerwise_lr_decay: if set (e.g. 0.9), layer ``i`` of ``L`` gets ``lr * decay ** (L - i)``.

    Best-k checkpoints are ranked by ``val/error_rate`` (PER for phonemes, WER otherwise), which every validation
    logs; :meth:`export_pretrained` writes the model with its tokenizer (what ``fit`` leaves in ``<run>/pretrained``).
    """

    checkpoint_monitor = ("val/error_rate", "min")

    def __init__(
        self,
        encoder: str = "wavlm_tiny",
        encoder_overrides: dict[str, Any] | None = None,
        head_dropout: float = 0.1,
        mask_prob: float = 0.0,
        mask_length: int = 10,
        init_from: str | None = None,
        freeze_feature_encoder: bool = False,
        freeze_encoder_steps: int = 0,
        layerwise_lr_decay: float | None = None,
        optim: OptimConfig | None = None,
        max_nonfinite_steps: int = 20,
    ) -> None:
        super().__init__(optim=optim, max_nonfinite_steps=max_nonfinite_steps)
        # Plain containers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optim"])
        self.hparams["optim"] = dataclasses.asdict(self.optim_config)
        self.encoder_config = build_config("ctc_encoder", encoder, encoder_overrides)
        if layerwise_lr_decay and not isinstance(self.encoder_config, SSLEncoderConfig):
            raise ValueError(
                f"layerwise_lr_decay is for fine-tuning SSL encoders; encoder {encoder!r} is trained from scratch: "
                "leave model.layerwise_lr_decay unset"
            )
        self.tokenizer = None
        self.model: CTCModel | None = None

    # -- model construction: the vocabulary is known only once the data module has built the tokenizer --------
    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "CTCTask needs a tokenizer: set data.tokenizer to 'char', 'sentencepiece' or 'phoneme' "
                "(or data.tokenizer_dir) in the config"
            )
        source = self.hparams.init_from
        if source is None:
            self.build(tokenizer)
        elif Path(source).suffix == ".ckpt":
            self.build(tokenizer)
            self._load_encoder_weights(load_encoder_state_dict(source), source)
        else:
            # Any speechlab.load source carries its architecture: take it from there, keep our overrides.
            pretrained = load_encoder(source)
            self.encoder_config = dataclasses.replace(
                pretrained.config, **(self.hparams.encoder_overrides or {})
            )
            self.build(tokenizer)
            self._load_encoder_weights(pretrained.state_dict(), source)

    def build(self, tokenizer: Any) -> None:
        """Create the model for ``tokenizer``'s unit inventory (done by ``setup`` from the data module)."""
        self.tokenizer = tokenizer
        self.model = CTCModel(self.encoder_config, tokenizer.vocab_size, self.hparams.head_dropout)
        if self.hparams.freeze_feature_encoder:
            self.model.encoder.feature_encoder.requires_grad_(False)
        if self.hparams.mask_prob == 0:
            # Unused without masking; a parameter without a gradient would make DDP fail.
            self.model.encoder.mask_emb.requires_grad_(False)

    def _load_encoder_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        missing, unexpected = self.model.encoder.load_state_dict(state, strict=False)
        # A pretraining checkpoint may lack the mask embedding (e.g. Hugging Face WavLMModel without it).
        missing = [k for k in missing if k != "mask_emb"]
        if missing or unexpected:
            raise ValueError(
                f"{source}: encoder weights do not match encoder preset {self.hparams.encoder!r} "
                f"(missing: {missing[:8]}, unexpected: {unexpected[:8]}); set model.encoder to the preset the "
                "checkpoint was trained with"
            )
        log.info("initialised the encoder from %s", source)

    # -- checkpoints carry the tokenizer ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["encoder_config"] = dataclasses.asdict(self.encoder_config)
        self.save_tokenizer(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.model is not None:
            return
        self.encoder_config = encoder_config_from_dict(checkpoint["encoder_config"])
        self.build(self.stored_tokenizer(checkpoint))

    def export_pretrained(self, directory: str | Path) -> Path:
        """Write the model and its tokenizer as a speechlab pretrained directory (family ``ctc``)."""
        return save_pretrained(self.model, directory, family="ctc", tokenizer=self.tokenizer)

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        decay = self.hparams.layerwise_lr_decay
        lr_scale = None
        if decay:
            num_layers = self.encoder_config.num_layers
            lr_scale = {"model.encoder.": decay ** (num_layers + 1)}
            lr_scale.update(
                {f"model.encoder.encoder.layers.{i}.": decay ** (num_layers - i) for i in range(num_layers)}
            )
        total = self.optim_config.total_steps or int(self.trainer.estimated_stepping_batches)
        return build_optimizer(self.named_parameters(), self.optim_config, max(1, total), lr_scale=lr_scale)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_step < self.hparams.freeze_encoder_steps:
            # Dropping the gradients (rather than toggling requires_grad) keeps DDP's parameter set fixed;
            # AdamW leaves parameters without a gradient, and their moments, untouched.
            for param in self.model.encoder.parameters():
                param.grad = None
        super().on_before_optimizer_step(optimizer)

    # -- steps --------------------------------------------------------------------------------------------------
    def _ctc_loss(self, batch: Any, frame_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, Any]:
        """-> (loss per target unit of the feasible utterances, logits, frame_lengths)."""
        logits, frame_lengths = self.model(batch.audio, batch.lengths, frame_mask=frame_mask)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V), CTC in fp32
        targets = batch.targets.clamp_min(0)
        # An utterance whose targets need more frames than it has gets an infinite loss, zeroed by zero_infinity;
        # it is left out of the normalisation (and counted as skipped by training_step).
        feasible = ctc_feasible(batch.targets, batch.target_lengths, frame_lengths)
        loss = F.ctc_loss(
            log_probs,
            targets,
            frame_lengths,
            batch.target_lengths,
            blank=self.tokenizer.blank_id,
            reduction="sum",
            zero_infinity=True,
        )
        units = (batch.target_lengths * feasible).sum().clamp_min(1)
        return loss / units, logits, frame_lengths

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if len(batch) == 0:
            return self.skip_empty_batch()
        frame_lengths = self.model.encoder.frame_lengths(batch.lengths)
        infeasible = (~ctc_feasible(batch.targets, batch.target_lengths, frame_lengths)).sum()
        self.count_skipped(CTC_TOO_LONG, infeasible, CTC_TOO_LONG_REMEDY)
        frame_mask = None
        if self.hparams.mask_prob > 0:
            # the mask's width from the audio's, not max(frame_lengths): that would be read on the host
            num_frames = None
            if not host_reads_are_free(frame_lengths):
                num_frames = self.model.encoder.num_frames(batch.audio.shape[1])
            frame_mask = span_mask(
                frame_lengths,
                self.hparams.mask_prob,
                self.hparams.mask_length,
                min_masks=0,
                num_frames=num_frames,
            ).to(batch.audio.device)
        loss, _, _ = self._ctc_loss(batch, frame_mask)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log(f"train/{CTC_TOO_LONG}", infeasible.float(), reduce_fx="sum", batch_size=len(batch))
        return self.check_finite_loss(loss)

    def on_validation_epoch_start(self) -> None:
        self._error_counts = torch.zeros(4, dtype=torch.float64)  # word errors, words, char errors, chars

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_error_rates("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_error_rates("test")

    def transcribe(self, audio: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """audio: (B, S), lengths: (B,) -> greedy transcripts (phoneme strings for a phoneme tokenizer)."""
        logits, frame_lengths = self.model(audio, lengths)
        return [
            self.tokenizer.decode(ids)
            for ids in ctc_greedy_decode(logits, frame_lengths, self.tokenizer.blank_id)
        ]

    def _evaluate(self, batch: Any, stage: str) -> None:
        if len(batch) == 0:
            return
        loss, logits, frame_lengths = self._ctc_loss(batch)
        self.log(f"{stage}/loss", loss, batch_size=len(batch), sync_dist=True)
        hyps = [
            self.tokenizer.decode(ids)
            for ids in ctc_greedy_decode(logits, frame_lengths, self.tokenizer.blank_id)
        ]
        refs = [
            self.tokenizer.decode(t[:n].tolist())
            for t, n in zip(batch.targets, batch.target_lengths, strict=True)
        ]
        self._error_counts += error_counts(refs, hyps)

    def _log_error_rates(self, stage: str) -> None:
        counts = self._error_counts.to(self.device)
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        word_rate = (counts[0] / counts[1].clamp_min(1)).item()
        char_rate = (counts[2] / counts[3].clamp_min(1)).item()
        if self.tokenizer.field == "phonemes":
            self.log(f"{stage}/per", word_rate, rank_zero_only=True)
        else:
            self.log(f"{stage}/wer", word_rate, rank_zero_only=True)
            self.log(f"{stage}/cer", char_rate, rank_zero_only=True)
        # One name to monitor whatever the units are: PER for phonemes, WER otherwise.
        self.log(f"{stage}/error_rate", word_rate, prog_bar=True, rank_zero_only=True)


CTC_TOO_LONG = "ctc_target_longer_than_frames"  # skip reason in the end-of-training summary
CTC_TOO_LONG_REMEDY = (
    "their transcripts need more frames than the audio gives: check for transcripts of the wrong clip or "
    "raise data.min_duration"
)


def ctc_feasible(
    targets: torch.Tensor, target_lengths: torch.Tensor, frame_lengths: torch.Tensor
) -> torch.Tensor:
    """(B,) bool: CTC can align each utterance's targets to its frames.

    targets: (B, U) int64 padded (any pad value), target_lengths: (B,), frame_lengths: (B,). A path needs one
    frame per target unit plus a blank between each pair of equal consecutive units, so it exists iff
    ``frame_lengths >= target_lengths + repeats``. Tensor ops only (no host sync).
    """
    valid = valid_mask(target_lengths, targets.shape[1])
    repeats = ((targets[:, 1:] == targets[:, :-1]) & valid[:, 1:]).sum(1)
    return frame_lengths.to(target_lengths.device) >= target_lengths + repeats
