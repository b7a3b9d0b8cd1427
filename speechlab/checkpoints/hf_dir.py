"""Reader for Hugging Face model directories (``save_pretrained`` output), by ``config.json`` ``model_type``:

* ``wavlm`` / ``hubert`` / ``wav2vec2`` -> :class:`~speechlab.models.ssl_encoder.SSLEncoder`, through the key map of
  :mod:`speechlab.checkpoints.hf_ssl`;
* ``unispeech`` -> :class:`~speechlab.models.unispeech.UniSpeech` (:mod:`speechlab.checkpoints.hf_unispeech`);
* any of these with a CTC head (``*ForCTC``: an ``lm_head`` next to the backbone, ``vocab.json`` beside it) ->
  :class:`~speechlab.models.ctc.CTCModel` with its head and a speechlab tokenizer built from the vocabulary
  (characters with the ``|`` word delimiter, or phonemes for ``Wav2Vec2PhonemeCTCTokenizer``);
* ``encodec`` / ``dac`` -> :class:`~speechlab.checkpoints.hf_codec.HFCodec` (the transformers model wrapped in
  speechlab's codec interface).

Config values are checked against :data:`~speechlab.checkpoints.safe_load.DEFAULT_CONFIG_LIMITS` and tensor shapes
(from the safetensors header) against the model built on the meta device before any weight is read; ``.bin``
weights are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechlab.checkpoints import hf_ssl, hf_unispeech
from speechlab.checkpoints.hf_codec import HFCodec
from speechlab.checkpoints.hf_files import read_do_normalize, read_hf_directory
from speechlab.checkpoints.pretrained_dir import config_to_dict
from speechlab.checkpoints.safe_load import (
    CheckpointError,
    TensorInfo,
    check_config_limits,
    check_state_dict,
    read_json,
    read_safetensors_header,
    tensor_infos,
)
from speechlab.data.text import BLANK, WORD_DELIMITER, CharTokenizer, PhonemeTokenizer
from speechlab.models.ctc import CTCConfig, CTCModel
from speechlab.models.ssl_encoder import SSLEncoder

__all__ = ["HF_MODEL_TYPES", "HF_CODEC_TYPES", "detect", "read", "read_hf_directory", "build_checked_encoder"]

HF_MODEL_TYPES = ("wavlm", "hubert", "wav2vec2", "unispeech")
HF_CODEC_TYPES = ("encodec", "dac")
CTC_HEAD = ("lm_head.weight", "lm_head.bias")
PHONEME_TOKENIZERS = ("Wav2Vec2PhonemeCTCTokenizer",)


def detect(path: Path) -> bool:
    """A directory whose ``config.json`` has a ``model_type`` this reader knows (and no speechlab ``family``)."""
    config_path = path / "config.json"
    if not (path.is_dir() and config_path.is_file()):
        return False
    try:
        config = read_json(config_path)
    except CheckpointError:
        return False
    return "family" not in config and config.get("model_type") in (*HF_MODEL_TYPES, *HF_CODEC_TYPES)


def read(path: Path) -> nn.Module:
    """Load the Hugging Face directory ``path`` (see the module docstring for what each model type gives)."""
    config_path = path / "config.json"
    hf_config = read_json(config_path)
    check_config_limits(hf_config, source=str(config_path))
    model_type = hf_config.get("model_type")
    if model_type in HF_CODEC_TYPES:
        return _read_codec(path)
    if model_type == "unispeech":
        return _read_unispeech(path, hf_config)
    return _read_ssl(path, hf_config)


# ------------------------------------------------------------------------------------------------ weights


def _meta_expected(config: Any) -> dict[str, TensorInfo]:
    """Expected tensor shapes of an SSLEncoder built on the meta device (allocates nothing)."""
    with torch.device("meta"):
        return tensor_infos(SSLEncoder(config))


def build_checked_encoder(config: Any, state: dict[str, Any], source: str) -> SSLEncoder:
    """Validate ``state`` against the config's shapes, then build the encoder and load it strictly."""
    expected = _meta_expected(config)
    if "mask_emb" not in state:  # HF drops masked_spec_embed when masking is off; it is unused at inference
        state = {**state, "mask_emb": None}
    check_state_dict({k: v for k, v in state.items() if v is not None}, expected, source=source,
                     ignore_missing=("mask_emb",))  # fmt: skip
    model = SSLEncoder(config)
    if state.get("mask_emb") is None:
        state = {**state, "mask_emb": model.mask_emb.detach().clone()}
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------------------ SSL models


