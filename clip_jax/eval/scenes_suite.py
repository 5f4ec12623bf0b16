"""The demo's scene evaluation as one evaluator: zero-shot shape/colour on held-out
combinations, retrieval of held-out scenes, the diagnostic suite, prompt sensitivity and
optionally linear probes (`ScenesEvaluator`; `evaluate_scenes` is the same as a function).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jax.sharding import Mesh

from clip_jax import diagnostics
from clip_jax.data import pipeline, scenes
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.eval import linear_probe as probe
from clip_jax.eval.encode import Encoder
from clip_jax.eval.evaluator import EvalContext
from clip_jax.eval.retrieval import retrieval_metrics
from clip_jax.eval.zeroshot import classification_metrics, classifier_weights
from clip_jax.models import clip


@dataclasses.dataclass(frozen=True)
class ScenesEvaluator:
    """`evaluate_scenes` on ``dataset`` every ``every`` steps (0: at the end only)."""

    name: str
    every: int
    dataset: scenes.ScenesDataset
    diagnostics: bool = True
    probes: int = 200
    linear_probe: bool = False

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        return evaluate_scenes(
            ctx.model,
            ctx.variables,
            ctx.tokenizer,
            self.dataset,
            ctx.batch_size,
            ctx.mesh,
            diagnostic_suite=self.diagnostics,
            linear_probe=self.linear_probe,
            progress=ctx.progress,
            probes=self.probes,
        )


def scenes_linear_probe(encoder, image_size: int, seed: int = 0) -> dict:
    """Linear probes for shape (4-way) and colour (8-way) on frozen features of single things."""
    data = diagnostics.single_things(1000, image_size, seed)
    features = encoder.images(data["image"])
    train_idx, val_idx = probe.validation_split(600, 0.2, seed)
    test = slice(600, None)
    out = {}
    for name, labels in data["labels"].items():
        train, held = (features[:600], labels[:600]), (features[test], labels[test])
        result = probe.linear_probe(
            (train[0][train_idx], train[1][train_idx]),
            (train[0][val_idx], train[1][val_idx]),
            held,
            num_classes=int(labels.max()) + 1,
        )
        out[f"linear_probe_{name}_acc"] = result["test_acc"]
        out[f"linear_probe_{name}_acc_chance"] = result["test_acc_chance"]
        out[f"linear_probe_{name}_l2"] = result["l2"]
    return out


def evaluate_scenes(
    model: clip.CLIP,
    params,
    tokenizer: Tokenizer,
    dataset: scenes.ScenesDataset,
    batch_size: int,
    mesh: Mesh | None = None,
    diagnostic_suite: bool = True,
    linear_probe: bool = False,
    progress: bool = False,
    probes: int = 200,
) -> dict:
    """The demo's evaluation: zero-shot shape/colour accuracy on held-out combinations,
    retrieval of held-out scenes, the diagnostic suite and prompt sensitivity
    (`clip_jax.diagnostics`, ``probes`` images per task), optionally linear probes.

    Returns the metrics with their chance levels (``*_chance``), confusion matrices and
    the per-template report (nested), and prints a table.
    """
    encoder = Encoder(model, params, batch_size, mesh, progress)
    size = model.config.vision.image_size
    things = pipeline.load_eval_set([dataset.heldout_things], tokenizer, size)
    image_emb = encoder.images(things["image"])
    results: dict = {}
    for attribute, names, templates in (
        ("shape", scenes.SHAPES, scenes.SHAPE_TEMPLATES),
        ("colour", list(scenes.COLOURS), scenes.COLOUR_TEMPLATES),
    ):
        weights = classifier_weights(encoder, tokenizer, [scenes.prompts(templates, n) for n in names])
        labels = things["labels"][attribute]
        results.update(classification_metrics(image_emb @ weights.T, labels, f"zero_shot_{attribute}_"))

    gallery = pipeline.load_eval_set([dataset.heldout_scenes], tokenizer, size)
    scene_emb, caption_emb = encoder.images(gallery["image"]), encoder.texts(gallery["tokens"])
    results.update(retrieval_metrics(scene_emb, caption_emb, np.arange(len(scene_emb))))
    if diagnostic_suite:
        results.update(diagnostics.run_suite(encoder, tokenizer, size, probes))
        results["prompt_sensitivity"] = diagnostics.prompt_sensitivity(
            encoder, tokenizer, image_emb, things["labels"]
        )
    if linear_probe:
        results.update(scenes_linear_probe(encoder, size))
    return results
