"""speechlab extract: manifest / folder in, per-utterance or sharded features out, resumable, clear failures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_api import tiny_encoder

from speechlab import cli
from speechlab.api import FeatureExtractor
from speechlab.audio import load_audio
from speechlab.checkpoints.pretrained_dir import save_pretrained
from speechlab.commands import extract


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return save_pretrained(tiny_encoder(), tmp_path / "model", family="wavlm")


@pytest.fixture
def corpus(tmp_corpus):
    rng = np.random.default_rng(0)
    for i, seconds in enumerate([0.6, 1.1, 0.8, 1.1]):
        tmp_corpus.add(f"utt{i}", signal=(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32))
    tmp_corpus.write()
    return tmp_corpus


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", str(model_dir), "--output-dir", str(out), "--no-progress", *extra]


def test_manifest_to_one_npy_per_utterance_matches_the_api(model_dir, corpus, tmp_path):
    out = tmp_path / "features"
    manifest = corpus.root / "manifest.jsonl"
    assert cli.main(_args(model_dir, out, "--manifest", str(manifest), "--layers", "0,2")) == 0
    reference = FeatureExtractor(tiny_encoder(), layers=[0, 2], exact=True)
    for line in corpus.lines:
        saved = np.load(out / f"{line['id']}.npy")
        expected = reference(load_audio(corpus.root / line["audio"])).hidden_states[:, 0].numpy()
        assert saved.shape == expected.shape == (2, reference.num_frames(line["num_samples"]), 32)
        assert np.abs(saved - expected).max() < 1e-5
    info = json.loads((out / "extract_info.json").read_text())
    assert info["layers"] == [0, 2] and info["frame_rate"] == 50.0
    assert info["hidden_size"] == 32
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files


def test_rerun_skips_finished_outputs_and_resumes_missing_ones(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "features"
    args = _args(model_dir, out, "--manifest", str(corpus.root / "manifest.jsonl"))
    assert cli.main(args) == 0
    finished = out / "utt1.npy"
    stamp = finished.stat().st_mtime_ns
    (out / "utt2.npy").unlink()  # as if the run had been killed before writing it
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "extracted 1 utterances" in capsys.readouterr().out
    assert finished.stat().st_mtime_ns == stamp and (out / "utt2.npy").exists()


def test_changed_settings_in_the_same_output_dir_are_refused(model_dir, corpus, tmp_path):
    out = tmp_path / "features"
    manifest = str(corpus.root / "manifest.jsonl")
    assert cli.main(_args(model_dir, out, "--manifest", manifest, "--layers", "last")) == 0
    with pytest.raises(SystemExit, match="other settings"):
        cli.main(_args(model_dir, out, "--manifest", manifest, "--layers", "all"))


def test_unreadable_file_is_a_clear_error_or_a_counted_skip(model_dir, tmp_corpus, tmp_path, capsys):
    tmp_corpus.add("good", seconds=0.5)
    (tmp_corpus.root / "audio").joinpath("broken.flac").write_bytes(b"fLaC" + b"\0" * 100)
    out = tmp_path / "features"
    folder = str(tmp_corpus.root / "audio")
    assert cli.main(_args(model_dir, out, "--input-dir", folder)) == 2
    assert "broken.flac" in capsys.readouterr().err
    assert cli.main(_args(model_dir, out, "--input-dir", folder, "--on-error", "skip")) == 0
    text = capsys.readouterr().out
    assert "1 skipped after errors" in text and "broken" in text
    assert (out / "good.npy").exists() and not (out / "broken.npy").exists()


def test_sharded_safetensors_output(model_dir, corpus, tmp_path):
    out = tmp_path / "shards"
    manifest = str(corpus.root / "manifest.jsonl")
    assert cli.main(_args(model_dir, out, "--manifest", manifest, "--shard-size", "3", "--layers", "-1")) == 0
    shards = sorted(out.glob("shard-*.safetensors"))
    assert [s.name for s in shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    reference = FeatureExtractor(tiny_encoder(), layers=[2], exact=True)
    with safe_open(str(shards[1]), "pt") as handle:
        assert json.loads(handle.metadata()["ids"]) == ["utt3"]
        saved = handle.get_tensor("utt3/layer_2")
    expected = reference(load_audio(corpus.root / "audio" / "utt3.flac")).hidden_states[0, 0]
    assert (saved - expected).abs().max() < 1e-5


def test_long_file_is_streamed_in_windows_to_the_same_result(model_dir, tmp_corpus, tmp_path):
    rng = np.random.default_rng(1)
    tmp_corpus.add("long", signal=(0.1 * rng.standard_normal(16000 * 5)).astype(np.float32))
    manifest = tmp_corpus.write()
    out = tmp_path / "features"
    window = ["--chunk-seconds", "1", "--context-seconds", "0.5"]
    assert cli.main(_args(model_dir, out, "--manifest", str(manifest), *window)) == 0
    saved = np.load(out / "long.npy")
    reference = FeatureExtractor(tiny_encoder(), chunk_seconds=1.0, context_seconds=0.5)
    expected = reference(load_audio(tmp_corpus.root / "audio" / "long.flac")).hidden_states[:, 0].numpy()
    assert saved.shape == expected.shape == (3, 249, 32)
    assert np.abs(saved - expected).max() < 1e-5


def test_safetensors_per_utterance_in_float16(model_dir, corpus, tmp_path):
    out = tmp_path / "features"
    manifest = str(corpus.root / "manifest.jsonl")
    assert (
        cli.main(
            _args(model_dir, out, "--manifest", manifest, "--format", "safetensors", "--dtype", "float16")
        )
        == 0
    )
    with safe_open(str(out / "utt0.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == ["layer_0", "layer_1", "layer_2"]
        assert handle.get_tensor("layer_2").dtype == torch.float16


def test_parser_explains_every_option():
    parser = argparse.ArgumentParser()
    extract.add_parser(parser.add_subparsers())
    help_text = parser._subparsers._group_actions[0].choices["extract"].format_help()
    for option in ("--model", "--manifest", "--input-dir", "--output-dir", "--layers", "--format", "--shard-size",
                   "--dtype", "--device", "--bf16", "--batch-seconds", "--padded-batches", "--chunk-seconds",
                   "--context-seconds", "--on-error", "--overwrite", "--no-progress"):  # fmt: skip
        assert option in help_text
    args = parser.parse_args(["extract", "--model", "m", "--output-dir", "o", "--input-dir", "i"])
    assert args.func is extract.run
