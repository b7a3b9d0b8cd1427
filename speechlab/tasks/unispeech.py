"""UniSpeech multitask pretraining: α·CTC(swap) + (1 − α)·(InfoNCE + β·diversity) (Wang et al. 2021, §2).

A batch may mix labeled (high-resource, phone targets) and unlabeled speech: an utterance is *labeled* when it has
targets and its language is in ``labeled_languages`` (None = every utterance with targets). The contrastive and
diversity terms use every utterance; CTC only the labeled ones. Normalisation follows the reference criterion: the
summed CTC (over labeled utterances) and the summed InfoNCE (over masked frames) are combined and divided by the
number of masked frames M::

    loss = [α · Σ CTC + (1 − α) · (Σ InfoNCE + β · L_div · M + γ · feature_penalty · M)] / M

α = ``ctc_weight`` (0.5), β = ``diversity_weight`` (0.1), γ = ``feature_penalty_weight`` (0 for UniSpeech).
The Gumbel temperature follows ``global_step`` (set before every training batch).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from speechlab.checkpoints.hf_unispeech import convert_state_dict, read_hf_directory
from speechlab.checkpoints.pretrained_dir import save_pretrained
from speechlab.host_sync import host_reads_are_free, to_device_async
from speechlab.models.ctc import ctc_greedy_decode
from speechlab.models.registry import build_config
from speechlab.models.unispeech import UniSpeech, UniSpeechConfig
from speechlab.nn.contrastive import contrastive_loss, diversity_loss
from speechlab.nn.masking import span_mask
from speechlab.optim import OptimConfig
from speechlab.tasks.base import SpeechTask
from speechlab.tasks.ctc import CTC_TOO_LONG, CTC_TOO_LONG_REMEDY, ctc_feasible, error_counts

log = logging.getLogger(__name__)


def unispeech_config(
    preset: str,
    num_ctc_classes: int,
    model_overrides: dict[str, Any] | None = None,
    encoder_overrides: dict[str, Any] | None = None,
) -> UniSpeechConfig:
    """The task's YAML keys (``model``, ``model_overrides``, ``encoder_overrides``) as one
    :func:`speechlab.models.registry.build_config` call: the backbone's overrides are the ``encoder`` field's."""
    overrides = {**(model_overrides or {}), "num_ctc_classes": num_ctc_classes}
    if encoder_overrides:
        overrides["encoder"] = {**(overrides.get("encoder") or {}), **encoder_overrides}
    return build_config("unispeech", preset, overrides)


LOSS_NORMALIZATIONS = ("masked_frames", "per_term")


class UniSpeechTask(SpeechTask):
    """UniSpeech pretraining on a mixed labeled / unlabeled batch.

    Args:
        model: preset name (``unispeech_tiny`` | ``unispeech_base`` | ``unispeech_large`` | ``unispeech_fbank_tiny``,
            the last on the fbank + Conformer encoder, for CPU experiments).
        model_overrides: ``UniSpeechConfig`` fields to change (e.g. ``{swap_prob: 0.0}``).
        encoder_overrides: fields of the backbone's config to change (``SSLEncoderConfig`` or
            ``FbankConformerConfig``, e.g. ``{num_layers: 4}``).
        num_ctc_classes: phone inventory size incl. blank; None = the data module tokenizer's ``vocab_size``.
        ctc_weight: α; 0 = contrastive-only (wav2vec 2.0), 1 = CTC only.
        diversity_weight: β (0.1).
        feature_penalty_weight: γ (0 for UniSpeech, 10 for wav2vec 2.0 Base).
        num_negatives: K distractors per masked frame (100), from the same utterance.
        logit_temperature: κ of the cosine logits (0.1).
        mask_prob / mask_length: span masking; None = the model config's (the SSL encoder's: 0.5 / 10 for UniSpeech;
            0.5 / 5 frames for the 25 Hz fbank encoder).
        labeled_languages: languages whose utterances get CTC; None = every utterance with targets.
        labeled_mask_prob: span-mask probability for the labeled utterances (None = ``mask_prob``, the reference:
            one mask for all). CTC reads the masked pass, and with half of its frames replaced by ``mask_emb`` a
            small model's CTC stays on the all-blank plateau much longer; a light mask here (SpecAugment-like,
            e.g. 0.05) keeps the contrastive task on the unlabeled utterances as it is.
        loss_normalization: ``masked_frames`` (the reference: both summed terms divided by the batch's masked
            frames M) or ``per_term`` (CTC per labeled target phone, InfoNCE per masked frame:
            ``α · CTC/N + (1 − α) · (InfoNCE/M + β · L_div + γ · penalty)``), which keeps the CTC gradient's scale
            independent of how many labeled utterances a length-bucketed mixed batch happens to hold.
        init_from: a Hugging Face UniSpeech directory to start from (heads that are absent stay freshly initialised;
            wav2vec 2.0 backbones only).
    """

    checkpoint_monitor = ("val/loss", "min")

    def __init__(
        self,
        model: str = "unispeech_tiny",
        model_overrides: dict[str, Any] | None = None,
        encoder_overrides: dict[str, Any] | None = None,
        num_ctc_classes: int | None = None,
        ctc_weight: float = 0.5,
        diversity_weight: float = 0.1,
        feature_penalty_weight: float = 0.0,
        num_negatives: int = 100,
        logit_temperature: float = 0.1,
        mask_prob: float | None = None,
        mask_length: int | None = None,
        labeled_languages: list[str] | None = None,
        labeled_mask_prob: float | None = None,
        loss_normalization: str = "masked_frames",
        init_from: str | None = None,
        optim: OptimConfig | None = None,
        max_nonfinite_steps: int = 20,
    ) -> None:
        super().__init__(optim=optim, max_nonfinite_steps=max_nonfinite_steps)
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight (alpha) must be in [0, 1], got {ctc_weight}")
        if labeled_mask_prob is not None and not 0.0 <= labeled_mask_prob < 1.0:
            raise ValueError(f"labeled_mask_prob must be in [0, 1) or null, got {labeled_mask_prob}")
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {loss_normalization!r}"
            )
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.save_hyperparameters(ignore=["optim"])
        self.hparams["optim"] = dataclasses.asdict(self.optim_config)
        self.labeled_languages = set(labeled_languages) if labeled_languages else None
        self.tokenizer = None
        self.model: UniSpeech | None = None
        if num_ctc_classes is not None:
            self._build(num_ctc_classes)

    # -- model construction -------------------------------------------------------------------------------------
    def _build(self, num_ctc_classes: int) -> None:
        h = self.hparams
        self.config = unispeech_config(h.model, num_ctc_classes, h.model_overrides, h.encoder_overrides)
        self.model = UniSpeech(self.config)
        if h.init_from:
            _, hf_state = read_hf_directory(h.init_from)
            missing, unexpected = self.model.load_state_dict(
                convert_state_dict(hf_state, self.config), strict=False
            )
            if unexpected or [k for k in missing if k.startswith("encoder.") and k != "encoder.mask_emb"]:
                raise ValueError(
                    f"{h.init_from}: weights do not fit preset {h.model!r} with the given overrides "
                    f"(missing {missing[:6]}, unexpected {unexpected[:6]})"
                )
            log.info("initialised UniSpeech from %s (fresh: %s)", h.init_from, missing)

    def export_pretrained(self, directory: str | Path) -> Path:
        """Write the UniSpeech model (backbone, quantizer, heads) as a speechlab pretrained directory."""
        return save_pretrained(self.model, directory, family="unispeech")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if self.model is not None:
            if tokenizer is not None and tokenizer.vocab_size != self.config.num_ctc_classes:
                raise ValueError(
                    f"num_ctc_classes={self.config.num_ctc_classes} but the data tokenizer has "
                    f"{tokenizer.vocab_size} units; leave model.num_ctc_classes unset to take it from the data"
                )
            return
        if tokenizer is None:
            raise ValueError(
                "UniSpeechTask needs the phone inventory: set data.tokenizer: phoneme (or model.num_ctc_classes)"
            )
        self._build(tokenizer.vocab_size)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["num_ctc_classes"] = self.config.num_ctc_classes
        self.save_tokenizer(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.tokenizer is None:
            self.tokenizer = self.stored_tokenizer(checkpoint)
        if self.model is None:
            self._build(int(checkpoint["num_ctc_classes"]))

    # -- losses -------------------------------------------------------------------------------------------------
    def labeled_mask(self, batch: Any) -> Tensor:
        """(B,) bool: utterances that get the CTC loss (targets present, language in ``labeled_languages``)."""
        batch_size = len(batch)
        if batch.targets is None or self.hparams.ctc_weight == 0.0:
            return torch.zeros(batch_size, dtype=torch.bool, device=batch.audio.device)
        if self.labeled_languages is None:
            labeled = [True] * batch_size
        else:
            labeled = [lang in self.labeled_languages for lang in batch.languages]
        # built on the host, copied without making the host wait for the device (torch.tensor(device=) would)
        mask = to_device_async(torch.tensor(labeled, dtype=torch.bool), batch.audio.device)
        return mask & (batch.target_lengths > 0)

    def compute_losses(self, batch: Any, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Every loss part and metric for one batch (training and validation; masking is applied in both so the
        validation contrastive loss is meaningful; validation PER decodes an unmasked pass instead). ``generator``
        seeds masks, distractors, Gumbel noise and swap.
        """
        h = self.hparams
        frame_lengths = self.model.encoder.frame_lengths(batch.lengths)
        default_prob, default_length = self.config.span_mask_args()
        mask_args = (
            default_prob if h.mask_prob is None else h.mask_prob,
            default_length if h.mask_length is None else h.mask_length,
        )
        frame_mask = self._span_mask(frame_lengths, batch, *mask_args, min_masks=2, generator=generator)
        labeled = self.labeled_mask(batch)
        if h.get("labeled_mask_prob") is not None:
            # labeled utterances get their own (lighter) mask: the CTC input is the masked pass
            light = self._span_mask(
                frame_lengths, batch, h.labeled_mask_prob, mask_args[1], min_masks=0, generator=generator
            )
            frame_mask = torch.where(labeled[:, None], light, frame_mask)
        out = self.model(batch.audio, batch.lengths, frame_mask=frame_mask, generator=generator)
        frame_mask = frame_mask[:, : out.last_hidden_state.shape[1]] & ~out.padding_mask

        contrastive = contrastive_loss(
            out.last_hidden_state,
            out.targets,
            frame_mask,
            out.frame_lengths,
            num_negatives=h.num_negatives,
            temperature=h.logit_temperature,
            generator=generator,
        )
        num_masked = max(contrastive.num_frames, 1)
        diversity = diversity_loss(out.prob_perplexity, self.model.quantizer.num_codevectors)
        self_supervised = (
            contrastive.loss
            + h.diversity_weight * diversity * num_masked
            + h.feature_penalty_weight * out.feature_penalty * num_masked
        )

        ctc_sum = out.ctc_logits.new_zeros(())
        num_tokens = torch.zeros((), device=batch.audio.device)
        infeasible = torch.zeros((), dtype=torch.long, device=batch.audio.device)
        if not host_reads_are_free(labeled) and batch.targets is not None and h.ctc_weight != 0.0:
            # On an accelerator: CTC over every row, summed over the labeled ones (selecting the labeled rows would
            # read their count on the host). A batch without labeled rows then gives the CTC head zero gradients
            # rather than none. F.ctc_loss still reads the lengths on the host inside ATen.
            feasible = ctc_feasible(batch.targets, batch.target_lengths, out.frame_lengths)
            infeasible = (labeled & ~feasible).sum()
            log_probs = out.ctc_logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
            per_utterance = F.ctc_loss(
                log_probs,
                batch.targets.clamp_min(0),
                out.frame_lengths,
                batch.target_lengths,
                blank=0,
                reduction="none",
                zero_infinity=True,
            )
            ctc_sum = torch.where(labeled, per_utterance, 0.0).sum()
            num_tokens = (batch.target_lengths * feasible * labeled).sum().float()
        elif host_reads_are_free(labeled) and bool(labeled.any()):
            # labeled utterances whose phones need more frames than they have: counted, left out of the CTC term
            feasible = ctc_feasible(batch.targets, batch.target_lengths, out.frame_lengths)
            infeasible = (labeled & ~feasible).sum()
            log_probs = out.ctc_logits[labeled].float().log_softmax(-1).transpose(0, 1)  # (T, B_lab, V)
            targets = batch.targets[labeled].clamp_min(0)
            ctc_sum = F.ctc_loss(
                log_probs,
                targets,
                out.frame_lengths[labeled],
                batch.target_lengths[labeled],
                blank=0,
                reduction="sum",
                zero_infinity=True,
            )
            num_tokens = (batch.target_lengths * feasible)[labeled].sum().float()

        alpha = h.ctc_weight
        if h.get("loss_normalization", "masked_frames") == "per_term":
            loss = alpha * ctc_sum / num_tokens.clamp(min=1.0) + (1.0 - alpha) * self_supervised / num_masked
        else:
            loss = (alpha * ctc_sum + (1.0 - alpha) * self_supervised) / num_masked
        return {
            "loss": loss,
            "ctc": ctc_sum / num_tokens.clamp(min=1.0),  # per target phone, for reading
            "contrastive": contrastive.loss / num_masked,  # per masked frame
            "diversity": diversity,
            "feature_penalty": out.feature_penalty,
            "accuracy": contrastive.accuracy,
            "prob_perplexity": out.prob_perplexity,
            "code_perplexity": out.code_perplexity,
            "num_masked": torch.tensor(float(contrastive.num_frames)),
            "num_labeled": labeled.sum().float(),
            CTC_TOO_LONG: infeasible.float(),
            # the mean over valid frames as a masked sum (no boolean indexing): NaN without any, as before
            "swap_fraction": (out.swap_mask & ~out.padding_mask).sum().float()
            / (~out.padding_mask).sum().float(),
            "_labeled": labeled,
        }

    def _span_mask(
        self,
        frame_lengths: Tensor,
        batch: Any,
        mask_prob: float,
        mask_length: int,
        min_masks: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """(B, T) bool span mask over the encoder frames of ``batch``."""
        if generator is None and not host_reads_are_free(frame_lengths):
            # training on an accelerator: drawn there, as wide as the encoder output, no lengths on the host
            num_frames = self.model.encoder.num_frames(batch.audio.shape[1])
            return span_mask(
                frame_lengths, mask_prob, mask_length, min_masks=min_masks, num_frames=num_frames
            )
        return span_mask(
            frame_lengths.cpu(), mask_prob, mask_length, min_masks=min_masks, generator=generator
        ).to(batch.audio.device)

    # -- steps --------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.model.set_step(self.global_step)

    def _log_parts(self, parts: dict[str, Tensor], stage: str, batch_size: int) -> None:
        for name, value in parts.items():
            if name.startswith("_") or (name == "ctc" and parts["num_labeled"] == 0):
                continue
            self.log(
                f"{stage}/{name}", value.detach().float(), batch_size=batch_size, prog_bar=name == "loss"
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if len(batch) == 0:
            return self.skip_empty_batch()
        parts = self.compute_losses(batch)
        self.count_skipped(CTC_TOO_LONG, parts[CTC_TOO_LONG], CTC_TOO_LONG_REMEDY)
        self._log_parts(parts, "train", len(batch))
        self.log("train/temperature", float(self.model.quantizer.temperature), batch_size=len(batch))
        return self.check_finite_loss(parts["loss"])

    def on_validation_epoch_start(self) -> None:
        self._error_counts = torch.zeros(4, dtype=torch.float64)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if len(batch) == 0:
            return
        parts = self.compute_losses(batch)
        self._log_parts(parts, "val", len(batch))
        labeled = parts["_labeled"]
        if self.tokenizer is None or not bool(labeled.any()):
            return
        # Phone error rate of the CTC head on the labeled utterances, from a forward pass on the *unmasked* input
        # (eval mode: no swap either): the span mask above exists for the contrastive loss, and the encoder would
        # replace those frames by mask_emb, so decoding its logits would measure a masked-input PER.
        logits, frame_lengths = self.ctc_logits(batch.audio, batch.lengths)
        hyps = ctc_greedy_decode(logits[labeled], frame_lengths[labeled], blank_id=0)
        refs = [
            t[:n].tolist() for t, n in zip(batch.targets[labeled], batch.target_lengths[labeled], strict=True)
        ]
        self._error_counts += error_counts(
            [self.tokenizer.decode(r) for r in refs], [self.tokenizer.decode(hyp) for hyp in hyps]
        )

    def ctc_logits(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """audio: (B, S), lengths: (B,) -> CTC logits (B, T, V) and frame_lengths (B,) of the unmasked input."""
        out = self.model(audio, lengths)
        return out.ctc_logits, out.frame_lengths

    def on_validation_epoch_end(self) -> None:
        if self._error_counts[1] > 0:
            self.log("val/per", (self._error_counts[0] / self._error_counts[1]).item(), prog_bar=True)
