"""Contrastive losses over the GLOBAL batch.

`softmax_contrastive` is the plain computation on whole arrays (the reference).
`make_softmax_contrastive(mesh)` is what the train step uses: inside
``shard_map`` each device gathers the embeddings of the whole batch (the
gather keeps its gradient: its transpose is a reduce-scatter) and computes
only its own rows against all columns, open_clip's ``--local-loss
--gather-with-grad``. Its memory is O(b * B) per device instead of O(B^2).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clip_jax.sharding import BATCH_AXES

# (image_emb [B, E], text_emb [B, E], scale []) -> (loss [], metrics {name: []})
LossFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _row_terms(queries, keys, scale, labels):
    """Cross-entropy and top-1 hits of query rows against all keys.

    queries [b, E], keys [B, E], labels [b] (column of each row's positive) -> ([b], [b]).
    """
    logits = scale * jnp.dot(queries, keys.T)  # [b, B]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return ce, hits


def softmax_contrastive(image_emb, text_emb, scale):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy.

    image_emb, text_emb: [B, E] unit-norm; scale: [] (exp of the logit scale).
    Returns (loss, {"i2t_acc", "t2i_acc"}), accuracies being in-batch top-1.
    """
    labels = jnp.arange(image_emb.shape[0])
    i2t, i2t_hits = _row_terms(image_emb, text_emb, scale, labels)
    t2i, t2i_hits = _row_terms(text_emb, image_emb, scale, labels)
    loss = 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
    return loss, {"i2t_acc": jnp.mean(i2t_hits), "t2i_acc": jnp.mean(t2i_hits)}


def make_softmax_contrastive(mesh: Mesh) -> LossFn:
    """The symmetric InfoNCE of `softmax_contrastive`, local rows x gathered columns per device."""

    def local_loss(image_emb, text_emb, scale):
        # image_emb, text_emb: [b, E], this device's rows of the global batch.
        all_image = jax.lax.all_gather(image_emb, BATCH_AXES, tiled=True)  # [B, E]
        all_text = jax.lax.all_gather(text_emb, BATCH_AXES, tiled=True)  # [B, E]
        local_batch, global_batch = image_emb.shape[0], all_image.shape[0]
        labels = jax.lax.axis_index(BATCH_AXES) * local_batch + jnp.arange(local_batch)
        i2t, i2t_hits = _row_terms(image_emb, all_text, scale, labels)
        t2i, t2i_hits = _row_terms(text_emb, all_image, scale, labels)
        total = lambda x: jax.lax.psum(jnp.sum(x), BATCH_AXES) / global_batch
        loss = 0.5 * (total(i2t) + total(t2i))
        return loss, {"i2t_acc": total(i2t_hits), "t2i_acc": total(t2i_hits)}

    batch = P(BATCH_AXES)
    return jax.shard_map(local_loss, mesh=mesh, in_specs=(batch, batch, P()), out_specs=(P(), P()))


BUILDERS: dict[str, Callable[[Mesh], LossFn]] = {"softmax": make_softmax_contrastive}


def make_loss(name: str, mesh: Mesh) -> LossFn:
    """The loss named by ``config.train.loss``."""
    if name not in BUILDERS:
        raise ValueError(f"config.train.loss={name!r} is unknown; known: {sorted(BUILDERS)}")
    return BUILDERS[name](mesh)
