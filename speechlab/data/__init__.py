"""Data pipeline: manifests, audio datasets, length-bucketed sampling, collation, text units."""
