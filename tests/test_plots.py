import csv

import pytest
import torch

from speechlab.plots import plot_curves, plot_spectrograms, read_metrics


def _write_log(path, rows):
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss", "val/per"])
        writer.writeheader()
        writer.writerows(rows)


def test_resumed_run_logs_are_joined_in_step_order_and_plotted(tmp_path):
    _write_log(
        tmp_path / "logs/version_0/metrics.csv",
        [{"step": 9, "train/loss": 3.0}, {"step": 19, "val/per": 0.9}],
    )
    _write_log(tmp_path / "logs/version_1/metrics.csv", [{"step": 29, "train/loss": 1.0}])
    series = read_metrics(tmp_path)
    assert series["train/loss"] == [(9, 3.0), (29, 1.0)]
    assert series["val/per"] == [(19, 0.9)]
    png = plot_curves(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    elsewhere = plot_curves(tmp_path, tmp_path / "plots" / "run.png")  # a folder that does not exist yet
    assert elsewhere.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_logs_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_metrics(tmp_path)


def test_spectrogram_plot_writes_a_png(tmp_path):
    out = plot_spectrograms({"a": torch.randn(16000), "b": torch.randn(8000)}, tmp_path / "s.png")
    assert out.stat().st_size > 1000
