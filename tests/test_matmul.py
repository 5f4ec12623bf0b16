"""`matmul.contract` (the towers' projections, custom VJP) against autodiff of ``jnp.einsum``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from clip_jax.models import cpu_backward, matmul

CASES = [
    ("bld,dhk->blhk", (2, 5, 12), (12, 3, 4), 1, jnp.float32, 1e-5),  # q/k/v
    ("blhk,hkd->bld", (2, 5, 3, 4), (3, 4, 12), 2, jnp.float32, 1e-5),  # attention out
    ("bld,dm->blm", (3, 7, 8), (8, 16), 1, jnp.float32, 1e-5),  # MLP
    ("bld,dm->blm", (3, 7, 8), (8, 16), 1, jnp.bfloat16, 3e-2),
]


def _operands(seed, x_shape, k_shape, dtype):
    kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(kx, x_shape, dtype), jax.random.normal(kk, k_shape, dtype), kg


@pytest.mark.parametrize("spec, x_shape, k_shape, num_in, dtype, tol", CASES)
def test_contract_equals_einsum_and_its_gradients(spec, x_shape, k_shape, num_in, dtype, tol):
    x, kernel, kg = _operands(0, x_shape, k_shape, dtype)
    ours = jax.jit(matmul.contract, static_argnums=2)(x, kernel, num_in)
    theirs = jnp.einsum(spec, x, kernel)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_allclose(np.float32(ours), np.float32(theirs), atol=tol, rtol=tol)
    # A loss that is not linear in the output, so the cotangent differs per element.
    g = jax.random.normal(kg, theirs.shape, jnp.float32)

    def loss(fn):
        return lambda x, k: jnp.sum(jnp.sin(fn(x, k).astype(jnp.float32)) * g)

    ours_grads = jax.jit(jax.grad(loss(lambda x, k: matmul.contract(x, k, num_in)), argnums=(0, 1)))(
        x, kernel
    )
    their_grads = jax.grad(loss(lambda x, k: jnp.einsum(spec, x, k)), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours_grads, their_grads, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol, rtol=tol)


@pytest.mark.parametrize("spec, x_shape, k_shape, num_in, dtype, tol", CASES)
@pytest.mark.parametrize("branch", ["cpu", "autodiff"])
def test_each_platforms_gradients_equal_einsums(branch, spec, x_shape, k_shape, num_in, dtype, tol):
    # The CPU branch runs here through `contract`; both are also checked on their own.
    x, kernel, kg = _operands(1, x_shape, k_shape, dtype)
    y, vjp = jax.vjp(lambda x, k: jnp.einsum(spec, x, k), x, kernel)
    dy = jax.random.normal(kg, y.shape, dtype)
    backward = {
        "cpu": functools.partial(matmul._flat_vjp, num_in=num_in),
        "autodiff": cpu_backward.autodiff_backward(functools.partial(matmul._forward, num_in=num_in)),
    }[branch]
    ours = jax.jit(backward)(x, kernel, dy)
    for a, b in zip(ours, vjp(dy), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol, rtol=tol)


def test_the_backward_is_chosen_by_the_platform_lowered_for():
    # The flat (reshaped) gradients on CPU; JAX's own elsewhere, e.g. an AOT compile for TPU.
    x, kernel = jnp.ones((2, 5, 12)), jnp.ones((12, 3, 4))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(matmul.contract(x, k, 1))), argnums=(0, 1)))
    traced = grad.trace(x, kernel)
    reshapes = {
        p: traced.lower(lowering_platforms=(p,)).as_text().count("stablehlo.reshape") for p in ("cpu", "tpu")
    }
    assert reshapes["cpu"] > 0 and reshapes["tpu"] == 0, reshapes


def test_contract_refuses_mismatched_dims():
    with pytest.raises(ValueError, match="do not match"):
        matmul.contract(jnp.ones((2, 3, 4)), jnp.ones((5, 6)), 1)


def test_dots_remat_policy_still_saves_the_matmul_output(capsys):
    # jax.checkpoint inlines the custom VJP's forward, so "dots" keeps its output as with einsum.
    x, w1, w2 = jnp.ones((6, 4)), jnp.ones((4, 8)), jnp.ones((8, 4))

    def block(x, w1, w2):
        return jnp.sum(jnp.sin(matmul.contract(jnp.sin(matmul.contract(x, w1, 1)), w2, 1)))

    def saved_dots(policy):
        print_saved_residuals(jax.checkpoint(block, policy=policy), x, w1, w2)
        return [line for line in capsys.readouterr().out.splitlines() if "output of dot_general" in line]

    assert len(saved_dots(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)) == 2
    assert saved_dots(jax.checkpoint_policies.nothing_saveable) == []
