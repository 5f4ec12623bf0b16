"""Backward passes written for XLA:CPU, chosen when the step is lowered.

``with_cpu_backward(forward, cpu_backward)`` is ``forward`` with a custom VJP that keeps the
forward's array arguments as its residuals. Its backward is ``lax.platform_dependent``:
- on **CPU**, ``cpu_backward(*args, dy)``, which returns one gradient per argument;
- on **every other platform**, JAX's own VJP of ``forward`` (`autodiff_backward`), recomputed
  from the arguments; XLA's CSE merges that recomputation with the forward, so TPUs and GPUs
  compile what plain autodiff gives them. An AOT compile for a TPU from a CPU host takes
  this branch too.

The users (`clip_jax.models.matmul`, `clip_jax.models.layers`) write their CPU backward to
avoid what XLA:CPU does badly in a ViT-B/32 step: transposes and the copies around them,
broadcasts materialised at activation size, and activation-sized arrays written in the
forward only for the backward to read them back (the step is bound by DRAM bandwidth
outside its matmuls). Each says what it avoids; their tests check both branches against
autodiff.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax


def autodiff_backward(forward: Callable) -> Callable:
    """``(*args, dy) -> grads``: JAX's own VJP of ``forward`` at ``args``."""

    def backward(*args_and_dy):
        *args, dy = args_and_dy
        return jax.vjp(forward, *args)[1](dy)

    return backward


def with_cpu_backward(forward: Callable, cpu_backward: Callable) -> Callable:
    """``forward`` (arrays in, one array out), differentiated by ``cpu_backward`` on CPU."""

    @jax.custom_vjp
    def fn(*args):
        return forward(*args)

    def fn_fwd(*args):
        return forward(*args), args

    def fn_bwd(args, dy):
        return lax.platform_dependent(*args, dy, cpu=cpu_backward, default=autodiff_backward(forward))

    fn.defvjp(fn_fwd, fn_bwd)
    return fn
