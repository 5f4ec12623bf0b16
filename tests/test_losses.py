"""The contrastive loss: hand-checked values, and the sharded version against the plain one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import losses, ring_loss, sharding


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


def correlated_pair(batch, dim, seed=0, noise=2.0):
    """Text embeddings near their images: accuracies in between 0 and 1, not trivially 0."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    image = unit(jax.random.normal(k1, (batch, dim)))
    return image, unit(image + noise * jax.random.normal(k2, (batch, dim)) / math.sqrt(dim))


def test_sigmoid_hand_computed_two_by_two():
    image = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    text = jnp.array([[0.8, 0.6], [0.0, 1.0]])
    scale, bias = 3.0, -1.5
    logits = scale * np.array([[0.8, 0.0], [0.96, 0.8]]) + bias
    signs = np.array([[1.0, -1.0], [-1.0, 1.0]])
    want = np.sum(np.log1p(np.exp(-signs * logits))) / 2  # -log sigmoid(z) = log(1 + e^-z)
    loss, stats = losses.sigmoid_contrastive(image, text, jnp.float32(scale), jnp.float32(bias))
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(stats["i2t_acc"]) == 0.5 and float(stats["t2i_acc"]) == 0.5


RING_CASES = [
    ("softmax_ring", ring_loss.make_ring_softmax, losses.softmax_contrastive),
    ("softmax_ring_tiles_of_4", lambda m: ring_loss.make_ring_softmax(m, 4), losses.softmax_contrastive),
    ("softmax_local_rows", losses.make_softmax_contrastive, losses.softmax_contrastive),
    ("sigmoid_ring", ring_loss.make_ring_sigmoid, losses.sigmoid_contrastive),
    ("sigmoid_ring_tiles_of_4", lambda m: ring_loss.make_ring_sigmoid(m, 4), losses.sigmoid_contrastive),
]


@pytest.mark.parametrize("name,build,dense", RING_CASES, ids=[c[0] for c in RING_CASES])
@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 2, "model": 2}, {"fsdp": 8}], ids=str)
def test_distributed_losses_equal_dense(name, build, dense, mesh_shape):
    """Loss, all four gradients and both accuracies against the dense computation."""
    image, text = correlated_pair(64, 32, seed=3)
    scale, bias = jnp.float32(12.0), jnp.float32(-4.0)
    args = (0, 1, 2, 3)
    ref_loss, ref_grads = jax.value_and_grad(lambda *a: dense(*a)[0], args)(image, text, scale, bias)
    ref_stats = dense(image, text, scale, bias)[1]
    mesh = sharding.make_mesh(mesh_shape)
    loss_fn = build(mesh)
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (image, text)]
        grad_fn = jax.jit(jax.value_and_grad(lambda *a: loss_fn(*a)[0], args))
        loss, grads = grad_fn(*placed, scale, bias)
        stats = jax.jit(loss_fn)(*placed, scale, bias)[1]
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
    assert float(jnp.max(jnp.abs(ref_grads[0]))) > 1e-3 and abs(float(ref_grads[2])) > 1e-4
    for key in ("i2t_acc", "t2i_acc"):
        assert 0.1 < float(ref_stats[key]) < 0.95  # a real test of the hit counting
        assert float(stats[key]) == float(ref_stats[key])


def _compiled_temp_bytes(loss_fn, mesh, batch, dim=64):
    spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    grad_fn = jax.grad(lambda *a: loss_fn(*a)[0], (0, 1, 2))
    with jax.set_mesh(mesh):
        compiled = jax.jit(grad_fn).lower(spec, spec, scalar, scalar).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_ring_loss_memory_grows_with_local_not_global_batch():
    """Per-device scratch of loss + gradient: the ring's stays ~flat when the global batch
    grows 4x at a fixed local batch share; local rows' grows with the global batch."""
    mesh = sharding.make_mesh({"data": 8})
    ring = losses.make_loss("softmax_ring", mesh)
    rows = losses.make_loss("softmax", mesh)
    ring_small, ring_big = (_compiled_temp_bytes(ring, mesh, b) for b in (2048, 8192))
    rows_big = _compiled_temp_bytes(rows, mesh, 8192)
    # local 1024 rows: the ring needs a [1024, 1024] block, local rows a [1024, 8192] matrix.
    assert ring_big < rows_big / 3
    assert ring_big < 20 * ring_small  # O(b^2): 4x local batch -> ~16x, not O(b * B) more


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="config.train.loss='sigmoidx'"):
        losses.make_loss("sigmoidx", sharding.make_mesh({"data": -1}))
