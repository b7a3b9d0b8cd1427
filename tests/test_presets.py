"""Config presets by family and name (speechlab.models.registry): unknown families, names and fields are clear
errors that list the valid choices; nested configs take dicts of overrides, validated the same way."""

import dataclasses

import pytest

from speechlab.models.codec import CodecConfig, codec_tiny
from speechlab.models.fbank_conformer import FbankConformerConfig
from speechlab.models.registry import build_config, config_from_dict, families, presets
from speechlab.models.ssl_encoder import SSLEncoderConfig
from speechlab.models.wavlm import wavlm_tiny


def test_unknown_preset_names_it_and_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown ssl_encoder preset 'wavlm_huge'.*wavlm_tiny"):
        build_config("ssl_encoder", "wavlm_huge")


def test_unknown_family_names_it_and_lists_the_families():
    with pytest.raises(ValueError, match=r"unknown model family 'whisper'.*codec.*ssl_encoder.*unispeech"):
        build_config("whisper", "tiny")


def test_unknown_override_field_names_it_and_lists_the_valid_fields():
    with pytest.raises(ValueError, match=r"unknown SSLEncoderConfig field\(s\).*hidden_sise.*valid fields"):
        build_config("ssl_encoder", "wavlm_tiny", {"hidden_sise": 64})


def test_overrides_apply_to_the_named_preset():
    config = build_config("ssl_encoder", "wavlm_tiny", {"num_layers": 1})
    assert config.num_layers == 1 and config.hidden_size == wavlm_tiny().hidden_size


def test_the_ctc_encoder_family_is_the_union_of_the_ssl_and_conformer_presets():
    assert families() == ["codec", "conformer", "ctc_encoder", "ssl_encoder", "unispeech"]
    assert presets("ctc_encoder") == {**presets("ssl_encoder"), **presets("conformer")}
    assert isinstance(build_config("ctc_encoder", "fbank_conformer_tiny"), FbankConformerConfig)
    assert isinstance(build_config("ctc_encoder", "wavlm_base"), SSLEncoderConfig)
    with pytest.raises(ValueError, match="unknown conformer preset 'wavlm_tiny'"):
        build_config("conformer", "wavlm_tiny")


def test_a_nested_config_takes_a_dict_of_overrides_validated_like_the_top():
    config = build_config("unispeech", "unispeech_tiny", {"num_ctc_classes": 7, "encoder": {"num_layers": 1}})
    assert config.num_ctc_classes == 7 and config.encoder.num_layers == 1 and config.encoder.hidden_size == 64
    with pytest.raises(ValueError, match=r"\['encoder.num_layerz'\].*unispeech preset 'unispeech_tiny'"):
        build_config("unispeech", "unispeech_tiny", {"encoder": {"num_layerz": 1}})
    with pytest.raises(ValueError, match=r"unknown UniSpeechConfig field\(s\) \['swap'\]"):
        build_config("unispeech", "unispeech_tiny", {"swap": 0.0})


def test_a_whole_dataclass_passes_through():
    encoder = FbankConformerConfig(num_layers=1)
    assert build_config("unispeech", "unispeech_tiny", {"encoder": encoder}).encoder == encoder
    mine = dataclasses.replace(codec_tiny(), num_quantizers=2)
    config = build_config("codec", mine, {"codebook_size": 32})
    assert (config.num_quantizers, config.codebook_size) == (2, 32) and mine.codebook_size == 64


def test_every_preset_builds_its_family_config():
    kinds = {"ssl_encoder": SSLEncoderConfig, "conformer": FbankConformerConfig, "codec": CodecConfig}
    for family, kind in kinds.items():
        for name in presets(family):
            assert isinstance(build_config(family, name), kind), name


def test_config_from_dict_inverts_asdict_and_names_unknown_fields():
    config = build_config("unispeech", "unispeech_fbank_tiny")
    assert config_from_dict(type(config), dataclasses.asdict(config)) == config
    with pytest.raises(ValueError, match=r"cfg.json: unknown CodecConfig field\(s\) \['bogus'\]"):
        config_from_dict(CodecConfig, {"bogus": 1}, source="cfg.json")
