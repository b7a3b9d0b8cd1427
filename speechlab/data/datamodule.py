"""LightningDataModule: manifests -> filtered items -> tokenizer -> bucketed, rank-sharded DataLoaders."""

from __future__ import annotations

import logging
import multiprocessing
from functools import partial
from multiprocessing.context import BaseContext
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from speechlab.data.collate import collate
from speechlab.data.dataset import AudioDataset, seed_worker
from speechlab.data.manifest import SkipReport, read_manifest
from speechlab.data.sampler import BucketBatchSampler
from speechlab.data.text import (
    CharTokenizer,
    PhonemeTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)
from speechlab.validate import check_number

__all__ = ["SpeechDataModule"]

log = logging.getLogger(__name__)


def worker_context(world_size: int) -> BaseContext | None:
    """How DataLoader workers start under DDP: from a fork server, not by forking the trainer (None: by fork).

    By the time a rank starts its workers, other threads run (gloo's, which call into Python to free finished work's
    tensors; Lightning's and the queues' Python threads), and on Python 3.11 a child forked while one of them holds
    the interpreter's thread-state lock can deadlock in ``PyOS_AfterFork_Child`` before it runs a line: in a 2-rank
    CPU rehearsal one rank waited forever on such a worker (gdb: ``_PyThreadState_DeleteExcept`` waiting on that
    lock), the other in a collective. Which thread held it was not found. The fork server is a single-threaded
    process that imports what a worker unpickles (the dataset with its tokenizer, ``collate``, ``seed_worker``:
    ~1 s, once per rank, no Lightning); workers fork from it. Like spawn, it needs the main script import-safe
    (``if __name__ == "__main__":``), as ``speechlab fit`` is and as Lightning's DDP launcher already expects. One
    process (no gloo threads) keeps plain fork, which starts 8 workers in 0.1 s.
    """
    if world_size <= 1 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    # not this module: its Lightning import (torchmetrics, transformers) costs ~4 s of every rank's start
    context.set_forkserver_preload([AudioDataset.__module__, collate.__module__])
    return context


_TOKENIZER_FIELDS = {
    "char": CharTokenizer.field,
    "sentencepiece": SentencePieceTokenizer.field,
    "phoneme": PhonemeTokenizer.field,
}


