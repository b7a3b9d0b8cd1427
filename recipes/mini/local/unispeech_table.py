#!/usr/bin/env python
"""The mini recipe's UniSpeech low-resource table: rows (a)-(d) x sw / tr / cy x seeds, mean ± sd.

Only ``speechlab fit`` / ``speechlab test`` commands on the shipped configs (printed as they run), then the test PERs
are read from each test run's CSV metrics:

    (a) CTC from scratch                 unispeech_ft_<lang>.yaml --model.init_args.init_from null
    (b) contrastive-only pretraining     unispeech_contrastive.yaml  (ctc_weight 0), then unispeech_ft_<lang>.yaml
    (c) multitask, swap 0                unispeech_swap0.yaml, then unispeech_ft_<lang>.yaml
    (d) UniSpeech, swap 0.5              unispeech.yaml, then unispeech_ft_<lang>.yaml

Every fine-tuning run uses the same steps and settings (the config's); a seed sets ``seed_everything`` and the
batch order (``data.init_args.seed``) of both stages. Runs go ``--jobs`` at a time, one thread each; a finished run
(its ``test_per.txt`` / ``pretrained/``) is skipped when the script is run again. Writes
``<out>/results.md`` and prints its own wall time.

    OMP_NUM_THREADS=1 python recipes/mini/local/unispeech_table.py --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CONF = ROOT / "recipes" / "mini" / "conf"
PRETRAIN = {"b": "unispeech_contrastive", "c": "unispeech_swap0", "d": "unispeech"}
ROWS = {
    "a": "(a) CTC from scratch",
    "b": "(b) contrastive-only → FT",
    "c": "(c) multitask, swap 0 → FT",
    "d": "(d) UniSpeech, swap 0.5 → FT",
}
LANGUAGES = ("sw", "tr", "cy")


def run(args: list[str], log: Path) -> None:
    """One speechlab command, one thread, its output in ``log``; a failure stops the table with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("+", shlex.join(args), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"failed ({done.returncode}): {shlex.join(args)}\n--- {log} ---\n{tail}")


def seed_args(seed: int, root: Path) -> list[str]:
    return [
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]


def pretrain(row: str, seed: int, out: Path) -> None:
    root = out / "pretrain" / row / f"seed{seed}"
    if (root / "pretrained").is_dir():
        return
    config = CONF / f"{PRETRAIN[row]}.yaml"
    run(["speechlab", "fit", "--config", str(config), *seed_args(seed, root)], root / "fit.log")


def last_test_per(root: Path) -> float:
    """test/error_rate (PER) of the newest CSV log under ``root``."""
    for metrics in sorted((root / "logs").glob("version_*/metrics.csv"), reverse=True):
        for row in csv.DictReader(metrics.open()):
            if row.get("test/error_rate"):
                return float(row["test/error_rate"])
    raise RuntimeError(f"{root}: no test/error_rate in its logs")


def finetune(row: str, lang: str, seed: int, out: Path) -> float:
    root = out / "finetune" / row / lang / f"seed{seed}"
    result = root / "test_per.txt"
    if result.is_file():
        return float(result.read_text())
    init = "null" if row == "a" else str(out / "pretrain" / row / f"seed{seed}" / "checkpoints" / "last.ckpt")
    config = ["--config", str(CONF / f"unispeech_ft_{lang}.yaml")]
    common = [*config, *seed_args(seed, root), f"--model.init_args.init_from={init}"]
    run(["speechlab", "fit", *common], root / "fit.log")
    run(
        ["speechlab", "test", *common, f"--ckpt_path={root / 'checkpoints' / 'last.ckpt'}"], root / "test.log"
    )
    per = last_test_per(root)
    result.write_text(f"{per}\n")
    return per


def pretrain_and_finetune(row: str, seed: int, out: Path) -> dict[str, float]:
    if row != "a":
        pretrain(row, seed, out)
    return {lang: finetune(row, lang, seed, out) for lang in LANGUAGES}


def cell(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.1f} ± {sd:.1f}"


def write_table(pers: dict[tuple[str, str, int], float], seeds: list[int], out: Path, wall: float) -> str:
    lines = [
        "# UniSpeech low-resource table (mini recipe)",
        "",
        f"Test PER (%) on the 10 held-out utterances per language, mean ± sd over seeds {seeds}; "
        "`recipes/mini/local/unispeech_table.py`.",
        "",
        "| row | " + " | ".join(LANGUAGES) + " | mean |",
        "|---|" + "---|" * (len(LANGUAGES) + 1),
    ]
    for row, name in ROWS.items():
        cells = [cell([pers[row, lang, s] for s in seeds]) for lang in LANGUAGES]
        # the row mean per seed (over languages), then mean ± sd over seeds
        means = [statistics.mean(pers[row, lang, s] for lang in LANGUAGES) for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cell(means)} |")
    lines += ["", "Per seed (PER %):", ""]
    for row in ROWS:
        for lang in LANGUAGES:
            values = ", ".join(f"{100 * pers[row, lang, s]:.1f}" for s in seeds)
            lines.append(f"- {row} {lang}: {values}")
    lines += ["", f"Wall time of this invocation: {wall / 60:.1f} min (runs already done were skipped)."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="speechlab processes at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "recipes" / "mini" / "exp" / "unispeech_table")
    args = parser.parse_args(argv)
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        # seed by seed (a smaller --seeds list reuses the finished runs), each pretraining run followed by its
        # three fine-tuning runs in the same worker; row (a) fine-tunes from scratch
        futures = {}
        for seed in args.seeds:
            for row in ROWS:
                futures[row, seed] = pool.submit(pretrain_and_finetune, row, seed, args.out)
        pers = {}
        for (row, seed), future in futures.items():
            for lang, per in future.result().items():
                pers[row, lang, seed] = per
    wall = time.monotonic() - start
    print(write_table(pers, args.seeds, args.out, wall))
    print(f"unispeech_table: wall time {wall / 60:.1f} min, results in {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
