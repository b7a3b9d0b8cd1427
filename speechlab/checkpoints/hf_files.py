"""Reading a Hugging Face ``save_pretrained`` directory safely: ``config.json``, the weights (``model.safetensors``,
sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` through ``torch.load(weights_only=True)``) and
the waveform normalisation of ``preprocessor_config.json``. One reader for every Hugging Face importer
(:mod:`~speechlab.checkpoints.hf_ssl`, :mod:`~speechlab.checkpoints.hf_unispeech`,
:mod:`~speechlab.checkpoints.hf_dir`)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from speechlab.checkpoints.safe_load import (
    CheckpointError,
    load_safetensors,
    load_torch_checkpoint,
    read_json,
)

__all__ = ["read_hf_directory", "read_do_normalize"]


def read_hf_directory(directory: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """``(config dict, state dict)`` of a Hugging Face ``save_pretrained`` directory, loaded safely.

    Weights: ``model.safetensors``, sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``
    (``torch.load(weights_only=True)``).
    """
    directory = Path(directory)
    config = read_json(directory / "config.json")
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return config, dict(load_safetensors(single))
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name.")
            state.update(load_safetensors(directory / shard))
        return config, state
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        state = load_torch_checkpoint(binary)
        if not isinstance(state, dict):
            raise CheckpointError(f"{binary}: expected a state dict, found {type(state).__name__}.")
        return config, state
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin next to config.json.")


def read_do_normalize(directory: str | os.PathLike) -> bool | None:
    """``do_normalize`` of the directory's ``preprocessor_config.json`` (waveform normalisation), None without one."""
    preprocessor = Path(directory) / "preprocessor_config.json"
    if not preprocessor.is_file():
        return None
    return bool(read_json(preprocessor).get("do_normalize", False))
