"""benchmarks/gpu.py runs end to end on the CPU (shrunk), and its host-read count reflects the training step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
SMOKE = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seconds", "1", "--steps", "2", "--rounds", "1",
         "--warmup", "1", "--threads", "1"]  # fmt: skip


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(tmp_path, *extra):
    threads = torch.get_num_threads()
    try:
        assert _load().main([*SMOKE, *extra, "--json", str(tmp_path / "out.jsonl")]) == 0
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_cpu_smoke_run_reports_throughput_memory_and_host_reads(tmp_path):
    records = _records(tmp_path)
    setup = records[0]
    assert setup["setup"] and setup["device"] == "cpu" and setup["fused_adamw"]
    assert setup["padded_audio_s_per_step"] == 2.0
    flex = next(r for r in records if r.get("backend") == "flex")
    assert "no backward pass on the CPU" in flex["skipped"]
    sdpa = next(r for r in records if r.get("backend") == "sdpa" and "skipped" not in r)
    # 2 utterances of 1.0 and 0.75 s per step
    assert sdpa["audio_s_per_gpu_s"] == pytest.approx(1.75 / sdpa["step_s_median"], rel=0.05)
    assert sdpa["peak_memory_mb"] > 0 and 0 < sdpa["in_step_fraction"] <= 1
    # the accelerator path of one step: LayerDrop's CPU flags are the only host read
    assert list(sdpa["host_reads"].values()) == [1], sdpa["host_reads"]
    assert "keep.tolist()" in next(iter(sdpa["host_reads"]))
    assert records[-1] == {"ddp": "skipped", "reason": "fewer than 2 GPUs"}


def test_flex_needs_attention_dropout_off_and_a_gpu():
    module = _load()

    class Args:
        attention_dropout = 0.1

    assert "no attention dropout" in module.backend_skip_reason("flex", torch.device("cuda"), Args)
    assert "CPU" in module.backend_skip_reason("flex", torch.device("cpu"), Args)
    assert module.backend_skip_reason("sdpa", torch.device("cuda"), Args) is None


@pytest.mark.slow
def test_ddp_smoke_run_on_two_gloo_processes_keeps_weights_identical(tmp_path):
    # a subprocess: the spawned workers must import the script as a module of its own
    out = tmp_path / "out.jsonl"
    command = [sys.executable, str(SCRIPT), *SMOKE, "--ddp", "on", "--ddp-steps", "1", "--json", str(out)]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ddp = json.loads(out.read_text().splitlines()[-1])
    assert ddp["ddp"] == "gloo" and ddp["world_size"] == 2
    assert ddp["weights_identical_across_ranks"], ddp
