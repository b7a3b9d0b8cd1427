"""Encoder presets by name: unknown names and fields are clear errors that list the valid choices."""

import pytest

from speechlab.models.presets import encoder_config


def test_unknown_preset_names_it_and_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown encoder preset 'wavlm_huge'.*wavlm_tiny"):
        encoder_config("wavlm_huge")


def test_unknown_override_field_names_it_and_lists_the_valid_fields():
    with pytest.raises(ValueError, match=r"unknown encoder field\(s\).*hidden_sise.*valid fields"):
        encoder_config("wavlm_tiny", {"hidden_sise": 64})


def test_overrides_apply_to_the_named_preset():
    config = encoder_config("wavlm_tiny", {"num_layers": 1})
    assert config.num_layers == 1 and config.hidden_size == encoder_config("wavlm_tiny").hidden_size
