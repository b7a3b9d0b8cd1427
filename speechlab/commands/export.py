"""``speechlab export``: a finished run (or any checkpoint) -> a model directory people use.

``speechlab export RUN_OR_CKPT --out DIR [--format speechlab|hf] [--ckpt best|last] [--family NAME]``
(``speechlab convert SOURCE OUTPUT [--to speechlab|hf]`` is the same command with positional paths.)

* the source is a run folder (``trainer.default_root_dir``: ``--ckpt best`` = the best checkpoint by the task's
  monitored metric, ``last`` = ``checkpoints/last.ckpt``, default: best if the run has one, else last), a Lightning
  ``.ckpt``, or anything else ``speechlab.load`` reads;
* ``--format speechlab`` (default) writes our pretrained directory, every family (CTC with its tokenizer);
* ``--format hf`` writes a transformers directory: CTC models as ``WavLMForCTC`` / ``HubertForCTC`` with
  vocabulary, tokenizer and feature-extractor configs (``transformers.pipeline("automatic-speech-recognition",
  model=DIR)`` transcribes with it), SSL encoders as ``WavLMModel`` / ``HubertModel``.

After writing, the result is reloaded and run on a fixed test signal next to the source, and a round-trip report
is printed: the largest absolute difference of the outputs (CTC logits, per-layer hidden states, codec
reconstructions), with ``transformers`` itself as the reference for Hugging Face exports and Hugging Face sources,
plus the greedy transcripts of both sides for CTC models. The command fails (exit 1) when a difference exceeds
``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechlab.checkpoints.export import export, source_family
from speechlab.commands import common
from speechlab.inference.round_trip import round_trip_report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab export``."""
    parser = common.add_command(subparsers, "export", run, doc=__doc__)
    add_source_argument(parser)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--format",
        choices=("speechlab", "hf"),
        default="speechlab",
        help="speechlab pretrained directory (default) or Hugging Face (CTC: WavLMForCTC / HubertForCTC + "
        "tokenizer + feature extractor; encoders: WavLMModel / HubertModel)",
    )
    common.add_ckpt_argument(
        parser,
        "for a run folder: its best checkpoint (by the task's monitored metric) or last.ckpt "
        "(default: best if the run has one, else last)",
    )
    add_common_arguments(parser)


def add_source_argument(parser: argparse.ArgumentParser) -> None:
    """The checkpoint to read (``speechlab convert`` reads the same sources)."""
    parser.add_argument(
        "source",
        help="a run folder (trainer.default_root_dir), a Lightning .ckpt, or any source speechlab.load reads "
        "(speechlab pretrained dir, Hugging Face dir or hub id, fairseq/unilm .pt)",
    )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``speechlab convert`` shares with ``export``."""
    parser.add_argument(
        "--family",
        help="family name stored in a speechlab config.json (default: the source's own for an SSL backbone, "
        "e.g. wav2vec2, else from the model: ctc, wavlm, hubert, unispeech, codec)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed max-abs difference in the round-trip report (exit 1 above it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(
            f"speechlab {getattr(args, 'command', 'export')}: {out} exists and is not empty; pass --overwrite",
            file=sys.stderr,
        )
        return 2
    source, model = common.load_source(args.source, args.ckpt)
    family = args.family or source_family(model, source)
    path = export(model, out, args.format, family=family)
    written = "Hugging Face" if args.format == "hf" else f"speechlab (family {family})"
    print(f"read {source}; wrote a {written} directory {path}")
    worst = round_trip_report(model, path, args.format, source=source)
    status = "OK" if worst <= args.tolerance else "FAILED"
    print(f"{status}: largest difference {worst:.3e} (tolerance {args.tolerance:.0e})")
    return 0 if worst <= args.tolerance else 1
