"""Contrastive losses over the GLOBAL batch: softmax (CLIP's InfoNCE) and sigmoid (SigLIP).

Every loss has the signature ``(image_emb [B, E], text_emb [B, E], scale [], bias [])
-> (loss [], {"i2t_acc": [], "t2i_acc": []})`` where ``scale`` is exp(logit_scale),
``bias`` the SigLIP logit bias (ignored by softmax) and the accuracies in-batch top-1.

Three ways to compute the same numbers, picked by ``config.train.loss``:

- dense (`softmax_contrastive`, `sigmoid_contrastive`): plain arrays, the whole
  [B, B] logit matrix. The reference; fine for small batches.
- local rows (``"softmax"``): inside ``shard_map`` every device gathers all
  embeddings (the gather's transpose is a reduce-scatter, so gradients flow)
  and computes its own rows against all columns: open_clip's
  ``--local-loss --gather-with-grad``. Memory O(b * B) per device.
- ring (``"softmax_ring"``, ``"sigmoid_ring"``, in `clip_jax.ring_loss`): text
  chunks travel round the devices with ``ppermute`` while each device keeps its
  images; the softmax normalisers are accumulated online (log-sum-exp), and the
  backward pass is a second ring. Memory O(b^2 + b * E) per device: it grows
  with the local batch b = B / devices, not with the global one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clip_jax import cli, ring_loss
from clip_jax.sharding import BATCH_AXES

# (image_emb [B, E], text_emb [B, E], scale [], bias []) -> (loss [], metrics {name: []})
LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

# SigLIP's initialisation (Zhai et al. 2023): logits t * x.y + b with t = 10, b = -10.
SIGMOID_LOGIT_SCALE_INIT = math.log(10.0)
SIGMOID_LOGIT_BIAS_INIT = -10.0


def sigmoid_scale_init(train_config) -> float:
    """The initial logit_scale (log t) of a sigmoid-loss model: log ``train.sigmoid_init_scale``,
    or SigLIP's log 10."""
    t = train_config.get("sigmoid_init_scale")
    if t is None:
        return SIGMOID_LOGIT_SCALE_INIT
    if not t > 0:
        raise cli.UserError(f"config.train.sigmoid_init_scale={t} must be > 0 (the initial t of t x.y + b)")
    return math.log(t)


def sigmoid_bias_init(train_config) -> float:
    """The initial logit bias b of a sigmoid-loss model: ``train.sigmoid_init_bias``, or SigLIP's -10."""
    b = train_config.get("sigmoid_init_bias")
    return SIGMOID_LOGIT_BIAS_INIT if b is None else float(b)


def _row_terms(queries, keys, scale, labels):
    """Cross-entropy and top-1 hits of query rows against all keys.

    queries [b, E], keys [B, E], labels [b] (column of each row's positive) -> ([b], [b]).
    """
    logits = scale * jnp.dot(queries, keys.T)  # [b, B]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return ce, hits


def softmax_contrastive(image_emb, text_emb, scale, bias=None):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy (dense reference).

    image_emb, text_emb: [B, E] unit-norm; scale: [] (exp of the logit scale); bias unused.
    """
    del bias
    labels = jnp.arange(image_emb.shape[0])
    i2t, i2t_hits = _row_terms(image_emb, text_emb, scale, labels)
    t2i, t2i_hits = _row_terms(text_emb, image_emb, scale, labels)
    loss = 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
    return loss, {"i2t_acc": jnp.mean(i2t_hits), "t2i_acc": jnp.mean(t2i_hits)}


def sigmoid_contrastive(image_emb, text_emb, scale, bias):
    """SigLIP: -1/B sum_ij log sigmoid(z_ij (scale x_i.y_j + bias)), z = +1 on the diagonal, else -1.

    image_emb, text_emb: [B, E]; scale, bias: []. Dense reference.
    """
    logits = scale * jnp.dot(image_emb, text_emb.T) + bias  # [B, B]
    signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
    labels = jnp.arange(logits.shape[0])
    i2t = jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))
    t2i = jnp.mean((jnp.argmax(logits, axis=0) == labels).astype(jnp.float32))
    return loss, {"i2t_acc": i2t, "t2i_acc": t2i}


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
    mapped = jax.shard_map(local_loss, mesh=mesh, in_specs=(batch, batch, P()), out_specs=(P(), P()))
    return lambda image_emb, text_emb, scale, bias=None: mapped(image_emb, text_emb, scale)


def _dense(fn: LossFn) -> Callable[[Mesh], LossFn]:
    return lambda mesh: fn


BUILDERS: dict[str, Callable[[Mesh], LossFn]] = {
    "softmax": make_softmax_contrastive,
    "softmax_dense": _dense(softmax_contrastive),
    "softmax_ring": ring_loss.make_ring_softmax,
    "sigmoid_dense": _dense(sigmoid_contrastive),
    "sigmoid_ring": ring_loss.make_ring_sigmoid,
}

# Losses whose model carries SigLIP's learnable bias (and its temperature init).
SIGMOID_LOSSES = ("sigmoid_dense", "sigmoid_ring")


def make_loss(name: str, mesh: Mesh) -> LossFn:
    """The loss named by ``config.train.loss``."""
    if name not in BUILDERS:
        raise ValueError(f"config.train.loss={name!r} is unknown; known: {sorted(BUILDERS)}")
    return BUILDERS[name](mesh)
