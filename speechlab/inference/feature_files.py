"""Layer-wise SSL features of many utterances written to disk: what ``speechlab extract`` runs.

One output per utterance (``<id>.npy`` holding ``(layers, frames, dim)``, or ``<id>.safetensors`` with one
``layer_<i>`` tensor ``(frames, dim)`` per layer), or shards of N utterances (``shard-00000.safetensors`` with
``<id>/layer_<i>`` keys). Resumable: finished outputs are skipped, every file is written atomically (temp file +
rename), and ``extract_info.json`` records the settings so a resumed run cannot mix layers or formats. Long files
are extracted in windows and streamed to disk (bounded memory for hour-long recordings).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from speechlab.atomic import atomic_write
from speechlab.audio import AudioError, list_audio_files, load_audio
from speechlab.data.manifest import item_segment, output_names, read_manifest

__all__ = [
    "ExtractReport",
    "Item",
    "extract_items",
    "items_from_folder",
    "items_from_manifest",
    "write_extract_info",
]

log = logging.getLogger(__name__)

INFO_NAME = "extract_info.json"


@dataclass
class Item:
    """One utterance to extract: output id, audio path and optional segment (seconds)."""

    id: str
    audio: str
    offset: float = 0.0
    duration: float | None = None


def items_from_manifest(path: str | os.PathLike, on_error: str = "raise") -> list[Item]:
    """Items of a JSON Lines manifest (``id``, ``audio``, optional ``offset`` / ``duration`` of a segment)."""
    items = []
    for entry in read_manifest(path, on_error=on_error, check_audio="exists"):
        items.append(Item(str(entry["id"]), entry["audio"], *item_segment(entry)))
    return items


def items_from_folder(folder: str | os.PathLike) -> list[Item]:
    """Every audio file under ``folder`` (:func:`speechlab.audio.list_audio_files`); the id is the relative path
    without extension."""
    folder = Path(folder)
    return [Item(p.relative_to(folder).with_suffix("").as_posix(), str(p)) for p in list_audio_files(folder)]


# ------------------------------------------------------------------------------------------------ writing


def output_path(output_dir: Path, name: str, fmt: str) -> Path:
    """``name``: from :func:`speechlab.data.manifest.output_names` (safe, distinct)."""
    return output_dir / f"{name}.{'npy' if fmt == 'npy' else 'safetensors'}"


def _write_utterance(
    path: Path, states: torch.Tensor, layers: tuple[int, ...], fmt: str, dtype: np.dtype
) -> None:
    """states: (layers, frames, dim) -> one file, atomically."""
    with atomic_write(path) as tmp:
        if fmt == "npy":
            with tmp.open("wb") as handle:
                np.save(handle, states.numpy().astype(dtype, copy=False))
        else:
            torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
            tensors = {
                f"layer_{layer}": states[i].to(torch_dtype).contiguous() for i, layer in enumerate(layers)
            }
            save_file(tensors, str(tmp), metadata={"layers": json.dumps(list(layers))})


def _stream_long(
    extractor: Any, item: Item, wave: torch.Tensor, path: Path, fmt: str, dtype: np.dtype
) -> None:
    """Chunked extraction of one long input streamed into a memory-mapped .npy (bounded RAM)."""
    frames = extractor.num_frames(wave.numel())
    shape = (len(extractor.layers), frames, extractor.encoder.config.hidden_size)
    if fmt == "npy":
        with atomic_write(path) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            for start, states in extractor.iter_chunks(wave):
                check_finite_features(item, states)
                array[:, start : start + states.shape[1]] = states.numpy().astype(dtype, copy=False)
            array.flush()
            del array
        return
    # safetensors needs the whole tensor at once; assemble per layer (memory = the output itself)
    out = torch.empty(shape, dtype=torch.float16 if dtype == np.float16 else torch.float32)
    for start, states in extractor.iter_chunks(wave):
        check_finite_features(item, states)
        out[:, start : start + states.shape[1]] = states
    _write_utterance(path, out, extractor.layers, fmt, dtype)


# ------------------------------------------------------------------------------------------------ main loop


@dataclass
class ExtractReport:
    done: int = 0
    skipped_existing: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    failures: list[str] | None = None


def _load(item: Item, min_samples: int) -> torch.Tensor:
    wave = load_audio(item.audio, sample_rate=16000, offset=item.offset, duration=item.duration)
    if wave.numel() < min_samples:
        raise ValueError(
            f"{item.audio}: {wave.numel()} samples is shorter than the model's receptive field "
            f"({min_samples} samples); it gives no feature frames"
        )
    return wave


def check_finite_features(item: Item, states: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the item if ``states`` holds NaN/inf (never write them as a finished output)."""
    bad = int((~torch.isfinite(states)).sum())
    if bad:
        raise ValueError(
            f"{item.audio}: id {item.id!r}: {bad} of {states.numel()} feature values are NaN/inf; nothing was "
            "written -> the model overflows or its weights are corrupt (check it with speechlab.load and a "
            "known-good file)"
        )


def _batches(items: list[Item], batch_seconds: float) -> Iterator[list[Item]]:
    """Consecutive items in groups of about ``batch_seconds`` (by manifest duration when known)."""
    batch: list[Item] = []
    seconds = 0.0
    for item in items:
        batch.append(item)
        seconds += item.duration or 10.0
        if seconds >= batch_seconds:
            yield batch
            batch, seconds = [], 0.0
    if batch:
        yield batch


