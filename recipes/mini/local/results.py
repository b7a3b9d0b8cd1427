"""Print the mini recipe's results table (markdown) from the runs' CSV logs."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

# (run folder, metric, what it is)
ROWS = [
    ("ctc_phoneme", "test/per", "phoneme CTC from scratch, espeak English test PER"),
    ("ctc_phoneme", "val/per", "phoneme CTC from scratch, espeak English best val PER"),
    ("wavlm/iter1", "val/acc_masked", "WavLM pretraining (tiny), masked-unit accuracy on val (last)"),
    ("wavlm_ctc_phoneme", "test/per", "phoneme CTC fine-tuned from WavLM, espeak English test PER"),
    ("wavlm_ctc_phoneme", "val/per", "phoneme CTC fine-tuned from WavLM, espeak English best val PER"),
]


def logged_values(run: Path, metric: str) -> list[float]:
    """Every value of ``metric`` in the run's CSV logs (all versions, in order)."""
    values = []
    for metrics in sorted(
        run.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    ):
        for row in csv.DictReader(metrics.open()):
            if row.get(metric):
                values.append(float(row[metric]))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp", type=Path, default=Path(__file__).resolve().parents[1] / "exp")
    args = parser.parse_args()
    print("| run | metric | value |\n|---|---|---|")
    for run, metric, what in ROWS:
        values = logged_values(args.exp / run, metric)
        if not values:
            continue
        value = min(values) if metric.endswith("per") and metric.startswith("val/") else values[-1]
        print(f"| {what} | `{metric}` | {value:.3f} |")


if __name__ == "__main__":
    main()
