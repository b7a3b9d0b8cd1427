"""``speechlab fit|validate|test``: LightningCLI with speechlab's trainer setup (imported only for these commands,
so the tool commands and ``speechlab --help`` start without Lightning)."""

from __future__ import annotations

import signal
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from speechlab.checkpoints.run_dir import run_checkpoint
from speechlab.checkpoints.safe_load import CheckpointError
from speechlab.train import (
    BASE_TRAINER_ARGS,
    AtomicCheckpointIO,
    default_callbacks,
    default_loggers,
    default_precision,
    resolve_strategy,
    task_monitor,
)

__all__ = ["SpeechLabCLI", "run"]


class SpeechLabCLI(LightningCLI):
    """LightningCLI with speechlab's trainer setup: loggers, checkpoint folder and monitor follow the run."""

    def __init__(self, args: list[str] | None = None) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={
                **BASE_TRAINER_ARGS,
                "precision": default_precision(),
                "default_root_dir": "exp",
            },
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int | None,
            default=None,
            help="also write checkpoints/last.ckpt every N optimiser steps (default: at validation / epoch end)",
        )
        parser.add_argument(
            "--sigterm_grace_seconds",
            type=float,
            default=120.0,
            help="after SIGTERM a run stops at the next optimiser step and writes last.ckpt; a process still alive "
            "this long after the signal (stuck in a collective) is ended",
        )
        parser.add_argument(
            "--ddp_timeout_seconds",
            type=float | None,
            default=None,
            help="with trainer.strategy ddp: a collective that has not completed after this long fails the run "
            "(default 600)",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or "exp"
        if config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(root)
        user_callbacks = list(config.get("callbacks") or [])
        if not any(isinstance(cb, ModelCheckpoint) for cb in user_callbacks):
            monitor, mode = task_monitor(self.model)
            every = self._get(self.config, "checkpoint_every_n_steps")
            grace = self._get(self.config, "sigterm_grace_seconds")
            user_callbacks += default_callbacks(
                root, monitor, mode, every_n_train_steps=every, sigterm_grace_seconds=grace
            )
        kwargs["callbacks"] = user_callbacks
        # Added here, not in trainer_defaults, so the saved config.yaml stays parseable (see BASE_TRAINER_ARGS).
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        if getattr(self.model, "automatic_optimization", True) is False:
            kwargs["gradient_clip_val"] = None  # manual optimisation clips inside the task
        timeout = self._get(self.config, "ddp_timeout_seconds")
        kwargs["strategy"] = resolve_strategy(config.get("strategy", "auto"), self.model, timeout)
        return super().instantiate_trainer(**kwargs)

    def _resolve_best(self) -> None:
        """``--ckpt_path best`` in a new process: the run folder's best checkpoint, as recorded in last.ckpt.

        Lightning knows "best" only from the ModelCheckpoint of the current process, which has saved nothing in
        a ``speechlab test`` run, so ``speechlab test --ckpt_path best`` after ``speechlab fit`` needs this.
        """
        section = self.config_init[self.subcommand]
        if section.get("ckpt_path") != "best":
            return
        callback = self.trainer.checkpoint_callback
        if callback is not None and getattr(callback, "best_model_path", ""):
            return
        section["ckpt_path"] = str(run_checkpoint(self.trainer.default_root_dir, "best"))

    def before_validate(self) -> None:
        self._resolve_best()

    def before_test(self) -> None:
        self._resolve_best()


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` is gloo's / NCCL's "a collective timed out" (a peer rank died or hangs)."""
    text = str(error)
    return ("Timed out waiting" in text or "timed out" in text.lower()) and any(
        word in text for word in ("gloo", "NCCL", "ProcessGroup", "recv", "send", "collective", "Watchdog")
    )


def run(argv: list[str]) -> int:
    """Run ``speechlab fit|validate|test|predict ARGS``; returns the exit status.

    A checkpoint that cannot be used (``--ckpt_path best`` of a run that never validated, a refused or corrupt
    file) ends with one line on stderr and exit status 2, like the tool commands.
    """
    try:
        # Lightning warns when it is handed args while sys.argv holds some: the console script's own argv is
        # what it would read anyway, so it is given none then (a caller's other argv is passed on).
        SpeechLabCLI(args=None if argv == sys.argv[1:] else argv)
    except CheckpointError as error:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"speechlab {argv[0]}: {message}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not is_collective_timeout(error):
            raise
        print(
            f"speechlab {argv[0]}: a DDP collective did not complete within the timeout (another rank died, hangs "
            "or is far slower); the run stopped. Check the other ranks' logs, then resume with --ckpt_path last "
            f"(--ddp_timeout_seconds sets the limit). [{str(error).splitlines()[0][:200]}]",
            file=sys.stderr,
        )
        return 2
    except SIGTERMException:  # Lightning saved last.ckpt (save_on_exception) and stopped
        print(
            "speechlab: stopped by SIGTERM after writing checkpoints/last.ckpt; resume with --ckpt_path last",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
    return 0
