"""Weights into a model of another layout, for ``config.train.init_from``.

- A new image size: the image tower's positional embedding is resampled on its patch
  grid (bilinear, as big_vision and open_clip do when fine-tuning 224 -> 336/384 px);
  the class token's row is kept as it is.
- ``config.model.scan=True``: per-block weights ``block_0 ... block_{L-1}`` are stacked
  into the scanned ``blocks`` subtree (leading layer axis).

Everything else must already match; `clip_jax.inference.matching_variables` checks it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.interop import mapping

POS_EMBEDDING, CLASS_TOKEN = "visual/pos_embedding", "visual/class_token"


def resample_positions(pos: np.ndarray, rows: int, prefix: int) -> np.ndarray:
    """[prefix + g*g, D] -> [prefix + G*G, D] with G*G = rows - prefix: the grid resized
    bilinearly (``jax.image.resize``: half-pixel centres, antialiased when shrinking);
    the ``prefix`` rows unchanged. Raises ValueError when a grid is not square."""
    old, new = pos.shape[0] - prefix, rows - prefix
    g, size = math.isqrt(max(old, 0)), math.isqrt(max(new, 0))
    if old <= 0 or new <= 0 or g * g != old or size * size != new:
        raise ValueError(f"{POS_EMBEDDING}: {pos.shape[0]} -> {rows} rows is not a square patch grid")
    grid = jnp.asarray(pos[prefix:], jnp.float32).reshape(g, g, -1)
    resized = jax.image.resize(grid, (size, size, grid.shape[-1]), "bilinear")
    return np.concatenate([pos[:prefix], np.asarray(resized).reshape(new, -1)]).astype(np.float32)


def _stacked(flat: dict[str, np.ndarray], key: str, layers: int) -> np.ndarray | None:
    """The ``layers`` per-block arrays of the scanned ``key`` stacked (removed from ``flat``),
    or None when any is missing (the caller then reports it)."""
    names = [re.sub(r"/blocks/", f"/block_{i}/", key, count=1) for i in range(layers)]
    if not all(n in flat for n in names):
        return None
    return np.stack([flat.pop(n) for n in names])


def fit(weights: Mapping, reference: Any) -> dict:
    """``weights`` (nested, per-block) in the layout of ``reference`` (a params tree or its
    abstract shapes): scanned blocks stacked, the image positional embedding resampled
    when its row count differs and both have a class token or neither has."""
    want = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(reference)
    }
    flat = mapping.flatten(weights)
    for key, shape in want.items():
        if "/blocks/" in key and key not in flat:
            stacked = _stacked(flat, key, shape[0])
            if stacked is not None:
                flat[key] = stacked
    pos = flat.get(POS_EMBEDDING)
    target = want.get(POS_EMBEDDING)
    prefix = int(CLASS_TOKEN in flat)
    same_prefix = prefix == int(CLASS_TOKEN in want)  # else the mismatch is reported
    if pos is not None and target is not None and pos.shape != tuple(target) and same_prefix:
        flat[POS_EMBEDDING] = resample_positions(pos, target[0], prefix)
    return mapping.unflatten(flat)
