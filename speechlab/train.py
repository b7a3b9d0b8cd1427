"""The one Trainer factory every task trains through.

``build_trainer`` (Python) and ``trainer_defaults`` (the ``speechlab fit`` CLI) give the same setup: precision
(``bf16-mixed`` on GPU, 32 on CPU), ``last.ckpt`` + best-k checkpoints written atomically, CSV + TensorBoard logs,
a progress bar, learning-rate logging, the resolved config saved with every run, and Lightning's own DDP.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from speechlab.atomic import atomic_write
from speechlab.checkpoints.safe_load import load_torch_checkpoint

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints with :func:`speechlab.atomic.atomic_write` (temporary file, fsync, rename).

    A run killed at any moment leaves either the previous complete file or the new complete file, never a
    truncated ``last.ckpt``; a full disk is a :class:`speechlab.atomic.WriteFailed` naming the file. A kill
    during a write leaves its temporary file (``.<name>.*.tmp``) behind; the next successful write of the same
    checkpoint removes it.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        with atomic_write(path) as tmp, tmp.open("wb") as f:
            torch.save(checkpoint, f)
        # Only one process writes a given checkpoint (global rank 0), so other temp files of it are stale.
        for stale in path.parent.glob(f"{glob.escape(f'.{path.name}.')}*.tmp"):
            stale.unlink(missing_ok=True)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        """Resume only from checkpoints that load without unpickling code (``torch.load(weights_only=True)``)."""
        return load_torch_checkpoint(path)


def _seed_from(entropy: list[int]) -> int:
    """A 63-bit seed that is a function of ``entropy`` only (negative entries allowed)."""
    words = [v % 2**32 for v in entropy]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


class ExactResume(Callback):
    """Make a resumed run continue exactly where the interrupted one stopped.

    * Data: after every training batch the train sampler's ``position`` is set to the number of batches of this
      epoch that are in the weights (Lightning's ``processed`` count). The sampler's own count would be ahead,
      since the loop prefetches batches; the data module saves the sampler state in every checkpoint.
    * Randomness: before every training batch the torch / numpy / Python RNGs are reseeded from
      ``(base_seed, epoch, batch index, rank)`` (as fairseq seeds each update), and ``base_seed`` is saved with
      the checkpoint. Draws that every rank must make alike (which layers LayerDrop skips: a layer dropped on
      one rank only would leave DDP's all-reduce waiting for its gradients) come from a second seed without the
      rank, handed to every submodule with a ``reseed_shared(seed)`` method. Dropout and masking of a batch therefore draw the same numbers however the run got there:
      restoring a saved RNG state instead is not enough, since whatever runs between a checkpoint and the next
      batch (the next epoch's DataLoader iterator, validation) draws from the same generators and differs between
      a resumed and an uninterrupted run (at an epoch end, for one).
    * CPU threads: the thread count changes the order of float sums (results differ in the last bits, then
      drift apart over steps), so it is saved too, and a CPU run resumed with another count says so once.
    """

    def __init__(self) -> None:
        self.base_seed: int | None = None
        self.saved_threads: int | None = None  # the interrupted run's torch.get_num_threads()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the checkpoint is restored (which overrides it); ``initial_seed`` draws nothing from the RNG.
        if self.base_seed is None:
            self.base_seed = int(torch.initial_seed())

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        shared = [self.base_seed or 0, trainer.current_epoch, batch_idx]
        seed = _seed_from([*shared, trainer.global_rank])
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        shared_seed = _seed_from([*shared, -1])
        for module in pl_module.modules():
            if hasattr(module, "reseed_shared"):
                module.reseed_shared(shared_seed)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sampler = (
            getattr(trainer.datamodule, "train_sampler", None) if trainer.datamodule is not None else None
        )
        if sampler is not None:
            sampler.position = trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        threads, saved = torch.get_num_threads(), self.saved_threads
        on_cpu = trainer.strategy.root_device.type == "cpu"
        if on_cpu and saved is not None and saved != threads and trainer.is_global_zero:
            log.warning(
                "resuming with %d CPU threads per process where the checkpoint was trained with %d: the result "
                "will differ from an uninterrupted run in the last bits, growing over the steps (for bit-identical "
                "weights resume with OMP_NUM_THREADS=%d)",
                threads,
                saved,
                saved,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"base_seed": self.base_seed, "cpu_threads": torch.get_num_threads()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("base_seed") is not None:
            self.base_seed = int(state_dict["base_seed"])
        if state_dict.get("cpu_threads") is not None:
            self.saved_threads = int(state_dict["cpu_threads"])


class GracefulSigterm(Callback):
    """SIGTERM stops every rank at the same optimiser-step boundary, writes ``last.ckpt``, and never hangs.

    Lightning's own handler runs a collective *inside* the signal handler, which can interleave with the
    gradient all-reduce of another rank and deadlock, and it lets ranks stop at different batches. Here the
    handler only notes the signal. After every optimiser step (the last micro-batch of an accumulation) the ranks
    agree, with one small all-reduce, whether any of them was signalled, and all raise Lightning's
    ``SIGTERMException`` after the same step: ``last.ckpt`` is written (``save_on_exception``) with no
    half-accumulated gradients lost, and resuming continues exactly. A stop at an epoch's last batch is deferred
    to the next step, because Lightning miscounts the epoch when it resumes from that point. (So with fewer
    batches per epoch than ``accumulate_grad_batches``, whose every update falls on an epoch's last batch, only
    the watchdog below ends the run, and it resumes from the previous checkpoint.)

    A process stuck in a collective (a dead peer) never returns to Python, so no Python handler can run: a
    watchdog thread, woken through ``signal.set_wakeup_fd`` by the signal itself, ends the process with exit
    code 143 if it is still alive ``grace_seconds`` after the SIGTERM.
    """

    def __init__(self, grace_seconds: float = 120.0) -> None:
        self.grace_seconds = grace_seconds
        self.signalled = False
        self._previous_handler: Any = None
        self._previous_wakeup_fd: int | None = None
        self._launcher: Any = None
        self._sockets: tuple[socket.socket, socket.socket] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        self.signalled = False
        self._launcher = trainer.strategy.launcher  # rank 0 of a `speechlab fit` DDP run started the others
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)  # replaces Lightning's
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._sockets = (reader, writer)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watchdog, args=(reader,), name="sigterm-watchdog", daemon=True).start()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            self.signalled = True
            if self._launcher is not None and hasattr(self._launcher, "kill"):
                self._launcher.kill(signum)  # the other ranks stop at the same step
            print(
                f"speechlab: SIGTERM received; stopping after the current optimiser step (a process still alive "
                f"{self.grace_seconds:.0f} s from now is ended)",
                file=sys.stderr,
                flush=True,
            )

    def _watchdog(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                time.sleep(self.grace_seconds)
                print(
                    f"speechlab: still running {self.grace_seconds:.0f} s after SIGTERM (stuck in a collective or "
                    "a checkpoint write?); exiting now. Resume with --ckpt_path last.",
                    file=sys.stderr,
                    flush=True,
                )
                for proc in getattr(self._launcher, "procs", None) or []:  # ranks this process started
                    proc.kill()
                os._exit(128 + signal.SIGTERM)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        processed = epoch_loop.batch_progress.current.processed
        if processed % trainer.accumulate_grad_batches != 0:
            return  # mid-accumulation: the next optimiser step comes first
        stop = self.signalled
        if trainer.world_size > 1:  # every rank takes part, so every rank decides alike
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop and processed >= trainer.num_training_batches:
            return  # the epoch's last batch: stop after the next step (see the class docstring)
        if stop:
            trainer._signal_connector.received_sigterm = (
                True  # Lightning raises SIGTERMException after this batch
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._sockets is None or self.signalled:
            return  # once signalled, the watchdog stays armed until the process exits
        signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        for sock in self._sockets:
            sock.close()
        self._sockets = None


# A collective that has not completed after this long fails (a rank died or hangs) instead of waiting forever.
DDP_TIMEOUT_SECONDS = 600


def resolve_strategy(
    strategy: Any, task: L.LightningModule | None, timeout_seconds: float | None = None
) -> Any:
    """``"ddp"`` -> Lightning's ``DDPStrategy`` with the settings our tasks need; anything else unchanged.

    ``find_unused_parameters``: a task's ``ddp_find_unused_parameters`` (default True). LayerDrop, a UniSpeech
    rank whose batch has no labeled utterance (the CTC head gets no gradient), the codec GAN's two backward
    passes and an unused mask embedding all leave parameters without a gradient in some steps; without the
    search DDP either crashes at the next step ("Expected to have finished reduction") or, when ranks differ,
    waits forever. ``timeout``: collectives fail after ``timeout_seconds`` (default :data:`DDP_TIMEOUT_SECONDS`).
    """
    if strategy != "ddp":
        return strategy
    find_unused = bool(getattr(task, "ddp_find_unused_parameters", True))
    timeout = timedelta(seconds=timeout_seconds if timeout_seconds is not None else DDP_TIMEOUT_SECONDS)
    return DDPStrategy(find_unused_parameters=find_unused, timeout=timeout)


def default_precision() -> str:
    """``bf16-mixed`` where a CUDA GPU supports it, else full fp32."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def default_callbacks(
    default_root_dir: str,
    monitor: str | None = None,
    mode: str = "min",
    save_top_k: int = 2,
    every_n_train_steps: int | None = None,
    sigterm_grace_seconds: float = 120.0,
) -> list[Callback]:
    """Checkpointing, exact-resume state and LR logging (Lightning adds its progress bar itself).

    ``<root>/checkpoints/last.ckpt`` is written at every validation / epoch end, every ``every_n_train_steps``
    steps if set, and when training stops on an exception or SIGTERM (Lightning finishes the current batch, then
    stops). The best-k checkpoints by ``monitor`` go to the same folder. The folder does not depend on the logger
    version, so ``--ckpt_path last`` finds the last checkpoint of an interrupted run.
    """
    dirpath = str(Path(default_root_dir) / "checkpoints")
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=dirpath,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            save_top_k=1,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            save_on_exception=True,
        ),
        ExactResume(),
        GracefulSigterm(sigterm_grace_seconds),
        LearningRateMonitor(logging_interval="step"),
    ]
    if monitor is not None:  # first: Lightning's ckpt_path="best" asks the first ModelCheckpoint
        callbacks.insert(
            0,
            ModelCheckpoint(
                dirpath=dirpath,
                filename="best-step{step:07d}",
                auto_insert_metric_name=False,
                monitor=monitor,
                mode=mode,
                save_top_k=save_top_k,
            ),
        )
    callbacks.append(ExportPretrained(str(Path(default_root_dir) / PRETRAINED_DIR)))
    return callbacks


