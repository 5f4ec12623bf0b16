"""Linear probe (CLIP paper, appendix A.3): L2-regularised logistic regression on
frozen image features, fitted full-batch with L-BFGS (optax), the L2 strength
chosen on a validation split, refitted on train + validation, scored on test.

Objective for weights W [D, C], bias b [C] (bias not regularised)::

    mean_i cross_entropy(x_i W + b, y_i) + l2 / 2 * ||W||^2
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Strengths tried, strongest first (ties in validation accuracy go to the stronger one).
# CLIP sweeps C = 1 / (l2 N) over 1e-6 .. 1e6; on unit-norm features this range covers it.
L2_GRID = tuple(10.0**e for e in range(1, -7, -1))


def objective(params, features, labels, weights, l2):
    """The probe's loss (see the module docstring); features [N, D], labels [N].

    weights [N]: 1 for the rows fitted, 0 for padding (one compiled shape for fit and refit).
    """
    logits = features @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(ce * weights) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit(features, labels, weights, l2, num_classes: int, max_iter: int):
    params = {
        "w": jnp.zeros((features.shape[1], num_classes), features.dtype),
        "b": jnp.zeros((num_classes,), features.dtype),
    }
    loss = functools.partial(objective, features=features, labels=labels, weights=weights, l2=l2)
    # A backtracking line search compiles several times faster than the default zoom search.
    opt = optax.lbfgs(
        linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=20, store_grad=True)
    )
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(params, updates), state), value

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=max_iter)
    return params


def fit(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2: float,
    max_iter: int = 200,
    pad_to: int | None = None,
) -> dict:
    """Fitted {"w": [D, C], "b": [C]} (numpy) minimising `objective`.

    ``pad_to``: pad the rows (weight 0) to this count, so fits of different sizes share a compile.
    """
    num = len(features)
    pad = (pad_to or num) - num
    features = np.concatenate([features, np.zeros((pad, features.shape[1]), features.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    weights = np.concatenate([np.ones(num, np.float32), np.zeros(pad, np.float32)])
    params = _fit(jnp.asarray(features, jnp.float32), jnp.asarray(labels), weights, l2, num_classes, max_iter)
    return jax.tree.map(np.asarray, params)


def accuracy(params: dict, features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((features @ params["w"] + params["b"]).argmax(axis=1) == labels))


def validation_split(num: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a seeded random share ``fraction`` held out."""
    order = np.random.default_rng(seed).permutation(num)
    cut = max(1, int(round(num * fraction)))
    return np.sort(order[cut:]), np.sort(order[:cut])


def linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    l2_grid: Sequence[float] = L2_GRID,
    max_iter: int = 200,
) -> dict:
    """(features [N, D], labels [N]) for train / validation / test.

    -> {"test_acc", "test_acc_chance" (majority class share of test), "l2", "val_acc",
        "sweep": {l2: validation accuracy}}.
    """
    sweep, rows = {}, len(train[0]) + len(val[0])
    for l2 in l2_grid:
        sweep[l2] = accuracy(fit(*train, num_classes, l2, max_iter, pad_to=rows), *val)
    best = max(sweep, key=lambda l2: sweep[l2])  # first maximum: the strongest
    features = np.concatenate([train[0], val[0]])
    labels = np.concatenate([train[1], val[1]])
    params = fit(features, labels, num_classes, best, max_iter, pad_to=rows)
    return {
        "test_acc": accuracy(params, *test),
        "test_acc_chance": float(np.bincount(test[1], minlength=num_classes).max() / len(test[1])),
        "l2": best,
        "val_acc": sweep[best],
        "sweep": {f"{l2:g}": acc for l2, acc in sweep.items()},
    }
