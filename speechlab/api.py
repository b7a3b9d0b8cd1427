"""The Python API: ``load`` a checkpoint from anywhere, extract layer-wise features with ``FeatureExtractor``.

```python
model = load("path/or/hub-id")                      # ours, Hugging Face dir / hub id, or fairseq/unilm .pt
extractor = FeatureExtractor(model, layers=[6, 12])
features = extractor(["a.flac", "b.wav"])           # waveforms, lists, padded batches or paths
features.hidden_states                              # (layers, batch, frames, dim) float32, zero-padded
features.lengths                                    # (batch,) valid frames (50 Hz)
```

Hidden states follow the backbone's convention (:mod:`speechlab.nn.transformer`): index 0 is the Transformer input
(after the conv positional embedding), index i the output of layer i, ``L+1`` states in all; for pre-LN (Large)
models index L is *before* the final LayerNorm (as in ``transformers``' ``hidden_states``).

**Batch invariance.** For models whose conv encoder uses LayerNorm (Large; ``conv_norm="layer"``) a padded batch
gives each utterance the same features as running it alone (within ~1e-5). Base models use a GroupNorm over time in
conv block 0, whose statistics include the zero padding, so padding *changes* the features of shorter utterances
(by tens of percent; every reference implementation behaves the same). The extractor warns once when it pads such
a batch; ``exact=True`` groups utterances by identical length and runs the rest unpadded, so every utterance gets
exactly its single-utterance features (at some speed cost for batches of mixed lengths).

**Long inputs** are split into windows on the 320-sample / 50 Hz frame grid: each window computes ``chunk_seconds``
of "core" frames plus ``context_seconds`` of context on each side, and only the core frames are kept, so every
output frame exists exactly once at its global index and the result has exactly the unchunked frame count. Frames
whose receptive field fits in the window are identical to unchunked extraction (within float error): the conv
features of every model (for Base models, whose block-0 GroupNorm normalises over time, each window uses the whole
file's statistics from one extra pass of conv 0), hidden state 0 once ``context_seconds`` covers half the positional
conv (64 frames = 1.28 s for the released models), and every layer of a model without attention. Transformer layers
see ``context_seconds`` of context on each side instead of the whole file, so their states differ from unchunked
extraction, most near window edges. Memory is bounded by one window batch plus the output (use :meth:`FeatureExtractor.iter_chunks` to stream
the output instead). With waveform normalisation (Large models) the whole file is normalised once, not per window.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from speechlab.audio import as_waveform, load_audio
from speechlab.checkpoints import registry
from speechlab.checkpoints.encoder_weights import find_encoder
from speechlab.checkpoints.hf_dir import HF_MODEL_TYPES, read_hf_directory
from speechlab.models.ssl_encoder import normalize_waveform
from speechlab.nn.feature_encoder import Fp32GroupNorm

__all__ = [
    "load",
    "FeatureExtractor",
    "Features",
    "WeightedLayerSum",
    "ChunkWindow",
    "plan_chunks",
    "conv_geometry",
    "find_encoder",
    "read_hf_directory",
    "HF_MODEL_TYPES",
]

SAMPLE_RATE = 16000


# =================================================================================================== load


def load(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Load a model from any supported source; returns it in eval mode on ``device``.

    ``source`` is one of (each read by one reader of :mod:`speechlab.checkpoints.registry`):

    * a training run folder (``trainer.default_root_dir``): its best checkpoint by the task's monitored metric,
      else ``checkpoints/last.ckpt``;
    * a Lightning ``.ckpt`` of a speechlab task: CTC -> :class:`~speechlab.models.ctc.CTCModel` with its
      ``tokenizer``; WavLM pretraining -> the encoder; UniSpeech -> :class:`~speechlab.models.unispeech.UniSpeech`;
      codec -> :class:`~speechlab.models.codec.Codec`;
    * a speechlab pretrained directory (``config.json`` with ``family`` + ``model.safetensors``), any family;
    * a Hugging Face model directory (``config.json`` with ``model_type`` in ``wavlm``, ``hubert``, ``wav2vec2``,
      ``unispeech`` — ``*ForCTC`` ones give a CTCModel with head and vocabulary — or ``encodec`` / ``dac``);
    * a Hugging Face hub id (``"microsoft/wavlm-base-plus"``), fetched with ``huggingface_hub.snapshot_download``;
      when the hub cannot be reached the local cache is used (``local_files_only``), and an id that is neither
      reachable nor cached is a clear error naming it;
    * an original fairseq / unilm checkpoint file (``WavLM-Base+.pt``: a dict with ``cfg`` and ``model``).

    Nothing is ever unpickled beyond tensors and plain containers (see :mod:`speechlab.checkpoints.safe_load`).
    WavLM / HuBERT / wav2vec2 give an :class:`~speechlab.models.ssl_encoder.SSLEncoder`; UniSpeech gives
    :class:`~speechlab.models.unispeech.UniSpeech` (its backbone is ``model.encoder``).
    """
    return registry.load(source, revision=revision, cache_dir=cache_dir).to(device).eval()


