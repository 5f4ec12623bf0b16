"""The evaluator protocol: what the training loop and ``python -m clip_jax.evaluate`` run.

A recipe lists its evaluators by name in ``config.eval.evaluators``, each a section with
its ``kind`` (zeroshot, retrieval, val_loss, scenes), its cadence (``every`` N steps; 0:
only at the end) and the kind's own options. `clip_jax.eval.suite.build` turns that
section into `Evaluator` objects; the loop calls each one whose cadence is due with an
`EvalContext` and writes the returned metrics under the evaluator's name.

Every process calls every evaluator (collectives inside): each process reads its share
of every global batch, the batch is one global array sharded over the mesh, and the
numbers do not depend on the number of processes. Eval sets stream in batches: host
memory does not grow with the set (embeddings, or only per-example results, are kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from jax.sharding import Mesh

from clip_jax.data.tokenizer import Tokenizer
from clip_jax.models import clip


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator may use: the model and its variables at one step, and the run's setup."""

    model: clip.CLIP
    variables: dict  # {"params": ..., **model_state} (model_state: {"batch_stats": ...} or {})
    tokenizer: Tokenizer
    mesh: Mesh
    batch_size: int  # the global eval batch (config.eval.batch_size)
    train_batch_size: int  # the global training batch (validation loss uses the same)
    loss_fn: Callable[..., Any]  # the training loss (clip_jax.losses.make_loss), for val_loss
    step: int
    progress: bool = False  # tqdm bars (the evaluate command), not in the training loop


class Evaluator(Protocol):
    """One configured evaluation. ``name`` is unique in a recipe and prefixes nothing: the
    loop stores ``{name: metrics}``; ``every``: steps between runs (0: only at the end)."""

    name: str
    every: int

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        """Flat metrics {metric: float} (chance/baseline entries end in ``_chance`` or
        ``_majority``); nested values (confusion matrices, reports) are allowed beside them."""
        ...


def options(section: Mapping[str, Any] | Any) -> Callable[[str], Any]:
    """``get(key)`` over a ``config.eval.evaluators`` entry, for an evaluator's ``from_config``:
    ``section.get(key)`` of a ConfigDict or dict, else the attribute; None when not set."""
    return lambda key: section.get(key) if hasattr(section, "get") else getattr(section, key, None)


def due(evaluator: Evaluator, step: int, total_steps: int) -> bool:
    """Whether ``evaluator`` runs at ``step``: on its cadence, and always at the last step."""
    return step == total_steps or (evaluator.every > 0 and step % evaluator.every == 0)
