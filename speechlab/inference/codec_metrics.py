"""Codec evaluation harness: one table for any set of codecs on the same manifest (``speechlab codec-eval``).

Per codec and codebook count: bitrate, multi-scale mel distance, multi-resolution STFT distance, SI-SDR, STOI
(``pystoi``) and wide-band PESQ (``pesq``; both are dependencies, a column is left out only where the package is
missing), codebook usage (fraction of each level's codes used on the whole manifest, averaged over levels, and the
least-used level's; level-0 perplexity) and real-time factor of encode + decode.

Every codec sees the same reference clips at ``--sample-rate`` (default 16 kHz); a codec at another rate gets them
resampled and its output is resampled back, so all metrics are computed at one rate.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from speechlab.audio import resample
from speechlab.nn.spectral import MultiResolutionSTFTLoss, MultiScaleMelLoss, si_sdr


def _optional_metrics() -> dict:
    metrics = {}
    try:
        from pystoi import stoi

        metrics["stoi"] = lambda ref, deg, sr: float(stoi(ref, deg, sr, extended=False))
    except ImportError:
        pass
    try:
        from pesq import pesq

        def _pesq(ref, deg, sr):
            if sr not in (8000, 16000):
                return math.nan
            try:
                return float(pesq(sr, ref, deg, "wb" if sr == 16000 else "nb"))
            except Exception:  # pesq raises on silent / too short clips
                return math.nan

        metrics["pesq"] = _pesq
    except ImportError:
        pass
    return metrics


def build_codec(spec: str, device: str = "cpu"):
    """``spec``: a speechlab codec dir, a transformers EnCodec/DAC dir, or ``preset:<name>`` (random init)."""
    if spec.startswith("preset:"):
        from speechlab.models.codec import PRESETS, Codec

        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(f"--codec {spec}: unknown preset, choose from {sorted(PRESETS)}")
        torch.manual_seed(0)
        return Codec(PRESETS[name]()).eval().fold_weight_norm().to(device)
    from speechlab.codec_tokens import load_codec

    return load_codec(spec, device)


@torch.no_grad()
def evaluate_codec(codec, clips: list[Tensor], sample_rate: int, n_q: int | None = None) -> dict:
    """Encode + decode each clip alone; return averaged metrics. ``clips``: list of ``(samples,)`` at ``sample_rate``."""
    mel = MultiScaleMelLoss(sample_rate)
    stft = MultiResolutionSTFTLoss()
    optional = _optional_metrics()
    n_q = n_q or codec.num_quantizers
    totals: dict[str, list[float]] = {"mel_distance": [], "stft_distance": [], "si_sdr": []}
    for key in optional:
        totals[key] = []
    counts = torch.zeros(n_q, codec.codebook_size)
    seconds = elapsed = 0.0
    device = next(iter(codec.parameters())).device
    for clip in clips:
        audio = clip
        if codec.sample_rate != sample_rate:
            audio = resample(clip, sample_rate, codec.sample_rate)
        audio = audio[None].to(device)
        start = time.perf_counter()
        codes, frame_lengths = codec.encode(audio, n_q=n_q)
        recon = codec.decode(codes, frame_lengths)
        elapsed += time.perf_counter() - start
        seconds += clip.shape[0] / sample_rate
        recon = recon[0, : audio.shape[1]].float().cpu()
        if codec.sample_rate != sample_rate:
            recon = resample(recon, codec.sample_rate, sample_rate)
        recon = torch.nn.functional.pad(recon, (0, max(0, clip.shape[0] - recon.shape[0])))[: clip.shape[0]]
        ref, deg = clip[None], recon[None]
        totals["mel_distance"].append(float(mel(deg, ref)))
        totals["stft_distance"].append(float(stft(deg, ref)))
        totals["si_sdr"].append(float(si_sdr(deg, ref)[0]))
        for key, fn in optional.items():
            totals[key].append(fn(clip.numpy(), recon.numpy(), sample_rate))
        valid = codes[0, :, : int(frame_lengths[0])].cpu()
        counts.scatter_add_(1, valid, torch.ones_like(valid, dtype=counts.dtype))
    probs = counts[0] / counts[0].sum().clamp_min(1)
    row = {key: float(torch.tensor(values).nanmean()) for key, values in totals.items()}
    row.update(
        n_q=n_q,
        kbps=n_q * math.log2(codec.codebook_size) * codec.frame_rate / 1000,
        codebook_usage=float((counts > 0).float().mean()),
        usage_min=float((counts > 0).float().mean(dim=1).min()),
        perplexity_l0=float(torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())),
        rtf=elapsed / max(seconds, 1e-9),
    )
    return row


COLUMNS = [
    ("codec", "{}"),
    ("n_q", "{}"),
    ("kbps", "{:.2f}"),
    ("mel_distance", "{:.3f}"),
    ("stft_distance", "{:.3f}"),
    ("si_sdr", "{:.2f}"),
    ("stoi", "{:.3f}"),
    ("pesq", "{:.2f}"),
    ("codebook_usage", "{:.3f}"),
    ("usage_min", "{:.3f}"),
    ("perplexity_l0", "{:.1f}"),
    ("rtf", "{:.4f}"),
]


def format_table(rows: list[dict]) -> str:
    """Markdown table; columns absent from every row (e.g. PESQ without the package) are left out."""
    cols = [(name, fmt) for name, fmt in COLUMNS if any(name in r for r in rows)]
    lines = ["| " + " | ".join(name for name, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for name, fmt in cols:
            value = r.get(name)
            cells.append(
                "-"
                if value is None or (isinstance(value, float) and math.isnan(value))
                else fmt.format(value)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speechlab.audio import load_audio
    from speechlab.data.manifest import read_manifest

    if args.threads:
        torch.set_num_threads(args.threads)
    items = read_manifest(args.manifest)[: args.max_items or None]
    clips = []
    for item in tqdm(items, desc="load", unit="utt"):
        offset = float(item.get("offset", 0.0))
        duration = float(item["duration"]) if "offset" in item else None
        if args.max_seconds:
            duration = min(duration or float(item["duration"]), args.max_seconds)
        clips.append(load_audio(item["audio"], args.sample_rate, offset=offset, duration=duration))
    n_qs = [int(v) for v in args.n_q.split(",")] if args.n_q else [None]
    rows = []
    for spec in tqdm(args.codec, desc="codecs", unit="codec"):
        codec = build_codec(spec, args.device)
        allowed = (
            codec.allowed_n_q() if hasattr(codec, "allowed_n_q") else list(range(1, codec.num_quantizers + 1))
        )
        for n_q in n_qs:
            if n_q is not None and n_q not in allowed:
                print(f"skip {spec} n_q={n_q}: the codec supports {allowed}")
                continue
            rows.append({"codec": spec, **evaluate_codec(codec, clips, args.sample_rate, n_q)})
    table = format_table(rows)
    print(f"{len(clips)} clips from {args.manifest} at {args.sample_rate} Hz")
    print(table)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".json":
            out.write_text(json.dumps(rows, indent=2) + "\n")
        else:
            out.write_text(table + "\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab codec-eval``."""
    parser = subparsers.add_parser(
        "codec-eval",
        help="compare codecs on one manifest (mel/STFT distance, SI-SDR, STOI, PESQ, usage, RTF)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--manifest", required=True, help="JSON Lines manifest of reference audio")
    parser.add_argument(
        "--codec",
        action="append",
        required=True,
        help="codec to evaluate (repeat the option): a speechlab codec directory, a transformers "
        "EnCodec/DAC directory, or preset:<name> for a random-init speechlab preset",
    )
    parser.add_argument(
        "--n-q", default=None, help="comma list of codebook counts (default: each codec's all)"
    )
    parser.add_argument("--sample-rate", type=int, default=16000, help="rate the metrics are computed at")
    parser.add_argument("--max-items", type=int, default=None, help="evaluate only the first N utterances")
    parser.add_argument("--max-seconds", type=float, default=None, help="crop each utterance to N seconds")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (RTF depends on it)")
    parser.add_argument("--output", default=None, help="also write the table (.md) or the rows (.json) here")
    parser.set_defaults(func=run)
