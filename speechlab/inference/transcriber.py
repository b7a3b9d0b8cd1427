"""Speech recognition with a trained CTC model: :class:`Transcriber`.

```python
import speechlab

transcriber = speechlab.Transcriber(speechlab.load("exp/ctc_phoneme"))   # a run folder, .ckpt, export dir, ...
for result in transcriber(["a.wav", "b.flac"]):
    print(result.text, result.start_seconds)                             # per emitted unit: its first frame
```

Decoding is greedy (best path: argmax per frame, repeats merged, blanks dropped) or a beam search through
torchaudio's ``ctc_decoder`` (flashlight-text), optionally with a KenLM n-gram language model (ARPA or binary) and a
lexicon (``word unit unit ...`` per line: the search then only emits words of the lexicon and the text is those
words). Without a lexicon the beam search is over units and the text is the tokenizer's decoding of the best
unit sequence; a language model is only used with a lexicon (a lexicon-free LM would have to be over units).

Batches never change results: encoders whose conv stack normalises with LayerNorm are padding-invariant, so
utterances of any lengths share a batch (masked attention); GroupNorm encoders (Base models: the statistics run
over time and include the padding) only batch utterances of identical length. Inputs longer than
``chunk_seconds + 2 * context_seconds`` are run in windows on the 50 Hz frame grid (as
:class:`speechlab.api.FeatureExtractor` does): each window keeps ``chunk_seconds`` of frames and sees
``context_seconds`` more on each side, so the log-probabilities have exactly the unchunked frame count and
memory stays bounded; waveform normalisation (Large models) uses the whole file's statistics.

``speechlab transcribe`` (:mod:`speechlab.commands.transcribe`) runs it on files, folders and manifests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from speechlab.api import conv_geometry, plan_chunks
from speechlab.audio import as_waveform, list_audio_files
from speechlab.data.manifest import read_manifest
from speechlab.data.text import BLANK, WORD_DELIMITER
from speechlab.metrics import error_rates
from speechlab.models.ctc import CTCModel
from speechlab.models.ssl_encoder import normalize_waveform

__all__ = ["Transcript", "Transcriber", "collect_inputs", "error_rates"]

SAMPLE_RATE = 16000


@dataclass
class Transcript:
    """One utterance's result.

    text: the transcript (phones separated by spaces for a phoneme model; lexicon words for a beam search with a
    lexicon). unit_ids: emitted units after CTC collapsing (blanks dropped). frames: the first frame of each
    emitted unit (``frame_seconds`` apart). score: the beam search score (None for greedy).
    """

    text: str
    unit_ids: list[int]
    units: list[str]
    frames: list[int]
    frame_seconds: float
    score: float | None = None
    words: list[str] = field(default_factory=list)

    @property
    def start_seconds(self) -> list[float]:
        """When each emitted unit starts, in seconds from the beginning of the audio."""
        return [round(f * self.frame_seconds, 4) for f in self.frames]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "units": self.units, "start": self.start_seconds}
        if self.words:
            out["words"] = self.words
        if self.score is not None:
            out["score"] = self.score
        return out


def _ctc_model(model: nn.Module) -> nn.Module:
    if isinstance(model, CTCModel):
        return model
    raise TypeError(
        f"Transcriber needs a CTC model (speechlab.load of a CTC run folder, .ckpt, speechlab 'ctc' directory or a "
        f"Hugging Face *ForCTC directory); got a {type(model).__name__}, which has no CTC head"
    )


class Transcriber:
    """Transcribe audio with a :class:`~speechlab.models.ctc.CTCModel` from :func:`speechlab.load`.

    Args:
        model: the CTC model; its ``tokenizer`` is used unless ``tokenizer`` is given.
        decoder: ``"greedy"`` or ``"beam"`` (torchaudio ``ctc_decoder``, needs ``flashlight-text``).
        beam_size, lm, lexicon, lm_weight, word_score: beam search settings; ``lm`` is a KenLM ARPA / binary
            file and needs ``lexicon`` (a file of ``word unit unit ...`` lines).
        device: where the model runs (default: where its parameters are).
        batch_seconds: most padded audio seconds per forward call.
        chunk_seconds, context_seconds: long-input windows (kept frames / context each side); None: no chunking.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        decoder: str = "greedy",
        beam_size: int = 50,
        lm: str | os.PathLike | None = None,
        lexicon: str | os.PathLike | None = None,
        lm_weight: float = 2.0,
        word_score: float = 0.0,
        device: str | torch.device | None = None,
        batch_seconds: float = 120.0,
        chunk_seconds: float | None = 30.0,
        context_seconds: float = 5.0,
    ) -> None:
        self.model = _ctc_model(model).eval()
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("Transcriber: the model carries no tokenizer; pass tokenizer=...")
        if self.tokenizer.vocab_size != self.model.head.out_features:
            raise ValueError(
                f"Transcriber: tokenizer has {self.tokenizer.vocab_size} units, the model's head "
                f"{self.model.head.out_features}"
            )
        if decoder not in ("greedy", "beam"):
            raise ValueError(f"decoder must be 'greedy' or 'beam', got {decoder!r}")
        if lm is not None and lexicon is None:
            raise ValueError(
                "an n-gram LM needs a lexicon (words spelled in the model's units): pass lexicon=..."
            )
        if decoder == "greedy" and (lm is not None or lexicon is not None):
            raise ValueError("lm / lexicon are used by the beam search: pass decoder='beam'")
        if device is None:
            device = next(self.model.parameters()).device
        self.device = torch.device(device)
        self.model.to(self.device)
        encoder = self.model.encoder
        if hasattr(encoder.config, "conv_layers"):  # an SSL encoder: conv feature encoder on the waveform
            self.padding_invariant = encoder.config.conv_norm == "layer"
            self.hop, self.receptive_field = conv_geometry(encoder.config.conv_layers)
        else:
            # fbank + Conformer: per-utterance feature normalisation and a padding-sensitive depthwise conv, so
            # each input is transcribed whole (no windows) and padded only next to inputs of its own length
            self.padding_invariant = False
            self.hop, self.receptive_field = encoder.hop, encoder.hop
            chunk_seconds = None
        self.frame_seconds = self.hop / SAMPLE_RATE
        self.batch_seconds = batch_seconds
        if chunk_seconds is not None and chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds must be positive or None, got {chunk_seconds}")
        self.chunk_frames = (
            None if chunk_seconds is None else max(1, round(chunk_seconds / self.frame_seconds))
        )
        self.context_frames = max(0, round(context_seconds / self.frame_seconds))
        self.decoder_name = decoder
        self._beam = None
        self._lexicon = lexicon is not None
        if decoder == "beam":
            self._beam = self._beam_decoder(beam_size, lm, lexicon, lm_weight, word_score)

    def _beam_decoder(
        self, beam_size: int, lm: Any, lexicon: Any, lm_weight: float, word_score: float
    ) -> Any:
        try:
            from torchaudio.models.decoder import ctc_decoder
        except (ImportError, RuntimeError) as err:
            raise ImportError("beam search needs flashlight-text (pip install flashlight-text)") from err
        units = list(self.tokenizer.units)
        # The word boundary unit: '|' for characters; phonemes and pieces have none, so the blank stands in.
        silence = WORD_DELIMITER if WORD_DELIMITER in units else BLANK
        for path in (lm, lexicon):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such file (language model / lexicon)")
        try:
            return ctc_decoder(
                lexicon=str(lexicon) if lexicon is not None else None,
                tokens=units,
                lm=str(lm) if lm is not None else None,
                beam_size=beam_size,
                lm_weight=lm_weight,
                word_score=word_score,
                blank_token=BLANK,
                sil_token=silence,
                unk_word="<unk>",
            )
        except (RuntimeError, ValueError) as err:  # flashlight errors: bad lexicon line, unknown unit, bad LM
            raise ValueError(f"cannot build the beam search decoder: {err}") from err

    # ------------------------------------------------------------------------------------------ inputs

    def _waveforms(self, audio: Any, sample_rate: int) -> list[Tensor]:
        if isinstance(audio, str | os.PathLike) or (
            isinstance(audio, Tensor | np.ndarray) and np.ndim(audio) == 1
        ):
            audio = [audio]
        if not isinstance(audio, Sequence | Tensor | np.ndarray) or len(audio) == 0:
            raise ValueError("no audio given (expected a path, a waveform, or a list of them)")
        waves = [as_waveform(item, i, sample_rate, SAMPLE_RATE) for i, item in enumerate(audio)]
        for i, wave in enumerate(waves):
            if int(self.model.encoder.frame_lengths(torch.tensor([wave.numel()]))[0]) < 1:
                raise ValueError(f"input {i}: {wave.numel()} samples is too short for one output frame")
            if not torch.isfinite(wave).all():
                raise ValueError(f"input {i}: waveform contains NaN or inf samples")
        return waves

    def _groups(self, sizes: list[int]) -> list[list[int]]:
        """Indices in forward batches: longest first, under ``batch_seconds`` padded; equal lengths only for
        GroupNorm encoders (see the module docstring)."""
        budget = max(1, int(self.batch_seconds * SAMPLE_RATE))
        groups: list[list[int]] = []
        for i in sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True):
            if groups:
                current = groups[-1]
                longest = sizes[current[0]]
                fits = longest * (len(current) + 1) <= budget
                if fits and (self.padding_invariant or sizes[i] == longest):
                    current.append(i)
                    continue
            groups.append([i])
        return groups

    # ------------------------------------------------------------------------------------------ model

    @property
    def chunk_threshold(self) -> int | None:
        """Inputs with more samples than this are transcribed in windows (None: never)."""
        if self.chunk_frames is None:
            return None
        return (self.chunk_frames + 2 * self.context_frames - 1) * self.hop + self.receptive_field

    def _forward(self, waves: list[Tensor], normalize: bool | None = None) -> list[Tensor]:
        """One padded forward: per waveform its (frames, vocab) log-probabilities on the CPU.

        ``normalize`` overrides the encoder's ``config.normalize_waveform`` for this call (windows of a long input
        that was normalised as a whole: False), without touching the shared config."""
        batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        lengths = torch.tensor([w.numel() for w in waves])
        with torch.inference_mode():
            batch, lengths = batch.to(self.device), lengths.to(self.device)
            if normalize is None:
                logits, frames = self.model(batch, lengths)
            else:  # CTCModel.forward with the override (its dropout is off in eval)
                out = self.model.encoder(batch, lengths, normalize=normalize)
                logits, frames = self.model.head(out.last_hidden_state), out.frame_lengths
            log_probs = logits.float().log_softmax(-1).cpu()
        return [log_probs[row, : int(n)] for row, n in enumerate(frames.tolist())]

    def _chunked(self, wave: Tensor) -> Tensor:
        """(frames, vocab) of one long waveform, window by window (see the module docstring)."""
        encoder = self.model.encoder
        total = int(encoder.frame_lengths(torch.tensor([wave.numel()]))[0])
        windows = plan_chunks(total, hop=self.hop, receptive_field=self.receptive_field,
                              chunk_frames=self.chunk_frames, context_frames=self.context_frames)  # fmt: skip
        if encoder.config.normalize_waveform:  # whole-file statistics, like the unchunked model
            wave = normalize_waveform(wave[None])[0]
        kept = []
        # one window per forward bounds memory (windows of equal length could share one); the windows skip the
        # per-input normalisation, passed down rather than set on the shared config
        for window in windows:
            log_probs = self._forward([wave[window.sample_start : window.sample_end]], normalize=False)[0]
            lo, hi = window.keep_start - window.frame_start, window.keep_end - window.frame_start
            kept.append(log_probs[lo:hi])
        return torch.cat(kept)

    def log_probs(self, audio: Any, *, sample_rate: int = SAMPLE_RATE) -> list[Tensor]:
        """Per utterance: (frames, vocab) float32 CTC log-probabilities on the CPU."""
        waves = self._waveforms(audio, sample_rate)
        out: list[Tensor | None] = [None] * len(waves)
        threshold = self.chunk_threshold
        short = [i for i, w in enumerate(waves) if threshold is None or w.numel() <= threshold]
        for i in sorted(set(range(len(waves))) - set(short)):
            out[i] = self._chunked(waves[i])
        for group in self._groups([waves[i].numel() for i in short]):
            for i, log_probs in zip(group, self._forward([waves[short[j]] for j in group]), strict=True):
                out[short[i]] = log_probs
        return out  # type: ignore[return-value]

    def decode(self, log_probs: Tensor) -> Transcript:
        """Decode one utterance's (frames, vocab) log-probabilities with this transcriber's decoder."""
        if self._beam is not None:
            return self._decode_beam(log_probs)
        return self._decode_greedy(log_probs)

    def _result(self, ids: list[int], frames: list[int], text: str | None = None, **extra: Any) -> Transcript:
        units = [self.tokenizer.units[i] for i in ids]
        return Transcript(
            text=self.tokenizer.decode(ids) if text is None else text,
            unit_ids=ids,
            units=units,
            frames=frames,
            frame_seconds=self.frame_seconds,
            **extra,
        )

    def _decode_greedy(self, log_probs: Tensor) -> Transcript:
        best = log_probs.argmax(-1).tolist()
        ids, frames = [], []
        blank = self.tokenizer.blank_id
        for t, unit in enumerate(best):
            if unit != blank and (t == 0 or best[t - 1] != unit):
                ids.append(unit)
                frames.append(t)
        return self._result(ids, frames)

    def _decode_beam(self, log_probs: Tensor) -> Transcript:
        num_frames = log_probs.shape[0]
        lengths = torch.tensor([num_frames], dtype=torch.int32)
        hypotheses = self._beam(log_probs[None].contiguous(), lengths)[0]
        if not hypotheses:
            return self._result([], [], score=float("-inf"))
        best = hypotheses[0]
        ids, frames = [], []
        blank = self.tokenizer.blank_id
        # flashlight's timesteps count from 1 (its path starts with a virtual frame before frame 0)
        for unit, step in zip(best.tokens.tolist(), best.timesteps.tolist(), strict=True):
            if unit == blank or not 0 <= step - 1 < num_frames:
                continue  # the blank standing in for silence, and the virtual start/end frames
            ids.append(int(unit))
            frames.append(int(step) - 1)
        words = [w for w in best.words if w]
        text = " ".join(words) if self._lexicon else None
        return self._result(ids, frames, text=text, score=float(best.score), words=words)

    def __call__(self, audio: Any, *, sample_rate: int = SAMPLE_RATE) -> list[Transcript]:
        """Transcribe a path, a waveform ``(samples,)`` or a list of them; returns one Transcript each."""
        return [self.decode(lp) for lp in self.log_probs(audio, sample_rate=sample_rate)]


# ================================================================================================ inputs


@dataclass
class _Item:
    id: str
    audio: str
    offset: float = 0.0
    duration: float | None = None
    reference: str | None = None


def collect_inputs(inputs: Sequence[str], field_name: str) -> list[_Item]:
    """Audio files, folders (recursive) and ``.jsonl`` manifests -> items (manifest references from ``field_name``)."""
    items: list[_Item] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            files = list_audio_files(path)
            items += [_Item(p.relative_to(path).with_suffix("").as_posix(), str(p)) for p in files]
        elif path.suffix.lower() in (".jsonl", ".json"):
            for line in read_manifest(path, check_audio="exists"):
                reference = line.get(field_name)
                has_segment = "offset" in line
                items.append(
                    _Item(
                        str(line["id"]),
                        str(line["audio"]),
                        float(line.get("offset", 0.0) or 0.0),
                        float(line["duration"]) if has_segment and line.get("duration") else None,
                        reference if isinstance(reference, str) and reference.strip() else None,
                    )
                )
        elif path.is_file():
            items.append(_Item(path.with_suffix("").name, str(path)))
        else:
            raise FileNotFoundError(f"{path}: no such audio file, folder or manifest")
    if not items:
        raise ValueError("no inputs to transcribe")
    return items
