"""Inference engine: caches, sampling, the batched decode loop."""
