"""Padding a list of dataset items into a :class:`Batch`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, replace

import torch
from torch.nn.utils.rnn import pad_sequence

from speechlab.nn import masks

__all__ = ["Batch", "TARGET_PAD", "UNIT_PAD", "collate"]

TARGET_PAD = -100  # padding of `targets`; always read targets with `target_lengths` (CTC ignores the rest)
UNIT_PAD = -100  # padding of `units`; the value cross-entropy ignores by default (ignore_index=-100)


@dataclass
class Batch:
    """A padded batch. A plain dataclass of tensors, so Lightning moves it to the device as it is.

    Attributes:
        ids: utterance ids, length B.
        audio: (B, S) float32, zero-padded after each utterance's ``lengths[b]`` samples.
        lengths: (B,) int64 valid samples.
        targets: (B, U) int64 token ids padded with ``TARGET_PAD`` (-100), or None without a tokenizer.
            ``torch.nn.functional.ctc_loss`` reads only the first ``target_lengths[b]`` ids of each row.
        target_lengths: (B,) int64, or None.
        units: (B, T_units) int64 frame-level unit targets padded with ``UNIT_PAD`` (-100), or None.
        unit_lengths: (B,) int64 valid units per row, or None.
        texts: transcripts ("" where there is none), length B.
        languages: language codes (None where unknown), length B.
        speakers: speaker ids (None where unknown), length B; utterance mixing uses them.
        skipped: items of this batch dropped under the skip policy, by reason (``{"audio": 1}``).

    An empty batch (``len(batch) == 0``: every item failed to load under ``on_error="skip"``) has ``audio`` of
    shape (0, 0); a task should return ``None`` from ``training_step`` for it (Lightning then skips the step).
    Under DDP a skipped step on one rank leaves the others waiting in the gradient all-reduce; there, return a
    zero loss that touches every parameter (``sum(p.sum() for p in params) * 0``) instead.
    """

    ids: list[str]
    audio: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor | None = None
    target_lengths: torch.Tensor | None = None
    units: torch.Tensor | None = None
    unit_lengths: torch.Tensor | None = None
    texts: list[str] = field(default_factory=list)
    languages: list[str | None] = field(default_factory=list)
    speakers: list[str | None] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def padding_mask(self) -> torch.Tensor:
        """(B, S) bool, True at padded samples."""
        return masks.padding_mask(self.lengths, self.audio.shape[1])

    def to(self, device: torch.device | str) -> Batch:
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if torch.is_tensor(getattr(self, f.name))
        }
        return replace(self, **changes)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        changes = {
            f.name: getattr(self, f.name).pin_memory()
            for f in fields(self)
            if torch.is_tensor(getattr(self, f.name))
        }
        return replace(self, **changes)


def _pad_int(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    tensors = [torch.as_tensor(r, dtype=torch.int64) for r in rows]
    return pad_sequence(tensors, batch_first=True, padding_value=pad), lengths


def collate(items: list[dict | None]) -> Batch:
    """Pad dataset items (dicts from :class:`speechlab.data.dataset.AudioDataset`) into a :class:`Batch`.

    Items that failed to load under ``on_error="skip"`` (``{"id", "skipped": reason}``, or ``None``) are dropped
    and counted in ``Batch.skipped``. ``targets``/``units`` are present
    when every remaining item has them.
    """
    skipped = Counter(it["skipped"] for it in items if it is not None and "skipped" in it)
    skipped.update({"unknown": sum(it is None for it in items)} if None in items else {})
    items = [it for it in items if it is not None and "skipped" not in it]
    if not items:
        empty = torch.zeros(0, dtype=torch.int64)
        return Batch(ids=[], audio=torch.zeros(0, 0), lengths=empty, skipped=dict(skipped))
    lengths = torch.tensor([it["audio"].shape[0] for it in items], dtype=torch.int64)
    audio = pad_sequence([it["audio"].to(torch.float32) for it in items], batch_first=True, padding_value=0.0)
    targets = target_lengths = units = unit_lengths = None
    if all(it.get("targets") is not None for it in items):
        targets, target_lengths = _pad_int([it["targets"] for it in items], TARGET_PAD)
    if all(it.get("units") is not None for it in items):
        units, unit_lengths = _pad_int([it["units"] for it in items], UNIT_PAD)
    return Batch(
        ids=[it["id"] for it in items],
        audio=audio,
        lengths=lengths,
        targets=targets,
        target_lengths=target_lengths,
        units=units,
        unit_lengths=unit_lengths,
        texts=[it.get("text") or "" for it in items],
        languages=[it.get("language") for it in items],
        speakers=[it.get("speaker") for it in items],
        skipped=dict(skipped),
    )
