"""``speechlab decode``: codec token files (from ``speechlab encode``) -> wav files, with the codec that made them.

Decode token files back to audio with the codec that made them (the header's codebook hash, sample rate and frame
rate are checked against the model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from speechlab.checkpoints.codec_tokens import TokenFileError, load_tokens
from speechlab.checkpoints.hf_codec import load_codec
from speechlab.commands import common
from speechlab.data.manifest import output_names


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab decode``."""
    dec = common.add_command(subparsers, "decode", run, doc=__doc__)
    common.add_input_choice(
        dec,
        manifest_help="manifest written by 'speechlab encode' (its 'tokens' field)",
        folder="--tokens-dir",
        folder_help="folder searched recursively for *.tokens.safetensors",
    )
    dec.add_argument("--model", required=True, help="the codec directory that encoded the tokens")
    dec.add_argument("--output-dir", required=True, help="where <id>.wav files are written")
    dec.add_argument(
        "--force", action="store_true", help="decode even if the token header names another codec"
    )
    common.add_device_arguments(dec, threads="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    device = common.select_device(args)
    codec = load_codec(args.model, device)
    if args.manifest:
        with open(args.manifest, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        root = Path(args.manifest).resolve().parent
        paths = []
        for number, rec in enumerate(records, 1):
            if "tokens" not in rec:
                raise TokenFileError(
                    f"{args.manifest}:{number}: no 'tokens' field (write it with speechlab encode)"
                )
            p = Path(rec["tokens"])
            paths.append((str(rec.get("id", p.stem)), p if p.is_absolute() else root / p))
    else:
        folder = Path(args.tokens_dir)
        files = sorted(folder.rglob("*.tokens.safetensors"))
        if not files:
            raise FileNotFoundError(f"--tokens-dir {folder}: no *.tokens.safetensors files")
        # the id keeps the sub-folder: a/x and b/x are different utterances
        paths = [(p.relative_to(folder).as_posix()[: -len(".tokens.safetensors")], p) for p in files]
    names = output_names([item_id for item_id, _ in paths], source=args.manifest or args.tokens_dir)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (_, path) in tqdm(zip(names, paths, strict=True), total=len(paths), desc="decode", unit="utt"):
        codes, info = load_tokens(path)
        if not args.force:
            info.check_compatible(codec, str(path))
        audio = codec.decode(codes[None].to(device))[0].cpu()
        if info.num_samples is not None:
            audio = audio[: info.num_samples]
        wav = out_dir / f"{name}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, audio.clamp(-1, 1).numpy(), codec.sample_rate)
    print(f"wrote {len(paths)} wav files to {out_dir}")
    return 0
