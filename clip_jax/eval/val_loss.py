"""Validation loss as an `Evaluator`: the training loss on held-out pairs, the same global batches.

Held-out ArrayRecord pairs (or webdataset ``KEY.txt`` pairs) are read in global batches of
``ctx.train_batch_size`` (the last partial batch dropped, as training drops it), each
process reading its rows; every batch's loss is ``ctx.loss_fn`` on the model's own
temperature (and SigLIP bias), as `clip_jax.step.make_gradient_fn` computes it, but
without dropout or patch dropout. An example's caption is its first one (training draws
one at random). A batch with an unreadable row is left out of the mean and counted
(``n_skipped_batches``); the contrastive loss of a batch depends on all its rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import cli, sharding
from clip_jax.data import transforms
from clip_jax.eval import stream, stream_sources
from clip_jax.eval.evaluator import EvalContext, options


@dataclasses.dataclass
class ValLossEvaluator:
    """The training loss on ``dataset`` ("array_record:GLOB" or "wds:DIR" with captions)."""

    name: str
    dataset: str
    image_size: int
    every: int = 0
    limit: int | None = None
    _source: Any = dataclasses.field(default=None, init=False, repr=False)
    _jitted: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, name: str, section: Mapping[str, Any], image_size: int) -> ValLossEvaluator:
        """From a ``config.eval.evaluators`` entry (dataset, every, limit)."""
        get = options(section)
        if not get("dataset") or get("dataset").split(":")[0] not in ("array_record", "wds"):
            raise cli.UserError(
                f"config.eval.evaluators.{name}.dataset={get('dataset')!r}: validation loss reads "
                "array_record:GLOB or wds:DIR"
            )
        return cls(name, get("dataset"), image_size, int(get("every") or 0), get("limit"))

    def source(self):
        if self._source is None:
            self._source = stream_sources.open_dataset(self.dataset)
        return self._source

    def _loss(self, ctx: EvalContext):
        model, loss_fn = ctx.model, ctx.loss_fn
        if (key := (id(model), id(loss_fn), id(ctx.mesh))) not in self._jitted:

            def loss(variables, images, tokens, valid):
                image_emb, text_emb, scale, bias = model.apply(
                    variables, transforms.normalize(images), tokens
                )
                value, stats = loss_fn(image_emb, text_emb, scale, bias)
                return value, stats, jnp.all(valid)

            self._jitted[key] = jax.jit(loss, out_shardings=sharding.replicated(ctx.mesh))
        return self._jitted[key]

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        source, loss = self.source(), self._loss(ctx)
        size = ctx.train_batch_size
        if size % sharding.batch_devices(ctx.mesh):
            raise cli.UserError(f"{self.name}: train batch {size} is not divisible by the mesh's batch split")
        n = len(source) if self.limit is None else min(self.limit, len(source))
        if n < size:
            raise stream_sources.EvalSetError(
                f"{self.name}: {self.dataset} has {n} pairs, under one global batch of {size}"
            )
        totals: dict[str, float] = {}
        batches = skipped_batches = 0
        with stream.mesh_context(ctx.mesh):

            def dispatched():  # device outputs, batch by batch
                global_batches = stream.stream(
                    source, size, ctx.mesh, n, drop_remainder=True, show_progress=ctx.progress
                )
                for batch in global_batches:
                    images = stream.decode_images(batch, self.image_size)
                    valid = np.array([e is not None and bool(e.get("captions")) for e in batch.examples])
                    texts = [
                        e["captions"][0] if ok else "" for e, ok in zip(batch.examples, valid, strict=True)
                    ]
                    local = {"image": images, "tokens": ctx.tokenizer(texts), "valid": valid}
                    arrays = stream.to_global(local, ctx.mesh, size)
                    yield loss(ctx.variables, arrays["image"], arrays["tokens"], arrays["valid"])

            for value, stats, ok in stream.one_ahead(dispatched()):
                if not bool(ok):
                    skipped_batches += 1
                    continue
                batches += 1
                for name, x in {"loss": value, **stats}.items():
                    totals[name] = totals.get(name, 0.0) + float(x)
        out: dict[str, Any] = {k: v / batches for k, v in totals.items()} if batches else {"loss": math.nan}
        out.update(n_batches=batches, n_skipped_batches=skipped_batches, batch_size=size)
        return out
