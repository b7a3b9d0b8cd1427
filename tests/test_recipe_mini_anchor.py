"""The mini recipe's anchor (``recipes/mini/local/anchor_bilstm.py``, the README's comparison command) runs on
manifests made by ``recipes/mini/prepare.py`` and reports val and test PER (one epoch here), also as JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_anchor_trains_one_epoch_and_reports_test_per(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    data = tmp_path / "data"
    prepare = [sys.executable, "recipes/mini/prepare.py", "--out", str(data)]
    subprocess.run(prepare, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    done = subprocess.run(
        [
            sys.executable,
            "recipes/mini/local/anchor_bilstm.py",
            "--cpu-minutes",
            "0.01",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "a" / "anchor.json"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"best val PER ([\d.]+) at step (\d+); test PER ([\d.]+)", done.stdout)
    assert match, done.stdout[-2000:]
    assert int(match.group(2)) > 0 and 0.0 <= float(match.group(3)) <= 2.0
    result = json.loads((tmp_path / "a" / "anchor.json").read_text())
    assert abs(result["test_per"] - float(match.group(3))) < 1e-3
    assert result["best_step"] == int(match.group(2)) and result["cpu_minutes"] > 0
