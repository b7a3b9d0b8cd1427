"""Where a trained codec's reconstruction error comes from: mel distance per RVQ level count and unquantized.

For each held-out clip (the first ``--max-seconds``), decodes the codes of the first 1..n_q levels and the encoder's
*unquantized* latent, and prints the multi-scale mel distance (``speechlab.nn.spectral.MultiScaleMelLoss``, the one
``speechlab codec-eval`` reports) of each, averaged over clips. The unquantized row is the decoder's own floor: when
n_q 4 already sits on it and n_q 1 barely above, the extra levels carry detail the decoder cannot render yet.

    python recipes/mini/local/codec_levels.py recipes/mini/exp/codec/pretrained
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from speechlab.checkpoints.hf_codec import load_codec
from speechlab.data.manifest import load_item_audio, read_manifest
from speechlab.nn.spectral import MultiScaleMelLoss

DATA = Path(__file__).resolve().parents[1] / "exp" / "data"


@torch.no_grad()
def level_distances(codec, clips: list[torch.Tensor]) -> dict[str, float]:
    """``clips``: (samples,) float32 at the codec's rate -> {"n_q 1": mel, ..., "unquantized": mel}."""
    mel = MultiScaleMelLoss(codec.sample_rate)
    totals: dict[str, float] = {}
    for clip in clips:
        audio = clip[None]
        # one encoding: residual VQ's first n levels are the same codes whatever n_q it was asked for
        codes, frame_lengths = codec.encode(audio)
        rows = {f"n_q {n}": codec.decode(codes[:, :n], frame_lengths) for n in range(1, codes.shape[1] + 1)}
        latent, frame_lengths = codec.encode_latent(audio)
        rows["unquantized"] = codec.decode_latent(latent, frame_lengths)
        for name, recon in rows.items():
            totals[name] = totals.get(name, 0.0) + float(mel(recon[:, : audio.shape[1]], audio)) / len(clips)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("codec", help="a trained codec directory (exp/codec/pretrained)")
    parser.add_argument(
        "--manifest", default=str(DATA / "lj_test.jsonl"), help="held-out clips (default: lj_test)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=4.0, help="first seconds of each clip (default: 4)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    codec = load_codec(args.codec, "cpu").eval()
    items = read_manifest(args.manifest)
    clips = [torch.as_tensor(load_item_audio(item, codec.sample_rate, args.max_seconds)) for item in items]
    totals = level_distances(codec, clips)
    print(f"mel distance on {len(clips)} clips of {args.manifest} (<= {args.max_seconds:g} s each)")
    for name, value in totals.items():
        print(f"{name:>12}  {value:.3f}")


if __name__ == "__main__":
    main()
