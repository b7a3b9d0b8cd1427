"""Kill-and-resume harness: real ``speechlab fit`` runs in subprocesses, killed and resumed.

The pieces:

* :func:`tiny_manifest` writes a few short bundled utterances to a manifest (absolute audio paths).
* :func:`write_config` writes a ``speechlab fit`` YAML for a tiny run (CPU, given task and data sections) that adds
  :class:`StepRecorder`, a callback logging every optimiser step (global step, epoch, batch ids) to a JSON-lines
  file, so a test can see which steps each attempt trained and with which data.
* :class:`FitRun` starts ``python -m speechlab.cli fit`` (``OMP_NUM_THREADS=1``, ``PYTHONPATH`` = repo + tests)
  and can SIGKILL / SIGTERM it once a step was logged or while a checkpoint temp file exists.
* :func:`committed_history` checks the step log of a sequence of attempts: every attempt starts right after the
  step of the checkpoint it resumed from, and the steps that ended up in the final weights are 1..N once each.

The step log is written with ``os.write`` on an ``O_APPEND`` file: a SIGKILL cannot lose a line that was written
(the kernel has it), so the log is a faithful record of what each attempt did.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- run inputs
def tiny_manifest(
    path: Path, count: int = 8, languages: tuple[str, ...] = ("en",), units: int | None = None
) -> Path:
    """Write the ``count`` shortest espeak utterances of each of ``languages`` to ``path``.

    ``units``: also add a ``units`` field (one made-up unit id in ``0..units-1`` per 20 ms frame), standing in
    for k-means labels.
    """
    source = REPO / "data/espeak/manifest.jsonl"
    items = [json.loads(line) for line in source.open(encoding="utf-8")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for language in languages:
            mine = sorted(
                (it for it in items if it["language"] == language), key=lambda it: (it["duration"], it["id"])
            )
            for n, it in enumerate(mine[:count]):
                line = {**it, "audio": str(REPO / "data/espeak" / it["audio"])}
                if units is not None:
                    frames = int(it["num_samples"]) // 320
                    line["units"] = " ".join(str((3 * n + i // 4) % units) for i in range(frames))
                f.write(json.dumps(line) + "\n")
    return path


CTC_MODEL = """model:
  class_path: speechlab.tasks.ctc.CTCTask
  init_args:
    encoder: wavlm_tiny
    encoder_overrides: {layerdrop: 0.0, num_layers: 1, dropout: 0.1}
    mask_prob: 0.2
    mask_length: 2
    optim: {lr: 3.0e-3, warmup_steps: 2}
"""


def ctc_data(train: Path, val: Path | None = None, max_batch_seconds: float = 3.0) -> str:
    val_line = f"    val_manifest: {val}\n" if val is not None else ""
    return f"""data:
  class_path: speechlab.data.datamodule.SpeechDataModule
  init_args:
    train_manifest: {train}
{val_line}    tokenizer: phoneme
    max_batch_seconds: {max_batch_seconds}
