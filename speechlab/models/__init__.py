"""Model architectures (nn.Modules with a config dataclass); named presets of every family are registered with
``@preset(family)`` and looked up by :func:`speechlab.models.registry.build_config`."""

# Importing any model module runs this first: the modules that define presets register them here, so that
# registry.build_config sees every family (they import the registry for @preset, so it cannot import them).
from speechlab.models import codec, fbank_conformer, unispeech, wavlm  # noqa: F401
