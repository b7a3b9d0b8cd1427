"""Two CPU processes (DDP over gloo) under faults: uneven data, a rank that raises, a NaN on one rank.

Each test is a real ``speechlab fit`` with ``devices: 2, strategy: ddp`` in a subprocess, run under a timeout:
a hang is a failure, not a stuck test suite. Subprocess DDP runs take minutes on a shared CPU, hence ``slow``.
"""

from __future__ import annotations

import csv
import signal
import time
from pathlib import Path

import kill_harness as kh
import pytest

TIMEOUT = 600  # seconds; a healthy run takes well under this even on a loaded CPU, a hang runs into it


def _ddp_config(tmp_path: Path, utterances: int, callbacks: list[dict] | None = None) -> Path:
    manifest = kh.tiny_manifest(tmp_path / "train.jsonl", utterances)
    return kh.write_config(
        tmp_path / "ddp.yaml",
        tmp_path / "run",
        model=kh.CTC_MODEL,
        data=kh.ctc_data(manifest, val=manifest),
        max_steps=-1,
        trainer_extra={"devices": 2, "strategy": "ddp", "max_epochs": 2},
        callbacks=callbacks,
    )


def _steps_by_rank(root: Path) -> dict[int, list[int]]:
    by_rank: dict[int, list[int]] = {}
    for record in kh.read_steps(root / "steps.jsonl"):
        if record["event"] == "step":
            by_rank.setdefault(record["rank"], []).append(record["step"])
    return by_rank


@pytest.mark.slow
def test_ranks_with_uneven_data_take_the_same_number_of_steps(tmp_path):
    # 5 utterances, 2 per batch -> 3 batches per epoch: one rank would get 2 and the other 1 without padding.
    config = _ddp_config(tmp_path, utterances=5)
    run = kh.FitRun(config, tmp_path / "run", extra_args=[]).start(0)
    assert run.wait(TIMEOUT) == 0, run.output[-3000:]
    by_rank = _steps_by_rank(tmp_path / "run")
    assert sorted(by_rank) == [0, 1]
    assert by_rank[0] == by_rank[1] == [1, 2, 3, 4], by_rank
    rows = list(csv.DictReader((tmp_path / "run/logs/version_0/metrics.csv").open()))
    assert len([r for r in rows if r.get("val/loss")]) == 2, "validation (also uneven) must run every epoch"


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_whole_run_with_its_error(tmp_path):
    failing = {"class_path": "kill_harness.RaiseAtStep", "init_args": {"step": 2, "rank": 1}}
    config = _ddp_config(tmp_path, utterances=8, callbacks=[failing])
    run = kh.FitRun(config, tmp_path / "run", extra_args=[]).start(0)
    code = run.wait(TIMEOUT)  # raises if the run hangs
    assert code != 0, run.output[-3000:]
    assert "injected failure (rank 1, step 2)" in run.output, run.output[-3000:]
    assert max(_steps_by_rank(tmp_path / "run")[0]) <= 3, "rank 0 must not train on alone"


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    poison = {"class_path": "kill_harness.PoisonBatch", "init_args": {"step": 1, "rank": 1}}
    config = _ddp_config(tmp_path, utterances=8, callbacks=[poison])
    run = kh.FitRun(config, tmp_path / "run", extra_args=[]).start(0)
    assert run.wait(TIMEOUT) == 0, run.output[-3000:]
    by_rank = _steps_by_rank(tmp_path / "run")
    assert by_rank[0] == by_rank[1] == list(range(1, 5)), by_rank
    assert "non-finite loss at step 1" in run.output
    from speechlab.checkpoints.safe_load import load_torch_checkpoint

    weights = load_torch_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["state_dict"]
    assert all(t.isfinite().all() for t in weights.values() if t.is_floating_point())


def _hang_config(tmp_path: Path, marker: Path | None = None) -> Path:
    hang = {
        "class_path": "kill_harness.HangAtStep",
        "init_args": {"step": 2, "rank": 1, "seconds": 300, "marker": str(marker) if marker else None},
    }
    return _ddp_config(tmp_path, utterances=8, callbacks=[hang])


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_a_collective_that_cannot_complete_fails_with_a_clear_error_within_the_timeout(tmp_path):
    config = _hang_config(tmp_path)
    run = kh.FitRun(config, tmp_path / "run", extra_args=["--ddp_timeout_seconds", "15"]).start(0)
    started = time.monotonic()
    code = run.wait(TIMEOUT)  # raises if the run hangs past the test's limit
    assert code == 2, run.output[-3000:]
    assert "a DDP collective did not complete within the timeout" in run.output, run.output[-3000:]
    assert time.monotonic() - started < 120, (
        "rank 0 must give up after --ddp_timeout_seconds, not wait for rank 1"
    )


@pytest.mark.slow
def test_sigterm_ends_a_run_stuck_in_a_collective(tmp_path):
    marker = tmp_path / "hanging.pid"
    config = _hang_config(tmp_path, marker)
    run = kh.FitRun(config, tmp_path / "run", extra_args=["--sigterm_grace_seconds", "5"]).start(0)
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():  # rank 1 now sleeps; rank 0 waits for it inside a gloo collective
        assert run.process.poll() is None, run.output[-3000:]
        assert time.monotonic() < deadline, "rank 1 never reached the hang"
        time.sleep(0.2)
    time.sleep(2.0)
    hanging_rank = int(marker.read_text())
    run.process.send_signal(signal.SIGTERM)  # to rank 0, as a scheduler would
    code = run.wait(60)
    assert code == 128 + signal.SIGTERM, run.output[-3000:]
    assert "still running 5 s after SIGTERM" in run.output, run.output[-3000:]
    deadline = time.monotonic() + 10
    while _running(hanging_rank) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(hanging_rank), "the rank that rank 0 started must not outlive it"
