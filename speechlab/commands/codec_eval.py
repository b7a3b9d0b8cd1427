"""``speechlab codec-eval``: compare codecs on one manifest (the metrics: :mod:`speechlab.inference.codec_metrics`).

Per codec and codebook count: bitrate, multi-scale mel distance, multi-resolution STFT distance, SI-SDR, STOI
(``pystoi``), wide-band PESQ (``pesq``), codebook usage (fraction of each level's codes used on the whole manifest,
averaged over levels, and the least-used level's; level-0 perplexity) and real-time factor of encode + decode.
Every codec sees the same reference clips at ``--sample-rate`` (default 16 kHz); a codec at another rate gets them
resampled and its output is resampled back, so all metrics are computed at one rate.
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from speechlab.atomic import write_text
from speechlab.commands import common
from speechlab.data.manifest import load_item_audio, read_manifest
from speechlab.inference.codec_metrics import build_codec, evaluate_codec, format_table


def run(args: argparse.Namespace) -> int:
    device = common.select_device(args)
    items = read_manifest(args.manifest)[: args.max_items or None]
    clips = []
    for item in tqdm(items, desc="load", unit="utt"):
        clips.append(load_item_audio(item, args.sample_rate, args.max_seconds or None))
    n_qs = [int(v) for v in args.n_q.split(",")] if args.n_q else [None]
    rows = []
    for spec in tqdm(args.codec, desc="codecs", unit="codec"):
        codec = build_codec(spec, device)
        allowed = (
            codec.allowed_n_q() if hasattr(codec, "allowed_n_q") else list(range(1, codec.num_quantizers + 1))
        )
        for n_q in n_qs:
            if n_q is not None and n_q not in allowed:
                print(f"skip {spec} n_q={n_q}: the codec supports {allowed}")
                continue
            rows.append({"codec": spec, **evaluate_codec(codec, clips, args.sample_rate, n_q)})
    table = format_table(rows)
    print(f"{len(clips)} clips from {args.manifest} at {args.sample_rate} Hz")
    print(table)
    if args.output:
        text = json.dumps(rows, indent=2) if args.output.endswith(".json") else table
        write_text(args.output, text + "\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab codec-eval``."""
    parser = common.add_command(subparsers, "codec-eval", run, doc=__doc__)
    parser.add_argument("--manifest", required=True, help="JSON Lines manifest of reference audio")
    parser.add_argument(
        "--codec",
        action="append",
        required=True,
        help="codec to evaluate (repeat the option): a speechlab codec directory, a transformers "
        "EnCodec/DAC directory, or preset:<name> for a random-init speechlab preset",
    )
    parser.add_argument(
        "--n-q", default=None, help="comma list of codebook counts (default: each codec's all)"
    )
    parser.add_argument("--sample-rate", type=int, default=16000, help="rate the metrics are computed at")
    parser.add_argument("--max-items", type=int, default=None, help="evaluate only the first N utterances")
    parser.add_argument("--max-seconds", type=float, default=None, help="crop each utterance to N seconds")
    common.add_device_arguments(parser, threads="torch CPU threads (RTF depends on it)")
    parser.add_argument("--output", default=None, help="also write the table (.md) or the rows (.json) here")
