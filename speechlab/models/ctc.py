"""CTC speech recognition model: SSL encoder (conv features + Transformer) + linear CTC head, and greedy decoding."""

from __future__ import annotations

import torch
from torch import nn

from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig


class CTCModel(nn.Module):
    """``SSLEncoder`` followed by dropout and a linear layer over the unit inventory (index 0 = CTC blank)."""

    def __init__(self, encoder_config: SSLEncoderConfig, vocab_size: int, head_dropout: float = 0.1) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (blank + at least one unit), got {vocab_size}")
        self.encoder = SSLEncoder(encoder_config)
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(encoder_config.hidden_size, vocab_size)

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
    frames = torch.arange(best.shape[1], device=best.device)
    valid = frames[None, :] < frame_lengths[:, None]
    changed = torch.ones_like(valid)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = (valid & changed & (best != blank_id)).cpu()
    best = best.cpu()
    return [best[b][keep[b]].tolist() for b in range(best.shape[0])]
