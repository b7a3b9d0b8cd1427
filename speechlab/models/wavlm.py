"""Named backbone presets. Each returns an :class:`SSLEncoderConfig`; build with ``SSLEncoder(cfg)``.

The released models' sizes (WavLM, Chen et al. 2022, §IV-A; HuBERT, Hsu et al. 2021, Table I; wav2vec 2.0, Baevski
et al. 2020, §4.2) with the settings of their checkpoints' configs (torchaudio's ``wavlm_base`` / ``wavlm_large`` factories,
transformers' ``WavLMConfig`` on the hub).

| preset            | conv norm | layout | layers x D (heads) | rel. bias | waveform norm |
|-------------------|-----------|--------|--------------------|-----------|---------------|
| wavlm_base        | group     | post-LN| 12 x 768 (12)      | 320 / 800 | no            |
| wavlm_base_plus   | group     | post-LN| 12 x 768 (12)      | 320 / 800 | no            |
| wavlm_large       | layer     | pre-LN | 24 x 1024 (16)     | 320 / 800 | yes           |
| hubert_base       | group     | post-LN| 12 x 768 (12)      | no        | no            |
| wav2vec2_base     | group     | post-LN| 12 x 768 (12)      | no        | no            |
| wavlm_tiny        | layer     | post-LN| 3 x 128 (4)        | 320 / 800 | no            |
| tiny_encoder      | layer     | post-LN| 3 x 128 (4)        | no        | no            |

The tiny presets keep the 320-sample hop (7 convs, 128 channels) and train on a CPU; the layer-norm CNN makes them
padding-invariant, which keeps batched tests exact.
"""

from __future__ import annotations

from speechlab.models.ssl_encoder import SSLEncoderConfig

_TINY_CONV = [(128, 10, 5)] + [(128, 3, 2)] * 4 + [(128, 2, 2)] * 2


def wavlm_base() -> SSLEncoderConfig:
    """WavLM Base (LibriSpeech 960 h): HuBERT Base backbone + gated relative position bias."""
    return SSLEncoderConfig(relative_position_bias=True, mask_prob=0.8)


def wavlm_base_plus() -> SSLEncoderConfig:
    """WavLM Base+ (Mix-94k): same architecture as Base."""
    return SSLEncoderConfig(relative_position_bias=True, mask_prob=0.8)


def wavlm_large() -> SSLEncoderConfig:
    """WavLM Large: layer-norm CNN, pre-LN, 24 x 1024, normalised input."""
    return SSLEncoderConfig(
        conv_norm="layer",
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        ffn_size=4096,
        layer_norm_first=True,
        relative_position_bias=True,
        normalize_waveform=True,
        mask_prob=0.8,
    )


def hubert_base() -> SSLEncoderConfig:
    """HuBERT Base (fairseq hubert_base_librispeech.yaml): mask 0.8, feature_grad_mult 0.1."""
    return SSLEncoderConfig(mask_prob=0.8, feature_grad_mult=0.1)


def wav2vec2_base() -> SSLEncoderConfig:
    """wav2vec 2.0 Base: mask 0.65, feature_grad_mult 0.1."""
    return SSLEncoderConfig(mask_prob=0.65, feature_grad_mult=0.1)


def wavlm_tiny() -> SSLEncoderConfig:
    """CPU-trainable WavLM: 7 convs x 128 ch (20 ms hop), 3 layers x 128, 4 heads, gated relative bias (~0.9 M parameters)."""
    return SSLEncoderConfig(
        conv_layers=list(_TINY_CONV),
        conv_norm="layer",
        hidden_size=128,
        num_layers=3,
        num_heads=4,
        ffn_size=512,
        pos_conv_kernel=32,
        pos_conv_groups=16,
        relative_position_bias=True,
        layerdrop=0.0,
        mask_prob=0.65,
    )


def tiny_encoder() -> SSLEncoderConfig:
    """Same size as :func:`wavlm_tiny` without the relative position bias (HuBERT / wav2vec 2.0 style)."""
    config = wavlm_tiny()
    config.relative_position_bias = False
    return config
