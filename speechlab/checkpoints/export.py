"""Writing a loaded model as a directory people use: our pretrained directory or a Hugging Face one.

:func:`export` is what ``speechlab export`` and ``speechlab convert`` write; :func:`model_family` names the
pretrained-directory family of a model, :func:`source_family` keeps the name a source gave its SSL backbone
(``wav2vec2`` stays ``wav2vec2``). The check that the written directory computes what the source did is
:func:`speechlab.inference.round_trip.round_trip_report`.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from speechlab.checkpoints.hf_ctc import export_hf_ctc
from speechlab.checkpoints.hf_ssl import export_hf_wavlm
from speechlab.checkpoints.pretrained_dir import CONFIG_NAME, save_pretrained
from speechlab.checkpoints.safe_load import read_json
from speechlab.models.codec import Codec
from speechlab.models.ctc import CTCModel
from speechlab.models.fbank_conformer import FbankConformerEncoder
from speechlab.models.ssl_encoder import SSLEncoder
from speechlab.models.unispeech import UniSpeech

__all__ = ["export", "model_family", "source_family"]

SSL_FAMILIES = ("wavlm", "hubert", "wav2vec2")


def model_family(model: nn.Module) -> str:
    """The pretrained-directory family of a loaded model (``ctc``, ``wavlm``, ``hubert``, ``unispeech``, ``codec``)."""
    if isinstance(model, CTCModel):
        return "ctc"
    if isinstance(model, SSLEncoder):
        return "wavlm" if model.config.relative_position_bias else "hubert"
    if isinstance(model, UniSpeech):
        return "unispeech"
    if isinstance(model, Codec):
        return "codec"
    raise ValueError(
        f"speechlab export: a {type(model).__name__} has no speechlab pretrained format (a transformers codec is "
        "already a Hugging Face directory: use it as it is)"
    )


def source_family(model: nn.Module, source: str | os.PathLike) -> str:
    """:func:`model_family`, except that an SSL backbone keeps the family its source directory names (a speechlab
    ``family`` or a Hugging Face ``model_type``: wavlm / hubert / wav2vec2)."""
    family = model_family(model)
    config_path = Path(source) / CONFIG_NAME
    if family in SSL_FAMILIES and config_path.is_file():
        data = read_json(config_path)
        named = data.get("family") or data.get("model_type")
        if named in SSL_FAMILIES:
            return str(named)
    return family


def export(model: nn.Module, out: str | Path, fmt: str = "speechlab", family: str | None = None) -> Path:
    """Write ``model`` to ``out`` as a speechlab pretrained directory (``family``: default :func:`model_family`) or
    a Hugging Face directory (``fmt="hf"``: CTC models as ``WavLMForCTC`` / ``HubertForCTC``, SSL backbones as
    ``WavLMModel`` / ``HubertModel``)."""
    if fmt == "speechlab":
        return save_pretrained(model, out, family=family or model_family(model))
    if fmt != "hf":
        raise ValueError(f"format must be 'speechlab' or 'hf', got {fmt!r}")
    kind = model_family(model)
    if kind == "ctc":
        if isinstance(model.encoder, FbankConformerEncoder):
            raise ValueError(
                "speechlab export --format hf: a CTC model with the fbank Conformer encoder has no Hugging Face "
                "export (transformers has no such model class); use --format speechlab"
            )
        return export_hf_ctc(model, out)
    if kind in ("wavlm", "hubert"):
        return export_hf_wavlm(model, out)
    raise ValueError(
        f"speechlab export --format hf: a {kind} model has no Hugging Face export (transformers' classes for it "
        "use other parameter layouts); use --format speechlab"
    )
