"""Checkpoint formats: our pretrained directory, Hugging Face and fairseq/unilm import/export."""
