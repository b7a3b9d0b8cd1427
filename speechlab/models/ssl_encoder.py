"""The shared SSL backbone: wav2vec 2.0 / HuBERT / WavLM / UniSpeech encoder.

wav2vec 2.0 (Baevski et al. 2020) §2, the backbone HuBERT (Hsu et al. 2021) §III reuses, plus WavLM's gated relative
position bias (Chen et al. 2022) §III-A.

waveform (B, S) -> [per-utterance normalisation] -> conv feature encoder (B, C, T) -> LayerNorm(C) -> Linear(C, D)
-> dropout -> [mask_emb at masked frames] -> Transformer (conv positional embedding, post-LN or pre-LN layers,
optional WavLM gated relative position bias) -> (B, T, D).

Padding: ``lengths`` gives valid samples; frames are valid up to the conv formula (:func:`conv_output_lengths`), the
same convention as ``transformers``. With ``conv_norm="layer"`` (Large) a padded batch gives, on valid frames, the
same result as each utterance alone (within float error). With ``conv_norm="group"`` (Base) it does **not**: the
GroupNorm of conv block 0 normalises each channel over the whole padded time axis, so zero padding changes the
statistics and thus every valid frame (docs/pitfalls.md, 1; ~10-30 % relative change on random weights). This is what the
released Base checkpoints and the reference implementations do; bucket by length or run unpadded when exact
Base features matter.

Speed: with ``skip_padding`` (default) and more than 10 % padded frames, the Transformer runs each utterance on its
valid frames only (the conv encoder still runs on the padded batch, which keeps GroupNorm faithful). Valid frames are
unchanged; padded frames of ``last_hidden_state`` / ``hidden_states`` are then 0 instead of the values a padded
computation leaves there (which nobody should read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from speechlab.host_sync import host_reads_are_free
from speechlab.nn import masks
from speechlab.nn.feature_encoder import ConvFeatureEncoder, Fp32LayerNorm, conv_output_lengths
from speechlab.nn.transformer import TransformerEncoder
from speechlab.validate import check_number


def _default_conv_layers() -> list[tuple[int, int, int]]:
    return [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class SSLEncoderConfig:
    """Backbone hyper-parameters; defaults are the Base model (WavLM/HuBERT/wav2vec 2.0 Base, 94 M parameters)."""

    conv_layers: list[tuple[int, int, int]] = field(
        default_factory=_default_conv_layers
    )  # (channels, kernel, stride)
    conv_norm: str = (
        "group"  # "group" (Base: GroupNorm in block 0) | "layer" (Large: LayerNorm in every block)
    )
    conv_bias: bool = False
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    layer_norm_first: bool = False  # pre-LN (Large) vs post-LN (Base)
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    relative_position_bias: bool = False  # WavLM gated relative position bias
    num_buckets: int = 320
    max_distance: int = 800
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feature_dropout: float = 0.1  # fairseq dropout_input / HF feat_proj_dropout
    layerdrop: float = 0.05
    mask_prob: float = 0.65
    mask_length: int = 10
    normalize_waveform: bool = False  # per-utterance zero mean / unit variance over valid samples
    feature_grad_mult: float = 1.0
    layer_norm_eps: float = 1e-5
    skip_padding: bool = True  # Transformer per utterance on valid frames when > 10 % of a batch is padding

    def __post_init__(self) -> None:
        self.conv_layers = [tuple(int(v) for v in spec) for spec in self.conv_layers]
        self._check_numbers()
        if self.conv_norm not in ("group", "layer"):
            raise ValueError(f"SSLEncoderConfig.conv_norm must be 'group' or 'layer', got {self.conv_norm!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"SSLEncoderConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_buckets % 4 != 0:
            raise ValueError(f"SSLEncoderConfig.num_buckets must be a multiple of 4, got {self.num_buckets}")

    def _check_numbers(self) -> None:
        """NaN, inf, negative sizes and out-of-range probabilities are errors naming the field."""
        name = "SSLEncoderConfig."
        if not self.conv_layers or len(self.conv_layers) > 64:
            raise ValueError(f"{name}conv_layers must hold 1 to 64 layers, got {len(self.conv_layers)}")
        for i, spec in enumerate(self.conv_layers):
            if len(spec) != 3 or min(spec) < 1:
                raise ValueError(
                    f"{name}conv_layers[{i}] must be (channels, kernel, stride) >= 1, got {spec}"
                )
        for size in (
            "hidden_size",
            "num_heads",
            "ffn_size",
            "pos_conv_kernel",
            "pos_conv_groups",
            "mask_length",
        ):
            check_number(name + size, getattr(self, size), minimum=1, integer=True)
        for size in ("num_layers", "num_buckets", "max_distance"):
            check_number(name + size, getattr(self, size), minimum=0, integer=True)
        for probability in ("dropout", "attention_dropout", "activation_dropout", "feature_dropout", "layerdrop",
                            "mask_prob"):  # fmt: skip
            check_number(name + probability, getattr(self, probability), minimum=0, maximum=1)
        check_number(name + "feature_grad_mult", self.feature_grad_mult, minimum=0)
        check_number(name + "layer_norm_eps", self.layer_norm_eps, above=0)


@dataclass
class SSLEncoderOutput:
    last_hidden_state: Tensor  # (B, T, D); pre-LN models: after the final LayerNorm
    padding_mask: Tensor  # (B, T) bool, True at padded frames
    frame_lengths: Tensor  # (B,) int64
    features: Tensor  # (B, T, C) CNN features after the feature LayerNorm, before projection, unmasked
    feature_penalty: (
        Tensor  # scalar: mean(cnn_features ** 2) over valid frames (raw CNN output, before the LN)
    )
    hidden_states: (
        tuple[Tensor, ...] | None
    )  # L+1 states (B, T, D) when requested (see speechlab.nn.transformer)


class _GradMultiply(torch.autograd.Function):
    """Identity forward; gradient scaled by ``scale`` (fairseq GradMultiply, for feature_grad_mult)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad * ctx.scale, None


