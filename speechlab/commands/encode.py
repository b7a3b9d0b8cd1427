"""``speechlab encode``: audio (a manifest or a folder) -> codec token files + a manifest.

Encode every utterance of a manifest or folder into <id>.tokens.safetensors files (codes (n_q, frames) + a header
naming the codec), and write <output-dir>/manifest.jsonl with a 'tokens' field.
The token file format is :mod:`speechlab.checkpoints.codec_tokens`; ``speechlab decode`` reads it back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from speechlab.audio import list_audio_files
from speechlab.checkpoints.codec_tokens import TokenInfo, save_tokens
from speechlab.checkpoints.hf_codec import load_codec
from speechlab.commands import common
from speechlab.data.manifest import load_item_audio, output_names, read_manifest, write_manifest


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab encode``."""
    enc = common.add_command(subparsers, "encode", run, doc=__doc__)
    common.add_input_choice(
        enc,
        manifest_help="JSON Lines manifest of the audio to encode",
        folder="--input-dir",
        folder_help="folder searched recursively for audio files (.flac, .wav, .ogg, .mp3, .opus, .aiff)",
    )
    enc.add_argument(
        "--model", required=True, help="speechlab codec directory or transformers EnCodec/DAC dir"
    )
    enc.add_argument("--output-dir", required=True, help="where token files and manifest.jsonl are written")
    enc.add_argument("--n-q", type=int, default=None, help="codebooks to keep (default: all the codec has)")
    enc.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="utterances per forward pass, sorted by length "
        "(speechlab codecs give the same codes at any batch size; HF codecs always use 1)",
    )
    enc.add_argument(
        "--units",
        action="store_true",
        help="also write level-0 codes as a space-separated "
        "'units' field (frame-level targets for SSL training)",
    )
    common.add_device_arguments(enc, threads="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    device = common.select_device(args)
    codec = load_codec(args.model, device)
    n_q = args.n_q or codec.num_quantizers
    if args.manifest:
        items = read_manifest(args.manifest, on_error="raise")
    else:
        folder = Path(args.input_dir)
        files = list_audio_files(folder)
        items = [
            {"id": p.relative_to(folder).with_suffix("").as_posix(), "audio": str(p.resolve())} for p in files
        ]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names([str(item["id"]) for item in items], source=args.manifest or args.input_dir)
    order = sorted(range(len(items)), key=lambda i: float(items[i].get("duration") or 0.0))
    batch_size = args.batch_size if not hasattr(codec, "kind") else 1  # HF codecs are not padding-invariant
    written: dict[int, dict] = {}
    with tqdm(total=len(items), desc="encode", unit="utt") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            clips = [load_item_audio(items[i], codec.sample_rate) for i in idx]
            lengths = torch.tensor([c.shape[0] for c in clips])
            audio = torch.zeros(len(clips), int(lengths.max()))
            for row, clip in enumerate(clips):
                audio[row, : clip.shape[0]] = clip
            try:
                codes, frame_lengths = codec.encode(audio.to(device), lengths.to(device), n_q=n_q)
            except ValueError as err:  # e.g. a non-finite latent: name the items, write nothing for them
                ids = [str(items[i]["id"]) for i in idx]
                raise ValueError(f"{args.model}: encoding ids {ids}: {err}") from err
            for row, i in enumerate(idx):
                name = names[i]
                frames = int(frame_lengths[row])
                info = TokenInfo.for_codec(codec, n_q, int(lengths[row]))
                path = save_tokens(out_dir / f"{name}.tokens.safetensors", codes[row, :, :frames].cpu(), info)
                record = dict(items[i])
                record["tokens"] = str(path.resolve())
                record["token_frames"] = frames
                if args.units:
                    record["units"] = " ".join(map(str, codes[row, 0, :frames].tolist()))
                written[i] = record
            bar.update(len(idx))
    manifest = write_manifest(out_dir / "manifest.jsonl", [written[i] for i in range(len(items))])
    print(
        f"wrote {len(items)} token files ({n_q} x {codec.codebook_size} codes at {codec.frame_rate:g} Hz) and "
        f"{manifest}"
    )
    return 0
