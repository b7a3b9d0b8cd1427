"""Skips every task shares: empty batches (every item failed to load) and the non-finite counters in checkpoints."""

from __future__ import annotations

import pytest
import torch

from speechlab.data.collate import collate
from speechlab.tasks.ctc import CTCTask
from speechlab.tasks.unispeech import UniSpeechTask
from speechlab.tasks.wavlm_pretrain import WavLMPretrainTask

TASKS = {
    "ctc": lambda: CTCTask(encoder="wavlm_tiny", encoder_overrides={"num_layers": 1}),
    "wavlm": lambda: WavLMPretrainTask(
        encoder="wavlm_tiny", encoder_overrides={"num_layers": 1}, num_classes=8
    ),
    "unispeech": lambda: UniSpeechTask(model="unispeech_tiny", num_ctc_classes=6),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_an_empty_batch_is_skipped_and_counted_not_crashed_on(name):
    task = TASKS[name]()
    empty = collate([None, None])  # both loads failed under on_error="skip"
    assert len(empty) == 0
    assert task.training_step(empty, 0) is None  # single process: Lightning skips the step
    assert task.training_step(empty, 1) is None
    assert task.empty_batches == 2
    task.validation_step(empty, 0)  # nothing to score, no crash


def test_nonfinite_counters_survive_a_checkpoint_round_trip():
    task = TASKS["unispeech"]()
    task.nonfinite_steps, task._consecutive_nonfinite, task._last_nonfinite_batch = 7, 3, 41
    checkpoint: dict = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    restored = TASKS["unispeech"]()
    restored.on_load_checkpoint(checkpoint)
    assert (restored.nonfinite_steps, restored._consecutive_nonfinite, restored._last_nonfinite_batch) == (
        7,
        3,
        41,
    )


def test_nonfinite_counters_load_with_weights_only(tmp_path):
    task = TASKS["wavlm"]()
    task.nonfinite_steps = 2
    checkpoint: dict = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["speechlab_nonfinite"]["steps"] == 2


def test_items_skipped_by_the_data_policy_are_counted_by_reason_and_reported_at_the_end(caplog):
    task = TASKS["wavlm"]()
    good = {"id": "a", "audio": torch.zeros(800)}
    batch = collate([good, {"id": "b", "skipped": "audio"}, {"id": "c", "skipped": "audio"}, None])
    assert batch.ids == ["a"] and batch.skipped == {"audio": 2, "unknown": 1}
    task.on_train_batch_start(batch, 0)
    task.on_train_batch_start(collate([{"id": "d", "skipped": "unknown_unit"}]), 1)
    assert task.skipped_items == {"audio": 2, "unknown": 1, "unknown_unit": 1}
    with caplog.at_level("WARNING"):
        task.on_train_end()
    assert "training skipped 4 items (2 audio, 1 unknown, 1 unknown_unit" in caplog.text
