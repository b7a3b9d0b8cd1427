"""Non-finite losses and gradients: the step is skipped and counted, nothing non-finite reaches the weights or the
optimiser state, and too many consecutive faults stop training with ``NonFiniteError``.

In-process tiny CTC runs (1 layer, 4 utterances, a few steps); three of them in the default suite, the other
variants (inf gradient, consecutive non-finite losses, isolated faults) are ``slow``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import kill_harness as kh
import lightning as L
import pytest
import torch

from speechlab.data.datamodule import SpeechDataModule
from speechlab.tasks.base import NonFiniteError
from speechlab.tasks.ctc import CTCTask
from speechlab.train import build_trainer


class PoisonedCTCTask(CTCTask):
    """CTC task that makes the loss (``poison="loss"``) or one gradient (``poison="grad"``) NaN or inf at the
    optimiser steps in ``at`` (0-based: the batch trained when ``global_step == s``). ``poison="skip"`` instead
    returns None for those batches after computing the loss (Lightning's documented way to skip a step), the
    reference for "this batch never updated anything"."""

    def __init__(
        self, poison: str = "loss", at: tuple[int, ...] = (), value: float = math.nan, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.poison, self.poison_at, self.poison_value = poison, set(at), value

    def _poisoned(self) -> bool:
        return self.global_step in self.poison_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = super().training_step(batch, batch_idx)
        if self._poisoned() and self.poison == "skip":
            return None
        return loss

    def _ctc_loss(self, batch: Any, frame_mask: torch.Tensor | None = None):
        loss, logits, frame_lengths = super()._ctc_loss(batch, frame_mask)
        if self.training and self._poisoned() and self.poison == "loss":
            loss = loss * self.poison_value
        return loss, logits, frame_lengths

    def on_after_backward(self) -> None:
        if self._poisoned() and self.poison == "grad":
            param = next(p for p in self.parameters() if p.grad is not None)
            param.grad.view(-1)[0] = self.poison_value


class StepAudit(L.Callback):
    """Records, for every optimiser step, whether parameters and optimiser state changed, and checks both stay
    finite after every step."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}
        self.optimizer_changed: dict[int, bool] = {}
        self._before: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @staticmethod
    def _optimizer_tensors(trainer: L.Trainer) -> list[torch.Tensor]:
        optimizer = trainer.optimizers[0]
        return [
            value.detach().clone()
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        ]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        params = [p.detach().clone() for p in pl_module.parameters()]
        self._before = (params, self._optimizer_tensors(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        params, optimizer_state = self._before
        step = trainer.global_step - 1  # the step this batch was trained as
        now = list(pl_module.parameters())
        for p in now:
            assert torch.isfinite(p).all(), f"non-finite weights after step {step}"
        now_state = self._optimizer_tensors(trainer)
        for t in now_state:
            assert torch.isfinite(t).all(), f"non-finite optimiser state after step {step}"
        self.changed[step] = any(not torch.equal(a, b) for a, b in zip(params, now, strict=True))
        self.optimizer_changed[step] = len(optimizer_state) != len(now_state) or any(
            not torch.equal(a, b) for a, b in zip(optimizer_state, now_state, strict=True)
        )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    # 4 utterances of ~1.3 s, 3 s per batch -> 2 batches per epoch.
    return kh.tiny_manifest(tmp_path_factory.mktemp("faults") / "train.jsonl", 4)


def _fit(manifest: Path, root: Path, max_steps: int, **task_args: Any) -> tuple[PoisonedCTCTask, StepAudit]:
    L.seed_everything(0)
    task = PoisonedCTCTask(
        encoder="wavlm_tiny",
        encoder_overrides={"layerdrop": 0.0, "num_layers": 1},
        mask_prob=0.2,
        mask_length=2,
        optim={"lr": 3e-3, "warmup_steps": 1},
        **task_args,
    )
    data = SpeechDataModule(train_manifest=str(manifest), tokenizer="phoneme", max_batch_seconds=3.0)
    audit = StepAudit()
    trainer = build_trainer(
        None,
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[audit],
        deterministic=True,
    )
    trainer.fit(task, datamodule=data)
    return task, audit


@pytest.fixture(scope="module")
def skipped_reference(manifest, tmp_path_factory) -> PoisonedCTCTask:
    """The run where step 1's batch is dropped the documented way (``training_step`` returns None)."""
    task, audit = _fit(manifest, tmp_path_factory.mktemp("skipped"), 4, poison="skip", at=(1,))
    assert audit.changed == {0: True, 1: False, 2: True, 3: True}, audit.changed
    return task


@pytest.mark.parametrize(
    ("poison", "value"), [("loss", math.nan), pytest.param("grad", -math.inf, marks=pytest.mark.slow)]
)
def test_nonfinite_step_is_skipped_counted_and_equals_never_applying_that_batch(
    manifest, skipped_reference, tmp_path, poison, value
):
    task, audit = _fit(manifest, tmp_path, 4, poison=poison, at=(1,), value=value)
    assert task.nonfinite_steps == 1
    assert audit.changed == {0: True, 1: False, 2: True, 3: True}, audit.changed
    assert audit.optimizer_changed[1] is False, "the skipped step must leave the optimiser state untouched"
    for (name, expected), (_, actual) in zip(
        skipped_reference.state_dict().items(), task.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, actual), name


@pytest.mark.parametrize("poison", [pytest.param("loss", marks=pytest.mark.slow), "grad"])
def test_consecutive_nonfinite_steps_stop_training_with_a_clear_error(manifest, tmp_path, poison):
    with pytest.raises(
        NonFiniteError,
        match=rf"3 consecutive steps had a non-finite {'gradient' if poison == 'grad' else 'loss'}",
    ) as info:
        _fit(manifest, tmp_path, 8, poison=poison, at=(1, 2, 3, 4, 5, 6), max_nonfinite_steps=3)
    assert "learning rate" in str(info.value) and "NaN" in str(info.value), "the error must say what to check"


@pytest.mark.slow
def test_isolated_faults_do_not_add_up_to_an_error(manifest, tmp_path):
    # 2 faults in a row, a good step, 2 more: never 3 consecutive, so the run finishes.
    task, audit = _fit(manifest, tmp_path, 7, poison="grad", at=(1, 2, 4, 5), max_nonfinite_steps=3)
    assert task.nonfinite_steps == 4
    assert [step for step, changed in audit.changed.items() if not changed] == [1, 2, 4, 5]
