"""The benchmark commands that ``benchmarks/README.md`` reports figures for are valid commands of today's scripts,
and the scripts without a test of their own run end to end (shrunk)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _readme_commands() -> list[list[str]]:
    commands = re.findall(r"`(?:PYTHONPATH=\. )?python (benchmarks/\w+\.py[^`]*)`", README.read_text())
    return [command.split() for command in sorted(set(commands))]


def test_every_benchmark_command_in_the_readme_uses_existing_options():
    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"benchmarks/wavlm.py", "benchmarks/extract.py", "benchmarks/codec.py"}
    for script in sorted({c[0] for c in commands}):
        help_text = _run([script, "--help"], timeout=120)
        assert help_text.returncode == 0, help_text.stderr[-2000:]
        for command in (c for c in commands if c[0] == script):
            for option in (word for word in command[1:] if word.startswith("--")):
                assert re.search(rf"{re.escape(option)}\b", help_text.stdout), (
                    f"{' '.join(command)}: {option}?"
                )


@pytest.mark.slow  # a benchmark run as a test, with two DDP processes
def test_ddp_find_unused_benchmark_runs_and_reports_both_modes():
    done = _run(["benchmarks/ddp_find_unused.py", "--steps", "2", "--warmup", "1", "--seconds", "0.5"])
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["median_step_s_find_unused_true"] > 0 and record["median_step_s_find_unused_false"] > 0
    assert record["cost_ratio"] == pytest.approx(
        record["median_step_s_find_unused_true"] / record["median_step_s_find_unused_false"]
    )


@pytest.mark.slow
def test_wavlm_training_benchmark_runs_quick_in_fp32(tmp_path):
    out = tmp_path / "records.jsonl"
    done = _run(
        [
            "benchmarks/wavlm.py",
            "--quick",
            "--tasks",
            "train",
            "--no-bf16",
            "--skip-memory",
            "--threads",
            "1",
            "--json",
            str(out),
        ]  # fmt: skip
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    impls = {r["impl"] for r in records if r.get("task") == "train"}
    assert impls == {"hf_fp32", "ours_fp32"}, records