def _read_ssl(directory: Path, hf_config: dict) -> nn.Module:
    """HF WavLM / HuBERT / wav2vec2 directory -> SSLEncoder (or CTCModel for ``*ForCTC``), shapes checked from
    the safetensors header before any tensor data is read."""
    source = str(directory / "config.json")
    try:
        config = hf_ssl.config_from_hf(hf_config, normalize_waveform=read_do_normalize(directory))
        check_config_limits(config_to_dict(config), source=source)
        single = directory / "model.safetensors"
        if single.is_file():  # shapes from the header first: refuse mismatches before reading any tensor data
            infos, _ = read_safetensors_header(single)
            mapped = hf_ssl.state_dict_from_hf(infos, config)
            check_state_dict(mapped, _meta_expected(config), source=str(single), ignore_missing=("mask_emb",))
        _, hf_state = read_hf_directory(directory)
        state = hf_ssl.state_dict_from_hf(hf_state, config)
    except (KeyError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{directory}: cannot convert the Hugging Face checkpoint: {err}") from err
    encoder = build_checked_encoder(config, state, str(directory))
    if CTC_HEAD[0] in hf_state:
        return _ctc_model(directory, hf_config, encoder, hf_state)
    return encoder


def _read_unispeech(directory: Path, hf_config: dict) -> nn.Module:
    _, hf_state = read_hf_directory(directory)
    if CTC_HEAD[0] not in hf_state:
        return hf_unispeech.load_hf_unispeech(directory)
    config = hf_unispeech.config_from_hf(hf_config)
    encoder = build_checked_encoder(
        config.encoder, hf_unispeech.encoder_state_from_hf(hf_state, config), str(directory)
    )
    return _ctc_model(directory, hf_config, encoder, hf_state)


# ------------------------------------------------------------------------------------------------ CTC heads


def _ctc_model(
    directory: Path, hf_config: dict, encoder: SSLEncoder, hf_state: dict[str, Tensor]
) -> nn.Module:
    """A ``*ForCTC`` directory: our CTCModel with the HF ``lm_head`` and a tokenizer from ``vocab.json``."""
    weight, bias = (hf_state.get(k) for k in CTC_HEAD)
    if bias is None or weight.dim() != 2 or weight.shape[1] != encoder.config.hidden_size:
        raise CheckpointError(
            f"{directory}: lm_head has shape {list(weight.shape)}, expected [vocab, {encoder.config.hidden_size}] "
            "with a bias."
        )
    tokenizer = hf_ctc_tokenizer(directory, vocab_size=weight.shape[0])
    config = CTCConfig(
        encoder=encoder.config,
        vocab_size=int(weight.shape[0]),
        head_dropout=float(hf_config.get("final_dropout", 0.1)),
    )
    model = CTCModel(config)
    model.encoder.load_state_dict(encoder.state_dict(), strict=True)
    model.head.load_state_dict({"weight": weight, "bias": bias}, strict=True)
    model.tokenizer = tokenizer
    return model


def hf_ctc_tokenizer(directory: Path, *, vocab_size: int) -> Any:
    """A speechlab tokenizer equivalent to the directory's ``Wav2Vec2CTCTokenizer`` (characters) or
    ``Wav2Vec2PhonemeCTCTokenizer`` (phonemes): same ids, the pad token as the CTC blank (id 0)."""
    vocab_path = directory / "vocab.json"
    if not vocab_path.is_file():
        raise CheckpointError(
            f"{directory}: a CTC model (lm_head) without vocab.json; the unit inventory is needed to transcribe. "
            "Save the processor / tokenizer next to the model."
        )
    vocab = read_json(vocab_path)
    settings = (
        read_json(directory / "tokenizer_config.json")
        if (directory / "tokenizer_config.json").is_file()
        else {}
    )
    pad = _token_string(settings.get("pad_token", "<pad>"))
    delimiter = _token_string(settings.get("word_delimiter_token", WORD_DELIMITER))
    by_id: dict[int, str] = {}
    for token, index in vocab.items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise CheckpointError(f"{vocab_path}: id of {token!r} is {index!r}, expected an integer.")
        by_id.setdefault(index, token)
    missing = [i for i in range(vocab_size) if i not in by_id]
    if missing:
        raise CheckpointError(
            f"{vocab_path}: no token for ids {missing[:10]} of the {vocab_size}-row lm_head; vocab and model differ."
        )
    units = [by_id[i] for i in range(vocab_size)]
    if units[0] != pad:
        raise CheckpointError(
            f"{vocab_path}: the pad token {pad!r} (the CTC blank) has id {vocab.get(pad)!r}; speechlab needs the blank "
            "at id 0. Reorder vocab.json and the lm_head rows together."
        )
    units[0] = BLANK
    if settings.get("tokenizer_class") in PHONEME_TOKENIZERS:
        return PhonemeTokenizer(units)
    if delimiter and delimiter != WORD_DELIMITER:
        if WORD_DELIMITER in units:
            raise CheckpointError(
                f"{vocab_path}: word delimiter {delimiter!r} and a separate '|' unit: cannot map to speechlab."
            )
        units = [WORD_DELIMITER if u == delimiter else u for u in units]
    lowercase = not any(u.isupper() for u in units if len(u) == 1)
    return CharTokenizer(units, lowercase=lowercase)


def _token_string(token: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts (``{"content": ...}``)."""
    if isinstance(token, dict):
        return token.get("content")
    return token


# ------------------------------------------------------------------------------------------------ codecs


def _read_codec(directory: Path) -> nn.Module:
    """transformers EnCodec / DAC directory -> HFCodec; safetensors header validated first, missing or
    mismatched weights refused (transformers would otherwise initialise them randomly)."""
    single = directory / "model.safetensors"
    if single.is_file():
        read_safetensors_header(
            single
        )  # truncation / corrupt header -> clear error before transformers reads
    elif not (directory / "pytorch_model.bin").is_file():
        raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin next to config.json.")
    kind = read_json(directory / "config.json")["model_type"]
    import transformers

    cls = transformers.EncodecModel if kind == "encodec" else transformers.DacModel
    try:
        model, info = cls.from_pretrained(
            str(directory), output_loading_info=True, use_safetensors=single.is_file()
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{directory}: transformers could not load the {kind} model ({err}).") from err
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"{directory}: weights do not match config.json: {problems}")
    try:
        return HFCodec(model)
    except ValueError as err:
        raise CheckpointError(f"{directory}: {err}") from err
