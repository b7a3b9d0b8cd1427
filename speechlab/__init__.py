"""speechlab: speech foundation models (WavLM, UniSpeech, neural codecs) in one Lightning training loop."""

__version__ = "0.1.0"