# =================================================================================================== geometry


def conv_geometry(conv_layers: Sequence[Sequence[int]]) -> tuple[int, int]:
    """``(hop, receptive_field)`` in samples of a conv stack of ``(channels, kernel, stride)``; (320, 400) for
    the standard wav2vec 2.0 encoder: frame ``t`` sees samples ``[t * hop, t * hop + receptive_field)``."""
    hop, field = 1, 1
    for _, kernel, stride in conv_layers:
        field += (kernel - 1) * hop
        hop *= stride
    return hop, field


@dataclass(frozen=True)
class ChunkWindow:
    """One window of chunked extraction, on the frame grid.

    The model runs on samples ``[sample_start, sample_end)`` which give frames ``[frame_start, frame_end)``
    (global indices); of those, ``[keep_start, keep_end)`` (global) are kept.
    """

    sample_start: int
    sample_end: int
    frame_start: int
    frame_end: int
    keep_start: int
    keep_end: int

    @property
    def num_samples(self) -> int:
        return self.sample_end - self.sample_start


def plan_chunks(
    num_frames: int, *, hop: int, receptive_field: int, chunk_frames: int, context_frames: int
) -> list[ChunkWindow]:
    """Split ``num_frames`` output frames into windows of ``chunk_frames`` kept frames with up to
    ``context_frames`` of context each side. Window ``[a - c, b + c)`` needs samples
    ``[(a - c) * hop, (b + c - 1) * hop + receptive_field)``, which give exactly ``b + c - (a - c)`` frames
    aligned with the global grid because every window starts at a multiple of ``hop``."""
    if chunk_frames < 1 or context_frames < 0:
        raise ValueError(
            f"chunk_frames must be >= 1 and context_frames >= 0, got {chunk_frames}, {context_frames}"
        )
    windows = []
    for keep_start in range(0, num_frames, chunk_frames):
        keep_end = min(keep_start + chunk_frames, num_frames)
        frame_start = max(0, keep_start - context_frames)
        frame_end = min(num_frames, keep_end + context_frames)
        windows.append(
            ChunkWindow(
                sample_start=frame_start * hop,
                sample_end=(frame_end - 1) * hop + receptive_field,
                frame_start=frame_start,
                frame_end=frame_end,
                keep_start=keep_start,
                keep_end=keep_end,
            )
        )
    return windows


def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (or cannot be read: then assume yes)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return True


# =================================================================================================== features


@dataclass
class Features:
    """Output of :class:`FeatureExtractor`.

    hidden_states: (num_layers, batch, frames, dim) float32; frames past ``lengths[b]`` are zero.
    lengths: (batch,) int64 valid frames per utterance (conv formula, 50 Hz).
    layers: which hidden-state indices ``hidden_states[i]`` holds (0 = Transformer input, L = last layer).
    """

    hidden_states: Tensor
    lengths: Tensor
    layers: tuple[int, ...]

    def unpad(self) -> list[Tensor]:
        """Per utterance: (num_layers, frames_b, dim) views without padding."""
        return [self.hidden_states[:, b, : int(n)] for b, n in enumerate(self.lengths.tolist())]

    def layer(self, index: int) -> Tensor:
        """(batch, frames, dim) for hidden-state index ``index`` (must be among ``layers``)."""
        if index not in self.layers:
            raise KeyError(f"layer {index} was not extracted; extracted layers: {list(self.layers)}")
        return self.hidden_states[self.layers.index(index)]


