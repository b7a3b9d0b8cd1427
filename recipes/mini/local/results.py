"""Print the mini recipe's results (markdown) from the runs' CSV logs and the evaluation files of stages 7 and 8."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

# (run folder, metric, how to summarise its logged values, what it is)
ROWS = [
    ("ctc_phoneme", "val/per", "best", "phoneme CTC from scratch: espeak English val PER (best of the run)"),
    ("ctc_phoneme", "test/per", "last", "phoneme CTC from scratch: espeak English test PER"),
    ("ctc_phoneme_fbank", "val/per", "best", "phoneme CTC from scratch, fbank + Conformer: val PER (best)"),
    ("ctc_phoneme_fbank", "test/per", "last", "phoneme CTC from scratch, fbank + Conformer: test PER"),
    ("wavlm/iter1", "val/acc_masked", "first_last", "WavLM pretraining (tiny): val masked-unit accuracy"),
    ("wavlm/iter1", "val/loss_masked", "first_last", "WavLM pretraining (tiny): val masked-unit CE (nats)"),
    ("wavlm/iter1", "val/acc_unmasked", "first_last", "WavLM pretraining (tiny): val unmasked-unit accuracy"),
    ("wavlm_ctc_phoneme", "val/per", "best", "phoneme CTC fine-tuned from WavLM: val PER (best of the run)"),
    ("wavlm_ctc_phoneme", "test/per", "last", "phoneme CTC fine-tuned from WavLM: test PER"),
    ("unispeech", "val/per", "best", "UniSpeech pretraining: English val PER (best)"),
    ("unispeech_ft_sw", "val/per", "best", "UniSpeech -> Swahili CTC fine-tuning: val PER (best)"),
    ("unispeech_ft_sw", "test/per", "last", "UniSpeech -> Swahili CTC fine-tuning: test PER"),
]
# markdown written by stages 7 (codec-eval) and 8 (the UniSpeech low-resource table), shown as they are
TABLES = [
    ("codec/eval.md", "Codec on held-out LJ Speech (untrained preset vs trained)"),
    ("unispeech_experiment/results.md", "UniSpeech low-resource table"),
]


def logged_values(run: Path, metric: str) -> list[tuple[int, float]]:
    """Every ``(step, value)`` of ``metric`` in the run's CSV logs (all versions, in order)."""
    values = []
    for metrics in sorted(
        run.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    ):
        for row in csv.DictReader(metrics.open()):
            if row.get(metric):
                values.append((int(row.get("step") or 0), float(row[metric])))
    return values


def summarise(values: list[tuple[int, float]], how: str) -> str:
    """``best`` (lowest), ``last`` or ``first_last`` ("a (step s) -> b (step t)") of logged values."""
    if how == "best":
        step, value = min(values, key=lambda sv: sv[1])
        return f"{value:.3f} (step {step})"
    if how == "last":
        return f"{values[-1][1]:.3f}"
    (first_step, first), (last_step, last) = values[0], values[-1]
    return f"{first:.3f} (step {first_step}) -> {last:.3f} (step {last_step})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp", type=Path, default=Path(__file__).resolve().parents[1] / "exp")
    args = parser.parse_args()
    print("| run | metric | value |\n|---|---|---|")
    for run, metric, how, what in ROWS:
        values = logged_values(args.exp / run, metric)
        if values:
            print(f"| {what} | `{metric}` | {summarise(values, how)} |")
    for path, title in TABLES:
        if (args.exp / path).is_file():
            print(f"\n{title} (`exp/{path}`):\n\n{(args.exp / path).read_text(encoding='utf-8').strip()}")


if __name__ == "__main__":
    main()
