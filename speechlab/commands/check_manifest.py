"""``speechlab check-manifest``: validate manifests the way training reads them (:mod:`speechlab.data.manifest`).

Validate JSON Lines manifests the way training reads them, report every bad line (counted per reason) and exit
with status 1 if any was found.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from speechlab.audio import AudioError, audio_info
from speechlab.commands import common
from speechlab.data.manifest import (
    DEFAULT_DURATION_TOLERANCE,
    ManifestError,
    SkipReport,
    load_item_audio,
    read_manifest,
    write_manifest,
)
from speechlab.data.text import load_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab check-manifest``: validate manifests before a run (and optionally write clean copies)."""
    parser = common.add_command(subparsers, "check-manifest", run, doc=__doc__)
    parser.add_argument("manifests", nargs="+", help="manifest.jsonl files to check")
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="FIELD",
        help="optional field that must be present and non-empty (repeatable), e.g. --require text",
    )
    parser.add_argument(
        "--check-audio",
        choices=("header", "exists", "none"),
        default="header",
        help="header: open each file's header and compare rate/duration (default); exists: only check the file "
        "exists and is readable; none: no disk access",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="also decode every file completely (finds truncated files and NaN/inf samples, which headers hide); "
        "slow: reads all audio",
    )
    parser.add_argument(
        "--tokenizer-dir",
        default=None,
        help="folder with a saved tokenizer (units.json): every line's text/phonemes must encode",
    )
    parser.add_argument(
        "--duration-tolerance",
        type=float,
        default=DEFAULT_DURATION_TOLERANCE,
        help=f"seconds a manifest duration may differ from the file's (default {DEFAULT_DURATION_TOLERANCE})",
    )
    parser.add_argument(
        "--allow-outside",
        action="store_true",
        help="accept relative audio paths that leave the manifest's folder",
    )
    parser.add_argument(
        "--write-clean",
        default=None,
        metavar="SUFFIX",
        help="write the good lines of each manifest next to it as <stem><SUFFIX>: with .clean.jsonl, "
        "manifest.jsonl -> manifest.clean.jsonl",
    )


def run(args: argparse.Namespace) -> int:
    """``speechlab check-manifest``: 0 when every line of every manifest is good, 1 otherwise."""
    validate = None
    if args.tokenizer_dir:
        tokenizer = load_tokenizer(args.tokenizer_dir)

        def validate(item: dict) -> None:
            tokenizer.encode(item.get(tokenizer.field) or "")

    problems = 0
    for manifest in args.manifests:
        report = SkipReport(max_examples=10)
        try:
            items = read_manifest(
                manifest,
                require=tuple(args.require),
                on_error="skip",
                check_audio=args.check_audio,
                duration_tolerance=args.duration_tolerance,
                allow_outside=args.allow_outside,
                report=report,
                validate=validate,
            )
        except ManifestError as err:
            print(f"error: {err}")
            problems += 1
            continue
        if args.decode:
            good = []
            for item in tqdm(items, desc=f"decoding {Path(manifest).name}", unit="file"):
                try:
                    load_item_audio(item, audio_info(item["audio"])[0])  # at the file's own rate
                    good.append(item)
                except AudioError as err:
                    report.counts["undecodable_audio"] += 1
                    if len(report.examples) < report.max_examples:
                        report.examples.append(f"{manifest}: id {item['id']!r}: {err}")
            items, report.kept = good, len(good)
        print(f"{manifest}: {report.summary()}")
        for example in report.examples:
            print(f"  {example}")
        problems += report.skipped
        if args.write_clean:
            out = Path(manifest).with_name(Path(manifest).stem + args.write_clean)
            write_manifest(out, items)
            print(f"  wrote {len(items)} good lines to {out}")
    return 1 if problems else 0
