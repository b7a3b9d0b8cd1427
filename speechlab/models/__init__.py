"""Model architectures (nn.Modules with a config dataclass); named presets of every family are registered with
``@preset(family)`` and looked up by :func:`speechlab.models.registry.build_config`."""
