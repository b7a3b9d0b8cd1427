"""The shared training loop: CTC learns, a killed run resumes exactly, checkpoints are atomic, DDP works."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from speechlab.data.datamodule import SpeechDataModule
from speechlab.tasks.ctc import CTCTask
from speechlab.train import AtomicCheckpointIO, build_trainer

REPO = Path(__file__).resolve().parents[1]
TINY = {"layerdrop": 0.0, "num_layers": 2}


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory) -> Path:
    """12 short English espeak utterances (absolute audio paths)."""
    items = [json.loads(line) for line in (REPO / "data/espeak/manifest.jsonl").open(encoding="utf-8")]
    english = sorted((it for it in items if it["language"] == "en"), key=lambda it: it["duration"])[:12]
    path = tmp_path_factory.mktemp("manifests") / "small.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for it in english:
            f.write(json.dumps({**it, "audio": str(REPO / "data/espeak" / it["audio"])}) + "\n")
    return path


def _datamodule(manifest: Path, **kwargs) -> SpeechDataModule:
    return SpeechDataModule(
        train_manifest=str(manifest),
        val_manifest=str(manifest),
        tokenizer="phoneme",
        max_batch_seconds=8.0,
        **kwargs,
    )


def _task(**kwargs) -> CTCTask:
    return CTCTask(
        encoder="wavlm_tiny", encoder_overrides=TINY, optim={"lr": 3e-3, "warmup_steps": 2}, **kwargs
    )


def _trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    return build_trainer(None, default_root_dir=str(root), **{**defaults, **kwargs})


def test_ctc_training_loss_decreases_on_bundled_data(small_manifest, tmp_path):
    L.seed_everything(0)
    data, task = _datamodule(small_manifest), _task()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    trainer = _trainer(tmp_path, max_steps=30)
    task.build(data.tokenizer)
    task.eval()
    with torch.no_grad():
        before = task._ctc_loss(batch)[0].item()
    task.train()
    trainer.fit(task, datamodule=data)
    task.eval()
    with torch.no_grad():
        after = task._ctc_loss(batch)[0].item()
    assert after < 0.7 * before, (before, after)


class _Crash(L.Callback):
    """Simulates a kill right after optimiser step ``at`` (its checkpoint is on disk, nothing later)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt("simulated kill")


def _fit(
    root: Path, manifest: Path, max_steps: int, ckpt_path: str | None = None, crash_at: int | None = None
):
    L.seed_everything(0)
    task = _task(mask_prob=0.2)  # masking + dropout: resume must restore the RNG too
    trainer = _trainer(root, max_steps, checkpoint_every_n_steps=1)
    if crash_at is not None:
        trainer.callbacks.insert(0, _Crash(crash_at))
    try:
        trainer.fit(task, datamodule=_datamodule(manifest), ckpt_path=ckpt_path)
    except SystemExit:
        pass  # Lightning turns KeyboardInterrupt into a graceful shutdown or SystemExit, depending on the version
    return task, trainer


def test_killed_mid_epoch_run_resumes_to_identical_weights(small_manifest, tmp_path):
    reference, _ = _fit(tmp_path / "reference", small_manifest, max_steps=7)
    _, crashed = _fit(tmp_path / "resumed", small_manifest, max_steps=7, crash_at=5)
    batches_per_epoch = crashed.num_training_batches
    assert 5 % batches_per_epoch != 0, "the kill must fall inside an epoch for this test to mean something"
    assert crashed.global_step == 5
    resumed, trainer = _fit(tmp_path / "resumed", small_manifest, max_steps=7, ckpt_path="last")
    assert trainer.global_step == 7
    for (name, expected), (_, actual) in zip(
        reference.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, actual), name


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_cpu_run_resumed_with_another_thread_count_says_it_will_not_be_bit_identical(
    small_manifest, tmp_path, caplog, restore_threads
):
    torch.set_num_threads(1)
    _fit(tmp_path, small_manifest, max_steps=3, crash_at=2)
    warning = "resuming with 2 CPU threads per process where the checkpoint was trained with 1"
    torch.set_num_threads(2)
    with caplog.at_level(logging.WARNING, logger="speechlab.train"):
        _fit(tmp_path, small_manifest, max_steps=4, ckpt_path="last")
    assert warning in caplog.text and "OMP_NUM_THREADS=1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="speechlab.train"):  # trained on with 2 threads since
        _fit(tmp_path, small_manifest, max_steps=5, ckpt_path="last")
    assert "CPU threads" not in caplog.text


def test_checkpoint_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "the temporary file must be cleaned up"


def _write_config(path: Path, root: Path, manifest: Path, extra: str = "") -> None:
    path.write_text(
        f"""seed_everything: 0
trainer:
  default_root_dir: {root}
  accelerator: cpu
  max_epochs: 3
  enable_progress_bar: false
  num_sanity_val_steps: 0
{extra}
model:
  class_path: speechlab.tasks.ctc.CTCTask
  init_args:
    encoder: wavlm_tiny
    encoder_overrides: {{layerdrop: 0.0, num_layers: 2}}
    optim: {{lr: 3.0e-3, warmup_steps: 2}}
data:
  class_path: speechlab.data.datamodule.SpeechDataModule
  init_args:
    train_manifest: {manifest}
    val_manifest: {manifest}
    tokenizer: phoneme
    max_batch_seconds: 4.0
""",
        encoding="utf-8",
    )


def _val_losses(root: Path) -> list[float]:
    rows = list(csv.DictReader((root / "logs/version_0/metrics.csv").open()))
    return [float(r["val/loss"]) for r in rows if r.get("val/loss")]


@pytest.mark.slow  # multi-process DDP (the default run rehearses every shipped DDP config)
def test_two_process_cpu_ddp_trains_like_a_single_process(small_manifest, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = {"single": "  devices: 1", "ddp": "  devices: 2\n  strategy: ddp"}
    for name, extra in runs.items():
        config = tmp_path / f"{name}.yaml"
        _write_config(config, tmp_path / name, small_manifest, extra)
        result = subprocess.run(
            [sys.executable, "-m", "speechlab.cli", "fit", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = _val_losses(tmp_path / "single"), _val_losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 3
    assert ddp[-1] < ddp[0] and single[-1] < single[0]
    # Two ranks see the same data per epoch in half the steps, so the curves are close but not identical.
    assert abs(ddp[-1] - single[-1]) / single[-1] < 0.35, (single, ddp)
    assert (tmp_path / "ddp/checkpoints/last.ckpt").is_file()
