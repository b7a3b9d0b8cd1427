"""Export a speechlab :class:`~speechlab.models.ctc.CTCModel` as a Hugging Face ``WavLMForCTC`` / ``HubertForCTC``
directory that ``transformers.pipeline("automatic-speech-recognition", model=DIR)`` runs as is.

Written files: ``config.json`` (the backbone's config from :func:`speechlab.checkpoints.hf_ssl.config_to_hf`, the
``*ForCTC`` architecture, ``vocab_size``, ``pad_token_id = 0`` = the CTC blank, ``final_dropout`` = our head
dropout), ``model.safetensors`` (backbone under ``wavlm.`` / ``hubert.``, the head as ``lm_head``), the tokenizer
(``vocab.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, saved by transformers itself) and
``preprocessor_config.json`` (``Wav2Vec2FeatureExtractor``, 16 kHz, ``do_normalize`` = the encoder's waveform
normalisation).

Vocabularies: characters map to ``Wav2Vec2CTCTokenizer`` (our blank is its pad token, ``|`` its word delimiter)
and phonemes to ``Wav2Vec2PhonemeCTCTokenizer`` (``do_phonemize=False``: phones joined by spaces), so both decode
an id sequence to our text. One difference remains for characters: transformers keeps the double space of a
"word delimiter, blank, word delimiter" output where speechlab's decoder collapses whitespace runs. Sentencepiece
vocabularies are refused (see :func:`hf_tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speechlab.checkpoints.hf_ssl import config_to_hf, state_dict_to_hf
from speechlab.checkpoints.safe_load import CheckpointError
from speechlab.data.text import BLANK, WORD_DELIMITER

__all__ = ["ARCHITECTURES", "export_hf_ctc", "hf_tokenizer"]

ARCHITECTURES = {"wavlm": "WavLMForCTC", "hubert": "HubertForCTC"}
SAMPLE_RATE = 16000


def hf_tokenizer(tokenizer: Any, directory: Path) -> Any:
    """The transformers tokenizer equivalent to ``tokenizer``, its ``vocab.json`` written to ``directory``.

    Raises :class:`CheckpointError` for sentencepiece: its pieces carry the word boundary inside them (``▁the``)
    and its decoder undoes that, while transformers' CTC tokenizers only turn a whole-token word delimiter into
    a space, so the exported model would transcribe ``▁the▁cat`` where speechlab gives ``the cat``.
    """
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2PhonemeCTCTokenizer

    kind = getattr(tokenizer, "kind", "")
    if kind not in ("char", "phoneme"):
        raise CheckpointError(
            f"cannot export a {kind or type(tokenizer).__name__} vocabulary to Hugging Face: transformers' CTC "
            "tokenizers (Wav2Vec2CTCTokenizer / Wav2Vec2PhonemeCTCTokenizer) join tokens and only map a whole "
            "word-delimiter token to a space, while sentencepiece pieces carry the word boundary inside them "
            "('▁the'), so the exported model would not give speechlab's text. Export with --format speechlab, or "
            "train with a char or phoneme tokenizer for a Hugging Face model."
        )
    units = list(tokenizer.units)
    if units[0] != BLANK:
        raise CheckpointError(f"tokenizer: unit 0 is {units[0]!r}, expected the CTC blank {BLANK!r}")
    vocab_file = directory / "vocab.json"
    vocab_file.write_text(
        json.dumps({u: i for i, u in enumerate(units)}, ensure_ascii=False, indent=1) + "\n"
    )
    # The blank doubles as pad and unk token, so transformers adds no tokens beyond the model's vocabulary.
    common = dict(pad_token=BLANK, unk_token=BLANK, bos_token=None, eos_token=None)
    if kind == "phoneme":
        return Wav2Vec2PhonemeCTCTokenizer(
            str(vocab_file),
            do_phonemize=False,
            phone_delimiter_token=" ",
            word_delimiter_token=None,
            **common,
        )
    return Wav2Vec2CTCTokenizer(
        str(vocab_file), word_delimiter_token=WORD_DELIMITER, do_lower_case=False, **common
    )


def export_hf_ctc(model: Any, directory: str | Path, *, weight_norm_keys: str = "weight_g") -> Path:
    """Write ``model`` (a CTCModel with ``.tokenizer``) as a transformers ``*ForCTC`` directory; returns it."""
    from safetensors.torch import save_file
    from transformers import Wav2Vec2FeatureExtractor

    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise CheckpointError("export_hf_ctc: the model has no tokenizer (load it with speechlab.load)")
    encoder = model.encoder
    config = encoder.config
    if tokenizer.vocab_size != model.head.out_features:
        raise CheckpointError(
            f"export_hf_ctc: tokenizer has {tokenizer.vocab_size} units, the head {model.head.out_features}"
        )
    model_type = "wavlm" if config.relative_position_bias else "hubert"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_tokenizer(tokenizer, directory).save_pretrained(str(directory))

    hf_config = config_to_hf(config, model_type)
    hf_config.pop("do_normalize")
    hf_config.update(
        architectures=[ARCHITECTURES[model_type]],
        vocab_size=int(model.head.out_features),
        pad_token_id=tokenizer.blank_id,
        final_dropout=float(model.dropout.p),
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
        torch_dtype="float32",
    )
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=config.normalize_waveform,
        return_attention_mask=True,
    ).save_pretrained(str(directory))

    backbone = state_dict_to_hf(encoder.state_dict(), config, weight_norm_keys=weight_norm_keys)
    tensors = {f"{model_type}.{k}": v for k, v in backbone.items()}
    tensors["lm_head.weight"] = model.head.weight
    tensors["lm_head.bias"] = model.head.bias
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
