"""speechlab: speech foundation models (WavLM, UniSpeech, neural codecs) in one Lightning training loop.

The public Python API (imported lazily, so ``import speechlab`` stays fast)::

    import speechlab
    model = speechlab.load("path/to/wavlm-or-hf-dir-or-unilm.pt")
    features = speechlab.FeatureExtractor(model)(["a.flac", "b.wav"], layers=[6, 12])
    texts = [t.text for t in speechlab.Transcriber(speechlab.load("exp/ctc_run"))(["a.flac"])]
    codec = speechlab.Codec(speechlab.codec_16khz())
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "speechlab.api",
    "FeatureExtractor": "speechlab.api",
    "Transcriber": "speechlab.inference.transcriber",
    "Transcript": "speechlab.inference.transcriber",
    "Features": "speechlab.api",
    "WeightedLayerSum": "speechlab.api",
    "save_pretrained": "speechlab.checkpoints.pretrained_dir",
    "load_pretrained": "speechlab.checkpoints.pretrained_dir",
    "SSLEncoder": "speechlab.models.ssl_encoder",
    "SSLEncoderConfig": "speechlab.models.ssl_encoder",
    "Codec": "speechlab.models.codec",
    "CodecConfig": "speechlab.models.codec",
    "codec_16khz": "speechlab.models.codec",
    "load_audio": "speechlab.audio",
    "read_manifest": "speechlab.data.manifest",
    "write_manifest": "speechlab.data.manifest",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'speechlab' has no attribute {name!r}")
