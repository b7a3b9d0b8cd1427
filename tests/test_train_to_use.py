"""From a finished training run to a model people use: the README path, end to end on the bundled data.

``speechlab fit`` (a few CTC steps) -> ``speechlab test --ckpt_path best`` -> the saved config.yaml reruns ->
``speechlab export`` in both formats -> ``speechlab transcribe`` and ``transformers.pipeline`` give identical text
-> ``speechlab.load`` reads the run folder, last.ckpt and both export directories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch

from speechlab import cli
from speechlab.api import load
from speechlab.checkpoints.run_dir import run_checkpoint
from speechlab.models.ctc import CTCModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from kill_harness import tiny_manifest  # noqa: E402

# A small learning rate keeps the model near its random initialisation after a few steps, so its greedy output
# is a non-empty phone string (a CTC model trained further first learns to emit only blanks).
MODEL = """model:
  class_path: speechlab.tasks.ctc.CTCTask
  init_args:
    encoder: wavlm_tiny
    encoder_overrides: {layerdrop: 0.0, num_layers: 1}
    optim: {lr: 1.0e-5, warmup_steps: 1}
"""


def _config(path: Path, root: Path, manifest: Path, max_steps: int) -> Path:
    trainer = {
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "val_check_interval": 2,
        "check_val_every_n_epoch": None,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    data = f"""data:
  class_path: speechlab.data.datamodule.SpeechDataModule
  init_args:
    train_manifest: {manifest}
    val_manifest: {manifest}
    test_manifest: {manifest}
    tokenizer: phoneme
    max_batch_seconds: 3.0
"""
    path.write_text("seed_everything: 0\ntrainer: " + json.dumps(trainer) + "\n" + MODEL + data)
    return path


def _speechlab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "speechlab.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_fit_test_best_rerun_export_transcribe_and_load_a_ctc_run(tmp_path, capsys):
    manifest = tiny_manifest(tmp_path / "train.jsonl", count=3)
    run = tmp_path / "run"
    _speechlab("fit", "--config", str(_config(tmp_path / "conf.yaml", run, manifest, max_steps=4)))
    checkpoints = run / "checkpoints"
    best = sorted(p.name for p in checkpoints.glob("best-*.ckpt"))
    assert best and (checkpoints / "last.ckpt").is_file()
    assert run_checkpoint(run, "best").name in best and run_checkpoint(run, "last").name == "last.ckpt"
    assert (run / "pretrained" / "config.json").is_file()  # exported at the end of fit

    # README path: test the best checkpoint in a new process; the metric it was ranked by is logged
    tested = _speechlab("test", "--config", str(tmp_path / "conf.yaml"), "--ckpt_path", "best")
    assert "test/per" in tested.stdout + tested.stderr
    assert "best-step" in tested.stdout + tested.stderr  # Lightning names the checkpoint it restored

    # the run's saved config reruns as it is (only the folder changed, to keep the first run)
    saved = next((run / "logs").glob("version_*/config.yaml"))
    assert "Unable to serialize" not in saved.read_text()
    rerun = tmp_path / "rerun"
    _speechlab(
        "fit", "--config", str(saved), "--trainer.max_steps", "1", "--trainer.default_root_dir", str(rerun)
    )
    assert (rerun / "checkpoints" / "last.ckpt").is_file()

    # export in both formats, each with a round-trip report
    assert cli.main(["export", str(run), "--out", str(tmp_path / "ours")]) == 0
    assert (
        cli.main(["export", str(run), "--out", str(tmp_path / "hf"), "--format", "hf", "--ckpt", "last"]) == 0
    )
    report = capsys.readouterr().out
    assert "transformers WavLMForCTC vs speechlab: CTC logits: max abs difference" in report
    assert report.count("OK: largest difference") == 2

    # speechlab transcribe and transformers' ASR pipeline: the same text for the same files
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = tmp_path / "hyp.jsonl"
    assert cli.main(["transcribe", "--model", str(run), "--ckpt", "last", str(manifest), "--format", "jsonl",
                            "--output", str(out), "--no-progress"]) == 0  # fmt: skip
    ours = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert "PER" in capsys.readouterr().err  # the manifest has phoneme references
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "hf"))
    for row in rows:
        audio, rate = sf.read(row["audio"], dtype="float32")
        assert asr({"raw": audio, "sampling_rate": rate})["text"] == ours[row["id"]]
    assert any(ours.values()), "every transcript is empty: the comparison would prove nothing"

    # one loader for every form of the result
    reference = load(checkpoints / "last.ckpt")
    signal = torch.from_numpy(sf.read(rows[0]["audio"], dtype="float32")[0])[None]
    with torch.inference_mode():
        expected, _ = reference(signal)
        for source in (
            run / "checkpoints" / "last.ckpt",
            tmp_path / "ours",
            tmp_path / "hf",
            run / "pretrained",
        ):
            model = load(source)
            assert isinstance(model, CTCModel) and model.tokenizer.units == reference.tokenizer.units
            logits, _ = model(signal)
            assert (logits - expected).abs().max() < 1e-4, source
        best_model = load(run)  # the run folder: its best checkpoint
        assert isinstance(best_model, CTCModel)
