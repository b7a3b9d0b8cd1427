"""What several ``speechlab`` tool commands share, so each command module holds only its own options and
orchestration.

* :func:`add_command` registers a command with its summary from :data:`speechlab.commands.TOOLS` (the one table
  ``speechlab --help`` lists) and the function it runs;
* option groups that mean the same in every command: :func:`add_input_choice` (a manifest or a folder),
  :func:`add_ckpt_argument` (which checkpoint of a run folder), :func:`add_device_arguments` (``--device``, and
  ``--threads``), :func:`add_window_arguments` (batching and long-input windows), :func:`add_progress_argument`;
* their run-time side: :func:`select_device`, :func:`load_source` (a model source with its ``--ckpt``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from speechlab.api import load
from speechlab.checkpoints.run_dir import resolve_source
from speechlab.commands import TOOLS

__all__ = [
    "add_command",
    "add_input_choice",
    "add_ckpt_argument",
    "add_device_arguments",
    "add_window_arguments",
    "add_progress_argument",
    "select_device",
    "load_source",
]

DEVICE_HELP = {
    "cpu": "torch device (default cpu)",
    "auto": "'auto' (GPU when present), 'cpu', 'cuda', 'cuda:1', ...",
}


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    description: str | None = None,
    doc: str | None = None,
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter,
) -> argparse.ArgumentParser:
    """The parser of command ``name`` (summary from ``TOOLS``), running ``run``. ``doc``: the module docstring as
    the description, its layout kept; else ``description`` is re-wrapped by ``formatter_class``."""
    parser = subparsers.add_parser(
        name,
        help=TOOLS[name][1],
        description=doc if doc is not None else description,
        formatter_class=argparse.RawDescriptionHelpFormatter if doc is not None else formatter_class,
    )
    parser.set_defaults(func=run)
    return parser


def add_input_choice(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    manifest_help: str,
    folder: str,
    folder_help: str,
    required: bool = True,
) -> None:
    """``--manifest`` or the folder option ``folder`` (e.g. ``--input-dir``): where the command's inputs are.
    ``required=False`` leaves the "exactly one" check to the command (for a message of its own)."""
    group = parser.add_mutually_exclusive_group(required=True) if required else parser
    group.add_argument("--manifest", help=manifest_help)
    group.add_argument(folder, help=folder_help)


def add_ckpt_argument(
    parser: argparse.ArgumentParser, help: str = "for a run folder: which checkpoint"
) -> None:
    """``--ckpt best|last``: which checkpoint of a run folder source (:func:`load_source`)."""
    parser.add_argument("--ckpt", choices=("best", "last"), default=None, help=help)


def add_device_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    default: str = "cpu",
    threads: str | None = None,
) -> None:
    """``--device`` (``default`` ``cpu`` or ``auto``) and, when ``threads`` gives its help, ``--threads``
    (torch CPU threads); :func:`select_device` applies both."""
    parser.add_argument("--device", default=default, help=DEVICE_HELP[default])
    if threads is not None:
        parser.add_argument("--threads", type=int, default=None, help=threads)


def add_window_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, batch_seconds: float
) -> None:
    """Audio seconds per forward batch, and the windows long inputs run in (``--chunk-seconds`` kept seconds with
    ``--context-seconds`` each side): the same options for feature extraction and transcription."""
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=batch_seconds,
        help="audio seconds per forward batch (bounds memory)",
    )
    parser.add_argument(
        "--chunk-seconds",
        type=float,
        default=30.0,
        help="long inputs run in windows of this many kept seconds (0 = never chunk)",
    )
    parser.add_argument(
        "--context-seconds",
        type=float,
        default=5.0,
        help="context added on each side of every window (its frames are discarded)",
    )


def add_progress_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def select_device(args: argparse.Namespace) -> str:
    """``args.device`` with ``auto`` resolved (cuda when available); ``args.threads`` (if set) applied to torch."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def load_source(source: str, ckpt: str | None = None, device: str = "cpu") -> tuple[str, nn.Module]:
    """``(what was read, the model)``: ``source`` loaded with ``speechlab.load``; a run folder gives its ``ckpt``
    checkpoint (best / last; default best if the run has one), any other source needs ``ckpt`` None."""
    resolved = resolve_source(source, ckpt)
    return resolved, load(resolved, device=device)
