"""Print the mini recipe's results (markdown) from the runs' CSV logs, the anchor's JSON and the evaluation tables.

    python recipes/mini/local/results.py --exp recipes/mini/exp            # the main job (run.sh stage 8)
    python recipes/mini/local/results.py --exp recipes/mini/exp --seeds    # seeds 0-2 (stage 10)
    python recipes/mini/local/results.py --exp recipes/mini/exp --unseen   # unseen English speech (stage 9)

Every figure is read from what the stages wrote; a stage that did not run is reported as missing, and each claim
of issue 15 ("learns", "pays", "no collapse") is printed as a check with the numbers it compares.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch

from speechlab.metrics import error_rates

# (run folder under exp/, what it is) of the main job's phoneme CTC comparison
CTC_RUNS = [
    ("ctc_phoneme_fbank", "from scratch: fbank + Conformer (`ctc_phoneme_fbank.yaml`)"),
    ("wavlm_ctc_phoneme_fbank", "WavLM-style pretrained, then fine-tuned (`wavlm_ctc_phoneme_fbank.yaml`)"),
]
STAGES = {
    "0": "manifests",
    "1": "anchor (background, 1 thread)",
    "2": "CTC from scratch",
    "3": "WavLM-style pretraining",
    "4": "CTC fine-tuning",
    "5": "UniSpeech",
    "6": "codec",
    "7": "export + transcribe",
    "8": "plots",
    "total": "the whole job",
}
# codec criteria of issue 15: usage of every level, level-0 perplexity as a fraction of the codebook, mel gain
MIN_USAGE, MIN_PERPLEXITY_FRACTION, MIN_MEL_GAIN = 0.80, 0.5, 0.10


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


def best(values: list[tuple[int, float]]) -> str:
    step, value = min(values, key=lambda sv: sv[1])
    return f"{value:.3f} ({step})"


def last(values: list[tuple[int, float]]) -> float | None:
    return values[-1][1] if values else None


def fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.3f}"


def check(ok: bool, text: str) -> str:
    return f"- {'met' if ok else '**not met**'}: {text}"


def header() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"Measured {datetime.date.today().isoformat()} on {cpu} (torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}); seed 0; test PERs of the checkpoint with the best val PER, on `en_test` "
        "(12 utterances), decoded once per model."
    )


def anchor_result(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def markdown_table(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text`` as dicts keyed by its (lower-cased) header cells."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 3:
        return []
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    names = [name.lower() for name in cells[0]]
    return [dict(zip(names, row, strict=False)) for row in cells[2:]]


def timings(exp: Path) -> list[str]:
    path = exp / "timings.tsv"
    if not path.is_file():
        return ["(no exp/timings.tsv: run.sh was not run from stage 0)"]
    seconds: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name, value = line.split("\t")
        seconds[name] = int(value)  # a re-run stage: its latest time
    rows = ["| stage | what | wall time |", "|---|---|---|"]
    for name, value in seconds.items():
        rows.append(f"| {name} | {STAGES.get(name, name)} | {value / 60:.1f} min |")
    return rows


def ctc_section(exp: Path) -> list[str]:
    lines = [
        "## Phoneme CTC on espeak English: anchor, from scratch, pretrained + fine-tuned",
        "",
        "| model | budget | best val PER (step) | test PER |",
        "|---|---|---|---|",
    ]
    anchor = anchor_result(exp / "anchor" / "result.json")
    if anchor:
        lines.append(
            f"| anchor: fbank + BiLSTM, plain torch (`local/anchor_bilstm.py`) | {anchor['cpu_minutes']:.1f} "
            f"CPU-min, {anchor['steps']} steps | {anchor['val_per']:.3f} ({anchor['best_step']}) | "
            f"{anchor['test_per']:.3f} |"
        )
    test = {}
    for run, what in CTC_RUNS:
        val = logged_values(exp / run, "val/per")
        test[run] = last(logged_values(exp / run, "test/per"))
        steps = max((s for s, _ in val), default=-1) + 1
        lines.append(f"| {what} | {steps} steps | {best(val) if val else 'missing'} | {fmt(test[run])} |")
    scratch, tuned = test["ctc_phoneme_fbank"], test["wavlm_ctc_phoneme_fbank"]
    lines.append("")
    if anchor and scratch is not None:
        lines.append(
            check(
                scratch <= anchor["test_per"],
                f"from scratch {scratch:.3f} <= anchor {anchor['test_per']:.3f}",
            )
        )
    if scratch is not None and tuned is not None:
        lines.append(
            check(
                tuned < scratch,
                f"pretrained + fine-tuned {tuned:.3f} < from scratch {scratch:.3f} (same steps)",
            )
        )
    if anchor and tuned is not None:
        lines.append(
            check(
                tuned < anchor["test_per"],
                f"pretrained + fine-tuned {tuned:.3f} < anchor {anchor['test_per']:.3f}",
            )
        )
    pretrain = exp / "wavlm_fbank"
    acc, ce = logged_values(pretrain, "val/acc_masked"), logged_values(pretrain, "val/loss_masked")
    if acc:
        lines += [
            "",
            f"WavLM-style pretraining (`wavlm_pretrain_fbank.yaml`, 100 MFCC k-means units, chance 1 %): val "
            f"masked-unit accuracy {acc[0][1]:.3f} (step {acc[0][0]}) -> {acc[-1][1]:.3f} (step {acc[-1][0]}), "
            f"cross-entropy {ce[0][1]:.2f} -> {ce[-1][1]:.2f} nats (uniform: ln 100 = 4.61).",
        ]
    return lines


def unispeech_section(exp: Path) -> list[str]:
    lines = ["## UniSpeech (swap 0.5): English CTC during pretraining, then Swahili", ""]
    en = logged_values(exp / "unispeech", "val/per")
    sw = last(logged_values(exp / "unispeech_ft_sw", "test/per"))
    if not en:
        return lines + ["missing (stage 5 did not run)"]
    lines.append(
        f"English val PER (unmasked input) during multitask pretraining: first {en[0][1]:.3f} (step {en[0][0]}), "
        f"best {best(en)}, last {en[-1][1]:.3f}; Swahili test PER after fine-tuning: {fmt(sw)}."
    )
    lines.append("")
    lines.append(
        check(min(v for _, v in en) < 0.9, "English CTC leaves the all-blank plateau (val PER < 0.9)")
    )
    table = exp / "unispeech_table" / "results.md"
    if table.is_file():
        lines += [
            "",
            "Rows (a)-(d), 3 seeds (`exp/unispeech_table/results.md`, stage 11):",
            "",
            table.read_text().strip(),
        ]
    return lines


def codebook_size(pretrained: Path) -> int | None:
    """``codebook_size`` of a codec's exported ``config.json`` (wherever it is nested), if there is one."""
    path = pretrained / "config.json"
    if not path.is_file():
        return None
    stack = [json.loads(path.read_text())]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "codebook_size" in item:
                return int(item["codebook_size"])
            stack += item.values()
    return None


