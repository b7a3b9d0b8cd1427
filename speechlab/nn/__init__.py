"""Building blocks shared by the models: conv feature encoder, attention, Transformer, masking, quantizers, k-means."""