"""


def write_config(
    path: Path,
    root: Path,
    *,
    model: str,
    data: str,
    max_steps: int,
    trainer_extra: dict[str, Any] | None = None,
    recorder: dict[str, Any] | None = None,
    callbacks: list[dict[str, Any]] | None = None,
) -> Path:
    """A ``speechlab fit`` config for a tiny CPU run under ``root``, logging steps to ``root/steps.jsonl``.

    ``recorder``: extra init args of :class:`StepRecorder`; ``callbacks``: more ``{class_path, init_args}``.
    """
    trainer = {
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "deterministic": True,
        **(trainer_extra or {}),
    }
    step_log = {"class_path": "kill_harness.StepRecorder", "init_args": {"path": str(root / "steps.jsonl")}}
    step_log["init_args"].update(recorder or {})
    trainer["callbacks"] = [step_log, *(callbacks or [])]
    text = "seed_everything: 0\ntrainer: " + json.dumps(trainer) + "\n" + model + data
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- callbacks
class StepRecorder(L.Callback):
    """Logs what the run does to a JSON-lines file (one ``os.write`` per line, so a SIGKILL never tears one).

    Lines: ``{"event": "start", "step": S, "pid": P}`` when fitting starts (S = the resumed global step), then
    ``{"event": "step", "step": S, "epoch": E, "ids": [...]}`` after each training batch (S after the batch's
    optimiser step(s)).

    ``slow_checkpoint_write``: seconds to pause inside ``torch.save`` halfway through writing the bytes (the
    checkpoint temp file exists and is truncated), widening the window for a kill during a write.
    """

    def __init__(self, path: str, slow_checkpoint_write: float = 0.0) -> None:
        self.path = path
        self.slow_checkpoint_write = slow_checkpoint_write

    def _write(self, record: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.slow_checkpoint_write > 0:
            delay, save = self.slow_checkpoint_write, torch.save

            def slow_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
                # Half the bytes, a pause, the rest: a kill in the pause leaves a truncated temp file.
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(delay)
                f.write(data[len(data) // 2 :])

            torch.save = slow_save

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._write({"event": "start", "step": trainer.global_step, "pid": os.getpid()})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        record = {
            "event": "step",
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "rank": trainer.global_rank,
            "ids": list(getattr(batch, "ids", [])),
        }
        self._write(record)


class RaiseAtStep(L.Callback):
    """Raises ``RuntimeError(message)`` on rank ``rank`` at the start of the batch after optimiser step ``step``."""

    def __init__(self, step: int, rank: int = 0, message: str = "injected failure") -> None:
        self.step, self.rank, self.message = step, rank, message

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"{self.message} (rank {self.rank}, step {self.step})")


class PoisonBatch(L.Callback):
    """Fills the audio of the batch trained as optimiser step ``step`` (0-based) with NaN on rank ``rank``, so
    that rank alone gets a non-finite loss."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch.audio.fill_(float("nan"))