def normalize_waveform(audio: Tensor, lengths: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Zero mean / unit variance per utterance over its valid samples; padding stays 0.

    audio: (batch, samples) float; lengths: (batch,) int64 valid samples (None = all valid).
    """
    if lengths is None:
        valid = torch.ones_like(audio, dtype=torch.bool)
    else:
        valid = masks.valid_mask(lengths.to(audio.device), audio.shape[1])
    x = audio.float()
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (x * valid).sum(-1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    return (((x - mean) / torch.sqrt(var + eps)) * valid).to(audio.dtype)


def conv_num_frames(num_samples: int, conv_layers: list[tuple[int, int, int]]) -> int:
    """Output frames of a stack of unpadded convolutions ``(channels, kernel, stride)`` over ``num_samples``
    samples, on Python ints (no tensor, so no host read)."""
    frames = int(num_samples)
    for _, kernel, stride in conv_layers:
        frames = max((frames - kernel) // stride + 1, 0)
    return frames


def replace_masked_frames(x: Tensor, frame_mask: Tensor, mask_emb: Tensor) -> Tensor:
    """x: (B, T, D) encoder input, frame_mask: (B, T) bool -> x with the masked frames replaced by ``mask_emb``
    (D,), the masked-prediction input of HuBERT / WavLM / wav2vec 2.0 (and SpecAugment-style CTC masking)."""
    if frame_mask.shape != x.shape[:2]:
        raise ValueError(
            f"frame_mask must be (batch, frames)={tuple(x.shape[:2])}, got {tuple(frame_mask.shape)}"
        )
    return torch.where(frame_mask.unsqueeze(-1), mask_emb.to(x.dtype), x)


class SSLEncoder(nn.Module):
    """wav2vec 2.0 / HuBERT / WavLM backbone (no pretraining head). See module docstring for the data flow."""

    def __init__(self, config: SSLEncoderConfig):
        super().__init__()
        self.config = config
        self.feature_encoder = ConvFeatureEncoder(config.conv_layers, config.conv_norm, config.conv_bias)
        channels = self.feature_encoder.out_channels
        self.feature_norm = Fp32LayerNorm(channels, eps=config.layer_norm_eps)
        self.feature_projection = nn.Linear(channels, config.hidden_size)
        bound = channels**-0.5
        nn.init.uniform_(self.feature_projection.weight, -bound, bound)
        nn.init.uniform_(self.feature_projection.bias, -bound, bound)
        self.feature_dropout = nn.Dropout(config.feature_dropout)
        self.mask_emb = nn.Parameter(torch.rand(config.hidden_size))
        self.encoder = TransformerEncoder(
            dim=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            ffn_size=config.ffn_size,
            dropout=config.dropout,
            attention_dropout=config.attention_dropout,
            activation_dropout=config.activation_dropout,
            layer_norm_first=config.layer_norm_first,
            pos_conv_kernel=config.pos_conv_kernel,
            pos_conv_groups=config.pos_conv_groups,
            relative_position_bias=config.relative_position_bias,
            num_buckets=config.num_buckets,
            max_distance=config.max_distance,
            layerdrop=config.layerdrop,
            layer_norm_eps=config.layer_norm_eps,
            skip_padding=config.skip_padding,
        )

    @property
    def receptive_field(self) -> int:
        """Samples needed for one output frame (400 for the standard 7-layer stack)."""
        field, hop = 1, 1
        for _, kernel, stride in self.config.conv_layers:
            field += (kernel - 1) * hop
            hop *= stride
        return field

    @property
    def hop(self) -> int:
        """Samples between output frames (the product of the conv strides: 320 for the standard stack)."""
        return math.prod(stride for _, _, stride in self.config.conv_layers)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """lengths: (batch,) int64 samples -> (batch,) int64 frames (conv formula, 320-sample hop)."""
        return conv_output_lengths(lengths, self.config.conv_layers)

    def num_frames(self, num_samples: int) -> int:
        """Frames of one unpadded input of ``num_samples`` samples: :meth:`frame_lengths` on a Python int (no
        tensor, so no host read)."""
        return conv_num_frames(num_samples, self.config.conv_layers)

    def _cnn(self, audio: Tensor, block0_statistics: tuple[Tensor, Tensor] | None) -> Tensor:
        """(B, S) -> (B, C, T) with feature_grad_mult applied (0 = frozen, run without autograd)."""
        scale = self.config.feature_grad_mult
        if self.training and scale == 0.0:
            with torch.no_grad():
                return self.feature_encoder(audio, block0_statistics)
        features = self.feature_encoder(audio, block0_statistics)
        if self.training and scale != 1.0 and features.requires_grad:
            features = _GradMultiply.apply(features, scale)
        return features

    def forward(
        self,
        audio: Tensor,
        lengths: Tensor | None = None,
        *,
        frame_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        normalize: bool | None = None,
        block0_statistics: tuple[Tensor, Tensor] | None = None,
    ) -> SSLEncoderOutput:
        """audio: (batch, samples) float32 in [-1, 1], zero-padded; lengths: (batch,) int64 valid samples
        (None = no padding); frame_mask: (batch, T) bool, frames replaced by ``mask_emb`` (e.g. from
        :func:`speechlab.nn.masking.span_mask`).

        For windows of a longer input (chunked extraction), which must compute what the whole input does:
        ``normalize`` overrides ``config.normalize_waveform`` for this call (False: the caller normalised the whole
        file already); ``block0_statistics``: the whole file's ``(mean, var)`` for conv block 0's GroupNorm (Base
        models, see :meth:`ConvFeatureEncoder.block0_statistics`).
        """
        if audio.dim() != 2:
            raise ValueError(f"audio must be (batch, samples), got shape {tuple(audio.shape)}")
        if self.num_frames(audio.shape[1]) < 1:
            raise ValueError(
                f"audio too short: {audio.shape[1]} samples give 0 frames; the conv receptive field needs at least "
                f"{self.receptive_field} samples"
            )
        if self.config.normalize_waveform if normalize is None else normalize:
            audio = normalize_waveform(audio, lengths)
        cnn = self._cnn(audio, block0_statistics)  # (B, C, T)
        batch, _, num_frames = cnn.shape

        if lengths is None:
            frame_lengths = torch.full((batch,), num_frames, dtype=torch.long, device=audio.device)
            padding_mask = torch.zeros(batch, num_frames, dtype=torch.bool, device=audio.device)
            attn_padding = None
        else:
            frame_lengths = self.frame_lengths(lengths.to(audio.device)).clamp(max=num_frames)
            padding_mask = masks.padding_mask(frame_lengths, num_frames)
            if host_reads_are_free(padding_mask):
                attn_padding = padding_mask if bool(padding_mask.any()) else None
            else:  # masking no key is a no-op: pass the mask rather than read it on the host
                attn_padding = padding_mask

        valid = (~padding_mask).unsqueeze(1)  # (B, 1, T)
        penalty = (cnn.float().pow(2) * valid).sum() / (valid.sum() * cnn.shape[1]).clamp(min=1)

        features = self.feature_norm(cnn.transpose(1, 2))  # (B, T, C)
        x = self.feature_dropout(self.feature_projection(features))
        if frame_mask is not None:
            x = replace_masked_frames(x, frame_mask, self.mask_emb)

        last, hidden_states = self.encoder(x, attn_padding, output_hidden_states)
        return SSLEncoderOutput(
            last_hidden_state=last,
            padding_mask=padding_mask,
            frame_lengths=frame_lengths,
            features=features,
            feature_penalty=penalty,
            hidden_states=hidden_states,
        )
