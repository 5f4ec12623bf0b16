"""clip_jax: JAX/Flax, TPU-native CLIP training, evaluation and export."""

__version__ = "0.1.0"


def load(path: str, **kwargs):
    """`clip_jax.inference.load`: a workdir, params export or HF/OpenAI weights, ready to
    ``encode_image`` / ``encode_text``. Imported on call: ``import clip_jax`` stays light."""
    from clip_jax import inference

    return inference.load(path, **kwargs)
