"""The error boundary of the ``speechlab`` tool commands (extract, kmeans, encode, decode, check-manifest, ...).

A tool that fails on bad input ends with one line on stderr, ``speechlab <command>: <what went wrong, naming the
file / item / field> -> <what to do>``, and exit status 2, instead of a traceback through library internals.
``--debug`` (accepted by every tool command) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["EXIT_BAD_INPUT", "ToolError", "add_debug_argument", "run_tool"]

EXIT_BAD_INPUT = 2


class ToolError(RuntimeError):
    """A tool command cannot go on; the message names the file / item / field and says what to do."""


# Error types whose message is written for the user (names the file / line / field and the remedy); anything
# else is shown with its type, since its message may mean little without it.
_USER_ERRORS = (
    "ToolError",
    "AudioError",
    "ManifestError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "UnknownUnitError",
)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """Give a tool's parser the ``--debug`` flag read by :func:`run_tool`."""
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the full traceback instead of one line"
    )


def one_line(error: BaseException) -> str:
    """The error as one line: its message with line breaks folded, its type named unless written for users."""
    message = "; ".join(part.strip() for part in str(error).splitlines() if part.strip())
    if type(error).__name__ not in _USER_ERRORS:
        message = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return message


def run_tool(command: str, func: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run a tool's ``func(args)``; an exception becomes one line on stderr and exit status 2 (``--debug``: raise)."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        raise
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        print(
            f"speechlab {command}: {one_line(error)} (run again with --debug for the full traceback)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