def codec_section(exp: Path) -> list[str]:
    path = exp / "codec" / "eval.md"
    lines = ["## Codec on held-out LJ Speech (untrained preset vs trained)", ""]
    if not path.is_file():
        return lines + ["missing (stage 6 did not run)"]
    text = path.read_text(encoding="utf-8").strip()
    lines += [
        text,
        "",
        "(`codebook_usage`: mean over the levels used; `usage_min`: the least-used level)",
        "",
    ]
    # local/codec_levels.py: the mel distance at every level count and the decoder's floor (unquantized latent)
    levels = exp / "codec" / "levels.txt"
    if levels.is_file():
        lines += ["```", levels.read_text(encoding="utf-8").strip(), "```", ""]
    trained = {row["n_q"]: row for row in markdown_table(text) if not row["codec"].startswith("preset:")}
    if "1" not in trained or "4" not in trained:
        return lines + ["the table has no n_q 1 and 4 rows of the trained codec"]
    mel1, mel4 = float(trained["1"]["mel_distance"]), float(trained["4"]["mel_distance"])
    gain = 1 - mel4 / mel1
    usage = float(trained["4"]["usage_min"])
    lines.append(
        check(usage >= MIN_USAGE, f"every level uses >= 80 % of its codes: least-used level {usage:.2f}")
    )
    size = codebook_size(exp / "codec" / "pretrained")
    if size:
        perplexity = float(trained["1"]["perplexity_l0"])
        lines.append(
            check(
                perplexity >= MIN_PERPLEXITY_FRACTION * size,
                f"level-0 perplexity {perplexity:.1f} of {size} codes (>= half)",
            )
        )
    lines.append(
        check(
            gain >= MIN_MEL_GAIN,
            f"n_q 4 vs 1: mel distance {mel4:.3f} vs {mel1:.3f}, {gain:.1%} lower (>= 10 %)",
        )
    )
    return lines


