"""The optimizer: global-norm clipping, then AdamW with decoupled weight decay
on a linear-warmup + cosine schedule.

Weight decay follows CLIP: matrices decay; biases, gains, the positional
embeddings, the class token and the logit scale do not. Which parameters are
excluded is a list of regexes over '/'-joined parameter paths (big_vision's
convention), e.g. ``text/transformer/block_0/attn/query/bias``.

Fine-tuning uses the same paths: ``freeze`` regexes name parameters that get no
update at all (LiT locks the image tower with ``^visual/``; "all but the last two of
12 blocks" is ``^visual/(?!transformer/block_(10|11)/)``), and ``lr_multipliers``
({regex: factor}) scale the learning rate of the parameters they match (a parameter
matched by several takes the product; a factor of 0 freezes). Each parameter's update
is scaled after AdamW (decay included, so it is AdamW at ``factor * lr``); frozen
parameters receive -0.0 and stay bitwise unchanged. Frozen gradients are zeroed before
clipping, so they do not shrink the trained parameters' step. The transforms are
stateless, so the state layout (and `step.state_shardings`, which maps it with
``optax.tree_utils.tree_map_params``, which cannot see through ``multi_transform``'s
masks) is unchanged; the price is that frozen parameters keep (zero) Adam moments.
With a scanned tower (``config.model.scan``) the blocks are one stacked subtree:
freeze whole towers only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from clip_jax import nonfinite


def param_path(path) -> str:
    """A pytree key path -> 'visual/transformer/block_0/attn/query/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def matching_mask(params, patterns: Sequence[str]):
    """Tree of bools, True where a parameter path matches any of ``patterns`` (re.search)."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(c.search(param_path(path)) for c in compiled), params
    )


def weight_decay_mask(params, exclude: Sequence[str]):
    """Tree of bools, True where weight decay applies."""
    return jax.tree.map(lambda excluded: not excluded, matching_mask(params, exclude))


def make_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine to ``lr * end_lr_factor``."""
    warmup = min(optim_config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_config.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_config.lr * optim_config.end_lr_factor,
    )


def lr_factors(params, freeze: Sequence[str] = (), lr_multipliers: Mapping[str, float] | None = None):
    """Tree of floats: each parameter's learning-rate factor (0.0 where frozen).

    Raises ValueError for a pattern that matches no parameter (a typo would
    otherwise silently train what it meant to freeze).
    """
    rules = [(p, 0.0) for p in freeze] + [(p, float(f)) for p, f in (lr_multipliers or {}).items()]
    paths = [param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern, _ in rules:
        if not any(re.search(pattern, path) for path in paths):
            raise ValueError(f"optimizer pattern {pattern!r} matches no parameter (e.g. {paths[:3]})")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: math.prod(f for pattern, f in rules if re.search(pattern, param_path(path))),
        params,
    )


def scale_by_path(freeze: Sequence[str], lr_multipliers: Mapping[str, float], gate: bool = False):
    """Stateless: multiplies each update by its parameter's factor (`lr_factors`).

    ``gate``: multiply by 1 or 0 only (zero the frozen gradients, pass the rest).
    A frozen update becomes -0.0: ``p + (-0.0)`` is ``p`` bitwise for every p (+0.0 is
    not: ``-0.0 + 0.0 = +0.0``). Factors come from the paths at trace time: constants.
    """

    def update(updates, state, params=None):
        del params

        def apply(u, factor):
            if factor == 0.0:
                return jnp.full_like(u, -0.0)
            return u if gate or factor == 1.0 else u * factor

        return jax.tree.map(apply, updates, lr_factors(updates, freeze, lr_multipliers)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` (the same operations), except that it takes the norm from
    the extra argument ``grad_norm`` when one is given: the step computes the gradient's
    norm anyway (for the non-finite check and the metrics), outside `update_if`'s cond,
    where XLA cannot share it with a second one inside; passing it saves a pass over the
    gradients. Only for a chain where nothing before it changes the gradients."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(g_norm < max_norm)
        clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(optim_config, total_steps: int):
    """Returns (optax transformation, learning-rate schedule).

    With ``freeze`` / ``lr_multipliers``: frozen gradients are zeroed before global-norm
    clipping, and AdamW's updates (decay included) are scaled per parameter after it.
    The transforms are stateless, so the optimizer state keeps its layout.
    """
    schedule = make_schedule(optim_config, total_steps)
    freeze = tuple(optim_config.get("freeze") or ())
    multipliers = dict(optim_config.get("lr_multipliers") or {})
    adamw = optax.adamw(
        schedule,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        weight_decay=optim_config.weight_decay,
        mask=lambda params: weight_decay_mask(params, optim_config.wd_exclude),
    )
    if not freeze and not multipliers:
        return optax.chain(clip_by_global_norm(optim_config.grad_clip_norm), adamw), schedule
    tx = optax.chain(
        scale_by_path(freeze, multipliers, gate=True),
        optax.clip_by_global_norm(optim_config.grad_clip_norm),  # the norm of the gated gradients
        adamw,
        scale_by_path(freeze, multipliers),
    )
    return tx, schedule


def update_if(
    ok, tx: optax.GradientTransformation, grads, opt_state, params, finalize=lambda p: p, grad_norm=None
):
    """(params, opt_state) after one step of ``tx`` (``finalize`` applied to the new params)
    when ``ok``; else the old params and optimizer state, only the step counts advanced
    (`nonfinite.keep_if_finite`'s rule).

    A ``lax.cond``, not a select of new against old: with the select, XLA:CPU copied every
    donated moment before updating it in place (797 copies for ViT-B/32's 398 leaves: two
    extra passes over the 151M-parameter state) and the update alone took about twice as
    long (benchmark ``--breakdown``). The taken branch computes the same operations as
    before, so the results are bitwise those of the select (tests/test_optim.py).
    ``grad_norm``: the gradients' global norm, handed to `clip_by_global_norm`.
    """
    extra = {} if grad_norm is None else {"grad_norm": grad_norm}

    def step(params, opt_state, grads):
        updates, new_state = tx.update(grads, opt_state, params, **extra)
        return finalize(optax.apply_updates(params, updates)), new_state

    def skip(params, opt_state, grads):
        _, new_state = tx.update(grads, opt_state, params, **extra)  # for the counts; the rest is dead code
        return nonfinite.keep_if_finite(jnp.bool_(False), params, params, new_state, opt_state)

    return jax.lax.cond(ok, step, skip, params, opt_state, grads)
