"""Parity of SSLEncoder with transformers' WavLMModel / HubertModel / Wav2Vec2Model (same weights, same input).

Reference models are random-init transformers models built here (nothing is downloaded), perturbed away from their
init (gates, norms, gate constants) so that every parameter matters, saved with ``save_pretrained`` and loaded into
ours through :mod:`speechlab.checkpoints.hf_ssl`. Every hidden state must match within 1e-4 in fp32 in a padded batch:
on valid frames with the default per-utterance path (``skip_padding``), on all frames (padded ones included, both
compute them the same way) with ``skip_padding=False``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from speechlab.checkpoints.hf_ssl import load_hf_directory  # noqa: E402

TOLERANCE = 1e-4

SMALL = dict(
    conv_dim=[32] * 7,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)
BASE_SHAPED = dict(feat_extract_norm="group", do_stable_layer_norm=False)
LARGE_SHAPED = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "gru_rel_pos" in name or "rel_attn_embed" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)


def _batch():
    """Two utterances, 2.0 s and 1.3 s (99 / 64 frames: past the 80-frame exact-bucket range), zero-padded."""
    generator = torch.Generator().manual_seed(1)
    audio = torch.randn(2, 32000, generator=generator) * 0.1
    audio[1, 20800:] = 0.0
    lengths = torch.tensor([32000, 20800])
    attention_mask = (torch.arange(32000)[None] < lengths[:, None]).long()
    return audio, lengths, attention_mask


def _compare(hf_model, tmp_path) -> dict[str, float]:
    torch.manual_seed(0)
    _perturb(hf_model)
    hf_model.eval().save_pretrained(tmp_path)
    ours = load_hf_directory(tmp_path).eval()
    audio, lengths, attention_mask = _batch()
    with torch.no_grad():
        ref = hf_model(audio, attention_mask=attention_mask, output_hidden_states=True)
        out = ours(audio, lengths, output_hidden_states=True)
        ours.encoder.skip_padding = False
        out_padded = ours(audio, lengths, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == hf_model.config.num_hidden_layers + 1
    valid = ~out.padding_mask
    assert bool(out.padding_mask.any())
    diffs = {}
    for i, (a, b, c) in enumerate(
        zip(ref.hidden_states, out.hidden_states, out_padded.hidden_states, strict=True)
    ):
        diffs[f"hidden_states[{i}] valid frames"] = (a - b)[valid].abs().max().item()
        diffs[f"hidden_states[{i}] all frames, skip_padding=False"] = (a - c).abs().max().item()
    diffs["last_hidden_state"] = (ref.last_hidden_state - out.last_hidden_state)[valid].abs().max().item()
    diffs["last_hidden_state, skip_padding=False"] = (
        (ref.last_hidden_state - out_padded.last_hidden_state).abs().max().item()
    )
    if getattr(ref, "extract_features", None) is not None:  # HubertModel does not return them
        diffs["features"] = (ref.extract_features - out.features).abs().max().item()
    assert max(diffs.values()) <= TOLERANCE, diffs
    return diffs


def test_wavlm_base_shaped_matches_transformers_on_every_hidden_state(tmp_path):
    torch.manual_seed(0)
    model = transformers.WavLMModel(transformers.WavLMConfig(**SMALL, **BASE_SHAPED))
    _compare(model, tmp_path)


def test_wavlm_large_shaped_matches_transformers_on_every_hidden_state(tmp_path):
    torch.manual_seed(0)
    model = transformers.WavLMModel(transformers.WavLMConfig(**SMALL, **LARGE_SHAPED))
    _compare(model, tmp_path)


def test_hub_weight_g_spelling_loads_identically(tmp_path):
    """A hub-style file (``weight_g``/``weight_v`` keys, as on the Hub and in old torch) loads to the same model."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = transformers.WavLMModel(transformers.WavLMConfig(**SMALL, **BASE_SHAPED))
    _perturb(model)
    model.eval().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in weights  # what new torch saves
    renamed = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in weights.items()
    }
    assert "encoder.pos_conv_embed.conv.weight_g" in renamed
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = load_hf_directory(tmp_path).eval()
    audio, lengths, attention_mask = _batch()
    with torch.no_grad():
        ref = model(audio, attention_mask=attention_mask).last_hidden_state
        out = ours(audio, lengths)
    assert (ref - out.last_hidden_state)[~out.padding_mask].abs().max() <= TOLERANCE


def test_hubert_matches_transformers(tmp_path):
    torch.manual_seed(0)
    model = transformers.HubertModel(transformers.HubertConfig(**SMALL, **BASE_SHAPED))
    _compare(model, tmp_path)


def test_wav2vec2_large_shaped_matches_transformers(tmp_path):
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**SMALL, **LARGE_SHAPED))
    _compare(model, tmp_path)


def test_hidden_state_convention_pre_ln(tmp_path):
    """hidden_states[0] = encoder input after conv pos (no LN for pre-LN); hidden_states[-1] = last layer output
    *before* the final LN; last_hidden_state = final LN of it (= HF last_hidden_state)."""
    torch.manual_seed(0)
    hf_model = transformers.WavLMModel(transformers.WavLMConfig(**SMALL, **LARGE_SHAPED)).eval()
    _perturb(hf_model)
    hf_model.save_pretrained(tmp_path)
    ours = load_hf_directory(tmp_path).eval()
    audio, lengths, attention_mask = _batch()
    with torch.no_grad():
        ref = hf_model(audio, attention_mask=attention_mask, output_hidden_states=True)
        out = ours(audio, lengths, output_hidden_states=True)
        final_ln = ours.encoder.layer_norm(out.hidden_states[-1])
    valid = ~out.padding_mask
    torch.testing.assert_close(out.last_hidden_state[valid], final_ln[valid])
    assert (out.hidden_states[-1] - out.last_hidden_state).abs().max() > 0.1  # the two really differ
    valid = ~out.padding_mask
    torch.testing.assert_close(
        ref.hidden_states[-1][valid], out.hidden_states[-1][valid], atol=TOLERANCE, rtol=0
    )
    torch.testing.assert_close(
        ref.last_hidden_state[valid], out.last_hidden_state[valid], atol=TOLERANCE, rtol=0
    )


def test_hidden_state_convention_post_ln(tmp_path):
    """Post-LN: hidden_states[0] is after the encoder input LN; hidden_states[-1] is last_hidden_state."""
    torch.manual_seed(0)
    hf_model = transformers.WavLMModel(transformers.WavLMConfig(**SMALL, **BASE_SHAPED)).eval()
    hf_model.save_pretrained(tmp_path)
    ours = load_hf_directory(tmp_path).eval()
    audio, lengths, attention_mask = _batch()
    with torch.no_grad():
        out = ours(audio, lengths, output_hidden_states=True)
        ref = hf_model(audio, attention_mask=attention_mask, output_hidden_states=True)
    assert out.hidden_states[-1] is out.last_hidden_state
    valid = ~out.padding_mask
    # after the input LayerNorm (weight 1, bias 0 at init): zero mean per frame
    assert out.hidden_states[0][valid].mean(-1).abs().max() < 1e-4
    torch.testing.assert_close(
        ref.hidden_states[0][valid], out.hidden_states[0][valid], atol=TOLERANCE, rtol=0
    )
