"""LibriTTS folders -> speechlab manifests (for codec training).

Reads the standard layout ``<split>/<speaker>/<chapter>/<speaker>_<chapter>_<para>_<sent>.wav`` with the transcript
next to each file as ``<id>.normalized.txt`` (falling back to ``<id>.original.txt``). LibriTTS audio is 24 kHz; the
manifests keep the files as they are and record their rate, and speechlab resamples to the model's 16 kHz on load.

    python recipes/libritts/prepare.py --root /data/LibriTTS --out recipes/libritts/data
    python recipes/libritts/prepare.py --root /data/LibriTTS --out recipes/libritts/data \\
        --merge train-960=train-clean-100,train-clean-360,train-other-500

Output: ``<out>/<split>.jsonl`` (id, audio (absolute path), duration, sample_rate, num_samples, text, speaker,
chapter, language "en"), sorted by id. Durations come from the WAV headers (parallel, ``--num-workers``). A file
without a transcript is kept with an empty text (codec training does not need it) and counted in the summary.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from speechlab.data.manifest import write_manifest  # noqa: E402

STANDARD_SPLITS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)


class PrepareError(RuntimeError):
    """A problem with the corpus folder; the message names the path and says what to do."""


def _header(path: str) -> tuple[int, int]:
    info = sf.info(path)
    return info.samplerate, info.frames


def _transcript(wav: Path) -> str | None:
    for suffix in (".normalized.txt", ".original.txt"):
        text_path = wav.with_name(wav.stem + suffix)
        if text_path.is_file():
            return " ".join(text_path.read_text(encoding="utf-8").split())
    return None


def prepare_split(folder: Path, num_workers: int = 4) -> tuple[list[dict], int]:
    """Manifest items of one split folder and the number of files without a transcript."""
    wavs = sorted(folder.rglob("*.wav"))
    if not wavs:
        raise PrepareError(f"{folder}: no .wav files found; expected <split>/<speaker>/<chapter>/<id>.wav")
    with ProcessPoolExecutor(max_workers=max(1, num_workers)) as pool:
        headers = list(pool.map(_header, [str(w) for w in wavs], chunksize=64))
    items, missing = [], 0
    for wav, (rate, frames) in zip(wavs, headers, strict=True):
        parts = wav.stem.split("_")
        if len(parts) < 2:
            raise PrepareError(f"{wav}: file name is not <speaker>_<chapter>_..._<sentence>.wav")
        text = _transcript(wav)
        missing += text is None
        items.append(
            {
                "id": f"libritts-{wav.stem}",
                "audio": str(wav.resolve()),
                "duration": round(frames / rate, 4),
                "sample_rate": rate,
                "num_samples": frames,
                "text": text or "",
                "speaker": f"libritts-{parts[0]}",
                "chapter": parts[1],
                "language": "en",
            }
        )
    return items, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="LibriTTS folder holding the split folders")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "recipes" / "libritts" / "data", help="output folder"
    )
    parser.add_argument(
        "--splits",
        default=",".join(STANDARD_SPLITS),
        help="comma list of split folders to read (missing ones are skipped with a note)",
    )
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        help="NAME=split1,split2 writes NAME.jsonl concatenating prepared splits (repeatable)",
    )
    parser.add_argument("--num-workers", type=int, default=4, help="processes reading audio headers")
    args = parser.parse_args(argv)

    if not args.root.is_dir():
        raise PrepareError(
            f"--root {args.root} is not a directory; point it at the extracted LibriTTS folder"
        )
    prepared: dict[str, list[dict]] = {}
    for split in [s for s in args.splits.split(",") if s]:
        folder = args.root / split
        if not folder.is_dir():
            print(f"{split:>16}: not found under {args.root}, skipped")
            continue
        items, missing = prepare_split(folder, args.num_workers)
        prepared[split] = items
        write_manifest(args.out / f"{split}.jsonl", items)
        hours = sum(it["duration"] for it in items) / 3600
        print(f"{split:>16}: {len(items):7d} utterances, {hours:7.2f} h, {missing} without transcript")
    for spec in args.merge:
        name, _, parts = spec.partition("=")
        absent = [p for p in parts.split(",") if p not in prepared]
        if not name or not parts or absent:
            raise PrepareError(
                f"--merge {spec!r}: expected NAME=split1,split2 of prepared splits (missing {absent})"
            )
        merged = [it for p in parts.split(",") for it in prepared[p]]
        write_manifest(args.out / f"{name}.jsonl", merged)
        print(f"{name:>16}: {len(merged):7d} utterances (merged)")
    if not prepared:
        raise PrepareError(f"{args.root}: none of the splits {args.splits} exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
