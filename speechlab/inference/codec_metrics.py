"""Codec evaluation: one table for any set of codecs on the same clips (the library of ``speechlab codec-eval``).

Per codec and codebook count: bitrate, multi-scale mel distance, multi-resolution STFT distance, SI-SDR, STOI
(``pystoi``) and wide-band PESQ (``pesq``; both are dependencies, a column is left out only where the package is
missing), codebook usage (fraction of each level's codes used on the whole manifest, averaged over levels, and the
least-used level's; level-0 perplexity) and real-time factor of encode + decode.

Every codec sees the same reference clips at ``--sample-rate`` (default 16 kHz); a codec at another rate gets them
resampled and its output is resampled back, so all metrics are computed at one rate.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from speechlab.audio import resample
from speechlab.checkpoints.hf_codec import load_codec
from speechlab.models.codec import PRESETS, Codec
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
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(f"--codec {spec}: unknown preset, choose from {sorted(PRESETS)}")
        torch.manual_seed(0)
        return Codec(PRESETS[name]()).eval().fold_weight_norm().to(device)
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