def main_job(exp: Path) -> str:
    lines = ["# Mini recipe results (`bash recipes/mini/run.sh`)", "", header(), "", *timings(exp), ""]
    for section in (ctc_section, unispeech_section, codec_section):
        lines += section(exp) + [""]
    export = exp / "ctc_phoneme_fbank" / "test_transcripts.jsonl"
    if export.is_file():
        count = sum(1 for line in export.open() if line.strip())
        lines.append(
            f"Stage 7: exported the stage-2 model and transcribed `en_test` ({count} lines in `exp/{export.relative_to(exp)}`)."
        )
    lines.append("Curves: `exp/plots/*.png` (every logged metric against the step).")
    return "\n".join(lines)


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f} (1 seed)" if values else "missing"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def seeds_table(exp: Path, wall_seconds: int | None) -> str:
    out = exp / "seeds"
    rows: dict[str, list[float | None]] = {
        "anchor": [],
        "ctc_phoneme_fbank": [],
        "wavlm_ctc_phoneme_fbank": [],
    }
    for seed in (0, 1, 2):
        base = seed_dir(exp, seed)
        anchor = anchor_result(base / "anchor" / "result.json") or anchor_result(
            out / f"seed{seed}" / "anchor" / "result.json"
        )
        rows["anchor"].append(anchor["test_per"] if anchor else None)
        for run, _ in CTC_RUNS:
            rows[run].append(last(logged_values(base / run, "test/per")))
    names = {"anchor": "anchor: fbank + BiLSTM, plain torch (12 CPU-min)", **dict(CTC_RUNS)}
    lines = ["# Phoneme CTC over seeds 0, 1, 2 (`run.sh` stage 10): test PER at the best val checkpoint", ""]
    lines.append(header().replace("seed 0; ", ""))
    if wall_seconds is not None:
        lines.append(f"Wall time of the stage: {wall_seconds / 60:.1f} min.")
    lines += ["", "| model | seed 0 | seed 1 | seed 2 | mean ± sd |", "|---|---|---|---|---|"]
    for key, values in rows.items():
        present = [v for v in values if v is not None]
        lines.append(f"| {names[key]} | " + " | ".join(fmt(v) for v in values) + f" | {mean_sd(present)} |")
    means = {
        k: statistics.mean([v for v in vs if v is not None])
        for k, vs in rows.items()
        if any(v is not None for v in vs)
    }
    if len(means) == 3:
        tuned = means["wavlm_ctc_phoneme_fbank"]
        pairs = [
            a - b
            for a, b in zip(rows["ctc_phoneme_fbank"], rows["wavlm_ctc_phoneme_fbank"], strict=True)
            if a is not None and b is not None
        ]
        spread = statistics.stdev(pairs) if len(pairs) > 1 else float("nan")
        lines += [
            "",
            check(
                tuned < means["ctc_phoneme_fbank"],
                f"mean pretrained + fine-tuned {tuned:.3f} < from scratch {means['ctc_phoneme_fbank']:.3f}",
            ),
            check(
                statistics.mean(pairs) > spread,
                f"beyond the seed spread: per-seed gain over scratch {mean_sd(pairs)} (mean > sd)",
            ),
            check(
                tuned < means["anchor"],
                f"mean pretrained + fine-tuned {tuned:.3f} < anchor {means['anchor']:.3f}",
            ),
        ]
    lines += ["", *learning_speed(exp, out)]
    return "\n".join(lines)


