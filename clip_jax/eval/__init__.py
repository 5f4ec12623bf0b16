"""Evaluation: encoders, zero-shot classification, retrieval, linear probes, data sources.

`clip_jax.evaluate` is the entry point (``python -m clip_jax.evaluate``) and
re-exports what the training loop uses.
"""
