"""A training DataLoader whose position Lightning saves in checkpoints, for exact mid-epoch resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """DataLoader over a batch sampler with ``state_dict``/``load_state_dict`` (Lightning's stateful-loader hook).

    ``consumed_batches`` returns ``(epoch, batches of that epoch already trained on)``; it comes from the trainer's
    progress counters rather than from the sampler, because loader workers prefetch batches that were never
    trained on. Restoring hands that position to the batch sampler, which then continues the same epoch's
    batch order where the interrupted run stopped.
    """

    def __init__(self, *args: Any, consumed_batches: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumed_batches = consumed_batches

    def state_dict(self) -> dict[str, int]:
        epoch, position = self._consumed_batches()
        return {**self.batch_sampler.state_dict(), "epoch": epoch, "position": position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


def trainer_progress(trainer: Any) -> Callable[[], tuple[int, int]]:
    """``consumed_batches`` callable for a Lightning trainer: (current epoch, processed batches in it)."""

    def consumed() -> tuple[int, int]:
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    return consumed
