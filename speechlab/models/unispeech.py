"""UniSpeech: wav2vec 2.0 backbone + Gumbel product quantizer + phonetic CTC head with the swap (Wang et al. 2021, §2).

Data flow (training, one utterance batch)::

    audio (B, S) ─SSLEncoder(frame_mask)─▶ context c (B, T, D)            (masked frames replaced by mask_emb)
                 └─features (B, T, C) ─dropout─ quantizer ─project_q─ final_proj ─▶ targets y (B, T, D)
    CTC input z = where(swap ~ Bernoulli(swap_prob) per frame, y', c) ─dropout─ ctc_proj ─▶ phone logits (B, T, V)

``y'`` is a second, independently sampled quantization of the same features (the reference code quantizes twice),
projected to the model width like the contrastive targets; CTC gradients flow through it into the codebook
(straight-through), which is what makes the codebook phonetic. ``swap_prob = 0`` is exactly plain multitask
learning (CTC on ``c``). In eval mode nothing is swapped (the released code swaps at eval too: docs/pitfalls.md, 8).

The backbone is the paper's wav2vec 2.0 encoder (``SSLEncoder``; presets ``unispeech_base`` / ``unispeech_large`` /
``unispeech_tiny``) or, for small CPU experiments, the fbank + Conformer encoder of
:mod:`speechlab.models.fbank_conformer` (preset ``unispeech_fbank_tiny``): then the quantizer reads its unmasked
subsampled fbank features, the context is the Conformer output, and the rest is unchanged. The raw-waveform CNN +
small Transformer stays on the all-blank CTC plateau on the bundled espeak corpus for the whole pretraining budget,
so its swap would carry nothing; the fbank Conformer leaves it within a few hundred steps (recipes/mini/README.md).
Only the wav2vec 2.0 backbone maps onto Hugging Face / fairseq UniSpeech checkpoints.

``final_proj`` maps the quantized targets *up* to the model width (fairseq ``--transpose``; HF ``project_hid`` is
Linear(proj_codevector_dim → hidden_size), the opposite direction of ``Wav2Vec2ForPreTraining.project_hid``).
The model holds no loss: :mod:`speechlab.tasks.unispeech` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from speechlab.models.ctc import EncoderConfig, build_encoder, encoder_config_from_dict
from speechlab.models.fbank_conformer import FbankConformerConfig, FbankConformerEncoder
from speechlab.models.registry import preset
from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig
from speechlab.models.wavlm import LARGE_SIZE
from speechlab.nn.gumbel_quantizer import LARGE_TEMPERATURE, GumbelProductQuantizer, check_quantizer_arguments

FBANK_SPAN_MASK = (0.5, 5)


@dataclass
class UniSpeechConfig:
    """UniSpeech hyper-parameters; defaults are the released Large recipe (microsoft/UniSpeech
    ``src/examples/unispeech/scripts``).

    encoder: the backbone (``unispeech_large()`` etc. fill it): an ``SSLEncoderConfig`` (wav2vec 2.0, the paper's),
      or a ``FbankConformerConfig`` (fbank + Conformer, ``unispeech_fbank_tiny()``).
    num_codevector_groups / num_codevectors_per_group: G = 2, V = 320.
    codevector_dim: quantizer output size (fairseq ``vq_dim`` = final_dim = 768 for Large, HF default 256).
    proj_codevector_dim: ``project_q`` output size (fairseq final_dim).
    temperature: Gumbel τ (max, min, decay per step) = (2, 0.1, 0.999995).
    quantizer_dropout: dropout on the CNN features before the quantizer (fairseq ``dropout_features``).
    num_ctc_classes: phone inventory incl. blank (HF default 80 = 76 English IPA phones + 4 fairseq specials).
    final_dropout: dropout before ``ctc_proj``.
    swap_prob: probability that a frame's Transformer output is replaced by its quantized vector before the CTC layer
      (training only).
    target_grad_mult: scale of the gradient from the quantizer (contrastive targets, diversity, swapped CTC frames)
      into the encoder's features; 1 = the reference (0 = the targets do not shape the front end).
    """

    encoder: EncoderConfig = field(default_factory=SSLEncoderConfig)
    num_codevector_groups: int = 2
    num_codevectors_per_group: int = 320
    codevector_dim: int = 768
    proj_codevector_dim: int = 768
    temperature: tuple[float, float, float] = LARGE_TEMPERATURE
    quantizer_dropout: float = 0.1
    num_ctc_classes: int = 80
    final_dropout: float = 0.1
    swap_prob: float = 0.5
    target_grad_mult: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):  # read back from config.json / a checkpoint's hyper-parameters
            self.encoder = encoder_config_from_dict(self.encoder)
        self.temperature = tuple(float(t) for t in self.temperature)
        check_quantizer_arguments(
            self.num_codevector_groups, self.codevector_dim, self.temperature, "UniSpeechConfig"
        )
        if not 0.0 <= self.swap_prob <= 1.0:
            raise ValueError(f"UniSpeechConfig.swap_prob must be in [0, 1], got {self.swap_prob}")
        if self.num_ctc_classes < 2:
            raise ValueError(
                f"UniSpeechConfig.num_ctc_classes must be >= 2 (blank + phones), got {self.num_ctc_classes}"
            )

    @property
    def is_fbank(self) -> bool:
        """True when the backbone is the fbank + Conformer encoder (no Hugging Face / fairseq counterpart)."""
        return isinstance(self.encoder, FbankConformerConfig)

    @property
    def feature_dim(self) -> int:
        """Size of the encoder's ``features`` (the quantizer's input): the last CNN layer's channels, or the
        Conformer width for the fbank encoder (its subsampling convolutions output ``hidden_size`` channels)."""
        return self.encoder.hidden_size if self.is_fbank else self.encoder.conv_layers[-1][0]

    def span_mask_args(self) -> tuple[float, int]:
        """(mask_prob, mask_length) of pretraining's span masking: the SSL encoder config's, or for the fbank
        encoder (whose config has none) 0.5 / 5 frames, UniSpeech's 0.5 / 10 at 50 Hz as the same 200 ms at 25 Hz."""
        if self.is_fbank:
            return FBANK_SPAN_MASK
        return self.encoder.mask_prob, self.encoder.mask_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the released recipe's regularisation (its Large scripts), shared by the Large and tiny presets
