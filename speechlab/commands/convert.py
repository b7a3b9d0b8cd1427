"""``speechlab convert SOURCE OUTPUT [--to speechlab|hf]``: ``speechlab export`` with positional paths.

Kept for the scripts and READMEs that use it: ``convert SOURCE OUTPUT --to FORMAT`` is ``export SOURCE --out OUTPUT
--format FORMAT`` (same reader, writer and round-trip check; see ``speechlab export --help``). Sources: a speechlab
pretrained dir, a Hugging Face dir or hub id (wavlm, hubert, wav2vec2, unispeech), a fairseq/unilm .pt (import
only), a Lightning .ckpt. After writing, the result is reloaded and run on a fixed test signal next to the source
and the per-layer differences are printed (``transformers`` on a Hugging Face output or source as an independent
reference); exit 1 when one exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse

from speechlab.commands import common, export


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab convert``."""
    parser = common.add_command(subparsers, "convert", run, doc=__doc__)
    export.add_source_argument(parser)
    parser.add_argument("output", help="directory to write (export's --out)")
    parser.add_argument(
        "--to",
        choices=("speechlab", "hf"),
        default="speechlab",
        help="output format (export's --format): speechlab pretrained dir (default) or Hugging Face",
    )
    export.add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``speechlab export`` with ``--out OUTPUT --format TO``."""
    return export.run(argparse.Namespace(**vars(args), out=args.output, format=args.to, ckpt=None))
