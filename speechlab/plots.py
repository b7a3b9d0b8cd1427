"""Plots people would rather look at than read: training curves from a run's CSV logs, and spectrograms.

:func:`plot_curves` draws one panel per metric, all logger versions of the run joined, so a resumed run shows as
one curve; ``speechlab plot RUN_DIR`` (:mod:`speechlab.commands.plot`) writes it to ``RUN_DIR/curves.png``.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402

from speechlab.atomic import atomic_write  # noqa: E402


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from every ``logs/version_*/metrics.csv`` of a run, in step order."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    files = sorted(
        Path(run_dir).glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])
    )
    if not files:
        raise FileNotFoundError(
            f"{run_dir}: no logs/version_*/metrics.csv found; is this a speechlab run folder?"
        )
    for path in files:
        for row in csv.DictReader(path.open(encoding="utf-8")):
            step = int(float(row.get("step") or 0))
            for name, value in row.items():
                if name in ("step", "epoch") or value in ("", None):
                    continue
                series[name].append((step, float(value)))
    return {name: sorted(points) for name, points in series.items()}


def plot_curves(run_dir: str | Path, out: str | Path | None = None, metrics: list[str] | None = None) -> Path:
    """Plot the run's metrics against the optimiser step; returns the PNG path."""
    series = read_metrics(run_dir)
    names = [m for m in (metrics or sorted(series)) if m in series and not m.startswith("lr-")]
    if not names:
        raise ValueError(f"{run_dir}: none of the metrics {metrics} were logged; available: {sorted(series)}")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps, values = zip(*series[name], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    with atomic_write(out) as tmp:  # creates the folder; a killed run leaves no half-written PNG
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def plot_spectrograms(
    waveforms: dict[str, torch.Tensor], out: str | Path, sample_rate: int = 16000, n_mels: int = 80
) -> Path:
    """Log-mel spectrograms of several waveforms ``{title: (samples,)}`` stacked in one PNG (e.g. input vs codec)."""
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=1024, hop_length=256, n_mels=n_mels)
    fig, axes = plt.subplots(len(waveforms), 1, figsize=(10, 2.4 * len(waveforms)), squeeze=False)
    for ax, (title, wave) in zip(axes[:, 0], waveforms.items(), strict=True):
        spec = torch.log10(mel(wave.float().flatten()) + 1e-5)
        ax.imshow(spec.numpy(), origin="lower", aspect="auto", cmap="magma")
        ax.set_title(title)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel(f"frame (hop 256 at {sample_rate} Hz)")
    fig.tight_layout()
    with atomic_write(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out)
