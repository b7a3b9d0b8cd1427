"""CTC speech recognition model: an encoder (SSL: conv features + Transformer, or fbank + Conformer) + linear CTC
head, and greedy decoding."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from speechlab.models.fbank_conformer import FbankConformerConfig, FbankConformerEncoder
from speechlab.models.registry import ConfigError, config_from_dict
from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig
from speechlab.nn.masks import valid_mask

EncoderConfig = SSLEncoderConfig | FbankConformerConfig


def encoder_config_from_dict(values: dict[str, Any], source: str = "config") -> EncoderConfig:
    """A stored encoder config (``dataclasses.asdict``) back as its dataclass: ``kind`` names a non-SSL encoder."""
    kind = values.get("kind")
    if kind is None:
        return config_from_dict(SSLEncoderConfig, values, source=source, prefix="encoder.")
    if kind == "fbank_conformer":
        return config_from_dict(FbankConformerConfig, values, source=source, prefix="encoder.")
    raise ConfigError(
        f"unknown CTC encoder kind {kind!r}; expected 'fbank_conformer' or none (an SSL encoder)"
    )


def build_encoder(config: EncoderConfig) -> nn.Module:
    """The encoder module for ``config``: ``SSLEncoder`` or ``FbankConformerEncoder``."""
    if isinstance(config, FbankConformerConfig):
        return FbankConformerEncoder(config)
    return SSLEncoder(config)


@dataclasses.dataclass
class CTCConfig:
    """A CTC model: the encoder's config, the unit inventory size (blank included) and the head dropout."""

    encoder: EncoderConfig = dataclasses.field(default_factory=SSLEncoderConfig)
    vocab_size: int = 32
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):  # read back from config.json
            self.encoder = encoder_config_from_dict(self.encoder)


class CTCModel(nn.Module):
    """An encoder (``SSLEncoder``, or ``FbankConformerEncoder`` for a ``FbankConformerConfig``) followed by dropout and a linear layer over the unit inventory (index 0 = CTC blank).

    Built from a :class:`CTCConfig` (``CTCModel(config)``, how pretrained directories rebuild it) or from the
    encoder config and the vocabulary size (``CTCModel(encoder_config, vocab_size, head_dropout)``).
    ``tokenizer`` is the unit inventory when the model was loaded with one (``speechlab.load``), else None.
    """

    def __init__(
        self,
        config: CTCConfig | SSLEncoderConfig | FbankConformerConfig,
        vocab_size: int | None = None,
        head_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(config, SSLEncoderConfig | FbankConformerConfig):
            if vocab_size is None:
                raise ValueError("CTCModel(encoder_config, vocab_size): vocab_size is required")
            config = CTCConfig(encoder=config, vocab_size=vocab_size, head_dropout=head_dropout)
        elif vocab_size is not None:
            raise ValueError(
                "CTCModel(CTCConfig): pass the vocabulary size inside the config, not separately"
            )
        if config.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (blank + at least one unit), got {config.vocab_size}")
        self.config = config
        self.tokenizer: Any = None
        self.encoder = build_encoder(config.encoder)
        self.dropout = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(config.encoder.hidden_size, config.vocab_size)

    def forward(
        self, audio: torch.Tensor, lengths: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """audio: (B, S) float32, lengths: (B,) valid samples -> logits (B, T, vocab), frame_lengths (B,)."""
        out = self.encoder(audio, lengths, frame_mask=frame_mask)
        return self.head(self.dropout(out.last_hidden_state)), out.frame_lengths


def ctc_greedy_decode(
    logits: torch.Tensor, frame_lengths: torch.Tensor, blank_id: int = 0
) -> list[list[int]]:
    """Best-path decoding: argmax per frame, merge repeats, drop blanks.

    logits: (B, T, V); frame_lengths: (B,) -> one list of unit ids per utterance.
    """
    best = logits.argmax(dim=-1)  # (B, T)
    valid = valid_mask(frame_lengths.to(best.device), best.shape[1])
    changed = torch.ones_like(valid)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = (valid & changed & (best != blank_id)).cpu()
    best = best.cpu()
    return [best[b][keep[b]].tolist() for b in range(best.shape[0])]
