"""A log-mel (Kaldi fbank) front end + ``torchaudio.models.Conformer``: a CTC encoder that learns from scratch on a CPU.

waveform (B, S) -> per utterance: Kaldi fbank (80 bins, 25 ms / 10 ms) and mean/variance normalisation over its
frames -> stride-2 1-D convolutions over time (2 of them: 4x subsampling, 40 ms frames) -> Linear(D) ->
[mask_emb at masked frames] -> ``torchaudio.models.Conformer`` (Gulati et al. 2020) -> (B, T, D).

``front_end: waveform`` replaces fbank by ``wavlm_tiny``'s learned conv feature encoder on the raw waveform (7 convs x
128 channels, LayerNorm, 20 ms hop; then one stride-2 convolution gives the same 25 Hz): the diagnostic of the mini
recipe's README that separates the front end from the Transformer (preset ``waveform_conformer_tiny``).

Selected in configs by ``encoder: fbank_conformer_tiny`` (see :func:`fbank_conformer_tiny`); ``CTCModel`` builds it
from a :class:`FbankConformerConfig` the way it builds ``SSLEncoder`` from an ``SSLEncoderConfig``, and this
module's outputs carry the same fields ``CTCModel`` and ``CTCTask`` read (``last_hidden_state``,
``frame_lengths``, ``padding_mask``).

Padding: fbank and its normalisation see each utterance's valid samples only, and padded frames are zeroed after each
subsampling convolution, so the Conformer's input at valid frames does not depend on the padding. Inside the
Conformer, attention ignores padded keys, but torchaudio's depthwise convolution (and its BatchNorm) reads padded
frames as they are, so valid outputs near the end of a shorter utterance change slightly with the padding; the
length-bucketed sampler keeps that padding small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio
from torch import Tensor, nn

from speechlab.models.registry import preset
from speechlab.models.ssl_encoder import SSLEncoderOutput, conv_num_frames, replace_masked_frames
from speechlab.nn.feature_encoder import ConvFeatureEncoder, Fp32LayerNorm, conv_output_lengths
from speechlab.nn.masks import padding_mask, valid_mask
from speechlab.validate import check_number

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
WAVEFORM_CONV = [(128, 10, 5)] + [(128, 3, 2)] * 4 + [(128, 2, 2)] * 2  # wavlm_tiny's, 320-sample hop


@dataclass
class FbankConformerConfig:
    """Front end and Conformer hyper-parameters (defaults: the ~1.5 M-parameter CPU model of the mini recipe)."""

    kind: str = "fbank_conformer"  # tells this config from an SSLEncoderConfig in a stored dict
    front_end: str = "fbank"  # "fbank" | "waveform" (wavlm_tiny's conv feature encoder; a diagnostic)
    num_mel_bins: int = 80
    subsampling_layers: int = 2  # stride-2 convolutions: 2 -> 40 ms frames (25 Hz), 1 -> 20 ms (50 Hz)
    hidden_size: int = 144
    num_layers: int = 4
    num_heads: int = 4
    ffn_size: int = 576
    conv_kernel: int = 15  # Conformer depthwise convolution, in (subsampled) frames
    dropout: float = 0.1
    feature_dropout: float = 0.1  # after the subsampling's projection

    def __post_init__(self) -> None:
        if self.kind != "fbank_conformer":
            raise ValueError(f"FbankConformerConfig.kind must be 'fbank_conformer', got {self.kind!r}")
        name = "FbankConformerConfig."
        if self.front_end not in ("fbank", "waveform"):
            raise ValueError(f"{name}front_end must be 'fbank' or 'waveform', got {self.front_end!r}")
        for size in (
            "num_mel_bins",
            "subsampling_layers",
            "hidden_size",
            "num_layers",
            "num_heads",
            "ffn_size",
        ):
            check_number(name + size, getattr(self, size), minimum=1, integer=True)
        check_number(name + "conv_kernel", self.conv_kernel, minimum=1, integer=True)
        if self.conv_kernel % 2 == 0:
            raise ValueError(
                f"{name}conv_kernel must be odd (torchaudio's Conformer), got {self.conv_kernel}"
            )
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"{name}hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        for probability in ("dropout", "feature_dropout"):
            check_number(name + probability, getattr(self, probability), minimum=0, maximum=1)


@preset("conformer")
def fbank_conformer_tiny() -> FbankConformerConfig:
    """80-bin fbank, 4x subsampling (25 Hz), 4 Conformer layers x 144, 4 heads, kernel 15 (~1.5 M parameters)."""
    return FbankConformerConfig()


@preset("conformer")
def waveform_conformer_tiny() -> FbankConformerConfig:
    """:func:`fbank_conformer_tiny` on ``wavlm_tiny``'s raw-waveform CNN instead of fbank (same 25 Hz output)."""
    return FbankConformerConfig(front_end="waveform", subsampling_layers=1)


