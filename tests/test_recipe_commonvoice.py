"""The Common Voice recipe's prepare.py on a tiny fake release tree (MP3 clips written by soundfile)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def _load_prepare():
    spec = importlib.util.spec_from_file_location(
        "cv_prepare", ROOT / "recipes" / "commonvoice" / "prepare.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"


def _fake_release(root: Path) -> Path:
    cv = root / "cy"
    (cv / "clips").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {"train": [], "dev": [], "test": []}
    for i in range(6):
        name = f"common_voice_cy_{i:05d}.mp3"
        seconds = 1.0 + 0.25 * i
        samples = (0.1 * rng.standard_normal(int(48000 * seconds))).astype("float32")
        sf.write(str(cv / "clips" / name), samples, 48000, format="MP3")
        split = ["train", "train", "train", "train", "dev", "test"][i]
        rows[split].append(f"spk{i % 2}\t{name}\tBore da, Siôn! Rhif {i}.\t2\t0\t\t\t\tcy\t\n")
    for split, lines in rows.items():
        (cv / f"{split}.tsv").write_text(HEADER + "".join(lines), encoding="utf-8")
    (cv / "validated.tsv").write_text(HEADER + "".join(sum(rows.values(), [])), encoding="utf-8")
    return cv


def test_prepare_writes_one_manifest_per_split_from_mp3_clips(tmp_path):
    prepare = _load_prepare()
    cv = _fake_release(tmp_path)
    out = tmp_path / "manifests"
    assert prepare.main([str(cv), "--out", str(out), "--units", "chars", "--language", "cy", "--quiet"]) == 0
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 4
    assert len((out / "dev.jsonl").read_text().splitlines()) == 1
    first = train[0]
    assert first["id"] == "common_voice_cy_00000"
    assert first["text"] == "bore da siôn rhif 0"
    assert first["raw_text"] == "Bore da, Siôn! Rhif 0."
    assert first["language"] == "cy" and first["speaker"] == "spk0"
    assert first["sample_rate"] == 48000
    assert first["duration"] == pytest.approx(1.0, abs=0.05)
    assert "phonemes" not in first
    # the manifest is readable by speechlab's reader and its audio decodes (MP3 through soundfile)
    from speechlab.audio import load_audio
    from speechlab.data.manifest import read_manifest

    items = read_manifest(out / "train.jsonl")
    audio = load_audio(items[1]["audio"], sample_rate=16000)
    assert audio.numel() == pytest.approx(16000 * 1.25, abs=200)


def test_to_flac_resamples_once_and_train_hours_limits_the_subset(tmp_path):
    prepare = _load_prepare()
    cv = _fake_release(tmp_path)
    out = tmp_path / "m"
    prepare.main(
        [str(cv), "--out", str(out), "--units", "chars", "--to-flac", "--train-hours", "0.0005", "--quiet"]
    )
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert 1 <= len(train) < 4  # 1.8 s budget: stops after the clip that crosses it
    assert all(item["sample_rate"] == 16000 and item["audio"].endswith(".flac") for item in train)
    assert sf.info(str(out / train[0]["audio"])).samplerate == 16000


def test_missing_split_file_is_a_clear_error(tmp_path):
    prepare = _load_prepare()
    cv = _fake_release(tmp_path)
    (cv / "dev.tsv").unlink()
    with pytest.raises(SystemExit, match="dev.tsv: not found"):
        prepare.main([str(cv), "--out", str(tmp_path / "o"), "--units", "chars", "--quiet"])


def test_units_phonemes_without_phonemizer_says_what_to_install(tmp_path, monkeypatch):
    prepare = _load_prepare()
    monkeypatch.setattr(prepare, "make_phonemizer", lambda language: None)
    cv = _fake_release(tmp_path)
    with pytest.raises(SystemExit, match="phonemizer"):
        prepare.main([str(cv), "--out", str(tmp_path / "o"), "--units", "phonemes", "--quiet"])
