"""Zero-shot classification as an `Evaluator`: streamed, sharded over the mesh, prompt ensembles.

The classifier is built once per call (`zeroshot.classifier_weights` over the mesh);
each global batch of images is encoded and scored on device, and only each image's
rank of its true class and its predicted class come back: host memory holds a few
integers per image. Metrics: top-1, top-5 (more than 5 classes), mean per-class recall,
each beside its chance level, and the majority-class rate (the share of the largest
class among the evaluated images: what always answering that class scores).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import cli, sharding, zeroshot_metadata
from clip_jax.data import transforms
from clip_jax.eval import stream, stream_sources, zeroshot
from clip_jax.eval.evaluator import EvalContext, options
from clip_jax.models import clip

NAMED_TEMPLATES = {
    "imagenet": zeroshot_metadata.IMAGENET_TEMPLATES,
    "imagenet_simple": zeroshot_metadata.IMAGENET_SIMPLE_TEMPLATES,
    "cifar": zeroshot_metadata.CIFAR_TEMPLATES,
}
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def normalize_templates(templates, where: str) -> tuple[str, ...]:
    """Templates with ``{}`` (clip_jax, OpenAI) or ``{c}`` (CLIP_benchmark's files) -> ``{}`` ones."""
    out = tuple(t.replace("{c}", "{}") for t in templates)
    bad = [t for t in out if t.count("{}") != 1]
    if not out or bad:
        raise cli.UserError(f"{where}: templates need one '{{}}' or '{{c}}' each: {bad[:3] or 'none given'}")
    return out


def rank_metrics(labels: np.ndarray, ranks: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Per-image true-class rank (strictly better classes) and prediction -> the metrics above."""
    n = len(labels)
    counts = np.bincount(labels, minlength=num_classes)
    hits = ranks == 0
    out: dict[str, Any] = {"top1": float(np.mean(hits)), "top1_chance": 1 / num_classes}
    out["top1_majority"] = float(counts.max() / n)
    if num_classes > 5:
        out["top5"] = float(np.mean(ranks < 5))
        out["top5_chance"] = 5 / num_classes
    out["mean_per_class_recall"] = float(np.mean([hits[labels == c].mean() for c in np.flatnonzero(counts)]))
    out["mean_per_class_recall_chance"] = 1 / num_classes
    out["n_images"] = n
    if num_classes <= zeroshot.MAX_CONFUSION_CLASSES:
        confusion = np.zeros((num_classes, num_classes), np.int64)
        np.add.at(confusion, (labels, predictions), 1)
        out["confusion"] = confusion.tolist()
    return out


@dataclasses.dataclass
class ZeroShotEvaluator:
    """Zero-shot classification on ``dataset`` ("folder:ROOT", "wds:DIR", "array_record:GLOB",
    "tfds:NAME[:split]"). ``templates``: a file (one per line), a name in `NAMED_TEMPLATES`, or
    None (the set's own: CLIP_benchmark's file, CLIP's for a known TFDS set; else
    `DEFAULT_TEMPLATES`). ``class_names``: a file, or None (the set's own names)."""

    name: str
    dataset: str
    image_size: int
    every: int = 0
    templates: str | None = None
    class_names: str | None = None
    label_key: str | None = None
    limit: int | None = None
    tfds_data_dir: str | None = None
    _source: Any = dataclasses.field(default=None, init=False, repr=False)
    _jitted: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, name: str, section: Mapping[str, Any], image_size: int) -> ZeroShotEvaluator:
        """From a ``config.eval.evaluators`` entry (dataset, every, templates, class_names, label_key,
        limit, tfds_data_dir)."""
        get = options(section)
        if not get("dataset"):
            raise cli.UserError(f"config.eval.evaluators.{name}.dataset is not set")
        return cls(
            name=name,
            dataset=get("dataset"),
            image_size=image_size,
            every=int(get("every") or 0),
            templates=get("templates"),
            class_names=get("class_names"),
            label_key=get("label_key"),
            limit=get("limit"),
            tfds_data_dir=get("tfds_data_dir"),
        )

    def source(self):
        if self._source is None:
            self._source = stream_sources.open_dataset(
                self.dataset, self.label_key, tfds_data_dir=self.tfds_data_dir
            )
            if len(self._source) == 0:
                raise stream_sources.EvalSetError(f"{self.name}: {self.dataset} holds no images")
        return self._source

    def prompts(self) -> list[list[str]]:
        """C lists of T prompts, from the class names and templates resolved as the class says."""
        source, where = self.source(), f"evaluator {self.name} ({self.dataset})"
        known = (
            zeroshot_metadata.lookup(self.dataset.partition(":")[2])
            if self.dataset.startswith("tfds:")
            else None
        )
        names = stream_sources.read_lines(self.class_names) if self.class_names else None
        names = names or getattr(source, "class_names", None) or (known[0] if known else None)
        if not names:
            raise cli.UserError(f"{where}: no class names; set class_names to a file (one per line)")
        if self.templates:
            templates = NAMED_TEMPLATES.get(self.templates) or stream_sources.read_lines(self.templates)
        else:
            templates = getattr(source, "templates", None) or (known[1] if known else DEFAULT_TEMPLATES)
        return zeroshot.prompt_sets(names, normalize_templates(templates, where))

    def _classify(self, model: clip.CLIP, mesh):
        if (key := (id(model), id(mesh))) not in self._jitted:

            def classify(variables, images, labels, index, weights):
                emb = model.apply(variables, transforms.normalize(images), method=clip.CLIP.encode_image)
                logits = emb @ weights.T  # [B, C]
                target = jnp.take_along_axis(logits, jnp.clip(labels, 0, weights.shape[0] - 1)[:, None], 1)
                ranks = jnp.sum(logits > target, axis=1).astype(jnp.int32)
                return ranks, jnp.argmax(logits, axis=1).astype(jnp.int32), labels, index

            self._jitted[key] = jax.jit(classify, out_shardings=sharding.replicated(mesh))
        return self._jitted[key]

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        source, prompts = self.source(), self.prompts()
        if (key := ("text", id(ctx.model), id(ctx.mesh))) not in self._jitted:
            self._jitted[key] = stream.text_encoder_fn(ctx.model, ctx.mesh)
        encoder = stream.TextEncoder(self._jitted[key], ctx.variables, ctx.mesh, ctx.batch_size)
        weights = zeroshot.classifier_weights(encoder, ctx.tokenizer, prompts, ctx.progress)
        num_classes = len(prompts)
        classify = self._classify(ctx.model, ctx.mesh)
        size = stream.eval_batch_size(ctx.batch_size, ctx.mesh)
        skipped: collections.Counter = collections.Counter()
        labels, ranks, predictions = [], [], []
        with stream.mesh_context(ctx.mesh):
            weights = stream.replicate(weights.astype(np.float32), ctx.mesh)
            batches = stream.stream(
                source, size, ctx.mesh, self.limit, skipped=skipped, show_progress=ctx.progress
            )

            def dispatched():  # device outputs, batch by batch
                for batch in batches:
                    images = stream.decode_images(batch, self.image_size, skipped)
                    local_labels = np.zeros(len(batch.examples), np.int32)
                    for i, example in enumerate(batch.examples):
                        if example is not None and example.get("label") is None:
                            batch.examples[i], batch.index[i] = None, -1
                            skipped["missing_label"] += 1
                        elif example is not None:
                            local_labels[i] = example["label"]
                    local = {"image": images, "label": local_labels, "index": batch.index}
                    arrays = stream.to_global(local, ctx.mesh, size)
                    yield classify(ctx.variables, arrays["image"], arrays["label"], arrays["index"], weights)

            for out in stream.one_ahead(dispatched()):
                rank, prediction, label, index = (np.asarray(x) for x in out)
                keep = index >= 0
                labels.append(label[keep])
                ranks.append(rank[keep])
                predictions.append(prediction[keep])
        labels_all = np.concatenate(labels)
        if not len(labels_all):
            raise stream_sources.EvalSetError(
                f"{self.name}: no image of {self.dataset} could be read ({dict(skipped)})"
            )
        if labels_all.min() < 0 or labels_all.max() >= num_classes:
            raise stream_sources.EvalSetError(
                f"{self.name}: {self.dataset} has labels in [{labels_all.min()}, {labels_all.max()}] "
                f"but {num_classes} class names"
            )
        out = rank_metrics(labels_all, np.concatenate(ranks), np.concatenate(predictions), num_classes)
        # Rows that could not be read (counted from the gathered indices: the same on every process).
        out["n_skipped"] = min(len(source), self.limit or len(source)) - len(labels_all)
        return out
