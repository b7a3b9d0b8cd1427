"""Checkpoint conversion: unilm/fairseq ``.pt`` import, Hugging Face export round trip, key spellings, configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from speechlab.checkpoints.hf_ssl import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    export_hf_wavlm,
    state_dict_from_hf,
)
from speechlab.checkpoints.unilm import load_unilm_checkpoint, parse_conv_feature_layers  # noqa: E402
from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig  # noqa: E402

TOLERANCE = 1e-4
SMALL = dict(
    conv_dim=[32] * 7,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


def _hf_wavlm(large: bool) -> transformers.WavLMModel:
    torch.manual_seed(0)
    shape = dict(feat_extract_norm="layer", do_stable_layer_norm=True) if large else {}
    model = transformers.WavLMModel(transformers.WavLMConfig(**SMALL, **shape)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "gru_rel_pos" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    return model


def _batch():
    generator = torch.Generator().manual_seed(2)
    audio = torch.randn(2, 30000, generator=generator) * 0.1
    audio[1, 17000:] = 0
    lengths = torch.tensor([30000, 17000])
    return audio, lengths, (torch.arange(30000)[None] < lengths[:, None]).long()


def _to_unilm_layout(hf_state: dict, large: bool) -> dict:
    """HF WavLMModel keys -> the unilm release layout (unilm's wavlm/WavLM.py names), weight_g/weight_v spelling."""
    out = {}
    for key, value in hf_state.items():
        new = key
        for hf, unilm in [
            ("feature_projection.layer_norm.", "layer_norm."),
            ("feature_projection.projection.", "post_extract_proj."),
            ("masked_spec_embed", "mask_emb"),
            ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
            ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
            ("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
            (".attention.rel_attn_embed.", ".self_attn.relative_attention_bias."),
            (".attention.gru_rel_pos_linear.", ".self_attn.grep_linear."),
            (".attention.gru_rel_pos_const", ".self_attn.grep_a"),
            (".attention.", ".self_attn."),
            (".feed_forward.intermediate_dense.", ".fc1."),
            (".feed_forward.output_dense.", ".fc2."),
        ]:
            new = new.replace(hf, unilm)
        if new.startswith("encoder.layers.") and ".layer_norm." in new:
            new = new.replace(".layer_norm.", ".self_attn_layer_norm.")
        if new.startswith("feature_extractor.conv_layers."):
            new = new.replace(".conv.", ".0.")
            new = new.replace(".layer_norm.", ".2.1." if large else ".2.")
        out[new] = value
    return out


def _unilm_cfg(large: bool) -> dict:
    return {
        "extractor_mode": "layer_norm" if large else "default",
        "encoder_layers": 2,
        "encoder_embed_dim": 64,
        "encoder_ffn_embed_dim": 128,
        "encoder_attention_heads": 4,
        "activation_fn": "gelu",
        "layer_norm_first": large,
        "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
        "conv_bias": False,
        "normalize": False,
        "conv_pos": 16,
        "conv_pos_groups": 4,
        "relative_position_embedding": True,
        "num_buckets": 320,
        "max_distance": 800,
        "gru_rel_pos": True,
        "encoder_layerdrop": 0.05,
    }


@pytest.mark.parametrize("large", [False, True], ids=["base_shaped", "large_shaped"])
def test_unilm_checkpoint_loads_and_matches_transformers(tmp_path, large):
    hf_model = _hf_wavlm(large)
    unilm_state = _to_unilm_layout(hf_model.state_dict(), large)
    assert "encoder.pos_conv.0.weight_g" in unilm_state
    assert "encoder.layers.0.self_attn.relative_attention_bias.weight" in unilm_state
    assert ("feature_extractor.conv_layers.3.2.1.weight" in unilm_state) == large
    path = tmp_path / "WavLM-test.pt"
    torch.save({"cfg": _unilm_cfg(large), "model": unilm_state}, path)

    ours = load_unilm_checkpoint(path).eval()
    assert ours.config.max_distance == 800 and ours.config.layer_norm_first == large
    audio, lengths, attention_mask = _batch()
    with torch.no_grad():
        ref = hf_model(audio, attention_mask=attention_mask, output_hidden_states=True)
        out = ours(audio, lengths, output_hidden_states=True)
    valid = ~out.padding_mask
    for a, b in zip(ref.hidden_states, out.hidden_states, strict=True):
        assert (a - b)[valid].abs().max() <= TOLERANCE
    assert (ref.last_hidden_state - out.last_hidden_state)[valid].abs().max() <= TOLERANCE


def test_unilm_parametrizations_spelling_also_loads(tmp_path):
    hf_model = _hf_wavlm(False)
    state = _to_unilm_layout(hf_model.state_dict(), False)
    state["encoder.pos_conv.0.parametrizations.weight.original0"] = state.pop("encoder.pos_conv.0.weight_g")
    state["encoder.pos_conv.0.parametrizations.weight.original1"] = state.pop("encoder.pos_conv.0.weight_v")
    torch.save({"cfg": _unilm_cfg(False), "model": state}, tmp_path / "m.pt")
    ours = load_unilm_checkpoint(tmp_path / "m.pt").eval()
    audio, lengths, attention_mask = _batch()
    with torch.no_grad():
        out = ours(audio, lengths)
        diff = hf_model(audio, attention_mask=attention_mask).last_hidden_state - out.last_hidden_state
    assert diff[~out.padding_mask].abs().max() <= TOLERANCE


def test_unilm_cfg_without_max_distance_is_rejected(tmp_path):
    cfg = _unilm_cfg(False)
    del cfg["max_distance"]
    torch.save({"cfg": cfg, "model": {}}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="max_distance"):
        load_unilm_checkpoint(tmp_path / "m.pt")


class _Arbitrary:
    pass


def test_unilm_loader_never_unpickles_arbitrary_objects(tmp_path):
    torch.save({"cfg": {"x": _Arbitrary()}, "model": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_unilm_checkpoint(tmp_path / "evil.pt")


def test_unilm_weights_that_do_not_fit_the_cfg_are_an_error(tmp_path):
    state = _to_unilm_layout(_hf_wavlm(False).state_dict(), False)
    del state["encoder.layers.1.fc1.weight"]
    torch.save({"cfg": _unilm_cfg(False), "model": state}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="missing"):
        load_unilm_checkpoint(tmp_path / "m.pt")


def test_conv_feature_layers_string_is_parsed_without_eval():
    assert (
        parse_conv_feature_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")
        == SSLEncoderConfig().conv_layers
    )
    with pytest.raises(ValueError):
        parse_conv_feature_layers("__import__('os').getcwd()")


@pytest.mark.parametrize("spelling", ["weight_g", "parametrizations"])
@pytest.mark.parametrize("large", [False, True], ids=["base_shaped", "large_shaped"])
def test_export_to_transformers_round_trip_gives_identical_outputs(tmp_path, large, spelling):
    torch.manual_seed(0)
    config = SSLEncoderConfig(
        conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        conv_norm="layer" if large else "group",
        layer_norm_first=large,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        ffn_size=128,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        relative_position_bias=True,
    )
    ours = SSLEncoder(config).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "norm" in name or "gate" in name:
                param.add_(torch.randn_like(param) * 0.3)
    export_hf_wavlm(ours, tmp_path, weight_norm_keys=spelling)
    hf_model = transformers.WavLMModel.from_pretrained(tmp_path).eval()
    audio, lengths, attention_mask = _batch()
    with torch.no_grad():
        ref = hf_model(audio, attention_mask=attention_mask, output_hidden_states=True)
        out = ours(audio, lengths, output_hidden_states=True)
    valid = ~out.padding_mask
    for a, b in zip(ref.hidden_states, out.hidden_states, strict=True):
        assert (a - b)[valid].abs().max() <= TOLERANCE
    assert (ref.last_hidden_state - out.last_hidden_state)[valid].abs().max() <= TOLERANCE
    # every exported parameter really arrived (a silently re-initialised pos conv would break the check above too)
    torch.testing.assert_close(hf_model.encoder.pos_conv_embed.conv.weight, ours.encoder.pos_conv.conv.weight)


def test_config_round_trips_through_hf_dict():
    config = SSLEncoderConfig(
        conv_norm="layer", layer_norm_first=True, relative_position_bias=True, conv_bias=True
    )
    back = config_from_hf(config_to_hf(config, "wavlm"))
    for field in dataclasses.fields(SSLEncoderConfig):
        if field.name not in ("mask_prob", "feature_grad_mult"):  # pretraining-only, not in HF configs
            assert getattr(back, field.name) == getattr(config, field.name), field.name
    with pytest.raises(ValueError, match="relative_position_bias"):
        config_to_hf(SSLEncoderConfig(), "wavlm")


def test_hf_ctc_model_prefix_is_stripped_and_head_ignored():
    torch.manual_seed(0)
    hf_config = transformers.WavLMConfig(**SMALL, vocab_size=10)
    ctc = transformers.WavLMForCTC(hf_config)
    config = config_from_hf(hf_config.to_dict())
    weights = state_dict_from_hf(ctc.state_dict(), config)
    assert not any(k.startswith("lm_head") for k in weights)
    SSLEncoder(config).load_state_dict(weights, strict=True)


def test_unknown_backbone_key_is_a_clear_error():
    with pytest.raises(KeyError, match="encoder.mystery"):
        state_dict_from_hf({"encoder.mystery.weight": torch.zeros(1)}, SSLEncoderConfig())
