"""The ``speechlab`` command.

``speechlab fit|validate|test --config conf.yaml`` train and evaluate any task through LightningCLI (one Trainer
setup for every task, see :mod:`speechlab.train` and :mod:`speechlab.lightning_cli`); the other subcommands are
tools (feature extraction, k-means units, codec tokenization, checkpoint conversion and export, transcription),
one module each in :mod:`speechlab.commands`.

Start-up stays fast: this module imports neither torch nor Lightning. ``speechlab --help`` and ``--version`` are
answered from the table below, a tool command imports only its own module, and Lightning is imported only for
fit / validate / test / predict.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from speechlab import __version__
from speechlab.commands import TOOLS
from speechlab.tool_errors import add_debug_argument, run_tool

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# Modules that register tool subcommands through ``add_parser(subparsers)``.
TOOL_MODULES = tuple(dict.fromkeys(module for module, _ in TOOLS.values()))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("speechlab")
    except Exception:  # not installed as a package (a plain checkout on PYTHONPATH)
        return __version__


def _base_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(
        prog="speechlab",
        description=(
            "speechlab: WavLM, UniSpeech and neural-codec training and tools.\n\n"
            "Training: speechlab fit|validate|test --config CONF.yaml [--ckpt_path last|best] "
            "(see 'speechlab fit --help')."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"speechlab {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_SUBCOMMANDS[:3]:
        subparsers.add_parser(
            name, help=f"{name} a task from a YAML config (LightningCLI; --help for options)"
        )
    return parser, subparsers


def _tool_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The tool parser with every tool (default) or only the modules of ``commands`` imported; the other tools
    are listed by their summary so that ``--help`` still shows them."""
    parser, subparsers = _base_parser()
    wanted = TOOL_MODULES if commands is None else tuple(dict.fromkeys(TOOLS[c][0] for c in commands))
    for module_name in wanted:
        importlib.import_module(module_name).add_parser(subparsers)
    for name, (_, summary) in TOOLS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=summary)
    for name, tool in subparsers.choices.items():
        if name not in LIGHTNING_SUBCOMMANDS:
            add_debug_argument(tool)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from speechlab.lightning_cli import run  # local: Lightning only for fit/validate/test (fast --help)

        return run(argv)
    parser = _tool_parser([argv[0]] if argv and argv[0] in TOOLS else [])
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    return run_tool(args.command, args.func, args)


def __getattr__(name: str) -> Any:
    if name == "SpeechLabCLI":  # kept importable from here; defined where Lightning is imported
        from speechlab.lightning_cli import SpeechLabCLI  # local: imports Lightning (fast --help)

        return SpeechLabCLI
    raise AttributeError(f"module 'speechlab.cli' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
