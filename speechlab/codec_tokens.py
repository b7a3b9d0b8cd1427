"""Kept only for :mod:`speechlab.codec_eval`, which imports ``load_codec`` from here (it is being edited elsewhere):
the token file format is :mod:`speechlab.checkpoints.codec_tokens`, the codec reader
:func:`speechlab.checkpoints.hf_codec.load_codec`, the commands :mod:`speechlab.commands.encode` / ``decode``.
Delete this file once ``codec_eval`` imports ``load_codec`` from ``speechlab.checkpoints.hf_codec``.
"""

from speechlab.checkpoints.hf_codec import load_codec

__all__ = ["load_codec"]
