"""Transcript error counts (WER / CER / PER) via jiwer: one definition for training-time validation
(:mod:`speechlab.tasks.ctc`) and transcription (:mod:`speechlab.inference.transcriber`). Ground floor: imports
nothing of speechlab (and no Lightning)."""

from __future__ import annotations

import jiwer
import torch

__all__ = ["error_counts", "error_rates"]


def error_counts(refs: list[str], hyps: list[str]) -> torch.Tensor:
    """(word errors, reference words, char errors, reference chars) via jiwer; phoneme strings count phones as words.

    Empty references are skipped: they have no error rate (and jiwer refuses them).
    """
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r.strip()]
    if not pairs:
        return torch.zeros(4, dtype=torch.float64)
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    word_errors = words.substitutions + words.deletions + words.insertions
    char_errors = chars.substitutions + chars.deletions + chars.insertions
    return torch.tensor(
        [
            word_errors,
            words.hits + words.substitutions + words.deletions,
            char_errors,
            chars.hits + chars.substitutions + chars.deletions,
        ],
        dtype=torch.float64,
    )


def error_rates(refs: list[str], hyps: list[str], phonemes: bool) -> dict[str, float]:
    """WER + CER (text) or PER (phonemes) over the corpus (the counts of :func:`error_counts`)."""
    counts = error_counts(refs, hyps)
    word = float(counts[0] / counts[1].clamp_min(1))
    if phonemes:
        return {"per": word}
    return {"wer": word, "cer": float(counts[2] / counts[3].clamp_min(1))}
