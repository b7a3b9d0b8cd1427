"""``speechlab plot RUN_DIR``: a run's training curves (its ``logs/version_*/metrics.csv``) to a PNG."""

from __future__ import annotations

import argparse

from speechlab.commands import common
from speechlab.plots import plot_curves


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab plot``."""
    parser = common.add_command(
        subparsers,
        "plot",
        run,
        description="Plot every metric logged by a speechlab run (its logs/version_*/metrics.csv) against the step.",
    )
    parser.add_argument(
        "run_dir", help="the run folder (trainer.default_root_dir), e.g. recipes/mini/exp/ctc_phoneme"
    )
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--metrics", nargs="+", help="only these metrics (default: all but learning rates)")


def run(args: argparse.Namespace) -> int:
    print(plot_curves(args.run_dir, args.out, args.metrics))
    return 0