PRETRAINED_DIR = "pretrained"


class ExportPretrained(Callback):
    """When ``fit`` finishes (global rank 0), write the task's model to ``directory`` as a pretrained directory.

    Every task has ``export_pretrained(directory)`` (CTC: model + tokenizer; WavLM pretraining: the encoder;
    UniSpeech: the model; codec: the EMA generator), so a finished run is directly usable by ``speechlab.load``,
    ``speechlab transcribe`` and ``speechlab export``. A run stopped by an exception or SIGTERM exports nothing.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        export = getattr(pl_module, "export_pretrained", None)
        if export is None or not trainer.is_global_zero:
            return
        print(f"exported the trained model to {export(self.directory)}")


def default_loggers(default_root_dir: str) -> list:
    """CSV (easy to plot or grep) and TensorBoard logs under ``<root>/logs`` and ``<root>/tensorboard``."""
    return [
        CSVLogger(default_root_dir, name="logs"),
        TensorBoardLogger(default_root_dir, name="tensorboard", default_hp_metric=False),
    ]


# Trainer arguments every task shares; run-specific parts (loggers, checkpoint folder, monitored metric) are
# added by ``build_trainer`` and the CLI from the run's root folder and the task's ``checkpoint_monitor``.
# The checkpoint plugin (AtomicCheckpointIO) is added by ``build_trainer`` and ``SpeechLabCLI.instantiate_trainer``,
# not here: a plugin instance among the CLI's defaults ends up in the run's saved config.yaml, which then cannot
# be parsed again ("Unable to serialize instance").
BASE_TRAINER_ARGS: dict[str, Any] = {
    # Our data modules shard the length-bucketed batch sampler per rank themselves.
    "use_distributed_sampler": False,
    "gradient_clip_val": 10.0,
    "log_every_n_steps": 10,
}


def task_monitor(task: L.LightningModule) -> tuple[str | None, str]:
    """The metric a task wants best-k checkpoints ranked by: its ``checkpoint_monitor`` attribute."""
    return getattr(task, "checkpoint_monitor", (None, "min"))


def build_trainer(
    task: L.LightningModule | None = None,
    default_root_dir: str = "exp",
    checkpoint_every_n_steps: int | None = None,
    **overrides: Any,
) -> L.Trainer:
    """The Trainer every task trains through; ``overrides`` are ``lightning.Trainer`` arguments.

    ``checkpoint_every_n_steps`` also writes ``last.ckpt`` every that many optimiser steps (default: at every
    validation / epoch end).
    """
    monitor, mode = task_monitor(task) if task is not None else (None, "min")
    kwargs: dict[str, Any] = {
        **BASE_TRAINER_ARGS,
        "plugins": [AtomicCheckpointIO()],
        "precision": default_precision(),
        "default_root_dir": default_root_dir,
        "callbacks": default_callbacks(
            default_root_dir, monitor, mode, every_n_train_steps=checkpoint_every_n_steps
        ),
        "logger": default_loggers(default_root_dir),
    }
    if getattr(task, "automatic_optimization", True) is False:
        kwargs.pop("gradient_clip_val")  # manual optimisation clips inside the task
    kwargs.update(overrides)
    kwargs["strategy"] = resolve_strategy(kwargs.get("strategy", "auto"), task)
    if not kwargs.get("logger"):  # nothing to log the learning rate to
        kwargs["callbacks"] = [cb for cb in kwargs["callbacks"] if not isinstance(cb, LearningRateMonitor)]
    return L.Trainer(**kwargs)
