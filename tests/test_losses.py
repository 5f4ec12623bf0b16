"""The contrastive loss: hand-checked values, and the sharded version against the plain one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import losses, sharding


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def random_pair(batch, dim, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return unit(jax.random.normal(k1, (batch, dim))), unit(jax.random.normal(k2, (batch, dim)))


def test_perfect_alignment_at_large_scale_gives_zero_loss():
    emb = jnp.eye(16, 32)  # orthonormal rows: each pair matches only itself
    loss, stats = losses.softmax_contrastive(emb, emb, jnp.float32(100.0))
    assert float(loss) < 1e-6
    assert float(stats["i2t_acc"]) == 1.0 and float(stats["t2i_acc"]) == 1.0


def test_random_batch_gives_about_log_batch():
    image, text = random_pair(256, 512)
    loss, _ = losses.softmax_contrastive(image, text, jnp.float32(1.0))
    assert abs(float(loss) - math.log(256)) < 0.05


def test_hand_computed_two_by_two():
    image = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    text = jnp.array([[0.8, 0.6], [0.0, 1.0]])
    scale = 2.0
    logits = scale * np.array([[0.8, 0.0], [0.96, 0.8]])  # image @ text.T by hand
    i2t = [
        -logits[0, 0] + np.log(np.exp(logits[0]).sum()),
        -logits[1, 1] + np.log(np.exp(logits[1]).sum()),
    ]
    t2i = [
        -logits[0, 0] + np.log(np.exp(logits[:, 0]).sum()),
        -logits[1, 1] + np.log(np.exp(logits[:, 1]).sum()),
    ]
    loss, stats = losses.softmax_contrastive(image, text, jnp.float32(scale))
    np.testing.assert_allclose(float(loss), (np.mean(i2t) + np.mean(t2i)) / 2, rtol=1e-6)
    # image 1's best text is text 0 (0.96 > 0.8): i2t top-1 is 1/2; t2i columns: 0.96 > 0.8 too.
    assert float(stats["i2t_acc"]) == 0.5
    assert float(stats["t2i_acc"]) == 0.5


@pytest.mark.parametrize(
    "mesh_shape",
    [{"data": 2, "fsdp": 2, "model": 2}, {"data": 8}, {"data": 1, "fsdp": 4, "model": 2}],
    ids=str,
)
def test_sharded_loss_and_gradients_equal_single_device(mesh_shape):
    image, text = random_pair(64, 32, seed=1)
    scale = jnp.float32(14.3)
    grad_fn = jax.value_and_grad(lambda i, t, s: losses.softmax_contrastive(i, t, s)[0], argnums=(0, 1, 2))
    ref_loss, ref_grads = grad_fn(image, text, scale)
    ref_stats = losses.softmax_contrastive(image, text, scale)[1]

    mesh = sharding.make_mesh(mesh_shape)
    loss_fn = losses.make_softmax_contrastive(mesh)
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (image, text)]
        sharded = jax.value_and_grad(lambda i, t, s: loss_fn(i, t, s)[0], argnums=(0, 1, 2))
        loss, grads = jax.jit(sharded)(*placed, scale)
        stats = jax.jit(loss_fn)(*placed, scale)[1]
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert float(jnp.max(jnp.abs(ref_grads[0]))) > 1e-3  # the comparison is not of zeros
    for name in ("i2t_acc", "t2i_acc"):
        assert float(stats[name]) == float(ref_stats[name])


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="config.train.loss='sigmoidx'"):
        losses.make_loss("sigmoidx", sharding.make_mesh({"data": -1}))
