import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechlab.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
sys.path.insert(0, str(REPO / "recipes" / "librispeech"))

import prepare  # noqa: E402
import prepare_noise  # noqa: E402


def _speech_files(count: int) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "ljspeech_en" / "manifest.jsonl").read_text().splitlines()]
    return rows[:count]


def _fake_librispeech(root: Path) -> dict[str, list[str]]:
    """<root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac + .trans.txt from bundled audio."""
    layout = {"train-clean-100": [("19", "198", 3), ("26", "495", 2)], "dev-clean": [("84", "121123", 2)]}
    rows = iter(_speech_files(7))
    ids = {}
    for split, chapters in layout.items():
        ids[split] = []
        for speaker, chapter, count in chapters:
            folder = root / split / speaker / chapter
            folder.mkdir(parents=True)
            lines = []
            for utt in range(count):
                row = next(rows)
                utt_id = f"{speaker}-{chapter}-{utt:04d}"
                shutil.copy(DATA / "ljspeech_en" / row["audio"], folder / f"{utt_id}.flac")
                lines.append(f"{utt_id} {row['text'].upper()}")
                ids[split].append(utt_id)
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return ids


def test_prepare_writes_one_manifest_per_split_with_durations_and_transcripts(tmp_path):
    ids = _fake_librispeech(tmp_path / "LibriSpeech")
    out = tmp_path / "manifests"
    assert (
        prepare.main(
            [
                "--root",
                str(tmp_path / "LibriSpeech"),
                "--out",
                str(out),
                "--num-workers",
                "1",
                "--merge",
                "all=train-clean-100,dev-clean",
            ]
        )
        == 0
    )
    train = read_manifest(out / "train-clean-100.jsonl", require=("text",))
    dev = read_manifest(out / "dev-clean.jsonl", require=("text",))
    assert [it["id"] for it in train] == sorted(ids["train-clean-100"])
    assert [it["id"] for it in dev] == sorted(ids["dev-clean"])
    first = train[0]
    assert (first["speaker"], first["chapter"], first["language"]) == ("19", "198", "en")
    assert first["text"] == first["text"].upper() and len(first["text"]) > 5
    assert first["num_samples"] == sf.info(first["audio"]).frames
    assert first["duration"] == pytest.approx(first["num_samples"] / 16000, abs=1e-3)
    assert len(read_manifest(out / "all.jsonl")) == len(train) + len(dev)


def test_prepare_reads_nested_libri_light_folders_as_one_split(tmp_path):
    _fake_librispeech(tmp_path / "src")
    nested = tmp_path / "librispeech_finetuning"
    shutil.copytree(tmp_path / "src" / "train-clean-100" / "19", nested / "1h" / "0" / "clean" / "19")
    shutil.copytree(tmp_path / "src" / "train-clean-100" / "26", nested / "9h" / "other" / "26")
    out = tmp_path / "manifests"
    assert prepare.main(["--split", f"train-10h={nested}", "--out", str(out), "--num-workers", "1"]) == 0
    assert len(read_manifest(out / "train-10h.jsonl")) == 5


def test_prepare_names_the_transcript_line_of_a_missing_audio_file(tmp_path):
    _fake_librispeech(tmp_path / "LibriSpeech")
    next((tmp_path / "LibriSpeech" / "dev-clean").rglob("*.flac")).unlink()
    with pytest.raises(prepare.PrepareError, match=r"trans\.txt:\d+: audio .* is missing"):
        prepare.main(
            ["--root", str(tmp_path / "LibriSpeech"), "--out", str(tmp_path / "m"), "--num-workers", "1"]
        )


def test_prepare_noise_keeps_real_clips_and_skips_silent_short_and_broken_files(tmp_path):
    root = tmp_path / "noise"
    (root / "sub").mkdir(parents=True)
    clips = [
        json.loads(line) for line in (DATA / "noise_opensfx" / "manifest.jsonl").read_text().splitlines()
    ][:3]
    for i, clip in enumerate(clips):
        shutil.copy(DATA / "noise_opensfx" / clip["audio"], (root / "sub" if i else root) / f"clip{i}.flac")
    sf.write(root / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(root / "short.wav", 0.1 * np.ones(800, dtype=np.float32), 16000)
    (root / "broken.wav").write_bytes(b"not audio at all")
    (root / "notes.txt").write_text("ignored")
    out = tmp_path / "noise.jsonl"
    assert (
        prepare_noise.main(
            ["--root", str(root), "--out", str(out), "--num-workers", "1", "--max-clip-seconds", "2.0"]
        )
        == 0
    )
    items = read_manifest(out)
    assert sorted(it["id"] for it in items) == ["noise-clip0", "noise-sub-clip1", "noise-sub-clip2"]
    assert all(it["duration"] <= 2.0 for it in items)
    # the mixer loads the clipped segments
    from speechlab.augment.mixing import load_noise_bank

    bank = load_noise_bank(out)
    assert [c.numel() for c in bank] == [
        min(round(it["duration"] * 16000), sf.info(it["audio"]).frames) for it in read_manifest(out)
    ]
