#!/usr/bin/env python
"""Common Voice -> speechlab manifests (one JSON-lines file per split).

Reads one language folder of a standard Common Voice release::

    <cv_dir>/clips/*.mp3
    <cv_dir>/validated.tsv  train.tsv  dev.tsv  test.tsv   (tab-separated: client_id, path, sentence, ..., locale)

and writes ``<out>/<split>.jsonl`` with ``id, audio, duration, sample_rate, num_samples, text, raw_text, speaker,
language`` and, when a grapheme-to-phoneme step is available, ``phonemes`` (space-separated phones).

Phonemes come from espeak-ng through the ``phonemizer`` package (``pip install phonemizer`` plus the ``espeak-ng``
system package); without it, ``--units auto`` falls back to characters (the normalised ``text``) and says so. The
UniSpeech recipe trains on phonemes (PER); the character fallback gives CER instead.

Audio is decoded with soundfile (libsndfile >= 1.1 reads MP3). ``--to-flac`` decodes each clip once, resamples it
to 16 kHz mono and stores FLAC under ``<out>/audio/`` so training does not decode MP3 at every epoch.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
import unicodedata
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from speechlab.audio import AudioError, audio_info, load_audio
from speechlab.data.manifest import write_manifest

REQUIRED_COLUMNS = ("path", "sentence")
# Common Voice locale -> espeak-ng voice where they differ (others are used as they are).
ESPEAK_LANGUAGES = {
    "en": "en-us",
    "fr": "fr-fr",
    "es": "es",
    "pt": "pt",
    "zh-CN": "cmn",
    "fa": "fa",
    "ky": "ky",
}


def normalize_text(sentence: str) -> str:
    """NFKC, lower case, keep letters, combining marks, digits and apostrophes; collapse spaces."""
    text = unicodedata.normalize("NFKC", sentence).lower().replace("’", "'")
    kept = [ch if (unicodedata.category(ch)[0] in "LMN" or ch == "'") else " " for ch in text]
    return re.sub(r"\s+", " ", "".join(kept)).strip()


def read_split(tsv: Path) -> list[dict]:
    """Rows of a Common Voice TSV as dicts; a missing file or column is a clear error."""
    if not tsv.is_file():
        raise SystemExit(
            f"{tsv}: not found. Point cv_dir at one language folder of a Common Voice release "
            "(it holds clips/ and validated.tsv, train.tsv, dev.tsv, test.tsv), or choose --splits that exist."
        )
    with tsv.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(
                f"{tsv}: missing column(s) {missing}; found {reader.fieldnames}. Is this a CV TSV?"
            )
        return list(reader)


def make_phonemizer(language: str):
    """Return ``texts -> list of space-separated phone strings`` using phonemizer/espeak-ng, or None if absent."""
    try:
        from phonemizer import phonemize
        from phonemizer.separator import Separator
    except ImportError:
        return None
    voice = ESPEAK_LANGUAGES.get(language, language)

    def run(texts: list[str]) -> list[str]:
        phones = phonemize(
            texts,
            language=voice,
            backend="espeak",
            separator=Separator(phone=" ", word=" ", syllable=""),
            strip=True,
            preserve_punctuation=False,
            with_stress=False,
            njobs=1,
        )
        return [re.sub(r"\s+", " ", p).strip() for p in phones]

    return run


def prepare(args: argparse.Namespace) -> dict[str, int]:
    cv_dir, out = Path(args.cv_dir), Path(args.out)
    clips = cv_dir / "clips"
    if not clips.is_dir():
        raise SystemExit(f"{clips}: not a folder. cv_dir must be a Common Voice language folder with clips/.")
    validated = {row["path"] for row in read_split(cv_dir / "validated.tsv")} if args.only_validated else None

    phonemizer = None
    if args.units in ("auto", "phonemes"):
        phonemizer = make_phonemizer(args.language or "")
        if phonemizer is None and args.units == "phonemes":
            raise SystemExit(
                "--units phonemes needs the 'phonemizer' package and espeak-ng (pip install phonemizer; "
                "apt-get install espeak-ng); use --units chars to train on characters instead."
            )
    print(
        "units: phonemes (espeak-ng via phonemizer)"
        if phonemizer
        else "units: characters (no phonemizer found)",
        file=sys.stderr,
    )

    counts = {}
    for split in args.splits:
        rows = read_split(cv_dir / f"{split}.tsv")
        if validated is not None:
            rows = [r for r in rows if r["path"] in validated]
        if split == "train" and args.train_hours is not None:
            random.Random(args.seed).shuffle(rows)
        items, total_seconds, skipped = [], 0.0, 0
        for row in tqdm(rows, desc=f"{split}", unit="clip", disable=args.quiet):
            if split == "train" and args.train_hours is not None and total_seconds >= args.train_hours * 3600:
                break
            source = clips / row["path"]
            try:
                if args.to_flac:
                    samples = load_audio(source, sample_rate=16000)
                    target = out / "audio" / split / (Path(row["path"]).stem + ".flac")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    sf.write(str(target), samples.numpy(), 16000, format="FLAC", subtype="PCM_16")
                    audio, rate, num_samples = target.resolve(), 16000, int(samples.numel())
                else:
                    rate, num_samples, _ = audio_info(source)
                    audio = source.resolve()
            except AudioError as err:
                if not args.skip_bad_audio:
                    raise SystemExit(f"{err}\n(use --skip-bad-audio to drop such clips and go on)") from err
                skipped += 1
                continue
            text = normalize_text(row["sentence"])
            if not text:
                skipped += 1
                continue
            item = {
                "id": Path(row["path"]).stem,
                "audio": str(audio),
                "duration": round(num_samples / rate, 4),
                "sample_rate": rate,
                "num_samples": num_samples,
                "text": text,
                "raw_text": row["sentence"],
                "speaker": row.get("client_id") or None,
                "language": args.language or row.get("locale") or None,
            }
            total_seconds += item["duration"]
            items.append(item)
        if phonemizer is not None and items:
            for item, phones in zip(items, phonemizer([i["text"] for i in items]), strict=True):
                item["phonemes"] = phones
        write_manifest(out / f"{split}.jsonl", items)
        counts[split] = len(items)
        print(
            f"{split}: {len(items)} clips, {total_seconds / 3600:.2f} h, {skipped} skipped", file=sys.stderr
        )
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cv_dir", help="Common Voice language folder (contains clips/ and the *.tsv files)")
    parser.add_argument(
        "--out", required=True, help="output folder for <split>.jsonl (and audio/ with --to-flac)"
    )
    parser.add_argument(
        "--language",
        default=None,
        help="language code stored in the manifest and used for espeak-ng (e.g. cy)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["train", "dev", "test"],
        help="TSV names to convert (default: train dev test)",
    )
    parser.add_argument(
        "--units",
        choices=["auto", "phonemes", "chars"],
        default="auto",
        help="phonemes via phonemizer/espeak-ng; chars = normalised text only; auto = phonemes when available",
    )
    parser.add_argument(
        "--train-hours",
        type=float,
        default=None,
        help="keep a random subset of train of about this many hours",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --train-hours subset")
    parser.add_argument(
        "--to-flac", action="store_true", help="decode once to 16 kHz mono FLAC under <out>/audio"
    )
    parser.add_argument(
        "--only-validated", action="store_true", help="drop rows whose clip is not listed in validated.tsv"
    )
    parser.add_argument(
        "--skip-bad-audio", action="store_true", help="skip unreadable clips instead of stopping"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    prepare(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
