"""Bad input never becomes silent garbage, a memory bomb, or a write outside the run (issue 16).

Every test builds its bad file for real (no mocks); ``docs/bad_data.md`` lists each case with the test proving it.
"""

from __future__ import annotations

import json

import pytest

from speechlab import cli

# ------------------------------------------------------------------------------------------- tool error boundary


@pytest.mark.parametrize(
    "argv",
    [
        ["kmeans", "--manifest", "{tmp}/missing.jsonl", "--output-dir", "{tmp}/out"],
        ["check-manifest", "{tmp}/m.jsonl", "--tokenizer-dir", "{tmp}/no_tokenizer"],
        ["extract", "--model", "{tmp}/no_model", "--manifest", "{tmp}/m.jsonl", "--output-dir", "{tmp}/o"],
        ["encode", "--model", "{tmp}/no_codec", "--manifest", "{tmp}/m.jsonl", "--output-dir", "{tmp}/o"],
        ["decode", "--model", "{tmp}/no_codec", "--tokens-dir", "{tmp}", "--output-dir", "{tmp}/o"],
    ],
    ids=["kmeans", "check-manifest", "extract", "encode", "decode"],
)
def test_a_tool_command_failing_on_bad_input_prints_one_line_and_exits_2(argv, tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "audio": "a.wav", "duration": 1.0}) + "\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"speechlab {argv[0]}: ") and "--debug" in err
    assert str(tmp_path) in err  # names the file it failed on


def test_debug_shows_the_full_traceback(tmp_path):
    from speechlab.data.manifest import ManifestError

    with pytest.raises(ManifestError, match="missing.jsonl"):
        cli.main(
            [
                "kmeans",
                "--manifest",
                str(tmp_path / "missing.jsonl"),
                "--output-dir",
                str(tmp_path),
                "--debug",
            ]
        )


# ------------------------------------------------------------------------- checkpoint tokenizer: no path traversal


def _tiny_ctc_checkpoint(tmp_path, tokenizer_files_extra: dict[str, bytes]):
    import lightning as L
    import torch

    from speechlab.data.text import CharTokenizer
    from speechlab.tasks.ctc import CTCTask

    task = CTCTask(encoder="wavlm_tiny", encoder_overrides={"num_layers": 1})
    task.build(CharTokenizer.build(["a cab", "bad"]))
    checkpoint = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    task.on_save_checkpoint(checkpoint)
    checkpoint["tokenizer_files"].update(tokenizer_files_extra)
    path = tmp_path / "run" / "crafted.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return CTCTask, task, path


def _escapes(tmp_path) -> dict[str, bytes]:
    """Entry names that the old restore (``tmpdir / name``) turned into files in ``tmp_path``."""
    climb = "../" * 40 + str(tmp_path / "escaped_relative.txt").lstrip("/")
    return {climb: b"relative", str(tmp_path / "escaped_absolute.txt"): b"absolute"}


def test_a_checkpoint_naming_paths_in_tokenizer_files_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    before = sorted(p for p in tmp_path.rglob("*"))
    task_class, _, path = _tiny_ctc_checkpoint(tmp_path, _escapes(tmp_path))
    written = sorted(set(tmp_path.rglob("*")) - set(before))
    monkeypatch.chdir(path.parent)
    with pytest.raises(ValueError, match=r"unexpected entries.*escaped"):
        task_class.load_from_checkpoint(path, weights_only=True)
    assert sorted(set(tmp_path.rglob("*")) - set(before)) == written  # only the .ckpt and its folder
    assert (
        not (tmp_path / "escaped_relative.txt").exists() and not (tmp_path / "escaped_absolute.txt").exists()
    )


def test_unispeech_checkpoint_with_path_names_in_tokenizer_files_is_refused(tmp_path):
    import torch

    from speechlab.data.text import PhonemeTokenizer, tokenizer_to_files
    from speechlab.tasks.unispeech import UniSpeechTask

    checkpoint = {
        "num_ctc_classes": 5,
        "tokenizer_files": tokenizer_to_files(PhonemeTokenizer(["a", "b", "c"])),
    }
    checkpoint["tokenizer_files"].update(_escapes(tmp_path))
    fresh = UniSpeechTask(num_ctc_classes=5)
    with pytest.raises(ValueError, match="unexpected entries"):
        fresh.on_load_checkpoint(torch.load(_save(tmp_path, checkpoint), weights_only=True))
    assert not list(tmp_path.glob("escaped_*"))


def _save(tmp_path, obj):
    import torch

    path = tmp_path / "x.ckpt"
    torch.save(obj, path)
    return path


def test_a_checkpoint_carries_its_tokenizer_in_memory_round_trip(tmp_path):
    from speechlab.data.text import (
        PhonemeTokenizer,
        SentencePieceTokenizer,
        load_tokenizer,
        tokenizer_from_files,
        tokenizer_to_files,
    )

    task_class, task, path = _tiny_ctc_checkpoint(tmp_path, {})
    restored = task_class.load_from_checkpoint(path, weights_only=True)
    assert restored.tokenizer.units == task.tokenizer.units
    assert restored.tokenizer.encode("a cab") == task.tokenizer.encode("a cab")

    texts = ["the cat sat on the mat", "a dog ran in the park", "speech is sound"] * 20
    spm = SentencePieceTokenizer.build(texts, vocab_size=30)
    for tokenizer in (spm, PhonemeTokenizer(["a", "b"])):
        files = tokenizer_to_files(tokenizer)
        tokenizer.save(tmp_path / type(tokenizer).__name__)  # the files save() writes are the same bytes
        on_disk = {p.name: p.read_bytes() for p in (tmp_path / type(tokenizer).__name__).iterdir()}
        assert files == on_disk
        back = tokenizer_from_files(files)
        assert back.units == tokenizer.units == load_tokenizer(tmp_path / type(tokenizer).__name__).units


def test_a_units_json_naming_another_model_path_is_refused(tmp_path):
    from speechlab.data.text import (
        SentencePieceTokenizer,
        load_tokenizer,
        tokenizer_from_files,
        tokenizer_to_files,
    )

    spm = SentencePieceTokenizer.build(["the cat sat on the mat", "a dog ran"] * 20, vocab_size=20)
    files = tokenizer_to_files(spm)
    config = json.loads(files["units.json"])
    config["model"] = "../../secret.model"
    files["units.json"] = json.dumps(config).encode()
    with pytest.raises(ValueError, match="model file must be 'spm.model'"):
        tokenizer_from_files(files)
    folder = spm.save(tmp_path / "tok")
    (folder / "units.json").write_bytes(files["units.json"])
    with pytest.raises(ValueError, match="secret.model"):
        load_tokenizer(folder)
