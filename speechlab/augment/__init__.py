"""Batch augmentations (WavLM utterance mixing)."""
