"""The one Trainer factory every task trains through.

``build_trainer`` (Python) and ``trainer_defaults`` (the ``speechlab fit`` CLI) give the same setup: precision
(``bf16-mixed`` on GPU, 32 on CPU), ``last.ckpt`` + best-k checkpoints written atomically, CSV + TensorBoard logs,
a progress bar, learning-rate logging, the resolved config saved with every run, and Lightning's own DDP.
"""

from __future__ import annotations

import glob
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file in the same folder, fsync, then rename over the target.

    A run killed at any moment leaves either the previous complete file or the new complete file, never a
    truncated ``last.ckpt``. A kill during a write leaves its temporary file (``.<name>.*.tmp``) behind; the next
    successful write of the same checkpoint removes it. Files get the usual permissions (``0o666`` minus the
    umask), not the owner-only ones of a bare ``mkstemp``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{path.name}."
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        # Only one process writes a given checkpoint (global rank 0), so other temp files of it are stale.
        for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
            stale.unlink(missing_ok=True)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        """Resume only from checkpoints that load without unpickling code (``torch.load(weights_only=True)``)."""
        from speechlab.checkpoints.safe_load import load_torch_checkpoint

        return load_torch_checkpoint(path)


class ExactResume(Callback):
    """Make a resumed run continue exactly where the interrupted one stopped.

    * Data: after every training batch the train sampler's ``position`` is set to the number of batches of this
      epoch that are in the weights (Lightning's ``processed`` count). The sampler's own count would be ahead,
      since the loop prefetches batches; the data module saves the sampler state in every checkpoint.
    * Randomness: before every training batch the torch / numpy / Python RNGs are reseeded from
      ``(base_seed, epoch, batch index, rank)`` (as fairseq seeds each update), and ``base_seed`` is saved with
      the checkpoint. Dropout and masking of a batch therefore draw the same numbers however the run got there:
      restoring a saved RNG state instead is not enough, since whatever runs between a checkpoint and the next
      batch (the next epoch's DataLoader iterator, validation) draws from the same generators and differs between
      a resumed and an uninterrupted run (at an epoch end, for one).
    """

    def __init__(self) -> None:
        self.base_seed: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the checkpoint is restored (which overrides it); ``initial_seed`` draws nothing from the RNG.
        if self.base_seed is None:
            self.base_seed = int(torch.initial_seed())

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        entropy = [self.base_seed or 0, trainer.current_epoch, batch_idx, trainer.global_rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sampler = (
            getattr(trainer.datamodule, "train_sampler", None) if trainer.datamodule is not None else None
        )
        if sampler is not None:
            sampler.position = trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def state_dict(self) -> dict[str, Any]:
        return {"base_seed": self.base_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("base_seed") is not None:
            self.base_seed = int(state_dict["base_seed"])


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
            )
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
    if not kwargs.get("logger"):  # nothing to log the learning rate to
        kwargs["callbacks"] = [cb for cb in kwargs["callbacks"] if not isinstance(cb, LearningRateMonitor)]
    return L.Trainer(**kwargs)