class WeightedLayerSum(nn.Module):
    """SUPERB-style weighted sum of hidden states: ``sum_l w_l * h_l`` with ``w = softmax(logits)``.

    learnable=True: ``logits`` is a parameter initialised to zeros (equal weights) or to ``log(weights)``.
    learnable=False: ``weights`` are used as given (fixed, not normalised), e.g. a one-hot layer selection.
    normalize: apply a parameter-free LayerNorm to each layer first (s3prl ``Featurizer`` option).

    hidden_states: (num_layers, batch, frames, dim) -> (batch, frames, dim).
    """

    def __init__(
        self,
        num_layers: int,
        *,
        learnable: bool = True,
        weights: Sequence[float] | Tensor | None = None,
        normalize: bool = False,
    ):
        super().__init__()
        self.num_layers = num_layers
        self.learnable = learnable
        self.normalize = normalize
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32)
            if weights.shape != (num_layers,):
                raise ValueError(f"weights must have shape ({num_layers},), got {tuple(weights.shape)}")
        if learnable:
            init = torch.zeros(num_layers) if weights is None else weights.clamp(min=1e-8).log()
            self.logits = nn.Parameter(init)
        else:
            if weights is None:
                weights = torch.full((num_layers,), 1.0 / num_layers)
            self.register_buffer("fixed_weights", weights)

    @property
    def weights(self) -> Tensor:
        """(num_layers,) the weights currently applied."""
        return torch.softmax(self.logits, dim=0) if self.learnable else self.fixed_weights

    def forward(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.shape[0] != self.num_layers:
            raise ValueError(
                f"expected {self.num_layers} layers, got hidden_states of shape {tuple(hidden_states.shape)}"
            )
        if self.normalize:
            hidden_states = torch.nn.functional.layer_norm(hidden_states, hidden_states.shape[-1:])
        weights = self.weights.to(hidden_states.dtype)
        return torch.einsum("l,l...->...", weights, hidden_states)


AudioInput = Tensor | np.ndarray | str | os.PathLike | Sequence[Any]


class FeatureExtractor:
    """Layer-wise features from an SSL model, for single files up to hour-long recordings.

    Args:
        model: a model from :func:`load` (or any module holding an ``SSLEncoder``).
        layers: hidden-state indices to return (0..L, negatives count from the end); None = all L+1.
        device: where the model runs; default: where its parameters are. The model is moved there.
        exact: never pad utterances of different lengths together (group by identical length, else run alone).
            Only changes results for GroupNorm (Base) models, see module docstring.
        bf16: run under ``torch.autocast(bfloat16)`` (norms stay fp32; outputs move by ~1e-1 on random weights).
            Faster on GPUs and CPUs with native bf16 (AVX512-BF16 / AMX); slower on AVX2-only CPUs (warned).
        batch_seconds: most padded audio seconds per forward call (memory bound).
        chunk_seconds, context_seconds: long-input windows (kept frames / context each side). Inputs longer than
            ``chunk_seconds + 2 * context_seconds`` are chunked; ``chunk_seconds=None`` disables chunking.
        output_device: where returned tensors live (default CPU).

    Calling it accepts a waveform ``(samples,)``, a list of waveforms, a padded batch ``(batch, samples)`` with
    optional ``lengths`` (valid samples), file paths (any format/rate ``speechlab.audio.load_audio`` reads) or a
    list of paths; raw audio at another rate than 16 kHz needs ``sample_rate=``. Returns :class:`Features`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        exact: bool = False,
        bf16: bool = False,
        batch_seconds: float = 80.0,
        chunk_seconds: float | None = 30.0,
        context_seconds: float = 5.0,
        output_device: str | torch.device = "cpu",
    ):
        self.model = model.eval()
        self.encoder = find_encoder(model)
        if device is None:
            param = next(self.encoder.parameters(), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device)
        self.output_device = torch.device(output_device)
        self.num_layers = self.encoder.config.num_layers
        self.layers = self._resolve_layers(layers)
        self.exact = exact
        self.bf16 = bf16
        self.batch_seconds = batch_seconds
        self.hop, self.receptive_field = conv_geometry(self.encoder.config.conv_layers)
        if chunk_seconds is not None and chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds must be positive or None, got {chunk_seconds}")
        self.chunk_frames = (
            None if chunk_seconds is None else max(1, round(chunk_seconds * SAMPLE_RATE / self.hop))
        )
        self.context_frames = max(0, round(context_seconds * SAMPLE_RATE / self.hop))
        self.padding_invariant = self.encoder.config.conv_norm == "layer"
        self._warned_padding = False
        if bf16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                "FeatureExtractor(bf16=True): this CPU has no native bfloat16 (no AVX512-BF16 / AMX), so bf16 "
                "autocast is emulated and slower than fp32 here; it pays off on such CPUs and on GPUs.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ helpers

    def _resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        total = self.num_layers + 1
        if layers is None:
            return tuple(range(total))
        resolved = []
        for layer in layers:
            if not -total <= int(layer) < total:
                raise ValueError(
                    f"layer {layer} out of range: this model has hidden states 0..{self.num_layers}"
                )
            resolved.append(int(layer) % total)
        return tuple(resolved)

    @property
    def chunk_threshold(self) -> int | None:
        """Inputs with more samples than this are extracted in windows (None: never)."""
        if self.chunk_frames is None:
            return None
        return (self.chunk_frames + 2 * self.context_frames) * self.hop + self.receptive_field - self.hop

    def _to_waveforms(
        self, inputs: AudioInput, lengths: Tensor | Sequence[int] | None, sample_rate: int
    ) -> tuple[list[Tensor], bool]:
        """-> (list of 1-D float32 CPU waveforms at 16 kHz, whether the input was one 1-D waveform)."""

        def as_wave(item: Any, index: int) -> Tensor:
            return as_waveform(item, index, sample_rate, SAMPLE_RATE)

        single = False
        if isinstance(inputs, str | os.PathLike):
            waves, single = [as_wave(inputs, 0)], True
        elif isinstance(inputs, Tensor | np.ndarray):
            batch = torch.as_tensor(inputs)
            if batch.dim() == 1:
                waves, single = [as_wave(batch, 0)], True
            elif batch.dim() == 2:
                if lengths is None:
                    lengths = [batch.shape[1]] * batch.shape[0]
                lengths = torch.as_tensor(lengths, dtype=torch.long).tolist()
                if len(lengths) != batch.shape[0] or any(n < 0 or n > batch.shape[1] for n in lengths):
                    raise ValueError(f"lengths {lengths} do not fit a batch of shape {tuple(batch.shape)}")
                waves = [as_wave(batch[b, :n], b) for b, n in enumerate(lengths)]
            else:
                raise ValueError(
                    f"audio must be (samples,) or (batch, samples), got shape {tuple(batch.shape)}"
                )
        elif isinstance(inputs, Sequence):
            if len(inputs) == 0:
                raise ValueError("no audio given (empty list)")
            waves = [as_wave(item, i) for i, item in enumerate(inputs)]
        else:
            raise TypeError(f"unsupported audio input of type {type(inputs).__name__}")
        for i, wave in enumerate(waves):
            if wave.numel() < self.receptive_field:
                raise ValueError(
                    f"input {i}: {wave.numel()} samples is shorter than the model's receptive field "
                    f"({self.receptive_field} samples = {1000 * self.receptive_field / SAMPLE_RATE:.0f} ms)"
                )
            if not torch.isfinite(wave).all():
                raise ValueError(f"input {i}: waveform contains NaN or inf samples")
        return waves, single

    def _forward(self, audio: Tensor, lengths: Tensor | None, **window: Any) -> tuple[Tensor, Tensor]:
        """audio: (B, S) on any device -> ((num_layers, B, T, D) on output_device, (B,) frame lengths).

        ``window``: ``normalize`` / ``block0_statistics`` for the windows of a long input (see ``SSLEncoder``)."""
        audio = audio.to(self.device, torch.float32, non_blocking=True)
        if lengths is not None:
            lengths = lengths.to(self.device)
        with (
            torch.inference_mode(),
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            out = self.encoder(audio, lengths, output_hidden_states=True, **window)
            states = torch.stack([out.hidden_states[i] for i in self.layers])
        states = states.to(self.output_device, torch.float32)
        return states, out.frame_lengths.to(self.output_device)

    def _batches(self, waves: list[Tensor]) -> list[list[int]]:
        """Group indices into forward batches under ``batch_seconds`` of padded audio (exact: equal lengths only)."""
        budget = max(1, int(self.batch_seconds * SAMPLE_RATE))
        sizes = [w.numel() for w in waves]
        if not self.exact and max(sizes) * len(sizes) <= budget:
            return [list(range(len(waves)))]  # one batch, as given (e.g. a caller's padded batch)
        order = sorted(range(len(waves)), key=lambda i: sizes[i], reverse=True)
        batches: list[list[int]] = []
        for i in order:
            if batches:
                current = batches[-1]
                longest = sizes[current[0]]
                same = sizes[i] == longest
                if (same or not self.exact) and longest * (len(current) + 1) <= budget:
                    current.append(i)
                    continue
            batches.append([i])
        return batches

    def _maybe_warn(self, sizes: list[int]) -> None:
        if self.padding_invariant or self.exact or self._warned_padding or len(set(sizes)) <= 1:
            return
        self._warned_padding = True
        warnings.warn(
            "FeatureExtractor: this model's conv encoder uses GroupNorm over time (Base models), so padding "
            "utterances of different lengths into one batch changes the features of the shorter ones. Pass "
            "exact=True to run each length unpadded (same features as one utterance at a time).",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ public

    def __call__(
        self,
        audio: AudioInput,
        lengths: Tensor | Sequence[int] | None = None,
        *,
        sample_rate: int = SAMPLE_RATE,
    ) -> Features:
        """Extract features; see the class docstring for accepted inputs. Returns :class:`Features`."""
        waves, _ = self._to_waveforms(audio, lengths, sample_rate)
        threshold = self.chunk_threshold
        long_ids = [i for i, w in enumerate(waves) if threshold is not None and w.numel() > threshold]
        short_ids = [i for i in range(len(waves)) if i not in set(long_ids)]

        frame_lengths = self.encoder.frame_lengths(torch.tensor([w.numel() for w in waves]))
        dim = self.encoder.config.hidden_size
        out = torch.zeros(
            len(self.layers), len(waves), int(frame_lengths.max()), dim, device=self.output_device
        )

        if short_ids:
            short = [waves[i] for i in short_ids]
            for group in self._batches(short):
                sizes = [short[i].numel() for i in group]
                self._maybe_warn(sizes)
                batch = torch.nn.utils.rnn.pad_sequence([short[i] for i in group], batch_first=True)
                lens = torch.tensor(sizes) if len(set(sizes)) > 1 else None
                states, n_frames = self._forward(batch, lens)
                for row, i in enumerate(group):
                    n = int(n_frames[row])
                    out[:, short_ids[i], :n] = states[:, row, :n]
        for i in long_ids:
            for start, states in self.iter_chunks(waves[i]):
                out[:, i, start : start + states.shape[1]] = states
        return Features(hidden_states=out, lengths=frame_lengths, layers=self.layers)

    extract = __call__

    def iter_chunks(self, waveform: Tensor | np.ndarray | str | os.PathLike) -> Iterator[tuple[int, Tensor]]:
        """Stream a long input: yields ``(first_frame, states)`` with states (num_layers, frames, dim) on
        ``output_device``, in order and covering every frame once. Memory: one batch of windows at a time."""
        if isinstance(waveform, str | os.PathLike):
            waveform = load_audio(waveform, sample_rate=SAMPLE_RATE)
        wave = torch.as_tensor(waveform).to(torch.float32)
        if wave.dim() != 1:
            raise ValueError(f"iter_chunks takes one waveform (samples,), got shape {tuple(wave.shape)}")
        total_frames = int(self.encoder.frame_lengths(torch.tensor([wave.numel()]))[0])
        if total_frames < 1:
            raise ValueError(
                f"{wave.numel()} samples is shorter than the receptive field ({self.receptive_field})"
            )
        chunk = self.chunk_frames if self.chunk_frames is not None else total_frames
        windows = plan_chunks(
            total_frames,
            hop=self.hop,
            receptive_field=self.receptive_field,
            chunk_frames=chunk,
            context_frames=self.context_frames,
        )
        if self.encoder.config.normalize_waveform:  # whole-file statistics, like the unchunked model
            wave = normalize_waveform(wave[None])[0]
        # Base models: block 0's GroupNorm normalises over time, so every window gets the whole file's statistics
        # (one extra pass of conv 0 over the file) and the conv features are exact, as for LayerNorm models.
        # Both are passed to each forward: the shared model and its config stay untouched.
        window_args: dict[str, Any] = {"normalize": False}
        if isinstance(self.encoder.feature_encoder.conv_layers[0].norm, Fp32GroupNorm) and len(windows) > 1:
            window_args["block0_statistics"] = self.encoder.feature_encoder.block0_statistics(wave)
        budget = max(1, int(self.batch_seconds * SAMPLE_RATE))
        per_batch = max(1, budget // max(w.num_samples for w in windows))
        position = 0
        while position < len(windows):
            # consecutive windows of equal length share one forward (no padding: exact for GroupNorm too)
            group = [windows[position]]
            while (
                position + len(group) < len(windows)
                and len(group) < per_batch
                and windows[position + len(group)].num_samples == group[0].num_samples
            ):
                group.append(windows[position + len(group)])
            position += len(group)
            batch = torch.stack([wave[w.sample_start : w.sample_end] for w in group])
            states, _ = self._forward(batch, None, **window_args)
            for row, w in enumerate(group):
                lo, hi = w.keep_start - w.frame_start, w.keep_end - w.frame_start
                yield w.keep_start, states[:, row, lo:hi]

    def weighted_sum(
        self, *, learnable: bool = True, weights: Sequence[float] | None = None
    ) -> WeightedLayerSum:
        """A :class:`WeightedLayerSum` over this extractor's layers."""
        return WeightedLayerSum(len(self.layers), learnable=learnable, weights=weights)

    def num_frames(self, num_samples: int) -> int:
        """Output frames for an input of ``num_samples`` samples (conv formula)."""
        return int(self.encoder.frame_lengths(torch.tensor([num_samples]))[0])
