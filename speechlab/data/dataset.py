"""Map-style dataset over manifest items: audio, token targets, frame-level units."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from speechlab.audio import AudioError
from speechlab.data.manifest import load_item_audio
from speechlab.data.text import Tokenizer, UnknownUnitError

__all__ = ["AudioDataset", "parse_units", "seed_worker"]

log = logging.getLogger(__name__)


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: torch, ``random`` and numpy streams distinct per (base seed, worker, rank).

    PyTorch seeds a worker from the loader's base seed and its id only, and the base seed is the same on every
    rank after a shared ``seed_everything``; mixing in the rank is what Lightning's own init function does. This
    one lives here, beside the dataset, because a fork-server worker imports the module of every function it is
    handed (Lightning's would import Lightning, torchmetrics and transformers into each of 8 workers a rank).
    """
    base_seed = torch.initial_seed() - worker_id
    state = np.random.SeedSequence([base_seed, worker_id, rank]).generate_state(3, dtype=np.uint64)
    torch.manual_seed(int(state[0]))
    random.seed(int(state[1]))
    np.random.seed(state[2:].view(np.uint32))  # numpy's legacy seed takes 32-bit words


def parse_units(value: str | Sequence[int]) -> list[int]:
    """Manifest ``units`` (space-separated ints, or a list of ints) -> list of ints."""
    if isinstance(value, str):
        return [int(tok) for tok in value.split()]
    return [int(v) for v in value]


class AudioDataset(Dataset):
    """Items of a manifest (as returned by ``read_manifest``) loaded one at a time.

    ``dataset[i]`` is a dict: ``id``, ``audio`` ((samples,) float32 at ``sample_rate``), ``targets`` (token ids
    from ``tokenizer.encode(item[tokenizer.field])`` or None), ``units`` (ints from ``item[units_field]`` or None),
    ``text``, ``language``, ``speaker``.

    Args:
        items: manifest dicts with an absolute ``audio`` path (``read_manifest`` gives that).
        sample_rate: output rate; files at other rates are resampled.
        tokenizer: makes ``targets``; its ``field`` ("text" or "phonemes") is read.
        units_field: manifest field with frame-level unit targets (e.g. "units" from k-means).
        max_seconds: read at most this many seconds from the start of each utterance (a crop for unlabeled
            pretraining; units are cut in proportion). Labeled data cannot be cropped without breaking its
            transcript, so with a tokenizer an item longer than ``max_seconds`` is an error: filter such items with
            the DataModule's ``max_duration`` instead.
        on_error: ``"raise"`` lets an :class:`AudioError` / :class:`UnknownUnitError` propagate; ``"skip"`` logs a
            warning, counts the reason in ``self.skipped`` (per worker process) and returns
            ``{"id": ..., "skipped": reason}``, which :func:`speechlab.data.collate.collate` drops and counts in
            ``Batch.skipped`` (so the training process sees every skip, whatever the worker count).
    """

    def __init__(
        self,
        items: Sequence[dict],
        sample_rate: int = 16000,
        tokenizer: Tokenizer | None = None,
        units_field: str | None = None,
        max_seconds: float | None = None,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds}")
        self.items = list(items)
        self.sample_rate = sample_rate
        self.tokenizer = tokenizer
        self.units_field = units_field
        self.max_seconds = max_seconds
        self.on_error = on_error
        self.skipped: Counter = Counter()
        if tokenizer is not None and max_seconds is not None:
            too_long = [it["id"] for it in self.items if float(it["duration"]) > max_seconds]
            if too_long:
                raise ValueError(
                    f"{len(too_long)} labeled items are longer than max_seconds={max_seconds} (e.g. {too_long[0]}); "
                    "cropping would cut their transcripts -> filter them with max_duration instead"
                )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def durations(self) -> list[float]:
        return [float(it["duration"]) for it in self.items]

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        try:
            return self._load(item)
        except (AudioError, UnknownUnitError) as err:
            if self.on_error == "raise":
                raise
            reason = "audio" if isinstance(err, AudioError) else "unknown_unit"
            self.skipped[reason] += 1
            log.warning("skipping item %s (%s): %s", item.get("id"), reason, err)
            return {"id": item.get("id"), "skipped": reason}

    def _load(self, item: dict) -> dict:
        audio = load_item_audio(item, self.sample_rate, self.max_seconds)
        targets = None
        if self.tokenizer is not None:
            targets = self.tokenizer.encode(item.get(self.tokenizer.field) or "")
        units = None
        if self.units_field is not None:
            units = parse_units(item[self.units_field])
            full = float(item["duration"])
            if self.max_seconds is not None and full > self.max_seconds:
                units = units[: max(1, round(len(units) * self.max_seconds / full))]
        return {
            "id": item["id"],
            "audio": audio,
            "targets": targets,
            "units": units,
            "text": item.get("text") or "",
            "language": item.get("language"),
            "speaker": item.get("speaker"),
        }