def seed_dir(exp: Path, seed: int) -> Path:
    """Where stage 10 keeps seed ``seed``'s runs (seed 0: the main job's)."""
    return exp if seed == 0 else exp / "seeds" / f"seed{seed}"


def unseen_per(transcripts: Path) -> tuple[float, int] | None:
    """(corpus PER, utterances) of a ``speechlab transcribe --format jsonl`` output with references."""
    if not transcripts.is_file():
        return None
    records = [json.loads(line) for line in transcripts.read_text(encoding="utf-8").splitlines() if line]
    refs = [r["reference"] for r in records]
    return error_rates(refs, [r["text"] for r in records], phonemes=True)["per"], len(refs)


def unseen_table(exp: Path) -> str:
    """Stage 9: the test PER on ``en_test`` beside the PER on the unseen espeak English, per seed present."""
    lines = [
        "# Phoneme CTC on unseen English speech (`run.sh` stage 9)",
        "",
        header().replace("seed 0; ", ""),
        "",
        "Unseen: the espeak English items of the corpus that `data/` does not hold (`local/unseen.py`), transcribed "
        "greedily by the best-val checkpoint of each run; PER over the whole set (jiwer).",
        "",
        "| model | seed | test PER (`en_test`, 12 utterances) | unseen PER | unseen utterances |",
        "|---|---|---|---|---|",
    ]
    per_run: dict[str, list[float]] = {}
    for run, what in CTC_RUNS:
        for seed in (0, 1, 2):
            base = seed_dir(exp, seed)
            unseen = unseen_per(base / run / "unseen_transcripts.jsonl")
            if unseen is None:
                continue
            per_run.setdefault(run, []).append(unseen[0])
            test = last(logged_values(base / run, "test/per"))
            lines.append(f"| {what} | {seed} | {fmt(test)} | {unseen[0]:.3f} | {unseen[1]} |")
    lines.append("")
    for run, what in CTC_RUNS:
        lines.append(f"- {what}: unseen PER {mean_sd(per_run.get(run, []))}")
    return "\n".join(lines)


def learning_speed(exp: Path, out: Path, steps: tuple[int, ...] = (199, 399, 799, 1499)) -> list[str]:
    """Val PER of scratch and fine-tuned runs at the same steps, mean ± sd over the seeds (what pretraining buys
    along the way, not only at the end)."""
    lines = ["Val PER (`en_val`) at equal steps, mean ± sd over the seeds:", ""]
    lines += ["| model | " + " | ".join(f"step {s + 1}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for run, what in CTC_RUNS:
        cells = []
        for step in steps:
            values = []
            for seed in (0, 1, 2):
                logged = dict(logged_values((exp if seed == 0 else out / f"seed{seed}") / run, "val/per"))
                if step in logged:
                    values.append(logged[step])
            cells.append(mean_sd(values))
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", type=Path, default=Path(__file__).resolve().parents[1] / "exp")
    parser.add_argument("--seeds", action="store_true", help="the 3-seed table of stage 10 instead")
    parser.add_argument("--unseen", action="store_true", help="the unseen-speech table of stage 9 instead")
    parser.add_argument("--wall-seconds", type=int, help="the stage's wall time, printed with the table")
    args = parser.parse_args()
    if args.unseen:
        print(unseen_table(args.exp))
    else:
        print(seeds_table(args.exp, args.wall_seconds) if args.seeds else main_job(args.exp))


if __name__ == "__main__":
    main()
