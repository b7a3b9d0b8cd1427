"""``speechlab extract``: layer-wise SSL features for a manifest or a folder of audio files.

One output per utterance (``<id>.npy`` holding ``(layers, frames, dim)``, or ``<id>.safetensors`` with one
``layer_<i>`` tensor ``(frames, dim)`` per layer), or shards of N utterances (``shard-00000.safetensors`` with
``<id>/layer_<i>`` keys). Resumable: finished outputs are skipped, every file is written atomically (temp file +
rename), and ``extract_info.json`` records the settings so a resumed run cannot mix layers or formats. Long files
are extracted in windows and streamed to disk (bounded memory for hour-long recordings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechlab.api import FeatureExtractor, find_encoder, load
from speechlab.commands import common
from speechlab.data.manifest import output_names
from speechlab.inference.feature_files import (
    extract_items,
    items_from_folder,
    items_from_manifest,
    write_extract_info,
)
from speechlab.tool_errors import ToolError, one_line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab extract``."""
    parser = common.add_command(subparsers, "extract", run, doc=__doc__)
    src = parser.add_argument_group("input")
    src.add_argument(
        "--model",
        required=True,
        help="speechlab pretrained dir, Hugging Face dir or hub id, or a fairseq/unilm .pt file",
    )
    common.add_input_choice(
        src,
        manifest_help="JSON Lines manifest (id, audio, optional offset/duration)",
        folder="--input-dir",
        folder_help="folder of audio files (recursive); ids are relative paths without extension",
        required=False,
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", required=True, help="where features go (created; resumable)")
    out.add_argument(
        "--layers",
        default="all",
        help="hidden-state indices: 'all' (0..L, default), 'last', or e.g. '0,6,12' (0 = Transformer "
        "input, L = last layer; negatives count from the end)",
    )
    out.add_argument(
        "--format",
        choices=("npy", "safetensors"),
        default="npy",
        help="per-utterance file type: .npy (layers, frames, dim) or .safetensors (layer_<i>)",
    )
    out.add_argument(
        "--shard-size",
        type=int,
        default=0,
        help="write shards of N utterances (shard-00000.safetensors, keys '<id>/layer_<i>') "
        "instead of one file per utterance; 0 = no sharding",
    )
    out.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored precision")
    out.add_argument("--overwrite", action="store_true", help="re-extract outputs that already exist")
    cmp = parser.add_argument_group("compute")
    common.add_device_arguments(cmp, default="auto")
    cmp.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster; features move slightly)")
    cmp.add_argument(
        "--padded-batches",
        action="store_true",
        help="pad utterances of different lengths into one batch (faster). For Base models (GroupNorm conv "
        "encoder) an utterance's features then depend on the others in its batch; by default each length runs "
        "unpadded so every file gets its single-utterance features",
    )
    common.add_window_arguments(cmp, batch_seconds=80.0)
    cmp.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="unreadable audio or bad manifest lines: stop with an error (default) or skip and count",
    )
    common.add_progress_argument(cmp)


def _parse_layers(text: str, num_layers: int) -> list[int] | None:
    if text == "all":
        return None
    if text == "last":
        return [num_layers]
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise SystemExit(
            f"--layers: expected 'all', 'last' or comma-separated integers, got {text!r}"
        ) from err


def run(args: argparse.Namespace) -> int:
    if bool(args.manifest) == bool(args.input_dir):
        print("speechlab extract: give exactly one of --manifest or --input-dir", file=sys.stderr)
        return 2
    device = common.select_device(args)
    # A ManifestError / FileNotFoundError names the file and the fix; the tool error boundary prints it.
    items = (
        items_from_manifest(args.manifest, args.on_error)
        if args.manifest
        else items_from_folder(args.input_dir)
    )
    output_names(
        [item.id for item in items], source=args.manifest or args.input_dir
    )  # before the model loads
    model = load(args.model, device=device)
    layers = _parse_layers(args.layers, find_encoder(model).config.num_layers)
    extractor = FeatureExtractor(
        model,
        layers=layers,
        device=device,
        exact=not args.padded_batches,
        bf16=args.bf16,
        batch_seconds=args.batch_seconds,
        chunk_seconds=args.chunk_seconds if args.chunk_seconds > 0 else None,
        context_seconds=args.context_seconds,
    )
    output_dir = Path(args.output_dir)
    fmt = "safetensors" if args.shard_size > 0 else args.format
    info = {
        "model": str(args.model),
        "layers": list(extractor.layers),
        "format": fmt,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "frame_rate": 16000 / extractor.hop,
        "hidden_size": extractor.encoder.config.hidden_size,
        "layout": "(layers, frames, dim)" if fmt == "npy" else "layer_<i>: (frames, dim)",
    }
    write_extract_info(output_dir, info, args.overwrite)
    try:
        report = extract_items(
            extractor,
            items,
            output_dir,
            fmt=fmt,
            dtype=args.dtype,
            shard_size=args.shard_size,
            batch_seconds=args.batch_seconds,
            on_error=args.on_error,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except Exception as err:
        raise ToolError(
            f"{one_line(err)} -> re-run to resume; pass --on-error skip to skip unreadable files"
        ) from err
    print(
        f"extracted {report.done} utterances ({report.audio_seconds:.1f} s of audio) to {output_dir}; "
        f"{report.skipped_existing} already done, {report.failed} skipped after errors"
    )
    for line in (report.failures or [])[:10]:
        print(f"  skipped {line}")
    return 0
