"""Length-bucketed batch sampler with a seconds budget, rank sharding and exact mid-epoch resume."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler", "pack_batches"]


def pack_batches(
    sorted_durations: np.ndarray, max_batch_seconds: float, max_batch_size: int | None
) -> np.ndarray:
    """Greedy packing of durations sorted ascending into consecutive batches.

    A batch grows while ``longest * size <= max_batch_seconds`` (the padded seconds of the batch) and
    ``size <= max_batch_size``; an utterance longer than the budget on its own becomes a batch of one.

    Returns:
        starts: (num_batches + 1,) int64 boundaries; batch ``b`` is ``[starts[b], starts[b + 1])``.
    """
    n = len(sorted_durations)
    cap = n if max_batch_size is None else max_batch_size
    starts = [0]
    begin = 0
    # One pass over the items (O(n)); each step only compares against the current batch's start, because with
    # ascending durations the newest item is always the longest of its batch.
    for i, seconds in enumerate(sorted_durations.tolist()):
        size = i - begin + 1
        if i > begin and (seconds * size > max_batch_seconds or size > cap):
            starts.append(i)
            begin = i
    starts.append(n)
    return np.asarray(starts, dtype=np.int64)


class _EpochForwarder:
    """``batch_sampler.sampler`` stand-in: Lightning calls ``set_epoch`` on ``dataloader.sampler`` and
    ``dataloader.batch_sampler.sampler``, never on the batch sampler itself; this forwards the call."""

    def __init__(self, owner: BucketBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._owner.durations)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of utterances of similar length under a padded-seconds budget.

    Each epoch: a random permutation (from ``(seed, epoch)``) breaks ties, a stable sort by duration groups
    similar lengths, :func:`pack_batches` forms batches whose ``max_duration * batch_size <= max_batch_seconds``,
    and the order of the batches is shuffled with the same generator (as fairseq's ``batch_by_size`` + shuffled
    batches). Batch sizes, and so ``len()``, are the same every epoch; which utterances share a batch changes only
    among equal durations, which keeps every batch's padding minimal. With ``shuffle=False`` batches come in
    ascending duration order and never change.

    Distributed: the shuffled batch list is shared by all ranks (same seed and epoch) and dealt round-robin, rank
    ``r`` taking batches ``r, r + R, r + 2R, ...``. Every rank yields the SAME number of batches, so DDP can never
    hang on a missing batch: with ``drop_last=False`` the list is padded by repeating batches from its start
    (a few utterances are seen twice in that epoch); with ``drop_last=True`` the last ``len % R`` batches are
    dropped (a few utterances are not seen in that epoch; the shuffle changes which ones).

    Resume: :meth:`state_dict` gives ``{"epoch", "seed", "position"}``, ``position`` being the batches this rank
    has consumed in the current epoch (the training loop may overwrite :attr:`position` with the count it
    actually consumed, since a DataLoader prefetches). After :meth:`load_state_dict` the next ``__iter__``
    continues the same epoch's order after ``position`` batches; later epochs start from the beginning.

    Lightning calls :meth:`set_epoch` every epoch (through ``batch_sampler.sampler``); without a ``set_epoch`` call
    every epoch has the same order. ``drop_last=True`` with fewer batches than ranks falls back to padding.
    """

    def __init__(
        self,
        durations: Sequence[float] | np.ndarray,
        max_batch_seconds: float,
        *,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        durations = np.asarray(durations, dtype=np.float64)
        if durations.ndim != 1 or len(durations) == 0:
            raise ValueError("durations must be a non-empty 1-D sequence of seconds (one per utterance)")
        if not np.isfinite(durations).all() or (durations < 0).any():
            raise ValueError("durations must be finite and >= 0 seconds")
        if max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be > 0, got {max_batch_seconds}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}"
            )
        self.durations = durations
        self.max_batch_seconds = float(max_batch_seconds)
        self.max_batch_size = max_batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.position = 0  # batches of the current epoch handed out (or consumed, when set by the trainer)
        self._resume_from = 0
        self.sampler = _EpochForwarder(self)
        # The sorted duration sequence is the same for every tie-break permutation, so the batch sizes (and the
        # number of batches) are fixed; only which utterances fill equal-length slots and the batch order change.
        self._starts = pack_batches(np.sort(durations, kind="stable"), self.max_batch_seconds, max_batch_size)
        total = len(self._starts) - 1
        if drop_last and total >= num_replicas:
            self._per_rank = total // num_replicas
        else:
            self._per_rank = -(-total // num_replicas)

    @property
    def num_batches_total(self) -> int:
        """Batches in one epoch before sharding across ranks."""
        return len(self._starts) - 1

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. A different epoch than the one resumed clears the resume position."""
        if epoch != self.epoch:
            self._resume_from = 0
            self.position = 0
        self.epoch = int(epoch)

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch, in order (without the resume offset)."""
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            tie_break = rng.permutation(len(self.durations))
            order = tie_break[np.argsort(self.durations[tie_break], kind="stable")]
        else:
            rng = None
            order = np.argsort(self.durations, kind="stable")
        batches = np.split(order, self._starts[1:-1])
        batch_order = rng.permutation(len(batches)) if rng is not None else np.arange(len(batches))
        needed = self._per_rank * self.num_replicas
        if needed > len(batch_order):  # pad by cycling through the (shuffled) list from its start
            batch_order = np.resize(batch_order, needed)
        mine = batch_order[:needed][self.rank :: self.num_replicas]
        return [batches[b].tolist() for b in mine]

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_from = self._resume_from, 0
        batches = self.epoch_batches()
        self.position = start
        for batch in batches[start:]:
            self.position += 1
            yield batch

    def __len__(self) -> int:
        """Batches per rank per epoch (the full epoch, also when resuming mid-epoch)."""
        return self._per_rank

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed, "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        """Continue epoch ``state["epoch"]`` after ``state["position"]`` batches at the next ``__iter__``."""
        position = int(state.get("position", 0))
        if not 0 <= position <= len(self):
            raise ValueError(
                f"sampler position {position} is outside this epoch's 0..{len(self)} batches; "
                "was the checkpoint made with other data, max_batch_seconds or world size?"
            )
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state.get("epoch", self.epoch))
        self.position = self._resume_from = position
