"""``speechlab extract``: layer-wise SSL features for a manifest or a folder of audio files.

One output per utterance (``<id>.npy`` holding ``(layers, frames, dim)``, or ``<id>.safetensors`` with one
``layer_<i>`` tensor ``(frames, dim)`` per layer), or shards of N utterances (``shard-00000.safetensors`` with
``<id>/layer_<i>`` keys). Resumable: finished outputs are skipped, every file is written atomically (temp file +
rename), and ``extract_info.json`` records the settings so a resumed run cannot mix layers or formats. Long files
are extracted in windows and streamed to disk (bounded memory for hour-long recordings).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
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
    from speechlab.data.manifest import read_manifest

    items = []
    for entry in read_manifest(path, on_error=on_error, check_audio="exists"):
        offset = float(entry.get("offset", 0.0) or 0.0)
        duration = entry.get("duration") if "offset" in entry else None
        items.append(Item(str(entry["id"]), entry["audio"], offset, duration))
    return items


def items_from_folder(
    folder: str | os.PathLike, extensions: tuple[str, ...] = AUDIO_EXTENSIONS
) -> list[Item]:
    """Every audio file under ``folder`` (recursive, sorted); the id is the relative path without extension."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise FileNotFoundError(f"{folder}: no audio files with extensions {', '.join(extensions)}")
    return [Item(p.relative_to(folder).with_suffix("").as_posix(), str(p)) for p in files]


# ------------------------------------------------------------------------------------------------ writing


def output_path(output_dir: Path, name: str, fmt: str) -> Path:
    """``name``: from :func:`speechlab.data.manifest.output_names` (safe, distinct)."""
    return output_dir / f"{name}.{'npy' if fmt == 'npy' else 'safetensors'}"


def _write_utterance(
    path: Path, states: torch.Tensor, layers: tuple[int, ...], fmt: str, dtype: np.dtype
) -> None:
    """states: (layers, frames, dim) -> one file, atomically."""
    from speechlab.checkpoints.pretrained_dir import atomic_write

    with atomic_write(path) as tmp:
        if fmt == "npy":
            with tmp.open("wb") as handle:
                np.save(handle, states.numpy().astype(dtype, copy=False))
        else:
            from safetensors.torch import save_file

            torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
            tensors = {
                f"layer_{layer}": states[i].to(torch_dtype).contiguous() for i, layer in enumerate(layers)
            }
            save_file(tensors, str(tmp), metadata={"layers": json.dumps(list(layers))})