def normalized_fbank(audio: Tensor, num_mel_bins: int = 80) -> Tensor:
    """audio: (samples,) float32 at 16 kHz in [-1, 1] -> (frames, num_mel_bins) log-mel, zero mean / unit variance
    per bin over the utterance. Kaldi's convention: 16-bit sample scale, no dither (deterministic)."""
    feats = torchaudio.compliance.kaldi.fbank(
        audio[None].float() * 32768, num_mel_bins=num_mel_bins, sample_frequency=SAMPLE_RATE, dither=0.0
    )
    return (feats - feats.mean(0)) / (feats.std(0, unbiased=False) + 1e-5)


def fbank_frames(lengths: Tensor) -> Tensor:
    """(batch,) valid samples -> (batch,) fbank frames (Kaldi ``snip_edges``: whole 25 ms windows, 10 ms hop)."""
    return torch.where(lengths >= WINDOW, (lengths - WINDOW) // HOP + 1, torch.zeros_like(lengths))


class FbankConformerEncoder(nn.Module):
    """See the module docstring. ``feature_encoder`` is the subsampling stack (what ``freeze_feature_encoder``
    freezes); ``mask_emb`` replaces masked frames (SpecAugment-style time masking of ``CTCTask``)."""

    def __init__(self, config: FbankConformerConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = config.num_mel_bins
        if config.front_end == "waveform":
            self.waveform_encoder = ConvFeatureEncoder(WAVEFORM_CONV, norm="layer")
            channels = WAVEFORM_CONV[-1][0]
            self.waveform_norm = Fp32LayerNorm(channels)
        for _ in range(config.subsampling_layers):
            layers.append(nn.Conv1d(channels, config.hidden_size, kernel_size=3, stride=2, padding=1))
            channels = config.hidden_size
        self.feature_encoder = nn.ModuleList(layers)
        self.feature_projection = nn.Linear(config.hidden_size, config.hidden_size)
        self.feature_dropout = nn.Dropout(config.feature_dropout)
        self.mask_emb = nn.Parameter(torch.rand(config.hidden_size))
        self.encoder = torchaudio.models.Conformer(
            input_dim=config.hidden_size,
            num_heads=config.num_heads,
            ffn_dim=config.ffn_size,
            num_layers=config.num_layers,
            depthwise_conv_kernel_size=config.conv_kernel,
            dropout=config.dropout,
        )

    @property
    def hop(self) -> int:
        """Samples between output frames (the front end's hop x 2 per subsampling convolution)."""
        front_hop = 320 if self.config.front_end == "waveform" else HOP
        return front_hop * 2**self.config.subsampling_layers

    def _front_frames(self, lengths: Tensor) -> Tensor:
        """(batch,) samples -> (batch,) frames of the front end (before the subsampling convolutions)."""
        if self.config.front_end == "waveform":
            return conv_output_lengths(lengths, WAVEFORM_CONV).to(lengths.device)
        return fbank_frames(lengths)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """(batch,) int64 samples -> (batch,) int64 output frames (front end, then (n - 1) // 2 + 1 per stride-2
        conv)."""
        frames = self._front_frames(lengths)
        for _ in range(self.config.subsampling_layers):
            frames = torch.where(frames > 0, (frames - 1) // 2 + 1, frames)
        return frames

    def num_frames(self, num_samples: int) -> int:
        """Output frames of one unpadded input of ``num_samples`` samples, on a Python int (no host read)."""
        if self.config.front_end == "waveform":
            frames = conv_num_frames(num_samples, WAVEFORM_CONV)
        else:
            frames = (num_samples - WINDOW) // HOP + 1 if num_samples >= WINDOW else 0
        for _ in range(self.config.subsampling_layers):
            frames = (frames - 1) // 2 + 1 if frames > 0 else 0
        return frames

    def features(self, audio: Tensor, lengths: Tensor) -> Tensor:
        """audio: (B, S), lengths: (B,) -> (B, channels, frames) front-end features, zero at padded frames:
        normalised fbank (Kaldi's fbank takes one waveform, hence the loop over the few utterances of a batch), or
        the LayerNorm-ed output of the waveform CNN."""
        if self.config.front_end == "waveform":
            cnn = self.waveform_norm(self.waveform_encoder(audio).transpose(1, 2)).transpose(1, 2)
            return cnn * valid_mask(self._front_frames(lengths), cnn.shape[2]).unsqueeze(1)
        frames = fbank_frames(lengths)
        feats = audio.new_zeros(
            audio.shape[0], self.config.num_mel_bins, self.num_frames_before_subsampling(audio)
        )
        for b, (n, t) in enumerate(zip(lengths.tolist(), frames.tolist(), strict=True)):
            if t > 0:
                feats[b, :, :t] = normalized_fbank(audio[b, :n], self.config.num_mel_bins).T
        return feats

    @staticmethod
    def num_frames_before_subsampling(audio: Tensor) -> int:
        samples = audio.shape[1]
        return (samples - WINDOW) // HOP + 1 if samples >= WINDOW else 0

    def forward(
        self,
        audio: Tensor,
        lengths: Tensor | None = None,
        *,
        frame_mask: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> SSLEncoderOutput:
        """audio: (batch, samples) float32 in [-1, 1], zero-padded; lengths: (batch,) int64 valid samples (None =
        no padding); frame_mask: (batch, T) bool, frames replaced by ``mask_emb``. -> ``SSLEncoderOutput`` with
        ``last_hidden_state`` (B, T, D), ``padding_mask`` (B, T), ``frame_lengths`` (B,), ``features`` (the
        projected subsampled fbank, unmasked); no feature penalty (0) and no per-layer states."""
        if audio.dim() != 2:
            raise ValueError(f"audio must be (batch, samples), got shape {tuple(audio.shape)}")
        if self.num_frames(audio.shape[1]) < 1:
            raise ValueError(
                f"audio too short: {audio.shape[1]} samples; the front end needs at least {WINDOW}"
            )
        if output_hidden_states:
            raise ValueError("FbankConformerEncoder does not return per-layer hidden states")
        batch = audio.shape[0]
        if lengths is None:
            lengths = torch.full((batch,), audio.shape[1], dtype=torch.long, device=audio.device)
        lengths = lengths.to(audio.device)
        x = self.features(audio, lengths)  # (B, F, T0)
        frames = self._front_frames(lengths)
        for conv in self.feature_encoder:
            x = torch.relu(conv(x))
            frames = torch.where(frames > 0, (frames - 1) // 2 + 1, frames)
            # zero the padded frames, so the next convolution sees at valid frames what an unpadded input gives
            x = x * valid_mask(frames, x.shape[2]).unsqueeze(1)
        features = x.transpose(1, 2)  # (B, T, D)
        padded = padding_mask(frames, features.shape[1])
        x = self.feature_dropout(self.feature_projection(features))
        if frame_mask is not None:
            x = replace_masked_frames(x, frame_mask, self.mask_emb)
        # torchaudio's Conformer masks keys beyond each length; an utterance with 0 frames would mask every key
        last, _ = self.encoder(x, frames.clamp_min(1))
        return SSLEncoderOutput(
            last_hidden_state=last,
            padding_mask=padded,
            frame_lengths=frames,
            features=features,
            feature_penalty=x.new_zeros(()),
            hidden_states=None,
        )
