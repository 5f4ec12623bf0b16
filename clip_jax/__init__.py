"""clip_jax: JAX/Flax, TPU-native CLIP training, evaluation and export."""

__version__ = "0.1.0"
