"""Weights in and out: clip_jax params <-> Hugging Face `CLIPModel` and OpenAI/open_clip layouts.

``mapping`` holds the tensor-by-tensor conversions, ``hf`` and ``openai`` the two
external layouts (names, shapes, configs), ``files`` reading and writing them on
disk. ``clip_jax.export`` is the command line.
"""
