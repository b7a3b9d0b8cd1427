"""Any folder of noise audio -> a noise manifest for WavLM utterance mixing (``model.mixing.noise_manifest``).

    python recipes/librispeech/prepare_noise.py --root /data/DNS-Challenge/noise --out recipes/librispeech/data/noise.jsonl
    python recipes/librispeech/prepare_noise.py --root /data/musan/noise --out noise.jsonl --max-hours 2 --max-clip-seconds 30

Every decodable audio file under ``--root`` (recursive; .wav .flac .ogg .mp3 .opus .m4a ... whatever libsndfile
reads) becomes one item (``text`` ""). The mixer keeps the whole noise bank in memory (on the GPU during
training: 1 h at 16 kHz is 230 MB of float32), so large collections are subsampled: ``--max-clip-seconds`` keeps
only the first seconds of each file (written as ``offset``/``duration``) and ``--max-hours`` keeps a random subset
of files (seeded). Silent, too short and unreadable files are skipped with a count.
"""

from __future__ import annotations

import argparse
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from speechlab.data.manifest import write_manifest  # noqa: E402

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf"}


def _probe(path: Path) -> tuple[int, int, float] | str:
    """(sample_rate, frames, peak of the first minute) or the reason the file is skipped."""
    try:
        info = sf.info(str(path))
        if info.frames == 0:
            return "empty"
        data, _ = sf.read(
            str(path), frames=min(info.frames, 60 * info.samplerate), dtype="float32", always_2d=True
        )
    except Exception as err:  # libsndfile raises several types for undecodable files
        return f"unreadable ({type(err).__name__})"
    return int(info.samplerate), int(info.frames), float(abs(data).max()) if data.size else 0.0


def make_items(
    root: Path,
    min_seconds: float = 0.5,
    max_clip_seconds: float | None = None,
    max_hours: float | None = None,
    seed: int = 0,
    num_workers: int = 4,
) -> tuple[list[dict], dict[str, int]]:
    """Noise items under ``root`` and the counts of skipped files per reason."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not paths:
        raise SystemExit(f"{root}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) found")
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            probes = list(pool.map(_probe, paths, chunksize=64))
    else:
        probes = [_probe(p) for p in paths]
    items, skipped = [], {}
    for path, probe in zip(paths, probes, strict=True):
        if isinstance(probe, str):
            skipped[probe] = skipped.get(probe, 0) + 1
            continue
        rate, frames, peak = probe
        seconds = frames / rate
        if peak == 0.0:
            skipped["silent"] = skipped.get("silent", 0) + 1
            continue
        if seconds < min_seconds:
            skipped["too short"] = skipped.get("too short", 0) + 1
            continue
        rel = path.relative_to(root).with_suffix("")
        item = {
            "id": "noise-" + "-".join(rel.parts),
            "audio": str(path.resolve()),
            "duration": round(seconds, 3),
            "sample_rate": rate,
            "num_samples": frames,
            "text": "",
            "speaker": None,
            "language": None,
        }
        if max_clip_seconds is not None and seconds > max_clip_seconds:
            item.update(offset=0.0, duration=round(max_clip_seconds, 3))
            item.pop("num_samples")
        items.append(item)
    if max_hours is not None:
        random.Random(seed).shuffle(items)
        kept, total = [], 0.0
        for item in items:
            if total >= max_hours * 3600:
                break
            kept.append(item)
            total += item["duration"]
        items = sorted(kept, key=lambda it: it["id"])
    return items, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A folder of noise audio -> noise manifest for WavLM utterance mixing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--root", type=Path, required=True, help="folder searched recursively for audio files"
    )
    parser.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="skip shorter files")
    parser.add_argument(
        "--max-clip-seconds",
        type=float,
        default=None,
        help="keep only the first seconds of longer files (bounds the in-memory noise bank)",
    )
    parser.add_argument(
        "--max-hours",
        type=float,
        default=None,
        help="keep a random subset of files totalling about this many hours",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-hours subset")
    parser.add_argument("--num-workers", type=int, default=4, help="processes reading the files")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        raise SystemExit(f"--root {args.root} is not a folder")
    items, skipped = make_items(
        args.root, args.min_seconds, args.max_clip_seconds, args.max_hours, args.seed, args.num_workers
    )
    if not items:
        raise SystemExit(f"{args.root}: no usable noise clip (skipped: {skipped})")
    write_manifest(args.out, items)
    hours = sum(it["duration"] for it in items) / 3600
    print(
        f"{len(items)} noise clips, {hours:.2f} h -> {args.out}" + (f"; skipped {skipped}" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