# ----------------------------------------------------------------------------------------------- runs
def read_steps(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def subprocess_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class FitRun:
    """One ``speechlab fit`` subprocess (stdout + stderr go to ``root/attempt<i>.log``)."""

    config: Path
    root: Path
    ckpt_path: str | None = None
    extra_args: list[str] = field(default_factory=lambda: ["--checkpoint_every_n_steps", "1"])
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self, attempt: int) -> FitRun:
        command = [
            sys.executable,
            "-m",
            "speechlab.cli",
            "fit",
            "--config",
            str(self.config),
            *self.extra_args,
        ]
        if self.ckpt_path is not None:
            command += ["--ckpt_path", self.ckpt_path]
        self.log_path = self.root / f"attempt{attempt}.log"
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        return self

    @property
    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"run did not finish within {timeout} s:\n{self.output[-3000:]}") from None

    def steps(self, steps_path: Path) -> list[dict]:
        """The step log records of this process (after its ``start`` record)."""
        mine: list[dict] = []
        for record in read_steps(steps_path):
            if record["event"] == "start":
                mine = [record] if record["pid"] == self.process.pid else []
            elif mine:
                mine.append(record)
        return mine[1:]

    def wait_for_step(self, step: int, steps_path: Path, timeout: float) -> bool:
        """Wait until this process logged a step >= ``step`` (True) or ended (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(r["step"] >= step for r in self.steps(steps_path)):
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.02)
        raise AssertionError(f"step {step} not reached within {timeout} s:\n{self.output[-3000:]}")

    def wait_for_temp_checkpoint(self, timeout: float) -> str | None:
        """Poll the checkpoint folder until a ``.*.tmp`` file (a checkpoint being written) exists; return its name."""
        folder = self.root / "checkpoints"
        stale = set(os.listdir(folder)) if folder.is_dir() else set()  # left by earlier kills
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if folder.is_dir():
                temps = [name for name in os.listdir(folder) if name.endswith(".tmp") and name not in stale]
                if temps:
                    return temps[0]
            if self.process.poll() is not None:
                return None
            time.sleep(0.001)
        raise AssertionError(f"no checkpoint write seen within {timeout} s:\n{self.output[-3000:]}")

    def send(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)


# ----------------------------------------------------------------------------------------------- checks
def checkpoint_step(path: Path) -> int:
    """The global step stored in a Lightning checkpoint, loaded the safe way (weights_only)."""
    from speechlab.checkpoints.safe_load import load_torch_checkpoint

    return int(load_torch_checkpoint(path)["global_step"])


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    from speechlab.checkpoints.safe_load import load_torch_checkpoint

    return load_torch_checkpoint(path)["state_dict"]


def attempts(records: list[dict]) -> list[list[dict]]:
    """Split a step log into attempts (each begins with a ``start`` record)."""
    runs: list[list[dict]] = []
    for record in records:
        if record["event"] == "start":
            runs.append([record])
        elif runs:
            runs[-1].append(record)
    return runs


def committed_history(records: list[dict], resumed_from: list[int], rank: int = 0) -> dict[int, list[str]]:
    """The steps whose updates are in the final weights, ``{step: batch ids}``, checking the log is consistent.

    ``resumed_from[i]``: the global step of the checkpoint attempt ``i + 1`` resumed from. Checks: each attempt
    starts at that step, trains consecutive steps, and never resumes from a step it had not reached.
    """
    runs = attempts(records)
    assert len(runs) == len(resumed_from) + 1, (len(runs), resumed_from)
    history: dict[int, list[str]] = {}
    for i, run in enumerate(runs):
        start = run[0]["step"]
        expected_start = 0 if i == 0 else resumed_from[i - 1]
        assert start == expected_start, (
            f"attempt {i} started at step {start}, its checkpoint is {expected_start}"
        )
        steps = [r for r in run[1:] if r["rank"] == rank]
        numbers = [r["step"] for r in steps]
        assert numbers == sorted(set(numbers)), f"attempt {i} repeated or reordered steps: {numbers}"
        previous = start
        for r in steps:
            assert r["step"] > previous, f"attempt {i}: step {r['step']} after {previous}"
            previous = r["step"]
        end = resumed_from[i] if i < len(resumed_from) else float("inf")
        if i < len(resumed_from):
            reached = numbers[-1] if numbers else start
            assert start <= end <= reached, (
                f"attempt {i} reached step {reached} but left a checkpoint at {end}"
            )
        for r in steps:
            if r["step"] <= end:  # later steps were lost with the kill and redone by the next attempt
                history[r["step"]] = r["ids"]
    return history


def kill_points(seed: int, count: int, last_step: int) -> list[int]:
    """``count`` distinct random steps in 1..last_step-1 (sorted) after which to kill."""
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, last_step), count))


SIGKILL, SIGTERM = signal.SIGKILL, signal.SIGTERM


class GradientProbe(L.Callback):
    """Saves, per rank, what DDP all-reduced at the first optimiser step and what this rank alone computed.

    At the first training batch the probe runs this rank's ``training_step`` on the bare module with exactly
    the randomness the real step will use (the run's ``ExactResume`` reseed, made first here, is repeated by
    the trainer afterwards) and takes its gradients with ``torch.autograd.grad`` (which leaves ``.grad`` and
    DDP's hooks alone). At the first ``on_before_optimizer_step`` it saves the trainer's gradients (after the
    all-reduce). ``<folder>/rank<r>.pt`` holds ``{"local": {name: grad}, "reduced": {name: grad}}``; a
    parameter without a gradient is missing from the dict.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.local: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ):
        if self.local is not None:
            return
        from speechlab.train import ExactResume

        reseed = next(cb for cb in trainer.callbacks if isinstance(cb, ExactResume))
        reseed.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        loss = pl_module.training_step(batch, batch_idx)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        self.local = {n: g.detach().clone() for (n, _), g in zip(named, grads, strict=True) if g is not None}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any):
        if self.local is None or getattr(self, "_saved", False):
            return
        self._saved = True
        reduced = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"local": self.local, "reduced": reduced}, Path(self.folder) / f"rank{trainer.global_rank}.pt"
        )


class WeightsAtEnd(L.Callback):
    """Saves this rank's trained weights to ``<folder>/rank<r>.pt`` when training ends."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


class HangAtStep(L.Callback):
    """Rank ``rank`` stops responding (sleeps ``seconds``) at the batch after optimiser step ``step``; the file
    ``marker`` (if given) is written first, with this process's pid."""

    def __init__(self, step: int, rank: int = 1, seconds: float = 120.0, marker: str | None = None) -> None:
        self.step, self.rank, self.seconds, self.marker = step, rank, seconds, marker

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.marker:
                Path(self.marker).write_text(str(os.getpid()))
            time.sleep(self.seconds)
