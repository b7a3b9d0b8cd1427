"""speechlab export and the Hugging Face CTC export: transformers' ASR pipeline transcribes like speechlab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from test_transcribe import EN, ctc_model, files, phoneme_tokenizer

from speechlab.api import load
from speechlab.checkpoints.hf_ctc import export_hf_ctc
from speechlab.checkpoints.pretrained_dir import save_pretrained
from speechlab.checkpoints.safe_load import CheckpointError
from speechlab.cli import main
from speechlab.data.text import CharTokenizer, SentencePieceTokenizer
from speechlab.inference.transcriber import Transcriber
from speechlab.models.ctc import CTCConfig, CTCModel
from speechlab.models.registry import build_config


def _pipeline_texts(directory: Path) -> list[str]:
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(directory))
    texts = []
    for path in files():
        audio, rate = sf.read(path, dtype="float32")
        texts.append(asr({"raw": audio, "sampling_rate": rate})["text"])
    return texts


def test_phoneme_model_exported_to_hf_transcribes_with_the_same_text(tmp_path):
    model = ctc_model(phoneme_tokenizer())
    export_hf_ctc(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["WavLMForCTC"] and config["vocab_size"] == model.tokenizer.vocab_size
    for name in ("vocab.json", "tokenizer_config.json", "preprocessor_config.json", "model.safetensors"):
        assert (tmp_path / "hf" / name).is_file()
    ours = [t.text for t in Transcriber(model)(files())]
    assert all(ours) and _pipeline_texts(tmp_path / "hf") == ours


def test_character_model_exported_to_hf_transcribes_with_the_same_words(tmp_path):
    from transformers import AutoModelForCTC, AutoTokenizer

    tokenizer = CharTokenizer.build([r["text"] for r in EN])
    # a HuBERT-style encoder (no relative position bias, GroupNorm conv) -> HubertForCTC
    config = build_config(
        "ssl_encoder", "wavlm_tiny", {"num_layers": 1, "conv_norm": "group", "relative_position_bias": False}
    )
    torch.manual_seed(0)
    hubert = CTCModel(CTCConfig(config, tokenizer.vocab_size, 0.0)).eval()
    hubert.tokenizer = tokenizer
    export_hf_ctc(hubert, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["HubertForCTC"]
    ours = [t.text for t in Transcriber(hubert)(files())]
    theirs = _pipeline_texts(tmp_path / "hf")
    assert all(ours)
    # transformers keeps the double space of 'word delimiter, blank, word delimiter'; speechlab collapses it
    assert [" ".join(t.split()) for t in theirs] == ours
    # and the id -> text mapping itself is the same
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = Transcriber(hubert)(files()[0])[0].unit_ids
    assert " ".join(hf_tokenizer.decode(ids).split()) == tokenizer.decode(ids)
    reference = AutoModelForCTC.from_pretrained(str(tmp_path / "hf")).eval()
    audio = torch.from_numpy(sf.read(files()[0], dtype="float32")[0])[None]
    with torch.no_grad():
        assert (reference(audio).logits - hubert(audio)[0]).abs().max() < 1e-4
    # and back: the HF directory loads as our CTC model with the same vocabulary
    back = load(tmp_path / "hf")
    assert back.tokenizer.units == tokenizer.units and isinstance(back, CTCModel)


def test_sentencepiece_vocabulary_is_refused_with_the_reason(tmp_path):
    texts = [r["text"] for r in EN] * 5
    tokenizer = SentencePieceTokenizer.build(texts, vocab_size=40)
    model = ctc_model(tokenizer)
    with pytest.raises(CheckpointError, match="sentencepiece.*word boundary inside them"):
        export_hf_ctc(model, tmp_path / "hf")
    save_pretrained(model, tmp_path / "ours", family="ctc")  # our own format carries it
    assert load(tmp_path / "ours").tokenizer.units == tokenizer.units


def test_export_command_prints_a_round_trip_report(tmp_path, capsys):
    model = ctc_model(phoneme_tokenizer())
    save_pretrained(model, tmp_path / "ours", family="ctc")
    assert main(["export", str(tmp_path / "ours"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    out = capsys.readouterr().out
    assert "transformers WavLMForCTC vs speechlab: CTC logits: max abs difference" in out
    assert "greedy transcript, transformers:" in out and "OK: largest difference" in out


def test_a_corrupted_export_fails_the_report(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    from speechlab.checkpoints import export

    real = export.export_hf_ctc

    def corrupting(model, directory, **kwargs):
        real(model, directory, **kwargs)
        state = load_file(str(Path(directory) / "model.safetensors"))
        state["lm_head.weight"] = state["lm_head.weight"] * 3.0
        save_file(state, str(Path(directory) / "model.safetensors"))
        return Path(directory)

    monkeypatch.setattr(export, "export_hf_ctc", corrupting)
    save_pretrained(ctc_model(phoneme_tokenizer()), tmp_path / "ours", family="ctc")
    assert main(["export", str(tmp_path / "ours"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from speechlab.models.unispeech import UniSpeech

    save_pretrained(
        UniSpeech(build_config("unispeech", "unispeech_tiny", {"num_ctc_classes": 5})),
        tmp_path / "uni",
        family="unispeech",
    )
    assert main(["export", str(tmp_path / "uni"), "--out", str(tmp_path / "o"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "unispeech model has no Hugging Face export" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(tmp_path / "uni"), "--out", str(tmp_path / "o2"), "--ckpt", "best"]) == 2
    assert "needs a run folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["export", str(tmp_path / "uni"), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
