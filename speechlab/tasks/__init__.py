"""LightningModules, one per training objective, and the offline unit discovery (``units.py``: frame features ->
k-means -> unit ids) whose targets WavLM / HuBERT pretraining predicts."""