_RECIPE_REGULARISATION = dict(
    layer_norm_first=True,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    feature_dropout=0.1,
    layerdrop=0.0,
    mask_prob=0.5,
)


def _unispeech_preset(
    encoder: EncoderConfig, vq_dim: int, num_ctc_classes: int, temperature_decay: float = 0.998, **fields
) -> UniSpeechConfig:
    """The presets' shared rule: the quantizer output and ``project_q`` are both fairseq's ``final_dim``
    (``vq_dim``); τ anneals from 2 to 0.5 unless ``temperature`` says otherwise."""
    return UniSpeechConfig(
        encoder=encoder,
        codevector_dim=vq_dim,
        proj_codevector_dim=vq_dim,
        num_ctc_classes=num_ctc_classes,
        **{"temperature": (2.0, 0.5, temperature_decay), **fields},
    )


@preset("unispeech")
def unispeech_large(num_ctc_classes: int = 80) -> UniSpeechConfig:
    """Released UniSpeech Large (EN 1350 h): w2v2 Large backbone with conv bias, pre-LN, final_dim 768, mask 0.5,
    layerdrop 0, feature_grad_mult 1, dropouts 0.1, τ (2, 0.1, 0.999995) (the released stage-1 script)."""
    encoder = SSLEncoderConfig(
        **{**LARGE_SIZE, **_RECIPE_REGULARISATION}, conv_bias=True, mask_length=10, feature_grad_mult=1.0
    )
    return _unispeech_preset(encoder, 768, num_ctc_classes, temperature=LARGE_TEMPERATURE)


@preset("unispeech")
def unispeech_base(num_ctc_classes: int = 80) -> UniSpeechConfig:
    """A Base-size UniSpeech (12 × 768, group-norm CNN, post-LN, final_dim 256, τ (2, 0.5, 0.999995) as wav2vec 2.0
    Base). No Base UniSpeech was released; this mirrors HF ``UniSpeechConfig`` defaults and the w2v2 Base recipe."""
    encoder = SSLEncoderConfig(mask_prob=0.5, feature_grad_mult=0.1, layerdrop=0.05)
    return _unispeech_preset(encoder, 256, num_ctc_classes, temperature_decay=0.999995)


@preset("unispeech")
def unispeech_tiny(num_ctc_classes: int = 80) -> UniSpeechConfig:
    """CPU-sized model for tests and the bundled mini recipe: 32-channel group-norm CNN (same 320-sample hop; the
    layer-norm CNN costs ~2x on CPU), 2 x 64 pre-LN Transformer, G=2 x V=32 codebook, mask length 5, faster
    temperature decay (2 -> 0.5 in ~700 steps)."""
    encoder = SSLEncoderConfig(
        conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        conv_norm="group",
        conv_bias=False,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        ffn_size=128,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        mask_length=5,
        **_RECIPE_REGULARISATION,
    )
    return _unispeech_preset(encoder, 64, num_ctc_classes, num_codevectors_per_group=32)


@preset("unispeech")
def unispeech_fbank_tiny(num_ctc_classes: int = 80) -> UniSpeechConfig:
    """UniSpeech on ``fbank_conformer_tiny`` (80-bin fbank, 4x subsampling to 25 Hz, 4 x 144 Conformer): a backbone
    whose English CTC leaves the all-blank plateau within the mini recipe's budget. G=2 x V=64 codebook of 128-d
    vectors on the 144-d subsampled features; other heads and the swap as in :func:`unispeech_tiny`. CPU experiments
    only: no Hugging Face / fairseq checkpoint has this backbone."""
    return _unispeech_preset(FbankConformerConfig(), 128, num_ctc_classes, num_codevectors_per_group=64)


