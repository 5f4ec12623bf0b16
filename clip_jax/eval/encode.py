"""Batched, jitted image and text encoders for one model and its params."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from clip_jax import sharding
from clip_jax.data import transforms
from clip_jax.interop import openai_resnet
from clip_jax.models import clip


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    """tqdm on process 0 when ``enabled`` (stderr); the plain iterable otherwise."""
    if not enabled or jax.process_index() != 0:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class Encoder:
    """Jitted, batched ``encode_image`` / ``encode_text`` for one model and its params.

    ``progress``: show a tqdm bar for inputs of more than one batch.
    """

    def __init__(
        self, model: clip.CLIP, params, batch_size: int, mesh: Mesh | None = None, progress: bool = False
    ):
        # params, weights ({**params, "batch_stats": ...} of a ResNet tower, as exported)
        # or all variables ({"params": ..., "batch_stats": ...})
        self.params = params if "params" in params else openai_resnet.split_variables(params)
        self.batch_size = batch_size
        self.progress = progress
        # Replicated outputs: every process can read the embeddings (multi-host too).
        out = {} if mesh is None else {"out_shardings": sharding.replicated(mesh)}
        self._image = jax.jit(
            lambda v, x: model.apply(v, transforms.normalize(x), method=clip.CLIP.encode_image), **out
        )
        self._text = jax.jit(lambda v, t: model.apply(v, t, method=clip.CLIP.encode_text), **out)

    def _batched(self, fn, x: np.ndarray, desc: str) -> np.ndarray:
        n, size = len(x), self.batch_size
        padded = np.concatenate([x, np.zeros((-n % size, *x.shape[1:]), x.dtype)])
        starts = range(0, len(padded), size)
        bar = progress(starts, len(starts), desc, self.progress and len(starts) > 1)
        out = [np.asarray(fn(self.params, padded[i : i + size])) for i in bar]
        return np.concatenate(out)[:n]

    def images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> unit-norm float32 [N, E]."""
        return self._batched(self._image, images, "image features")

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """int32 [N, L] -> unit-norm float32 [N, E]."""
        return self._batched(self._text, tokens, "text features")
