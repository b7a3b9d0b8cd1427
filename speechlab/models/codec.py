"""Neural audio codec: SEANet encoder -> (latent Transformer) -> residual VQ -> (Transformer) -> SEANet decoder.

Presets (all 16 kHz mono):

* :func:`codec_16khz` — 50 Hz frames (hop 320, aligned with WavLM/HuBERT frames), 8 x 1024 codes = 4 kbps, sized to
  run >= 10x real time on 2 CPU threads (thin high-rate convs, capacity at the frame rate).
* :func:`codec_16khz_low_rate` — 12.5 Hz frames (hop 1280), 8 x 2048 = 1.1 kbps, 4-layer latent Transformers.
* :func:`codec_16khz_causal` — streaming variant of the 50 Hz model (causal convs and attention, explicit state).
* :func:`codec_tiny` — for tests and CPU recipes.

Tokens are ``codes: (B, n_q, frames) int64``; any prefix ``n_q`` of the levels decodes (quantizer dropout).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from speechlab.host_sync import host_reads_are_free
from speechlab.models.registry import preset, presets
from speechlab.nn.masks import valid_mask
from speechlab.nn.rvq import ResidualVectorQuantizer, RVQOutput
from speechlab.nn.seanet import (
    LatentTransformer,
    SEANetConfig,
    SEANetDecoder,
    SEANetEncoder,
    fold_weight_norm,
)

MODEL_TYPE = "codec"  # family name in speechlab pretrained directories
FORMAT_VERSION = 1


@torch.no_grad()
def init_conv_weights(module: nn.Module) -> None:
    """Variance-preserving init of every conv in ``module``: weights ~ N(0, 1 / fan_in), biases 0 (as DAC).

    Why not PyTorch's default: its weights (std 1/sqrt(3 fan_in)) shrink the signal ~1.7x per conv and its biases
    (uniform +-1/sqrt(fan_in)) add a per-channel constant, so a fresh SEANet encoder's latent is that constant
    (|mean| 0.041 against a time-std of 0.0075 on speech for codec_tiny). The RVQ's k-means init then spreads
    the codes over a speck that the first optimiser steps move by more than its width: every frame lands on one or
    two codes and stays there (level-0 perplexity 1.6 of 64 after the mini recipe's 200 batches). Weight norm's
    ``g`` and ``v`` are set through the parametrization, so ``weight`` is exactly the drawn tensor.
    """
    for conv in module.modules():
        if isinstance(conv, (nn.Conv1d, nn.ConvTranspose1d)):
            weight = torch.empty_like(conv.weight)
            # fan_in: inputs per output sample (a transposed conv of stride s sums in_channels * kernel / s)
            fan_in = weight.shape[1] * weight.shape[2]
            if isinstance(conv, nn.ConvTranspose1d):
                fan_in = weight.shape[0] * weight.shape[2] / conv.stride[0]
            weight.normal_(0.0, fan_in**-0.5)
            conv.weight = weight  # through weight norm's right_inverse when parametrized
            if conv.bias is not None:
                conv.bias.zero_()


@dataclass
class CodecConfig:
    """Every hyperparameter of :class:`Codec`. Defaults = :func:`codec_16khz`."""

    sample_rate: int = 16000
    # SEANet
    n_filters: int = 32
    ratios: list[int] = field(default_factory=lambda: [2, 4, 5, 8])
    dimension: int = 256
    n_residual_layers: int = 1
    compress: int = 2
    max_channels: int = 512
    causal: bool = False
    # latent Transformer (0 layers = none), one in the encoder and one in the decoder
    transformer_layers: int = 2
    transformer_heads: int = 4
    transformer_ffn: int = 1024
    transformer_context: int = 250  # causal sliding window in frames
    # residual VQ
    num_quantizers: int = 8
    codebook_size: int = 1024
    codebook_dim: int | None = None  # set (e.g. 8) for DAC-style factorized L2-normalised codebooks
    ema_decay: float = 0.99
    kmeans_iters: int = 50
    dead_code_threshold: float = 2.0  # EnCodec: EMA count under which a code is re-drawn from the batch
    # Mimi: the threshold as this fraction of the uniform count (frames per batch / codebook_size) instead, which does
    # not depend on the batch size (None: the absolute threshold above)
    dead_code_ratio: float | None = None
    quantizer_dropout: float = 0.5
    # optional projection of RVQ level 0 to a teacher's hidden size (semantic distillation)
    semantic_dim: int | None = None

    def __post_init__(self) -> None:
        self.ratios = [int(r) for r in self.ratios]
        if any(r < 1 for r in self.ratios):
            raise ValueError(f"CodecConfig.ratios must be positive, got {self.ratios}")
        if self.num_quantizers < 1 or self.codebook_size < 2:
            raise ValueError("CodecConfig needs num_quantizers >= 1 and codebook_size >= 2")

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def bitrate(self, n_q: int | None = None) -> float:
        """Bits per second without entropy coding: n_q * log2(K) * frame_rate."""
        return (n_q or self.num_quantizers) * math.log2(self.codebook_size) * self.frame_rate

    def seanet(self) -> SEANetConfig:
        return SEANetConfig(
            dimension=self.dimension,
            n_filters=self.n_filters,
            ratios=list(self.ratios),
            n_residual_layers=self.n_residual_layers,
            compress=self.compress,
            causal=self.causal,
            max_channels=self.max_channels,
        )


@preset("codec")
def codec_16khz() -> CodecConfig:
    return CodecConfig()


@preset("codec")
def codec_16khz_low_rate() -> CodecConfig:
    return CodecConfig(ratios=[2, 4, 5, 8, 4], transformer_layers=4, codebook_size=2048, dimension=256)


@preset("codec")
def codec_16khz_causal() -> CodecConfig:
    return CodecConfig(causal=True)


@preset("codec")
def codec_tiny() -> CodecConfig:
    return CodecConfig(
        n_filters=8,
        dimension=32,
        max_channels=64,
        transformer_layers=1,
        transformer_heads=2,
        transformer_ffn=64,
        num_quantizers=4,
        codebook_size=64,
        kmeans_iters=10,
    )


@preset("codec")
def codec_mini() -> CodecConfig:
    """``codec_tiny`` with 8 codes a level (150 bps each) and no quantizer dropout: the quick start's codec.

    A decoder trained for a few CPU minutes renders about as much as 64 codes of level 0 carry, so at 64 the
    extra levels buy ~8 % in mel distance; at 8 each level adds detail it can still render (recipes/mini/README.md).
    """
    return replace(codec_tiny(), codebook_size=8, quantizer_dropout=0.0)


# name -> preset function, the registry's ``codec`` family (kept for inference/codec_metrics.py and benchmarks/)
PRESETS = presets("codec")


@dataclass
class CodecOutput:
    audio: Tensor  # (B, S) reconstruction, same length as the input
    codes: Tensor  # (B, n_q, T)
    frame_lengths: Tensor  # (B,)
    rvq: RVQOutput  # losses and codebook statistics
    semantic: Tensor | None  # (B, T, semantic_dim) projected level-0 output when semantic_dim is set


@dataclass
class CodecStreamState:
    """Explicit streaming state: conv/attention caches and not-yet-encoded samples."""

    encoder: dict = field(default_factory=dict)
    decoder: dict = field(default_factory=dict)
    pending: Tensor | None = None  # (B, <hop) samples waiting for a full frame


class _ConfigField:
    """A read-only attribute of the model that is the field of the same name of its ``config``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        return self if model is None else getattr(model.config, self.name)


class Codec(nn.Module):
    """``encode(audio, lengths, n_q) -> (codes, frame_lengths)``, ``decode(codes, frame_lengths) -> audio``."""

    def __init__(self, config: CodecConfig | None = None, weight_norm: bool = True) -> None:
        """``weight_norm``: parametrize convs with weight norm (training); fold later with :meth:`fold_weight_norm`."""
        super().__init__()
        self.config = config = config or codec_16khz()
        seanet = config.seanet()
        self.encoder = SEANetEncoder(seanet, norm=weight_norm)
        self.decoder = SEANetDecoder(seanet, norm=weight_norm)
        init_conv_weights(self.encoder)
        init_conv_weights(self.decoder)
        self.encoder_transformer = self.decoder_transformer = None
        if config.transformer_layers:
            args = (
                config.dimension,
                config.transformer_layers,
                config.transformer_heads,
                config.transformer_ffn,
                config.causal,
                config.transformer_context,
            )
            self.encoder_transformer = LatentTransformer(*args)
            self.decoder_transformer = LatentTransformer(*args)
        self.quantizer = ResidualVectorQuantizer(
            config.dimension,
            config.num_quantizers,
            config.codebook_size,
            config.codebook_dim,
            config.ema_decay,
            config.kmeans_iters,
            config.dead_code_threshold,
            config.quantizer_dropout,
            config.dead_code_ratio,
        )
        self.semantic_proj = nn.Linear(config.dimension, config.semantic_dim) if config.semantic_dim else None

    # --- geometry ---------------------------------------------------------------------------------------------
    sample_rate = _ConfigField()
    hop_length = _ConfigField()
    frame_rate = _ConfigField()
    num_quantizers = _ConfigField()
    codebook_size = _ConfigField()

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Valid samples ``(B,)`` -> valid frames ``(B,)``: ceil(lengths / hop)."""
        return torch.div(lengths + self.hop_length - 1, self.hop_length, rounding_mode="floor")

    def _check_audio(self, audio: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if audio.dim() == 3 and audio.shape[1] == 1:
            audio = audio[:, 0]
        if audio.dim() != 2:
            raise ValueError(f"audio must be (batch, samples) mono, got shape {tuple(audio.shape)}")
        if lengths is not None:
            lengths = lengths.to(device=audio.device, dtype=torch.long)
            # The range check reads the lengths on the host: a device sync per step in training on a GPU, where
            # the lengths come from the task's own crops; the API (eval mode) and the CPU always check.
            check_range = not self.training or host_reads_are_free(lengths)
            if lengths.shape != (audio.shape[0],) or (
                check_range and (int(lengths.max()) > audio.shape[1] or int(lengths.min()) < 1)
            ):
                raise ValueError(f"lengths must be (batch,) in [1, {audio.shape[1]}], got {lengths.tolist()}")
        pad = (-audio.shape[1]) % self.hop_length
        if pad:
            audio = nn.functional.pad(audio, (0, pad))
        return audio, lengths

    # --- encode / decode ----------------------------------------------------------------------------------------
    def _encode(self, audio: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> latent (B, D, T), frame_lengths (B,), and the frame lengths to mask with (None: nothing padded)."""
        num_samples = audio.shape[-1]
        audio, lengths = self._check_audio(audio, lengths)
        if lengths is None and audio.shape[-1] != num_samples:
            # the hop padding is a padded tail too: mask it so a file alone == the same file inside a batch
            lengths = torch.full((audio.shape[0],), num_samples, dtype=torch.long, device=audio.device)
        if lengths is not None:
            audio = audio * valid_mask(lengths, audio.shape[1])
        latent = self.encoder(audio[:, None], lengths)
        mask_lengths = None if lengths is None else self.frame_lengths(lengths)
        if self.encoder_transformer is not None:
            latent = self.encoder_transformer(latent, mask_lengths)
        frame_lengths = mask_lengths
        if frame_lengths is None:
            frame_lengths = torch.full(
                (audio.shape[0],), latent.shape[-1], dtype=torch.long, device=audio.device
            )
        return latent, frame_lengths, mask_lengths

    def encode_latent(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``audio: (B, S)`` -> continuous latent ``(B, D, T)`` and ``frame_lengths (B,)``."""
        latent, frame_lengths, _ = self._encode(audio, lengths)
        return latent, frame_lengths

    @torch.no_grad()
    def encode(
        self, audio: Tensor, lengths: Tensor | None = None, n_q: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``audio: (B, S)`` float in [-1, 1] at ``sample_rate`` -> ``codes (B, n_q, T) int64, frame_lengths (B,)``.

        Codes of padded frames are meaningless (ignore them using ``frame_lengths``). A latent with NaN/inf at a
        real frame raises ``ValueError`` naming the batch rows: its nearest codes would be arbitrary.
        """
        latent, frame_lengths = self.encode_latent(audio, lengths)
        real = valid_mask(frame_lengths, latent.shape[-1])
        bad_rows = (~torch.isfinite(latent) & real[:, None]).any(dim=2).any(dim=1)
        if bool(bad_rows.any()):
            rows = bad_rows.nonzero().flatten().tolist()
            raise ValueError(
                f"codec latent is NaN/inf for batch rows {rows}, so their codes would be meaningless -> the codec "
                "overflows or its weights are corrupt; re-export or retrain it"
            )
        return self.quantizer.encode(latent, frame_lengths, n_q), frame_lengths

    def decode_latent(self, quantized: Tensor, frame_lengths: Tensor | None = None) -> Tensor:
        if self.decoder_transformer is not None:
            quantized = self.decoder_transformer(quantized, frame_lengths)
        return self.decoder(quantized, frame_lengths)[:, 0]

    @torch.no_grad()
    def decode(self, codes: Tensor, frame_lengths: Tensor | None = None) -> Tensor:
        """``codes: (B, n_q, T)`` (any ``n_q <= num_quantizers``) -> ``audio (B, T * hop)``; tails past
        ``frame_lengths * hop`` are zero."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be (batch, n_q, frames), got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must be in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        quantized = self.quantizer.decode(codes.long())
        if frame_lengths is not None:
            frame_lengths = frame_lengths.to(device=codes.device, dtype=torch.long)
            quantized = quantized * valid_mask(frame_lengths, codes.shape[-1])[:, None].to(quantized.dtype)
        return self.decode_latent(quantized, frame_lengths)

    def forward(self, audio: Tensor, lengths: Tensor | None = None, n_q: int | None = None) -> CodecOutput:
        """Training/analysis pass: quantize (updating codebooks in training mode) and reconstruct.

        ``audio: (B, S)`` -> :class:`CodecOutput` with ``audio (B, S)``.
        """
        num_samples = audio.shape[-1]
        latent, frame_lengths, mask_lengths = self._encode(audio, lengths)
        rvq = self.quantizer(latent, mask_lengths, n_q)
        recon = self.decode_latent(rvq.quantized, mask_lengths)
        semantic = None
        if self.semantic_proj is not None:
            semantic = self.semantic_proj(rvq.first_level.transpose(1, 2))
        return CodecOutput(recon[:, :num_samples], rvq.codes, frame_lengths, rvq, semantic)

    # --- streaming (causal configs) ------------------------------------------------------------------------------
    def new_stream_state(self) -> CodecStreamState:
        self._require_causal()
        return CodecStreamState()

    def _require_causal(self) -> None:
        if not self.config.causal:
            raise RuntimeError(
                "streaming needs a causal codec (codec_16khz_causal() or CodecConfig(causal=True))"
            )

    @torch.no_grad()
    def encode_chunk(
        self, audio: Tensor, state: CodecStreamState, n_q: int | None = None, *, _valid: int | None = None
    ) -> Tensor:
        """Feed ``audio: (B, n)`` (any n); returns the codes ``(B, n_q, frames)`` of every frame completed so far.

        Concatenating the outputs over chunks equals ``encode`` on the whole signal (zero-padded to a whole
        frame), provided the last partial frame is flushed with :meth:`flush`.
        """
        self._require_causal()
        if state.pending is not None:
            audio = torch.cat([state.pending, audio], dim=-1)
        usable = audio.shape[-1] - audio.shape[-1] % self.hop_length
        state.pending = audio[:, usable:]
        audio = audio[:, :usable]
        if usable == 0:
            return torch.zeros(
                audio.shape[0], n_q or self.num_quantizers, 0, dtype=torch.long, device=audio.device
            )
        lengths = None if _valid is None else torch.full((audio.shape[0],), _valid, device=audio.device)
        latent = self.encoder(audio[:, None], lengths, cache=state.encoder)
        if self.encoder_transformer is not None:
            latent = self.encoder_transformer(latent, cache=state.encoder)
        return self.quantizer.encode(latent, None, n_q)

    @torch.no_grad()
    def flush(self, state: CodecStreamState, n_q: int | None = None) -> Tensor:
        """Encode the pending partial frame (zero-padded), as ``encode`` does at the end of a file."""
        if state.pending is None or state.pending.shape[-1] == 0:
            b = 0 if state.pending is None else state.pending.shape[0]
            return torch.zeros(b, n_q or self.num_quantizers, 0, dtype=torch.long)
        valid = state.pending.shape[-1]
        pad = state.pending.new_zeros(state.pending.shape[0], self.hop_length - valid)
        return self.encode_chunk(pad, state, n_q, _valid=valid)

    @torch.no_grad()
    def decode_chunk(self, codes: Tensor, state: CodecStreamState) -> Tensor:
        """``codes: (B, n_q, frames)`` -> ``audio (B, frames * hop)``; chunks concatenate to ``decode``."""
        self._require_causal()
        quantized = self.quantizer.decode(codes.long())
        if self.decoder_transformer is not None:
            quantized = self.decoder_transformer(quantized, cache=state.decoder)
        return self.decoder(quantized, cache=state.decoder)[:, 0]

    # --- export -------------------------------------------------------------------------------------------------
    def fold_weight_norm(self) -> Codec:
        """Fold weight norm into plain weights (faster inference; training should keep it)."""
        fold_weight_norm(self)
        return self

    def codebook_hash(self) -> str:
        """sha256 (16 hex digits) of the code -> vector tables: identifies a token vocabulary."""
        digest = hashlib.sha256()
        for tensor in self.quantizer.codebook_state():
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def model_version(self) -> str:
        return f"speechlab-{MODEL_TYPE}/{FORMAT_VERSION}"
