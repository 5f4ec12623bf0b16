"""Image-text retrieval as an `Evaluator`: streamed, sharded over the mesh, several captions per image.

Each global batch carries its images and all their captions (``[B, K, L]`` tokens, K the
batch's largest caption count over all processes, rounded up to a power of two, with a
mask); both towers run on the sharded batch and the unit embeddings come back
replicated. The host keeps the embeddings (E floats per image and per caption) and
scores them with `clip_jax.eval.retrieval.retrieval_metrics`: image->text counts an
image as found at k when any of its captions is in the top k; every caption is a
text->image query; chance levels beside each recall.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from clip_jax import cli, sharding
from clip_jax.data import transforms
from clip_jax.eval import retrieval, stream, stream_sources
from clip_jax.eval.evaluator import EvalContext, options
from clip_jax.models import clip


def _global_max(value: int) -> int:
    """The largest ``value`` over all processes (every process calls this at the same point)."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


@dataclasses.dataclass
class RetrievalEvaluator:
    """R@k both ways on ``dataset``: "array_record:GLOB" (records with ``caption``/``captions``) or
    "wds:DIR" (CLIP_benchmark's retrieval layout: ``KEY.txt`` with one caption per line)."""

    name: str
    dataset: str
    image_size: int
    every: int = 0
    limit: int | None = None
    ks: tuple[int, ...] = (1, 5, 10)
    _source: Any = dataclasses.field(default=None, init=False, repr=False)
    _jitted: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, name: str, section: Mapping[str, Any], image_size: int) -> RetrievalEvaluator:
        """From a ``config.eval.evaluators`` entry (dataset, every, limit, ks)."""
        get = options(section)
        if not get("dataset") or get("dataset").split(":")[0] not in ("array_record", "wds"):
            raise cli.UserError(
                f"config.eval.evaluators.{name}.dataset={get('dataset')!r}: retrieval reads "
                "array_record:GLOB or wds:DIR"
            )
        return cls(
            name=name,
            dataset=get("dataset"),
            image_size=image_size,
            every=int(get("every") or 0),
            limit=get("limit"),
            ks=tuple(get("ks") or (1, 5, 10)),
        )

    def source(self):
        if self._source is None:
            self._source = stream_sources.open_dataset(self.dataset)
        return self._source

    def _encode(self, model: clip.CLIP, mesh):
        if (key := (id(model), id(mesh))) not in self._jitted:

            def encode(variables, images, tokens, index, caption_mask):
                image_emb = model.apply(
                    variables, transforms.normalize(images), method=clip.CLIP.encode_image
                )
                rows, k, length = tokens.shape
                text = model.apply(variables, tokens.reshape(rows * k, length), method=clip.CLIP.encode_text)
                return image_emb, text.reshape(rows, k, -1), index, caption_mask

            self._jitted[key] = jax.jit(encode, out_shardings=sharding.replicated(mesh))
        return self._jitted[key]

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        source, encode = self.source(), self._encode(ctx.model, ctx.mesh)
        size = stream.eval_batch_size(ctx.batch_size, ctx.mesh)
        skipped: collections.Counter = collections.Counter()
        image_emb, text_emb, caption_image = [], [], []
        length = ctx.tokenizer(["x"]).shape[1]
        with stream.mesh_context(ctx.mesh):

            def dispatched():  # device outputs, batch by batch
                batches = stream.stream(
                    source, size, ctx.mesh, self.limit, skipped=skipped, show_progress=ctx.progress
                )
                for batch in batches:
                    images = stream.decode_images(batch, self.image_size, skipped)
                    texts = []
                    for i, example in enumerate(batch.examples):
                        if example is not None and not example.get("captions"):
                            batch.examples[i], batch.index[i] = None, -1
                            skipped["missing_caption"] += 1
                        texts.append(example["captions"] if batch.examples[i] is not None else [])
                    k = 1 << max(0, _global_max(max(len(t) for t in texts)) - 1).bit_length()
                    tokens = np.zeros((len(texts), k, length), np.int32)
                    mask = np.zeros((len(texts), k), bool)
                    for i, own in enumerate(texts):
                        if own:
                            tokens[i, : len(own)] = ctx.tokenizer(own)
                            mask[i, : len(own)] = True
                    local = {"image": images, "tokens": tokens, "index": batch.index, "mask": mask}
                    arrays = stream.to_global(local, ctx.mesh, size)
                    yield encode(
                        ctx.variables, arrays["image"], arrays["tokens"], arrays["index"], arrays["mask"]
                    )

            for out in stream.one_ahead(dispatched()):
                images_out, texts_out, index, mask_out = (np.asarray(x) for x in out)
                for row in np.flatnonzero(index >= 0):
                    image_emb.append(images_out[row])
                    text_emb.extend(texts_out[row][mask_out[row]])
                    caption_image += [len(image_emb) - 1] * int(mask_out[row].sum())
        if len(image_emb) < 2:
            raise stream_sources.EvalSetError(
                f"{self.name}: {self.dataset} has under 2 readable images with captions"
            )
        out = retrieval.retrieval_metrics(
            np.stack(image_emb), np.stack(text_emb), np.asarray(caption_image), self.ks
        )
        out.update(n_images=len(image_emb), n_captions=len(text_emb))
        out["n_skipped"] = min(len(source), self.limit or len(source)) - len(image_emb)
        return out
