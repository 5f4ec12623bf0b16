"""Unrolled CLIP params -> the ``scan`` layout, for tests that compare the two."""

import jax
import jax.numpy as jnp


def stacked(params: dict) -> dict:
    """Each tower's ``transformer/block_0 ... block_{L-1}`` -> one ``transformer/blocks``
    subtree with a leading layer axis (the inverse of `layers.unstack_layers`)."""
    out = dict(params)
    for tower in ("visual", "text"):
        blocks = params[tower]["transformer"]
        stack = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[f"block_{i}"] for i in range(len(blocks))))
        out[tower] = {**params[tower], "transformer": {"blocks": stack}}
    return out
