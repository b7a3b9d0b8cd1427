"""speechlab convert: speechlab <-> Hugging Face, import from unilm .pt, with a per-layer parity report."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_api import _hf_to_unilm_key, hf_model, tiny_encoder

from speechlab import cli
from speechlab.api import FeatureExtractor, load
from speechlab.checkpoints.pretrained_dir import is_pretrained_dir, save_pretrained
from speechlab.commands import convert
from speechlab.inference.round_trip import test_signal as make_test_signal


def _layer_lines(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"layer\s+\d+\s+([0-9.e+-]+)", text)]


def test_hugging_face_to_speechlab_prints_per_layer_differences(tmp_path, capsys):
    hf_model("wavlm").save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert is_pretrained_dir(tmp_path / "ours")
    assert "transformers on source" in out  # independent reference: transformers itself on the source
    diffs = _layer_lines(out)
    assert len(diffs) == 2 * 3 and max(diffs) < 1e-4
    assert "OK: largest difference" in out


def test_speechlab_to_hugging_face_loads_in_transformers(tmp_path, capsys):
    from transformers import AutoModel

    model = tiny_encoder(conv_norm="layer", layer_norm_first=True, normalize_waveform=True)
    save_pretrained(model, tmp_path / "ours", family="wavlm")
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    out = capsys.readouterr().out
    assert "transformers on" in out and max(_layer_lines(out)) < 1e-4
    reference = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    audio = make_test_signal(1.0)
    normalized = (audio - audio.mean()) / torch.sqrt(audio.var(unbiased=False) + 1e-5)
    with torch.no_grad():
        expected = reference(normalized[None], output_hidden_states=True).hidden_states
    ours = FeatureExtractor(model)(audio).hidden_states
    for layer, state in enumerate(expected):
        assert (ours[layer, 0] - state[0]).abs().max() < 1e-4


def test_unilm_pt_import(tmp_path, capsys):
    reference = hf_model("hubert")
    state = {_hf_to_unilm_key(k): v for k, v in reference.state_dict().items()}
    cfg = {
        "extractor_mode": "default",
        "encoder_layers": 2,
        "encoder_embed_dim": 32,
        "encoder_ffn_embed_dim": 64,
        "encoder_attention_heads": 4,
        "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
        "conv_pos": 16,
        "conv_pos_groups": 4,
    }
    torch.save({"cfg": cfg, "model": state}, tmp_path / "hubert.pt")
    assert cli.main(["convert", str(tmp_path / "hubert.pt"), str(tmp_path / "ours")]) == 0
    assert max(_layer_lines(capsys.readouterr().out)) < 1e-4
    model = load(tmp_path / "ours")
    audio = make_test_signal(1.0)
    with torch.no_grad():
        expected = reference(audio[None], output_hidden_states=True).hidden_states
    ours = FeatureExtractor(model)(audio).hidden_states
    for layer, hidden in enumerate(expected):
        assert (ours[layer, 0] - hidden[0]).abs().max() < 1e-4


def test_a_corrupted_export_fails_the_parity_check(tmp_path, monkeypatch, capsys):
    from speechlab.checkpoints import export

    real_export = export.export_hf_wavlm

    def corrupting_export(encoder, directory, **kwargs):
        real_export(encoder, directory, **kwargs)
        path = directory / "model.safetensors"
        state = load_file(str(path))
        state["encoder.layers.1.feed_forward.output_dense.weight"] *= (
            3.0  # (a constant bias shift would vanish in LN)
        )
        save_file(state, str(path))
        return directory

    monkeypatch.setattr(export, "export_hf_wavlm", corrupting_export)
    save_pretrained(tiny_encoder(), tmp_path / "ours", family="wavlm")
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 1
    out = capsys.readouterr().out
    diffs = _layer_lines(out)
    assert diffs[0] == 0.0 and diffs[2] > 1e-2  # layer 0 untouched, the last layer moved
    assert "FAILED" in out


def test_refuses_non_empty_output_and_unreadable_source(tmp_path, capsys):
    save_pretrained(tiny_encoder(), tmp_path / "ours", family="wavlm")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "busy")]) == 2
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    assert cli.main(["convert", str(tmp_path / "bad.pt"), str(tmp_path / "out")]) == 2  # bad input: exit 2
    assert "bad.pt" in capsys.readouterr().err


def test_add_parser_registers_convert_with_documented_options():
    parser = argparse.ArgumentParser()
    convert.add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", "a", "b", "--to", "hf"])
    assert args.func is convert.run and args.to == "hf"
    help_text = parser._subparsers._group_actions[0].choices["convert"].format_help()
    for option in ("--to", "--family", "--tolerance", "--overwrite"):
        assert option in help_text


@pytest.mark.parametrize("seconds", [1.0, 2.0])
def test_test_signal_is_fixed(seconds):
    assert torch.equal(make_test_signal(seconds), make_test_signal(seconds))