@dataclass
class UniSpeechOutput:
    """Everything the task needs for one step.

    last_hidden_state: (B, T, D) context vectors c (masked frames were replaced by mask_emb at the input).
    targets: (B, T, D) final_proj(project_q(quantizer(features))): contrastive positives and distractor pool.
    ctc_logits: (B, T, num_ctc_classes) phone logits (after the swap in training).
    swap_mask: (B, T) bool frames whose CTC input was the quantized vector (all False in eval / swap_prob 0).
    codevector_indices: (B, T, G) int64 selected entries (of the targets' quantization).
    prob_perplexity / code_perplexity: scalars over valid frames (diversity loss / codebook usage).
    padding_mask: (B, T) bool True at padded frames; frame_lengths: (B,) int64; feature_penalty: scalar;
    hidden_states: L+1 states when requested.
    """

    last_hidden_state: Tensor
    targets: Tensor
    ctc_logits: Tensor
    swap_mask: Tensor
    codevector_indices: Tensor
    prob_perplexity: Tensor
    code_perplexity: Tensor
    padding_mask: Tensor
    frame_lengths: Tensor
    feature_penalty: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class UniSpeech(nn.Module):
    """Backbone + Gumbel quantizer + ``project_q`` + ``final_proj`` + phonetic CTC head with the swap."""

    def __init__(self, config: UniSpeechConfig):
        super().__init__()
        self.config = config
        self.encoder: SSLEncoder | FbankConformerEncoder = build_encoder(config.encoder)
        self.quantizer_dropout = nn.Dropout(config.quantizer_dropout)
        self.quantizer = GumbelProductQuantizer(
            config.feature_dim,
            config.num_codevector_groups,
            config.num_codevectors_per_group,
            config.codevector_dim,
            config.temperature,
        )
        self.project_q = nn.Linear(config.codevector_dim, config.proj_codevector_dim)
        self.final_proj = nn.Linear(config.proj_codevector_dim, config.encoder.hidden_size)
        self.final_dropout = nn.Dropout(config.final_dropout)
        self.ctc_proj = nn.Linear(config.encoder.hidden_size, config.num_ctc_classes)

    def set_step(self, step: int) -> float:
        """Anneal the Gumbel temperature from the optimiser step; returns τ."""
        return self.quantizer.set_step(step)

    def project_codevectors(self, codevectors: Tensor) -> Tensor:
        """(…, codevector_dim) -> (…, hidden_size): project_q then final_proj."""
        return self.final_proj(self.project_q(codevectors))

    def forward(
        self,
        audio: Tensor,
        lengths: Tensor | None = None,
        *,
        frame_mask: Tensor | None = None,
        swap_prob: float | None = None,
        output_hidden_states: bool = False,
        generator: torch.Generator | None = None,
    ) -> UniSpeechOutput:
        """audio: (B, S) float32 zero-padded; lengths: (B,) valid samples; frame_mask: (B, T) bool frames to mask
        (from :func:`speechlab.nn.masking.span_mask`); swap_prob overrides ``config.swap_prob``; generator seeds the
        Gumbel noise and the swap draw (masking and dropout use the global RNG)."""
        encoded = self.encoder(
            audio, lengths, frame_mask=frame_mask, output_hidden_states=output_hidden_states
        )
        valid = ~encoded.padding_mask
        features = encoded.features
        if self.config.target_grad_mult != 1.0:
            m = self.config.target_grad_mult
            features = features * m + features.detach() * (1.0 - m)
        features = self.quantizer_dropout(features)
        quantized = self.quantizer(features, valid, generator=generator)
        targets = self.project_codevectors(quantized.codevectors)

        context = encoded.last_hidden_state
        probability = self.config.swap_prob if swap_prob is None else swap_prob
        batch, frames = valid.shape
        swap_mask = torch.zeros(batch, frames, dtype=torch.bool, device=context.device)
        ctc_input = context
        if self.training and probability > 0.0:
            # An independent Gumbel sample of the same features, as in the reference implementation.
            swapped = self.project_codevectors(
                self.quantizer(features, valid, generator=generator).codevectors
            )
            draw = torch.rand(batch, frames, generator=generator, device=context.device)
            swap_mask = (draw < probability) & valid
            ctc_input = torch.where(swap_mask.unsqueeze(-1), swapped.to(context.dtype), context)
        ctc_logits = self.ctc_proj(self.final_dropout(ctc_input))

        return UniSpeechOutput(
            last_hidden_state=context,
            targets=targets,
            ctc_logits=ctc_logits,
            swap_mask=swap_mask,
            codevector_indices=quantized.indices,
            prob_perplexity=quantized.prob_perplexity,
            code_perplexity=quantized.code_perplexity,
            padding_mask=encoded.padding_mask,
            frame_lengths=encoded.frame_lengths,
            feature_penalty=encoded.feature_penalty,
            hidden_states=encoded.hidden_states,
        )
