"""The optimizer: global-norm clipping, then AdamW with decoupled weight decay
on a linear-warmup + cosine schedule.

Weight decay follows CLIP: matrices decay; biases, gains, the positional
embeddings, the class token and the logit scale do not. Which parameters are
excluded is a list of regexes over '/'-joined parameter paths (big_vision's
convention), e.g. ``text/transformer/block_0/attn/query/bias``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax


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


def make_optimizer(optim_config, total_steps: int):
    """Returns (optax transformation, learning-rate schedule)."""
    schedule = make_schedule(optim_config, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim_config.grad_clip_norm),
        optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=lambda params: weight_decay_mask(params, optim_config.wd_exclude),
        ),
    )
    return tx, schedule
