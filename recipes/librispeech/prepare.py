"""LibriSpeech (and Libri-Light limited-resource) folders -> speechlab manifests.

Reads the standard layout ``<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with one
``<speaker>-<chapter>.trans.txt`` per chapter folder (``<utt-id> TRANSCRIPT`` per line). The search is recursive,
so the Libri-Light fine-tuning sets (``librispeech_finetuning/1h/<fold>/{clean,other}/...`` and ``9h/...``)
work the same way: ``--split train-10h=/data/librispeech_finetuning`` gives the standard 10 h set (1 h + 9 h).

    python recipes/librispeech/prepare.py --root /data/LibriSpeech --out recipes/librispeech/data
    python recipes/librispeech/prepare.py --root /data/LibriSpeech --out recipes/librispeech/data \\
        --split train-10h=/data/librispeech_finetuning --merge train-960=train-clean-100,train-clean-360,train-other-500

Output: ``<out>/<split>.jsonl`` (id, audio (absolute path), duration, sample_rate, num_samples, text, speaker,
chapter, language "en"), sorted by id; merged sets concatenate splits. Durations come from the FLAC headers
(parallel, ``--num-workers``). Transcripts are kept as released (upper case); tokenizers lowercase them.
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
    """A problem with the corpus folder; the message names the file and says what to do."""


def read_transcripts(folder: Path) -> list[tuple[str, str, Path]]:
    """All ``(utt_id, text, audio_path)`` of ``*.trans.txt`` files under ``folder`` (recursive), sorted by id."""
    rows = []
    for trans in sorted(folder.rglob("*.trans.txt")):
        for number, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{utt_id}.flac"
            if not text.strip():
                raise PrepareError(
                    f"{trans}:{number}: no transcript for {utt_id!r}; expected '<utt-id> TEXT'"
                )
            if not audio.is_file():
                raise PrepareError(f"{trans}:{number}: audio {audio} is missing; re-extract the archive")
            rows.append((utt_id, text.strip(), audio))
    return sorted(rows, key=lambda row: row[0])


def _header(path: Path) -> tuple[int, int]:
    info = sf.info(str(path))
    return int(info.samplerate), int(info.frames)


def make_items(folder: Path, num_workers: int = 4) -> list[dict]:
    """Manifest items for every transcribed utterance under ``folder``."""
    rows = read_transcripts(folder)
    if not rows:
        raise PrepareError(
            f"{folder}: no '*.trans.txt' found; point --root at the folder holding the LibriSpeech splits "
            "(e.g. /data/LibriSpeech with train-clean-100/ inside)"
        )
    paths = [audio for _, _, audio in rows]
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            headers = list(pool.map(_header, paths, chunksize=256))
    else:
        headers = [_header(p) for p in paths]
    items = []
    for (utt_id, text, audio), (rate, frames) in zip(rows, headers, strict=True):
        parts = utt_id.split("-")
        items.append(
            {
                "id": utt_id,
                "audio": str(audio.resolve()),
                "duration": round(frames / rate, 3),
                "sample_rate": rate,
                "num_samples": frames,
                "text": text,
                "speaker": parts[0],
                "chapter": parts[1] if len(parts) > 2 else None,
                "language": "en",
            }
        )
    return items


def parse_named(values: list[str], what: str) -> dict[str, str]:
    named = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"--{what} {value!r}: expected NAME=VALUE")
        named[name] = rest
    return named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="LibriSpeech / Libri-Light folders -> speechlab manifests (one <split>.jsonl per split).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="LibriSpeech folder with the standard split folders inside (those found are used)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the manifests")
    parser.add_argument(
        "--splits",
        nargs="*",
        default=None,
        help=f"split folders under --root to prepare (default: those of {STANDARD_SPLITS} present)",
    )
    parser.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="an extra split from any folder (searched recursively for *.trans.txt), e.g. "
        "train-10h=/data/librispeech_finetuning; repeatable",
    )
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="NAME=A,B,...",
        help="also write NAME.jsonl concatenating prepared splits, e.g. "
        "train-960=train-clean-100,train-clean-360,train-other-500; repeatable",
    )
    parser.add_argument("--num-workers", type=int, default=4, help="processes reading FLAC headers")
    args = parser.parse_args(argv)

    folders: dict[str, Path] = {}
    if args.root is not None:
        if not args.root.is_dir():
            raise SystemExit(f"--root {args.root} is not a folder")
        names = (
            args.splits
            if args.splits is not None
            else [s for s in STANDARD_SPLITS if (args.root / s).is_dir()]
        )
        for name in names:
            if not (args.root / name).is_dir():
                raise SystemExit(
                    f"split folder {args.root / name} does not exist (have: "
                    f"{sorted(p.name for p in args.root.iterdir() if p.is_dir())})"
                )
            folders[name] = args.root / name
    folders.update({name: Path(folder) for name, folder in parse_named(args.split, "split").items()})
    if not folders:
        raise SystemExit(
            "nothing to prepare: give --root with LibriSpeech split folders inside, or --split NAME=DIR"
        )

    prepared: dict[str, list[dict]] = {}
    for name, folder in folders.items():
        items = make_items(folder, args.num_workers)
        path = write_manifest(args.out / f"{name}.jsonl", items)
        hours = sum(it["duration"] for it in items) / 3600
        print(f"{name}: {len(items)} utterances, {hours:.2f} h -> {path}")
        prepared[name] = items
    for name, parts in parse_named(args.merge, "merge").items():
        missing = [p for p in parts.split(",") if p not in prepared]
        if missing:
            raise SystemExit(
                f"--merge {name}: splits {missing} were not prepared in this run ({sorted(prepared)})"
            )
        merged = [it for p in parts.split(",") for it in prepared[p]]
        path = write_manifest(args.out / f"{name}.jsonl", merged)
        print(
            f"{name}: {len(merged)} utterances, {sum(it['duration'] for it in merged) / 3600:.2f} h -> {path}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
