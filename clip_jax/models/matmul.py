"""The towers' projections, with a backward pass that suits XLA:CPU.

``contract(x, kernel, num_in)`` contracts x's trailing ``num_in`` dims with the kernel's
leading ones: x [..., *in] and kernel [*in, *out] -> [..., *out] (the einsums "bld,dhk->blhk",
"blhk,hkd->bld" and a Dense's "...d,dm->...m"), as one ``lax.dot_general``.

Its gradients, chosen when the step is lowered (`cpu_backward.with_cpu_backward`, so an
AOT compile for a TPU from a CPU host takes the TPU's):
- **CPU**: both operands flattened to [rows, in] and [in, out], then ``dx = dy @ kernel.T``
  and ``dkernel = x.T @ dy``, each written directly in its operand's layout. JAX's own
  transpose rule computes the kernel's gradient as ``dy.T @ x`` followed by a transpose,
  and XLA:CPU keeps those transposes and the copies around them: a ViT-B/32 step has 699
  transposes and 806 copies with autodiff, 267 and 374 with this (the step 1-3% faster;
  `clip_jax.benchmark`'s side-by-side 1.64x -> 1.69x). The same VJP kept 3-D (multi-dim
  contractions) ran slower than autodiff on CPU, hence the flattening.
- **Every other platform**: JAX's own VJP of the same ``dot_general`` (XLA drops its traced
  forward: only the transpose is used), so TPUs and GPUs compile what they compiled before
  (on TPU the flattening, which merges the batch with a sequence length that is not a
  multiple of the tile, made the AOT-compiled v5p B/16 step ~10% slower by XLA's roofline:
  110.8 -> 121.8 ms).

tests/test_matmul.py checks values and gradients of both branches against autodiff of
``jnp.einsum``. Inside ``jax.checkpoint`` the forward's dot stays visible to the "dots"
remat policy (JAX inlines a custom VJP's forward).
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax

from clip_jax.models import cpu_backward


def _forward(x: jax.Array, kernel: jax.Array, num_in: int) -> jax.Array:
    in_dims = x.shape[x.ndim - num_in :]
    if in_dims != kernel.shape[:num_in]:
        raise ValueError(f"contract: input dims {in_dims} do not match the kernel's {kernel.shape[:num_in]}")
    dims = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
    return lax.dot_general(x, kernel, (dims, ((), ())))


def contract(x: jax.Array, kernel: jax.Array, num_in: int) -> jax.Array:
    """x [..., *in] and kernel [*in, *out] -> [..., *out], in x's and the kernel's (common) dtype."""
    return _contract(num_in)(x, kernel)


@functools.cache
def _contract(num_in: int):
    return cpu_backward.with_cpu_backward(
        functools.partial(_forward, num_in=num_in), functools.partial(_flat_vjp, num_in=num_in)
    )


def _flat_vjp(x, kernel, dy, num_in):
    """The gradients as two 2-D matmuls, each in its operand's layout (for XLA:CPU)."""
    size_in = math.prod(kernel.shape[:num_in])
    x2, k2 = x.reshape(-1, size_in), kernel.reshape(size_in, -1)
    dy2 = dy.reshape(x2.shape[0], k2.shape[1])
    return (dy2 @ k2.T).reshape(x.shape), (x2.T @ dy2).reshape(kernel.shape)
