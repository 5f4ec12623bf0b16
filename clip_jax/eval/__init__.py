"""Evaluation: encoders, zero-shot classification, retrieval, linear probes, data sources,
and the evaluators the training loop runs (`evaluator`, `suite`, `scenes_suite`).

`clip_jax.evaluate` is the entry point (``python -m clip_jax.evaluate``); nothing here
imports it or `clip_jax.train`.
"""
