"""WavLM: named backbone presets (family ``ssl_encoder`` of :mod:`speechlab.models.registry`), and :class:`WavLM`,
the backbone + HuBERT's unit prediction head that masked-prediction pretraining trains.

Each preset returns an :class:`SSLEncoderConfig`; build the backbone alone with ``SSLEncoder(cfg)``.

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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechlab.models.ctc import EncoderConfig, build_encoder, encoder_config_from_dict
from speechlab.models.registry import preset
from speechlab.models.ssl_encoder import SSLEncoderConfig, SSLEncoderOutput

TINY_CONV = [(128, 10, 5)] + [(128, 3, 2)] * 4 + [(128, 2, 2)] * 2  # 7 convs x 128 channels, 320-sample hop
# the Large Transformer of WavLM / HuBERT / wav2vec 2.0 / UniSpeech: layer-norm CNN, pre-LN, 24 x 1024 (16 heads)
LARGE_SIZE = dict(
    conv_norm="layer", hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096, layer_norm_first=True
)


@preset("ssl_encoder")
def wavlm_base() -> SSLEncoderConfig:
    """WavLM Base (LibriSpeech 960 h): HuBERT Base backbone + gated relative position bias."""
    return SSLEncoderConfig(relative_position_bias=True, mask_prob=0.8)


@preset("ssl_encoder")
def wavlm_base_plus() -> SSLEncoderConfig:
    """WavLM Base+ (Mix-94k): same architecture as Base."""
    return SSLEncoderConfig(relative_position_bias=True, mask_prob=0.8)


@preset("ssl_encoder")
def wavlm_large() -> SSLEncoderConfig:
    """WavLM Large: layer-norm CNN, pre-LN, 24 x 1024, normalised input."""
    return SSLEncoderConfig(**LARGE_SIZE, relative_position_bias=True, normalize_waveform=True, mask_prob=0.8)


@preset("ssl_encoder")
def hubert_base() -> SSLEncoderConfig:
    """HuBERT Base (fairseq hubert_base_librispeech.yaml): mask 0.8, feature_grad_mult 0.1."""
    return SSLEncoderConfig(mask_prob=0.8, feature_grad_mult=0.1)


@preset("ssl_encoder")
def wav2vec2_base() -> SSLEncoderConfig:
    """wav2vec 2.0 Base: mask 0.65, feature_grad_mult 0.1."""
    return SSLEncoderConfig(mask_prob=0.65, feature_grad_mult=0.1)


@preset("ssl_encoder")
def wavlm_tiny() -> SSLEncoderConfig:
    """CPU-trainable WavLM: 7 convs x 128 ch (20 ms hop), 3 layers x 128, 4 heads, gated relative bias (~0.9 M parameters)."""
    return SSLEncoderConfig(
        conv_layers=list(TINY_CONV),
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


@preset("ssl_encoder")
def tiny_encoder() -> SSLEncoderConfig:
    """Same size as :func:`wavlm_tiny` without the relative position bias (HuBERT / wav2vec 2.0 style)."""
    config = wavlm_tiny()
    config.relative_position_bias = False
    return config


# ------------------------------------------------------------------------------------------ the pretraining model


class UnitPredictionHead(nn.Module):
    """HuBERT prediction head: ``final_proj`` + one learned embedding per unit, logits = cos / temperature.

    hidden: (..., D) -> logits (..., num_classes), computed in fp32 (cosine logits are kept out of bf16, docs/pitfalls.md, 2).
    """

    def __init__(
        self, hidden_size: int, num_classes: int, final_dim: int = 256, logit_temp: float = 0.1
    ) -> None:
        super().__init__()
        self.final_proj = nn.Linear(hidden_size, final_dim)
        self.label_embeddings = nn.Parameter(
            torch.rand(num_classes, final_dim)
        )  # uniform [0, 1) as in fairseq
        self.logit_temp = logit_temp

    def forward(self, hidden: Tensor) -> Tensor:
        projected = self.final_proj(hidden)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            projected = F.normalize(projected.float(), dim=-1, eps=1e-8)
            embeddings = F.normalize(self.label_embeddings.float(), dim=-1, eps=1e-8)
            return projected @ embeddings.T / self.logit_temp


@dataclass
class WavLMConfig:
    """The masked-prediction model: the encoder's config (an ``SSLEncoderConfig`` preset above, or a
    ``FbankConformerConfig``), the k-means cluster count, the head's projection size and cosine temperature."""

    encoder: EncoderConfig = field(default_factory=SSLEncoderConfig)
    num_classes: int = 100
    final_dim: int = 256  # 256 Base, 768 Large
    logit_temp: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):  # read back from a stored config
            self.encoder = encoder_config_from_dict(self.encoder)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (the k-means cluster count), got {self.num_classes}")


class WavLM(nn.Module):
    """WavLM / HuBERT pretraining model: an encoder (``encoder``, what fine-tuning and feature extraction keep) and
    the unit prediction head (``head``). The losses are :class:`speechlab.tasks.wavlm_pretrain.WavLMPretrainTask`'s.
    """

    def __init__(self, config: WavLMConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder)
        self.head = UnitPredictionHead(
            config.encoder.hidden_size, config.num_classes, config.final_dim, config.logit_temp
        )

    @property
    def hop(self) -> int:
        """Samples between encoder frames."""
        return self.encoder.hop

    def forward(
        self, audio: Tensor, lengths: Tensor | None = None, frame_mask: Tensor | None = None
    ) -> tuple[Tensor, SSLEncoderOutput]:
        """audio: (B, S) float32, lengths: (B,) valid samples, frame_mask: (B, T) bool frames to mask ->
        unit logits (B, T, num_classes) fp32 and the encoder's output (``frame_lengths``, ``feature_penalty``)."""
        out = self.encoder(audio, lengths, frame_mask=frame_mask)
        return self.head(out.last_hidden_state), out