def _stream_long(
    extractor: Any, item: Item, wave: torch.Tensor, path: Path, fmt: str, dtype: np.dtype
) -> None:
    """Chunked extraction of one long input streamed into a memory-mapped .npy (bounded RAM)."""
    from speechlab.checkpoints.pretrained_dir import atomic_write

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
    from speechlab.audio import load_audio

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
    from tqdm.auto import tqdm

    from speechlab.audio import AudioError

    if fmt not in ("npy", "safetensors"):
        raise ValueError(f"format must be 'npy' or 'safetensors', got {fmt!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    from speechlab.data.manifest import output_names

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
                from safetensors.torch import save_file

                from speechlab.checkpoints.pretrained_dir import atomic_write

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


# ------------------------------------------------------------------------------------------------ CLI


def _parse_layers(text: str, num_layers: int) -> list[int] | None:
    if text == "all":
        return None
    if text == "last":
        return [num_layers]
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise SystemExit(
            f"--layers: expected 'all', 'last' or comma-separated integers, got {text!r}"
        ) from err


def _check_info(output_dir: Path, info: dict, overwrite: bool) -> None:
    from speechlab.checkpoints.pretrained_dir import atomic_write

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


def run(args: argparse.Namespace) -> int:
    from speechlab.api import FeatureExtractor, find_encoder, load
    from speechlab.data.manifest import output_names
    from speechlab.tool_errors import ToolError, one_line

    if bool(args.manifest) == bool(args.input_dir):
        print("speechlab extract: give exactly one of --manifest or --input-dir", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # A ManifestError / FileNotFoundError names the file and the fix; the tool error boundary prints it.
    items = (
        items_from_manifest(args.manifest, args.on_error)
        if args.manifest
        else items_from_folder(args.input_dir)
    )
    output_names(
        [item.id for item in items], source=args.manifest or args.input_dir
    )  # before the model loads
    model = load(args.model, device=device)
    layers = _parse_layers(args.layers, find_encoder(model).config.num_layers)
    extractor = FeatureExtractor(
        model,
        layers=layers,
        device=device,
        exact=not args.padded_batches,
        bf16=args.bf16,
        batch_seconds=args.batch_seconds,
        chunk_seconds=args.chunk_seconds if args.chunk_seconds > 0 else None,
        context_seconds=args.context_seconds,
    )
    output_dir = Path(args.output_dir)
    fmt = "safetensors" if args.shard_size > 0 else args.format
    info = {
        "model": str(args.model),
        "layers": list(extractor.layers),
        "format": fmt,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "frame_rate": 16000 / extractor.hop,
        "hidden_size": extractor.encoder.config.hidden_size,
        "layout": "(layers, frames, dim)" if fmt == "npy" else "layer_<i>: (frames, dim)",
    }
    _check_info(output_dir, info, args.overwrite)
    try:
        report = extract_items(
            extractor,
            items,
            output_dir,
            fmt=fmt,
            dtype=args.dtype,
            shard_size=args.shard_size,
            batch_seconds=args.batch_seconds,
            on_error=args.on_error,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except Exception as err:
        raise ToolError(
            f"{one_line(err)} -> re-run to resume; pass --on-error skip to skip unreadable files"
        ) from err
    print(
        f"extracted {report.done} utterances ({report.audio_seconds:.1f} s of audio) to {output_dir}; "
        f"{report.skipped_existing} already done, {report.failed} skipped after errors"
    )
    for line in (report.failures or [])[:10]:
        print(f"  skipped {line}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab extract``."""
    parser = subparsers.add_parser(
        "extract",
        help="extract layer-wise SSL features for a manifest or a folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input")
    src.add_argument(
        "--model",
        required=True,
        help="speechlab pretrained dir, Hugging Face dir or hub id, or a fairseq/unilm .pt file",
    )
    src.add_argument("--manifest", help="JSON Lines manifest (id, audio, optional offset/duration)")
    src.add_argument(
        "--input-dir", help="folder of audio files (recursive); ids are relative paths without extension"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", required=True, help="where features go (created; resumable)")
    out.add_argument(
        "--layers",
        default="all",
        help="hidden-state indices: 'all' (0..L, default), 'last', or e.g. '0,6,12' (0 = Transformer "
        "input, L = last layer; negatives count from the end)",
    )
    out.add_argument(
        "--format",
        choices=("npy", "safetensors"),
        default="npy",
        help="per-utterance file type: .npy (layers, frames, dim) or .safetensors (layer_<i>)",
    )
    out.add_argument(
        "--shard-size",
        type=int,
        default=0,
        help="write shards of N utterances (shard-00000.safetensors, keys '<id>/layer_<i>') "
        "instead of one file per utterance; 0 = no sharding",
    )
    out.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored precision")
    out.add_argument("--overwrite", action="store_true", help="re-extract outputs that already exist")
    cmp = parser.add_argument_group("compute")
    cmp.add_argument(
        "--device", default="auto", help="'auto' (GPU when present), 'cpu', 'cuda', 'cuda:1', ..."
    )
    cmp.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster; features move slightly)")
    cmp.add_argument(
        "--batch-seconds", type=float, default=80.0, help="audio seconds per forward batch (bounds memory)"
    )
    cmp.add_argument(
        "--padded-batches",
        action="store_true",
        help="pad utterances of different lengths into one batch (faster). For Base models (GroupNorm conv "
        "encoder) an utterance's features then depend on the others in its batch; by default each length runs "
        "unpadded so every file gets its single-utterance features",
    )
    cmp.add_argument(
        "--chunk-seconds",
        type=float,
        default=30.0,
        help="long files are extracted in windows of this many kept seconds (0 = never chunk)",
    )
    cmp.add_argument(
        "--context-seconds",
        type=float,
        default=5.0,
        help="context added on each side of every window (its frames are discarded)",
    )
    cmp.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="unreadable audio or bad manifest lines: stop with an error (default) or skip and count",
    )
    cmp.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(argv: list[str] | None = None) -> int:
    from speechlab.tool_errors import add_debug_argument, run_tool

    parser = argparse.ArgumentParser(
        prog="speechlab extract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    add_debug_argument(parser)
    return run_tool("extract", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
