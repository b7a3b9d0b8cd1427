"""Behaviour every task shares: optimiser from ``OptimConfig``, non-finite losses/gradients skipped, and the
tokenizer stored inside checkpoints."""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import lightning as L
import torch

from speechlab.data.text import tokenizer_from_files, tokenizer_to_files
from speechlab.host_sync import host_reads_are_free, to_device_async
from speechlab.optim import OptimConfig, build_optimizer

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class SpeechTask(L.LightningModule):
    """Base LightningModule: subclasses define the model and ``compute_loss``; this class owns the optimiser.

    A step whose loss or gradients are not finite is skipped (no weight update) and counted in
    ``nonfinite_steps`` (logged as ``train/nonfinite_steps``, saved in checkpoints). After ``max_nonfinite_steps`` consecutive skipped
    steps, training stops with :class:`NonFiniteError` telling what to check.

    On an accelerator, with optimisers that can skip their update on the device (fused AdamW, which
    :func:`speechlab.optim.build_optimizer` builds there; under manual optimisation every optimiser must), the
    decision never reaches the host: the loss and gradient checks stay device tensors, the optimiser gets
    ``found_inf`` (as ``GradScaler`` passes it) and leaves parameters, moments and step counts untouched
    (``last_step_skipped`` tells task code that follows a step, e.g. an EMA), and the counters are read on the
    host every ``nonfinite_check_every`` batches, at checkpoints and at the end of training (so the error after
    ``max_nonfinite_steps`` consecutive skips comes up to that many batches late; the skipped steps in between
    change nothing). There a skip drops the whole update: under gradient accumulation a non-finite micro-batch
    takes the other micro-batches of its update with it, where the host path drops only that micro-batch.
    """

    nonfinite_check_every = 100  # batches between host reads of the on-device non-finite counters

    def __init__(self, optim: OptimConfig | dict | None = None, max_nonfinite_steps: int = 20) -> None:
        super().__init__()
        self.optim_config = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0
        self.empty_batches = 0
        self.skipped_items: Counter = Counter()  # training items dropped by the data skip policy, by reason
        self._pending_skips: dict[str, torch.Tensor] = {}  # skips counted on the device (see count_skipped)
        self._skip_remedies: dict[str, str] = {}
        self._consecutive_nonfinite = 0
        self._last_nonfinite_batch: int | None = None
        self._drop_next_step = False
        # On-device checks (see the class docstring), all device tensors: a loss of the coming optimiser step was
        # not finite (bool); this batch skipped an optimiser step (bool); [skipped steps, current run, longest
        # run] (int64); the last optimiser step was skipped (bool, None on the host path: for task code that
        # follows a step, e.g. an EMA of the weights, and must not read the decision on the host).
        self._loss_nonfinite: torch.Tensor | None = None
        self._batch_skipped: torch.Tensor | None = None
        self._nonfinite_counters: torch.Tensor | None = None
        self.last_step_skipped: torch.Tensor | None = None

    def count_skipped(self, reason: str, count: torch.Tensor, remedy: str = "") -> None:
        """Count ``count`` (a 0-d tensor) training items a step left out for ``reason`` (e.g. CTC targets longer
        than the output frames). Summed on the device, no host sync: added to ``skipped_items`` (with a warning
        giving ``remedy``) when a checkpoint is saved and at the end of training, so they appear in the
        end-of-training summary."""
        pending = self._pending_skips.get(reason)
        count = count.detach()
        self._pending_skips[reason] = count if pending is None else pending + count
        self._skip_remedies[reason] = remedy

    def _flush_pending_skips(self) -> None:
        for reason, count in self._pending_skips.items():
            if int(count):
                self.skipped_items[reason] += int(count)
                log.warning(
                    "%d training items left out of the loss (%s) -> %s",
                    int(count),
                    reason,
                    self._skip_remedies.get(reason) or "check the data",
                )
        self._pending_skips = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Subclasses that override this call ``super()`` so the skip counters survive a resume."""
        self._flush_pending_skips()
        self._read_nonfinite_counters()
        checkpoint["speechlab_nonfinite"] = {
            "steps": self.nonfinite_steps,
            "consecutive": self._consecutive_nonfinite,
            "last_batch": self._last_nonfinite_batch,
        }
        checkpoint["speechlab_skipped"] = {
            "empty_batches": self.empty_batches,
            "items": dict(self.skipped_items),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("speechlab_nonfinite") or {}
        self.nonfinite_steps = int(state.get("steps", 0))
        self._consecutive_nonfinite = int(state.get("consecutive", 0))
        self._last_nonfinite_batch = state.get("last_batch")
        skipped = checkpoint.get("speechlab_skipped") or {}
        self.empty_batches = int(skipped.get("empty_batches", 0))
        self.skipped_items = Counter(skipped.get("items", {}))

    # -- the unit inventory travels inside every checkpoint (CTC, UniSpeech): a checkpoint alone can decode ------
    TOKENIZER_KEY = "tokenizer_files"

    def save_tokenizer(self, checkpoint: dict) -> None:
        """Store ``self.tokenizer`` (when the task has one) in ``checkpoint`` as plain file contents, so the
        checkpoint stays ``torch.load(weights_only=True)``-readable (:func:`speechlab.data.text.tokenizer_to_files`)."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            checkpoint[self.TOKENIZER_KEY] = tokenizer_to_files(tokenizer)

    def stored_tokenizer(self, checkpoint: dict) -> Any:
        """The tokenizer :meth:`save_tokenizer` stored in ``checkpoint``, or None when it holds none."""
        files = checkpoint.get(self.TOKENIZER_KEY)
        return None if files is None else tokenizer_from_files(files)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.skipped_items.update(getattr(batch, "skipped", None) or {})

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Advance the on-device run of consecutive skipped batches; read the counters every
        ``nonfinite_check_every`` batches. Subclasses that override this call ``super()``."""
        if self._batch_skipped is None or self._nonfinite_counters is None:
            return  # host checks, or no optimiser step in this batch (gradient accumulation)
        skipped, run, longest = self._nonfinite_counters.unbind()
        run = torch.where(self._batch_skipped, run + 1, 0)
        self._nonfinite_counters = torch.stack([skipped, run, torch.maximum(longest, run)])
        self._batch_skipped = None
        if (batch_idx + 1) % self.nonfinite_check_every == 0:
            self._read_nonfinite_counters(final=True, log_metric=True)

    def on_train_end(self) -> None:
        """Say what was skipped during training (this rank), so no skip goes unnoticed."""
        self._flush_pending_skips()
        self._read_nonfinite_counters(final=True)
        rank = (
            f"rank {self.global_rank}: " if self._trainer is not None and self.trainer.world_size > 1 else ""
        )
        if self.skipped_items or self.empty_batches or self.nonfinite_steps:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped_items.items())) or "none"
            log.warning(
                "%straining skipped %d items (%s; the reasons are in the warnings above), %d empty batches, "
                "%d steps with a non-finite loss or gradient",
                rank,
                sum(self.skipped_items.values()),
                reasons,
                self.empty_batches,
                self.nonfinite_steps,
            )

    def configure_optimizers(self) -> dict:
        total = self.optim_config.total_steps or int(self.trainer.estimated_stepping_batches)
        return build_optimizer(self.named_parameters(), self.optim_config, total_steps=max(1, total))

    def check_finite_loss(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Return ``loss`` if finite; otherwise count the skip and return None (Lightning then skips the step).

        Under DDP the decision is shared: if any rank's loss is not finite every rank skips the step, since a
        rank that skips its backward pass while the others run theirs would leave them waiting for it forever.
        Lightning refuses a None ``training_step`` result under DDP, so there (automatic optimisation) every rank
        returns a zeroed loss instead, runs its backward pass (the gradient all-reduce happens as usual), and the
        gradients are dropped before the optimiser step.

        On an accelerator with automatic optimisation the check stays on the device: ``loss`` is returned as it
        is and :meth:`on_before_optimizer_step` skips the update (see the class docstring).
        """
        if not host_reads_are_free(loss) and (
            self.automatic_optimization or self._manual_steps_skip_on_device()
        ):
            nonfinite = ~torch.isfinite(loss.detach()).all()
            pending = self._loss_nonfinite
            self._loss_nonfinite = nonfinite if pending is None else pending | nonfinite
            return loss
        finite = bool(torch.isfinite(loss).all())
        trainer = self._trainer
        distributed = trainer is not None and trainer.world_size > 1
        if distributed:
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            return loss
        self._register_nonfinite("loss")
        if distributed and self.automatic_optimization:
            self._drop_next_step = True
            return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
        return None

    def skip_empty_batch(self) -> torch.Tensor | None:
        """``training_step`` result for an empty batch (every item failed to load under the skip policy).

        Single process: None (Lightning skips the step). Under DDP every rank must run the same collectives, so
        this rank returns a zero loss touching every trainable parameter and contributes zero gradients to the
        all-reduce (the other ranks' update is then averaged over the full world size).
        """
        self.empty_batches += 1
        log.warning(
            "empty batch at step %d (every item was skipped): %d so far", self.global_step, self.empty_batches
        )
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return None
        zero = torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0
        return self.check_finite_loss(zero)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_next_step:  # a non-finite loss under DDP (see check_finite_loss), already counted
            self._drop_next_step = False
            optimizer.zero_grad(set_to_none=True)
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_nonfinite, self._loss_nonfinite = self._loss_nonfinite, None
        if not grads:
            return
        # a LightningOptimizer copies the optimiser's attributes: ``found_inf`` must be set on the one that steps
        raw_optimizer = getattr(optimizer, "_optimizer", optimizer)
        if self._skips_on_device(raw_optimizer, grads[0]):
            self._skip_on_device(raw_optimizer, grads, loss_nonfinite)
            return
        what = "gradient"
        if loss_nonfinite is not None and bool(
            loss_nonfinite
        ):  # deferred by check_finite_loss, no fused step
            finite, what = False, "loss"
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            finite = math.isfinite(norm.item())
        trainer = self._trainer
        if loss_nonfinite is not None and trainer is not None and trainer.world_size > 1:
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            return
        # Dropping the gradients makes AdamW leave every parameter (and its moments) untouched this step.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._register_nonfinite(what)

    def _skips_on_device(self, optimizer: torch.optim.Optimizer, grad: torch.Tensor) -> bool:
        """Whether this step's non-finite check and skip can stay on the device (see the class docstring)."""
        if host_reads_are_free(grad):
            return False
        if not getattr(optimizer, "_step_supports_amp_scaling", False):  # fused optimisers take ``found_inf``
            return False
        if not self.automatic_optimization and not self._manual_steps_skip_on_device():
            return False
        trainer = self._trainer
        # under fp16 a GradScaler sets (and then deletes) ``found_inf`` itself
        return trainer is None or getattr(trainer.precision_plugin, "scaler", None) is None

    def _manual_steps_skip_on_device(self) -> bool:
        """Manual optimisation (e.g. a GAN): the checks stay on the device only when every optimiser can skip its
        update there, since the task's own code then steps without knowing on the host whether the loss was
        finite (``check_finite_loss`` returns the loss; see ``last_step_skipped``)."""
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return False
        return all(getattr(o, "_step_supports_amp_scaling", False) for o in trainer.optimizers)

    def _skip_on_device(
        self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], loss_nonfinite: torch.Tensor | None
    ) -> None:
        """Tell the fused optimiser to skip this update when a gradient (or the loss) is not finite, and count it,
        all on the device."""
        skip = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).float()).all()
        if loss_nonfinite is not None:
            skip = skip | loss_nonfinite
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            # ranks agree (the gradients are already averaged, the losses are not); queued, not waited for
            flag = skip.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            skip = flag.bool()
        optimizer.found_inf = skip.float()  # read by the fused AdamW/Adam kernels, as GradScaler passes it
        self.last_step_skipped = skip
        if self._nonfinite_counters is None:
            start = self._consecutive_nonfinite
            self._nonfinite_counters = to_device_async(torch.tensor([0, start, start]), skip.device)
        skipped, run, longest = self._nonfinite_counters.unbind()
        self._nonfinite_counters = torch.stack([skipped + skip.long(), run, longest])
        self._batch_skipped = skip if self._batch_skipped is None else self._batch_skipped | skip

    def _read_nonfinite_counters(self, final: bool = False, log_metric: bool = False) -> None:
        """Bring the on-device counters to the host (one read) and count the skips. ``final`` (batch end, end of
        training): raise after ``max_nonfinite_steps`` in a row; a checkpoint only counts and leaves the longest
        run for the next read. ``log_metric``: log ``train/nonfinite_steps`` (Lightning allows it in batch hooks)."""
        if self._nonfinite_counters is None:
            return
        device = self._nonfinite_counters.device
        skipped, run, longest = (int(v) for v in self._nonfinite_counters.tolist())
        kept = run if final else longest
        self._nonfinite_counters = to_device_async(torch.tensor([0, run, kept]), device)
        self._consecutive_nonfinite = run
        if run and self._trainer is not None:
            self._last_nonfinite_batch = self._trainer.fit_loop.total_batch_idx
        if skipped:
            self.nonfinite_steps += skipped
            log.warning(
                "non-finite loss or gradient: %d steps skipped since the last check (%d so far)",
                skipped,
                self.nonfinite_steps,
            )
        if skipped and log_metric and self._trainer is not None:
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), rank_zero_only=True)
        if final and longest >= self.max_nonfinite_steps:
            raise NonFiniteError(
                f"{longest} consecutive steps had a non-finite loss or gradient; stopping. Lower the learning "
                "rate, check the input data for NaN/inf or silent clips, or use bf16 instead of fp16."
            )

    def _register_nonfinite(self, what: str) -> None:
        """Count a skipped step; raise once ``max_nonfinite_steps`` consecutive batches had one.

        Consecutive means consecutive training batches (Lightning's running batch index), so a finite loss
        followed by a non-finite gradient in the same batch still counts, and two skipped optimiser steps in one
        batch (e.g. a GAN's generator and discriminator) count once.
        """
        self.nonfinite_steps += 1
        batch = self._trainer.fit_loop.total_batch_idx if self._trainer is not None else None
        last = self._last_nonfinite_batch
        if batch is None or last is None or batch == last + 1:
            self._consecutive_nonfinite += 1
        elif batch != last:
            self._consecutive_nonfinite = 1
        self._last_nonfinite_batch = batch
        log.warning(
            "non-finite %s at step %d: step skipped (%d so far)", what, self.global_step, self.nonfinite_steps
        )
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), rank_zero_only=True)
        if self._consecutive_nonfinite >= self.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self._consecutive_nonfinite} consecutive steps had a non-finite {what}; stopping. Lower the "
                "learning rate, check the input data for NaN/inf or silent clips, or use bf16 instead of fp16."
            )
