"""Does a written model compute what its source did? The check ``speechlab export`` / ``convert`` print.

The written directory is reloaded with :func:`speechlab.load` and run next to the source on a fixed test signal
(:func:`test_signal`); the report gives the largest absolute difference of the outputs: CTC logits, codec
reconstructions, or per-layer hidden states. ``transformers`` is an independent reference where it applies: on a
written Hugging Face directory, and on a Hugging Face source. For CTC models written for transformers the greedy
transcripts of both sides are compared too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from speechlab.api import FeatureExtractor, find_encoder, load
from speechlab.checkpoints import hf_dir
from speechlab.checkpoints.export import model_family
from speechlab.models.ctc import ctc_greedy_decode
from speechlab.models.ssl_encoder import normalize_waveform

__all__ = ["hidden_states", "round_trip_report", "test_signal", "transformers_hidden_states"]


def test_signal(seconds: float = 2.0, sample_rate: int = 16000) -> torch.Tensor:
    """The fixed test signal: (samples,) float32, a 0.1-amplitude chirp plus seeded noise (same on every run)."""
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    chirp = torch.sin(2 * torch.pi * (100.0 + 900.0 * t / seconds) * t)
    noise = torch.randn(t.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (0.1 * chirp + 0.02 * noise).to(torch.float32)


def hidden_states(model: nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """(L+1, frames, dim) hidden states of a speechlab model's SSL backbone for one waveform."""
    return FeatureExtractor(model, chunk_seconds=None).extract(audio).hidden_states[:, 0]


def transformers_hidden_states(
    directory: str | Path, audio: torch.Tensor, normalize: bool
) -> torch.Tensor | None:
    """(L+1, frames, dim) from ``transformers.AutoModel`` on a Hugging Face directory, or None without transformers."""
    try:
        from transformers import AutoModel  # optional, and slow to import
    except ImportError:
        return None
    model = AutoModel.from_pretrained(str(directory)).eval()
    if (
        normalize
    ):  # the HF processor's job (do_normalize); speechlab models do it inside, so feed the same input
        audio = normalize_waveform(audio[None])[0]
    with torch.no_grad():
        out = model(audio[None], output_hidden_states=True)
    return torch.stack([h[0] for h in out.hidden_states])


def _outputs(model: nn.Module, audio: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(what, tensor) compared between source and export: CTC logits, codec reconstruction or hidden states."""
    family = model_family(model)
    with torch.inference_mode():
        if family == "ctc":
            logits, _ = model(audio[None])
            return "CTC logits", logits[0]
        if family == "codec":
            codes, frames = model.encode(audio[None])
            return "codec reconstruction", model.decode(codes, frames)[0]
    return "hidden states", hidden_states(model, audio)


def _diff(title: str, reference: torch.Tensor, other: torch.Tensor) -> float:
    """Print the largest difference (per layer for hidden states ``(L+1, frames, dim)``); return the largest."""
    if reference.shape != other.shape:
        print(f"{title}: shape mismatch {tuple(other.shape)} vs {tuple(reference.shape)}")
        return float("inf")
    if title.endswith("hidden states"):
        diffs = (reference.float() - other.float()).abs().amax(dim=(1, 2))
        print(
            f"{title}: max abs difference per hidden state (0 = Transformer input, {len(diffs) - 1} = last layer)"
        )
        for layer, diff in enumerate(diffs.tolist()):
            print(f"  layer {layer:3d}  {diff:.3e}")
        return float(diffs.max())
    diff = float((reference.float() - other.float()).abs().max())
    print(f"{title}: max abs difference {diff:.3e}")
    return diff


def _greedy_text(model: nn.Module, logits: torch.Tensor) -> str:
    ids = ctc_greedy_decode(logits[None], torch.tensor([logits.shape[0]]), model.tokenizer.blank_id)[0]
    return model.tokenizer.decode(ids)


def _transformers_ctc_report(
    model: nn.Module, out: Path, audio: torch.Tensor, reference: torch.Tensor
) -> float:
    from transformers import AutoModelForCTC  # slow to import; only for a Hugging Face CTC export

    hf = AutoModelForCTC.from_pretrained(str(out)).eval()
    signal = audio
    if model.encoder.config.normalize_waveform:  # the HF feature extractor's job; ours does it inside
        signal = normalize_waveform(audio[None])[0]
    with torch.inference_mode():
        theirs = hf(signal[None]).logits[0]
    worst = _diff(f"transformers {type(hf).__name__} vs speechlab: CTC logits", reference, theirs)
    ours_text, their_text = _greedy_text(model, reference), _greedy_text(model, theirs)
    print(f"  greedy transcript, speechlab:    {ours_text!r}")
    print(f"  greedy transcript, transformers: {their_text!r}")
    if ours_text != their_text:
        print("  transcripts differ")
        worst = float("inf")
    return worst


def round_trip_report(model: nn.Module, out: Path, fmt: str, source: str | Path | None = None) -> float:
    """Print the differences between ``model`` and what was written to ``out`` (a ``fmt`` directory, read from
    ``source``); returns the largest."""
    audio = test_signal()
    what, reference = _outputs(model, audio)
    worst = _diff(f"speechlab.load({out}) vs source: {what}", reference, _outputs(load(out), audio)[1])
    family = model_family(model)
    if fmt == "hf" and family == "ctc":
        worst = max(worst, _transformers_ctc_report(model, out, audio, reference))
    elif fmt == "hf":
        theirs = transformers_hidden_states(out, audio, find_encoder(model).config.normalize_waveform)
        if theirs is not None:
            worst = max(worst, _diff(f"transformers on {out} vs source: hidden states", reference, theirs))
    if source is not None and hf_dir.detect(Path(source)) and family in ("wavlm", "hubert", "ctc"):
        normalize = find_encoder(model).config.normalize_waveform
        theirs = transformers_hidden_states(source, audio, normalize)
        if theirs is not None:
            title = f"transformers on source {source} vs speechlab import: hidden states"
            worst = max(worst, _diff(title, hidden_states(model, audio), theirs))
    return worst
