"""Model architectures (nn.Modules with a config dataclass and named presets)."""
