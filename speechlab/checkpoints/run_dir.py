"""Reader for a training run folder (``trainer.default_root_dir`` of ``speechlab fit``).

A run folder holds ``checkpoints/last.ckpt`` and the best-k checkpoints ranked by the task's
``checkpoint_monitor``. :func:`run_checkpoint` picks one: ``best`` is the best-scoring checkpoint recorded by the
monitored ``ModelCheckpoint`` in ``last.ckpt`` (its ``best_model_path``, looked up in the run's own
``checkpoints/`` folder when the run was moved), ``last`` is ``last.ckpt``; ``auto`` (what ``speechlab.load``
uses) is ``best`` when the run has one, else ``last``. The checkpoint is then read by
:mod:`speechlab.checkpoints.lightning_ckpt` (through the registry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from speechlab.checkpoints import registry
from speechlab.checkpoints.safe_load import CheckpointError, load_torch_checkpoint

__all__ = ["CHECKPOINT_DIR", "LAST", "detect", "read", "run_checkpoint", "best_checkpoint", "is_run_dir"]

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def is_run_dir(path: Path) -> bool:
    """A folder with ``checkpoints/*.ckpt`` and no ``config.json`` of its own (not a model directory)."""
    folder = path / CHECKPOINT_DIR
    return (
        path.is_dir()
        and not (path / "config.json").is_file()
        and folder.is_dir()
        and any(folder.glob("*.ckpt"))
    )


detect = is_run_dir


def read(path: Path) -> nn.Module:
    """The run's checkpoint (:func:`run_checkpoint` ``auto``), read by the reader that recognises it (the Lightning
    reader, imported only then: detecting a run folder must not import Lightning)."""
    return registry.read(run_checkpoint(path, "auto"))


def _monitored_states(checkpoint: Any) -> list[dict]:
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    states = []
    for key, state in (callbacks or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor"):
            states.append(state)
    return states


def best_checkpoint(run: Path) -> Path | None:
    """The best checkpoint of ``run`` by its monitored metric, or None (no monitor, or no validation yet)."""
    run = Path(run)
    last = run / CHECKPOINT_DIR / LAST
    if not last.is_file():
        return None
    for state in _monitored_states(load_torch_checkpoint(last)):
        recorded = state.get("best_model_path") or ""
        if not recorded:
            continue
        for candidate in (Path(recorded), run / CHECKPOINT_DIR / Path(recorded).name):
            if candidate.is_file():
                return candidate
    return None


def run_checkpoint(run: str | Path, which: str = "auto") -> Path:
    """The checkpoint of run folder ``run``: ``which`` = ``best``, ``last`` or ``auto`` (best if any, else last)."""
    run = Path(run)
    if which not in ("auto", "best", "last"):
        raise ValueError(f"which must be 'auto', 'best' or 'last', got {which!r}")
    folder = run / CHECKPOINT_DIR
    if not folder.is_dir():
        raise CheckpointError(
            f"{run}: no {CHECKPOINT_DIR}/ folder; not a training run folder (default_root_dir)."
        )
    if which in ("auto", "best"):
        best = best_checkpoint(run)
        if best is not None:
            return best
        if which == "best":
            raise CheckpointError(
                f"{run}: no best checkpoint recorded in {CHECKPOINT_DIR}/{LAST}: the task names no "
                "checkpoint_monitor, or validation never ran (so the monitored metric was never logged). "
                "Use the last checkpoint (--ckpt last) or validate during training (trainer.val_check_interval)."
            )
    last = folder / LAST
    if not last.is_file():
        raise CheckpointError(f"{run}: no {CHECKPOINT_DIR}/{LAST}; the run wrote no checkpoint yet.")
    return last


def resolve_source(source: str, ckpt: str | None) -> str:
    """A run folder -> its ``best`` / ``last`` checkpoint; anything else unchanged (``--ckpt`` then must be unset)."""
    path = Path(source)
    if is_run_dir(path):
        return str(run_checkpoint(path, ckpt or "auto"))
    if ckpt is not None:
        raise ValueError(f"--ckpt {ckpt} needs a run folder (with checkpoints/), but {source} is not one")
    return source
