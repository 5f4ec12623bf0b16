"""`layers.attend` against `jax.nn.dot_product_attention` (the function it replaces)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import layers


@pytest.mark.parametrize(
    "t, s, causal, dtype, tol",
    [
        (7, 7, False, jnp.float32, 1e-5),
        (7, 7, True, jnp.float32, 1e-5),  # the text tower's mask
        (1, 9, False, jnp.float32, 1e-5),  # a probe or pooling query over a longer context
        (6, 6, True, jnp.bfloat16, 2e-2),
    ],
)
def test_attend_equals_dot_product_attention(t, s, causal, dtype, tol):
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, t, 3, 8), dtype)
    k = jax.random.normal(kk, (2, s, 3, 8), dtype)
    v = jax.random.normal(kv, (2, s, 3, 8), dtype)
    ours = layers.attend(q, k, v, causal)
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_allclose(np.float32(ours), np.float32(theirs), atol=tol, rtol=tol)
    # Gradients too: the backward pass is what the benchmark's speed-up is mostly about.
    g = jax.random.normal(kg, ours.shape, jnp.float32)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * g), argnums=(0, 1, 2))(q, k, v)
    ours_g = grad(lambda q, k, v: layers.attend(q, k, v, causal))
    theirs_g = grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal))
    for a, b in zip(ours_g, theirs_g, strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol * 4, rtol=tol * 4)


def test_causal_mask_hides_the_future():
    q = k = jnp.ones((1, 4, 1, 2))
    v = jnp.arange(4.0).reshape(1, 4, 1, 1) * jnp.ones((1, 4, 1, 2))
    out = layers.attend(q, k, v, causal=True)[0, :, 0, 0]
    # Equal logits: position t averages the values 0..t.
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 1.5], atol=1e-6)