def extract_items(
    extractor: Any,
    items: list[Item],
    output_dir: str | os.PathLike,
    *,
    fmt: str = "npy",
    dtype: str = "float32",
    shard_size: int = 0,
    batch_seconds: float = 80.0,
    on_error: str = "raise",
    overwrite: bool = False,
    progress: bool = True,
) -> ExtractReport:
    """Extract ``items`` with ``extractor`` (a :class:`speechlab.api.FeatureExtractor`) into ``output_dir``."""
    if fmt not in ("npy", "safetensors"):
        raise ValueError(f"format must be 'npy' or 'safetensors', got {fmt!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    # every item needs its own output file: refuse ids that map to one name ('a' and './a') before writing
    names = dict(zip((id(item) for item in items), output_names([item.id for item in items]), strict=True))
    np_dtype = np.dtype(dtype)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = ExtractReport(failures=[])
    threshold = extractor.chunk_threshold

    if shard_size > 0:
        units = [
            (output_dir / f"shard-{k:05d}.safetensors", items[s : s + shard_size])
            for k, s in enumerate(range(0, len(items), shard_size))
        ]
    else:
        units = [(output_path(output_dir, names[id(item)], fmt), [item]) for item in items]
    todo = []
    for path, group in units:
        if path.exists() and not overwrite:
            report.skipped_existing += len(group)
        else:
            todo.append((path, group))

    bar = tqdm(total=sum(len(g) for _, g in todo), unit="utt", desc="extract", disable=not progress)

    def fail(item: Item, err: Exception) -> None:
        if on_error == "raise":
            bar.close()
            raise err
        report.failed += 1
        report.failures.append(f"{item.id}: {err}")
        log.warning("skipping %s: %s", item.id, err)

    def run_batch(batch: list[tuple[Item, torch.Tensor]]) -> list[tuple[Item, torch.Tensor]]:
        """-> [(item, (layers, frames, dim))] for the short items of a batch."""
        if not batch:
            return []
        features = extractor([wave for _, wave in batch])
        return [(item, states) for (item, _), states in zip(batch, features.unpad(), strict=True)]

    try:
        if shard_size > 0:
            for path, group in todo:
                loaded = []
                for item in group:
                    try:
                        loaded.append((item, _load(item, extractor.receptive_field)))
                    except (AudioError, OSError, ValueError) as err:
                        fail(item, err)
                tensors: dict[str, torch.Tensor] = {}
                shard_ids: list[str] = []  # the items whose features are in the shard
                torch_dtype = torch.float16 if np_dtype == np.float16 else torch.float32
                for chunk in _batches([i for i, _ in loaded], batch_seconds):
                    waves = {i.id: w for i, w in loaded if i in chunk}
                    for item, states in run_batch([(i, waves[i.id]) for i in chunk]):
                        try:
                            check_finite_features(item, states)
                        except ValueError as err:
                            fail(item, err)
                            continue
                        for row, layer in enumerate(extractor.layers):
                            tensors[f"{item.id}/layer_{layer}"] = states[row].to(torch_dtype).contiguous()
                        shard_ids.append(item.id)
                        report.audio_seconds += waves[item.id].numel() / 16000
                        report.done += 1
                bar.update(len(group))
                meta = {
                    "ids": json.dumps(shard_ids),
                    "layers": json.dumps(list(extractor.layers)),
                }
                with atomic_write(path) as tmp:
                    save_file(tensors, str(tmp), metadata=meta)
        else:
            pending: list[tuple[Item, torch.Tensor]] = []
            pending_seconds = 0.0

            def flush() -> None:
                nonlocal pending, pending_seconds
                for item, states in run_batch(pending):
                    try:
                        check_finite_features(item, states)
                    except ValueError as err:
                        fail(item, err)
                        continue
                    _write_utterance(
                        output_path(output_dir, names[id(item)], fmt), states, extractor.layers, fmt, np_dtype
                    )
                    report.done += 1
                bar.update(len(pending))
                pending, pending_seconds = [], 0.0

            for _, (item,) in todo:
                try:
                    wave = _load(item, extractor.receptive_field)
                except (AudioError, OSError, ValueError) as err:
                    fail(item, err)
                    bar.update(1)
                    continue
                report.audio_seconds += wave.numel() / 16000
                if threshold is not None and wave.numel() > threshold:
                    try:
                        _stream_long(
                            extractor,
                            item,
                            wave,
                            output_path(output_dir, names[id(item)], fmt),
                            fmt,
                            np_dtype,
                        )
                        report.done += 1
                    except ValueError as err:
                        fail(item, err)
                    bar.update(1)
                    continue
                pending.append((item, wave))
                pending_seconds += wave.numel() / 16000
                if pending_seconds >= batch_seconds:
                    flush()
            flush()
    finally:
        bar.close()
    return report


def write_extract_info(output_dir: Path, info: dict, overwrite: bool) -> None:
    """Record the settings in ``output_dir/extract_info.json``; refuse a resumed run with other settings."""
    path = output_dir / INFO_NAME
    if path.exists() and not overwrite:
        previous = json.loads(path.read_text())
        keys = ("layers", "format", "dtype", "shard_size", "model")
        diff = {k: (previous.get(k), info[k]) for k in keys if previous.get(k) != info[k]}
        if diff:
            raise SystemExit(
                f"{output_dir} holds features extracted with other settings {diff} (old, new); use a new "
                "--output-dir or pass --overwrite to re-extract everything."
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