class SpeechDataModule(L.LightningDataModule):
    """Speech data for every task: audio batches bucketed by length, with token and/or unit targets.

    The train manifest is read and validated in ``__init__`` (so a bad manifest fails before any model is
    built), and the tokenizer is built from it (or loaded from ``tokenizer_dir``) and exposed as
    ``self.tokenizer``, so the CLI can link ``data.tokenizer.vocab_size`` into the model. Val/test manifests are
    read in :meth:`setup`.

    Args:
        train_manifest: JSON Lines manifest of the training set.
        val_manifest: validation manifest, or None.
        test_manifest: test manifest, or None.
        sample_rate: audio rate fed to the model (files are resampled on load).
        max_batch_seconds: padded seconds per batch (longest utterance x batch size), per device.
        max_batch_size: cap on utterances per batch.
        min_duration: drop utterances shorter than this (seconds), e.g. shorter than the model's receptive field.
        max_duration: drop utterances longer than this (seconds), e.g. a 30-minute file in a training manifest.
        languages: keep only these language codes (all splits).
        tokenizer: "char" | "sentencepiece" | "phoneme": build a tokenizer from the train manifest's texts
            ("text") or phonemes ("phonemes"); None for audio-only (or unit-only) training.
        tokenizer_dir: a folder with a saved tokenizer (``units.json``): loaded instead of built. If it does not
            hold one yet and ``tokenizer`` is set, the built tokenizer is saved there.
        vocab_size: sentencepiece vocabulary size (upper bound, without the blank).
        lowercase: lowercase texts (char and sentencepiece tokenizers).
        units_field: manifest field with frame-level unit targets (e.g. "units"), or None.
        num_workers: DataLoader worker processes.
        seed: seed of the train batch order (per epoch: seed and epoch).
        on_error: "raise" stops at the first bad manifest line or audio file; "skip" drops, counts and logs it.
        check_audio: manifest validation level: "header" | "exists" | "none".
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        max_seconds: crop unlabeled audio to its first ``max_seconds`` (see ``AudioDataset``); None keeps all.

    Filters (``min_duration``, ``max_duration``, ``languages``) apply to every split, with a logged count.
    Distributed: the train sampler takes rank/world size from the attached trainer; configure Lightning with
    ``use_distributed_sampler=False``. Val/test loaders are not shuffled and are sharded across ranks with equal
    batch counts (a few batches repeat on some ranks when the count does not divide).
    """

    def __init__(
        self,
        train_manifest: str,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        sample_rate: int = 16000,
        max_batch_seconds: float = 60.0,
        max_batch_size: int | None = None,
        min_duration: float = 0.0,
        max_duration: float | None = None,
        languages: list[str] | None = None,
        tokenizer: str | None = None,
        tokenizer_dir: str | None = None,
        vocab_size: int = 256,
        lowercase: bool = True,
        units_field: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        on_error: str = "raise",
        check_audio: str = "header",
        pin_memory: bool = False,
        max_seconds: float | None = None,
    ) -> None:
        super().__init__()
        if tokenizer is not None and tokenizer not in _TOKENIZER_FIELDS:
            raise ValueError(
                f"data.tokenizer must be one of {sorted(_TOKENIZER_FIELDS)} or null, got {tokenizer!r}"
            )
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        check_number("data.sample_rate", sample_rate, minimum=1, integer=True)
        check_number("data.max_batch_seconds", max_batch_seconds, above=0)
        check_number("data.max_batch_size", max_batch_size, minimum=1, integer=True, optional=True)
        check_number("data.min_duration", min_duration, minimum=0)
        check_number("data.max_duration", max_duration, above=0, optional=True)
        check_number("data.max_seconds", max_seconds, above=0, optional=True)
        check_number("data.vocab_size", vocab_size, minimum=1, integer=True)
        check_number("data.num_workers", num_workers, minimum=0, integer=True)
        if max_duration is not None and max_duration <= min_duration:
            raise ValueError(
                f"data.max_duration ({max_duration}) must be > data.min_duration ({min_duration})"
            )
        self.save_hyperparameters()
        self.train_manifest, self.val_manifest, self.test_manifest = (
            train_manifest,
            val_manifest,
            test_manifest,
        )
        self.sample_rate, self.max_batch_seconds, self.max_batch_size = (
            sample_rate,
            max_batch_seconds,
            max_batch_size,
        )
        self.min_duration, self.max_duration = min_duration, max_duration
        self.languages = list(languages) if languages else None
        self.units_field, self.num_workers, self.seed = units_field, num_workers, seed
        self.on_error, self.check_audio, self.pin_memory, self.max_seconds = (
            on_error,
            check_audio,
            pin_memory,
            max_seconds,
        )

        self.tokenizer: Tokenizer | None = None
        if tokenizer_dir is not None and (Path(tokenizer_dir) / "units.json").is_file():
            self.tokenizer = load_tokenizer(tokenizer_dir)
            if tokenizer is not None and self.tokenizer.kind != tokenizer:
                raise ValueError(
                    f"{tokenizer_dir} holds a {self.tokenizer.kind!r} tokenizer but data.tokenizer is "
                    f"{tokenizer!r} -> change one of them, or point tokenizer_dir at an empty folder"
                )
        elif tokenizer_dir is not None and tokenizer is None:
            raise FileNotFoundError(
                f"{tokenizer_dir}/units.json does not exist -> set data.tokenizer to build one"
            )
        self._text_field = self.tokenizer.field if self.tokenizer else _TOKENIZER_FIELDS.get(tokenizer or "")

        self.train_items = self._read("train", train_manifest)
        if self.tokenizer is None and tokenizer is not None:
            options = {"lowercase": lowercase} if tokenizer in ("char", "sentencepiece") else {}
            if tokenizer == "sentencepiece":
                options.update(vocab_size=vocab_size, seed=seed)
            self.tokenizer = build_tokenizer(tokenizer, self.train_items, **options)
            log.info("built %r from %d training items", self.tokenizer, len(self.train_items))
            if tokenizer_dir is not None:
                self.tokenizer.save(tokenizer_dir)
        self.val_items: list[dict] | None = None
        self.test_items: list[dict] | None = None
        self.train_sampler: BucketBatchSampler | None = None
        self._pending_sampler_state: dict | None = None

    # ----------------------------------------------------------------------------------------------- reading
    def _read(self, split: str, manifest: str) -> list[dict]:
        require = tuple(f for f in (self._text_field, self.units_field) if f)
        report = SkipReport()
        validate = None
        if self.tokenizer is not None:
            tokenizer = self.tokenizer

            def validate(item: dict) -> None:
                tokenizer.encode(item.get(tokenizer.field) or "")

        items = read_manifest(
            manifest,
            require=require,
            on_error=self.on_error,
            check_audio=self.check_audio,
            report=report,
            validate=validate,
            where=self._keep,
        )
        if report.filtered:
            log.warning(
                "%s: filtered out %d of %d items (min_duration=%s, max_duration=%s, languages=%s)",
                split,
                report.filtered,
                report.lines,
                self.min_duration,
                self.max_duration,
                self.languages,
            )
        if not items:
            raise ValueError(
                f"{split} manifest {manifest}: no items left after validation and filtering "
                f"({report.summary()}; min_duration={self.min_duration}, max_duration="
                f"{self.max_duration}, languages={self.languages}) -> check the manifest and filters"
            )
        return items

    def _keep(self, item: dict) -> bool:
        seconds = float(item["duration"])
        if seconds < self.min_duration or (self.max_duration is not None and seconds > self.max_duration):
            return False
        return self.languages is None or item.get("language") in self.languages

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.val_manifest and self.val_items is None:
            self.val_items = self._read("val", self.val_manifest)
        if stage in (None, "test") and self.test_manifest and self.test_items is None:
            self.test_items = self._read("test", self.test_manifest)

    # ----------------------------------------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _dataset(self, items: list[dict]) -> AudioDataset:
        return AudioDataset(
            items,
            self.sample_rate,
            tokenizer=self.tokenizer,
            units_field=self.units_field,
            max_seconds=self.max_seconds,
            on_error=self.on_error,
        )

    def _loader(self, dataset: AudioDataset, sampler: BucketBatchSampler) -> DataLoader:
        world_size, rank = self._world()
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=worker_context(world_size) if self.num_workers > 0 else None,
            worker_init_fn=partial(seed_worker, rank=rank),
        )

    def _durations(self, items: list[dict]) -> list[float]:
        seconds = [float(it["duration"]) for it in items]
        return seconds if self.max_seconds is None else [min(s, self.max_seconds) for s in seconds]

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._world()
        sampler = self.train_sampler
        if sampler is None or (sampler.num_replicas, sampler.rank) != (world_size, rank):
            sampler = BucketBatchSampler(
                self._durations(self.train_items),
                self.max_batch_seconds,
                max_batch_size=self.max_batch_size,
                shuffle=True,
                seed=self.seed,
                num_replicas=world_size,
                rank=rank,
            )
            if self._pending_sampler_state is not None:
                sampler.load_state_dict(self._pending_sampler_state)
                self._pending_sampler_state = None
            self.train_sampler = sampler
        return self._loader(self._dataset(self.train_items), sampler)

    def _eval_loader(self, items: list[dict] | None, split: str) -> DataLoader:
        if items is None:
            raise ValueError(f"no {split} manifest: set data.{split}_manifest (and call setup())")
        world_size, rank = self._world()
        sampler = BucketBatchSampler(
            self._durations(items),
            self.max_batch_seconds,
            max_batch_size=self.max_batch_size,
            shuffle=False,
            num_replicas=world_size,
            rank=rank,
        )
        return self._loader(self._dataset(items), sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_manifest is None:
            return []
        self.setup("validate")
        return self._eval_loader(self.val_items, "val")

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._eval_loader(self.test_items, "test")

    # ----------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """The train sampler's ``{"epoch", "seed", "position"}`` (empty before the first train loader)."""
        if self.train_sampler is not None:
            return self.train_sampler.state_dict()
        return dict(self._pending_sampler_state or {})

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the train sampler (now, or when ``train_dataloader`` builds it)."""
        if not state_dict:
            return
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state_dict)
        else:
            self._pending_sampler_state = dict(state_dict)
