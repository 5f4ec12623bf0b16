"""The training loop's evaluations: the evaluators due at a step, run on the current
weights, their results written to ``WORKDIR/eval/STEP.json``, the summaries (``NAME/metric``)
and a table per evaluator on the terminal. Built once per run (`Scheduled`), so what
does not change between evaluations (the loss, the context's fields) is made once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from jax.sharding import Mesh

from clip_jax import goodput, storage
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.eval import evaluator, table
from clip_jax.models import clip


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """A run's evaluators with what they need besides the weights."""

    evaluators: tuple
    model: clip.CLIP
    tokenizer: Tokenizer
    mesh: Mesh
    batch_size: int
    train_batch_size: int
    loss_fn: Callable[..., Any]
    total_steps: int
    workdir: str
    primary: bool

    def run_due(self, step: int, variables: dict, logger, recorder: goodput.Recorder) -> dict:
        """Runs the evaluators due at ``step`` (every process) and records their results.
        Returns {evaluator: metrics} ({} when none is due); the time is goodput's "eval"."""
        due = [e for e in self.evaluators if evaluator.due(e, step, self.total_steps)]
        if not due:
            return {}
        with recorder.phase("eval"):
            ctx = evaluator.EvalContext(
                model=self.model,
                variables=variables,
                tokenizer=self.tokenizer,
                mesh=self.mesh,
                batch_size=self.batch_size,
                train_batch_size=self.train_batch_size,
                loss_fn=self.loss_fn,
                step=step,
            )
            results = {e.name: e(ctx) for e in due}
            if self.primary:
                for name, metrics in results.items():
                    table.print_table(f"{name} (step {step})", metrics)
                storage.write_json(os.path.join(self.workdir, "eval", f"{step}.json"), results)
                logger.write_eval(step, flat_metrics(results))
        return results


def flat_metrics(results: dict[str, dict]) -> dict:
    """{evaluator: {metric: value}} -> {"evaluator/metric": value} (the summaries' names)."""
    return {f"{name}/{k}": v for name, metrics in results.items() for k, v in metrics.items()}
