"""`cpu_backward` and its users in `layers` (LayerNorm, QuickGELU): values equal flax's and
plain JAX's, and each platform's gradients equal autodiff's."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import cpu_backward, layers


def test_the_backward_is_chosen_by_the_platform_lowered_for():
    # A CPU backward that is deliberately not sin's derivative, so each branch is recognisable.
    fn = cpu_backward.with_cpu_backward(jnp.sin, lambda x, dy: (dy * jnp.exp(x),))
    x = jnp.linspace(-1.0, 1.0, 8)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * x)))
    np.testing.assert_allclose(grad(x), jnp.exp(x) * x + jnp.sin(x), rtol=1e-6)  # this host: CPU
    texts = {p: grad.trace(x).lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu")}
    assert "stablehlo.exponential" in texts["cpu"] and "stablehlo.cosine" not in texts["cpu"]
    assert "stablehlo.exponential" not in texts["tpu"] and "stablehlo.cosine" in texts["tpu"]


def _inputs(seed, shape, dtype):
    kx, ks, kb, kd = jax.random.split(jax.random.key(seed), 4)
    width = shape[-1]
    x = (jax.random.normal(kx, shape) * 3 + 0.5).astype(dtype)
    scale = 1 + 0.3 * jax.random.normal(ks, (width,))
    bias = 0.2 * jax.random.normal(kb, (width,))
    return x, scale, bias, jax.random.normal(kd, shape).astype(dtype)


NORM_CASES = [((2, 5, 16), jnp.float32, 1e-5, 2e-5), ((3, 7, 24), jnp.float32, 1e-6, 2e-5)]
NORM_CASES += [((2, 5, 16), jnp.bfloat16, 1e-5, 5e-2)]


@pytest.mark.parametrize("shape, dtype, eps, tol", NORM_CASES)
def test_layer_norm_is_flaxs_with_the_same_gradients(shape, dtype, eps, tol):
    x, scale, bias, dy = _inputs(0, shape, dtype)
    ours, theirs = layers.layer_norm("ln", dtype, eps), nn.LayerNorm(epsilon=eps, dtype=dtype)
    ours_init, their_init = (m.init(jax.random.key(1), x)["params"] for m in (ours, theirs))
    assert jax.tree.map(np.asarray, nn.unbox(ours_init)).keys() == their_init.keys() == {"scale", "bias"}
    for name in ("scale", "bias"):
        np.testing.assert_array_equal(nn.unbox(ours_init)[name], their_init[name])
    params = {"scale": scale, "bias": bias}

    def vjp(module):
        y, back = jax.vjp(lambda x, p: module.apply({"params": p}, x), x, params)
        return y, back(dy)

    (y, (dx, dp)), (y_ref, (dx_ref, dp_ref)) = (jax.jit(vjp, static_argnums=0)(m) for m in (ours, theirs))
    assert y.dtype == y_ref.dtype == dtype and dx.dtype == dx_ref.dtype == dtype
    np.testing.assert_array_equal(np.float32(y), np.float32(y_ref))  # the forward, op for op (both jitted)
    for a, b in [(dx, dx_ref), (dp["scale"], dp_ref["scale"]), (dp["bias"], dp_ref["bias"])]:
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape, dtype, eps, tol", NORM_CASES)
@pytest.mark.parametrize("branch", ["cpu", "autodiff"])
def test_layer_norm_each_platforms_gradients_equal_flaxs(branch, shape, dtype, eps, tol):
    x, scale, bias, dy = _inputs(2, shape, dtype)
    forward = functools.partial(layers._layer_norm_forward, eps=eps, dtype=jnp.dtype(dtype))
    backward = {
        "cpu": functools.partial(layers._layer_norm_cpu_backward, eps=eps),
        "autodiff": cpu_backward.autodiff_backward(forward),
    }[branch]
    module = nn.LayerNorm(epsilon=eps, dtype=dtype)
    _, their_vjp = jax.vjp(
        lambda x, s, b: module.apply({"params": {"scale": s, "bias": b}}, x), x, scale, bias
    )
    for a, b in zip(jax.jit(backward)(x, scale, bias, dy), their_vjp(dy), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol, rtol=tol)


def test_layer_norm_gradients_on_rows_of_constant_and_large_inputs():
    # Zero variance (eps alone), and an offset much larger than the spread (the fast variance
    # cancels: flax's clamp at zero and float32 rounding, not the backward, set the error).
    x = jnp.concatenate([jnp.full((1, 16), 3.0), 20 + jnp.arange(16.0)[None] / 7], axis=0)
    dy = jnp.sin(jnp.arange(32.0)).reshape(2, 16)
    scale, bias = 1 + jnp.arange(16.0) / 16, jnp.zeros(16)
    forward = functools.partial(layers._layer_norm_forward, eps=1e-5, dtype=jnp.dtype(jnp.float32))
    ours = jax.jit(functools.partial(layers._layer_norm_cpu_backward, eps=1e-5))(x, scale, bias, dy)
    theirs = jax.vjp(forward, x, scale, bias)[1](dy)
    for a, b in zip(ours, theirs, strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("branch", ["cpu", "autodiff"])
def test_quick_gelu_and_each_platforms_gradient(branch, dtype, tol):
    x = jnp.linspace(-8.0, 8.0, 97).astype(dtype)
    dy = jnp.cos(jnp.arange(97.0)).astype(dtype)

    def plain(x):
        return x * jax.nn.sigmoid(1.702 * x)

    np.testing.assert_array_equal(jax.jit(layers.quick_gelu)(x), plain(x))
    backward = {
        "cpu": layers._quick_gelu_cpu_backward,
        "autodiff": cpu_backward.autodiff_backward(plain),
    }[branch]
    (ours,), (theirs,) = jax.jit(backward)(x, dy), jax.vjp(plain, x)[1](dy)
    assert ours.dtype == theirs.dtype == dtype
    np.testing.assert_allclose(np.float32(ours), np.float32(theirs), atol=tol, rtol=tol)
    # Through jit on this host (CPU), as the step differentiates it.
    grad = jax.jit(jax.grad(lambda x: jnp.sum((layers.quick_gelu(x) * dy).astype(jnp.float32))))(x)
    np.testing.assert_allclose(np.float32(grad), np.float32(theirs), atol=tol, rtol=tol)
