"""Evaluation: batched encoders, zero-shot classification by prompt ensembling,
retrieval recall, and the held-out report of the synthetic-scenes demo.

Ranks count strictly better-scoring candidates, so a tie is resolved in the
target's favour (with continuous embeddings ties are practically absent).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from clip_jax import sharding
from clip_jax.data import pipeline, scenes, transforms
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.models import clip


class Encoder:
    """Jitted, batched ``encode_image`` / ``encode_text`` for one model and its params."""

    def __init__(self, model: clip.CLIP, params, batch_size: int, mesh: Mesh | None = None):
        self.params = params
        self.batch_size = batch_size
        # Replicated outputs: every process can read the embeddings (multi-host too).
        out = {} if mesh is None else {"out_shardings": sharding.replicated(mesh)}
        self._image = jax.jit(
            lambda p, x: model.apply({"params": p}, transforms.normalize(x), method=clip.CLIP.encode_image),
            **out,
        )
        self._text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=clip.CLIP.encode_text), **out)

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        n, size = len(x), self.batch_size
        padded = np.concatenate([x, np.zeros((-n % size, *x.shape[1:]), x.dtype)])
        out = [np.asarray(fn(self.params, padded[i : i + size])) for i in range(0, len(padded), size)]
        return np.concatenate(out)[:n]

    def images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> unit-norm float32 [N, E]."""
        return self._batched(self._image, images)

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """int32 [N, L] -> unit-norm float32 [N, E]."""
        return self._batched(self._text, tokens)


def classifier_weights(
    encoder: Encoder, tokenizer: Tokenizer, class_prompts: Sequence[Sequence[str]]
) -> np.ndarray:
    """Prompt ensembling: per class, the renormalised mean of its prompts' unit embeddings.

    class_prompts: C lists of prompts -> [C, E].
    """
    weights = []
    for prompts in class_prompts:
        emb = encoder.texts(tokenizer(list(prompts))).mean(axis=0)
        weights.append(emb / np.linalg.norm(emb))
    return np.stack(weights)


def ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """scores [N, C], targets [N] -> [N] how many candidates score strictly above the target."""
    target_scores = scores[np.arange(len(targets)), targets]
    return np.sum(scores > target_scores[:, None], axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    return float(np.mean(ranks(scores, labels) < k))


def mean_per_class_recall(scores: np.ndarray, labels: np.ndarray) -> float:
    hits = ranks(scores, labels) == 0
    return float(np.mean([hits[labels == c].mean() for c in np.unique(labels)]))


def recall_at_k(similarity: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Queries [Q, G] against a gallery with one target each -> {"R@k": share ranked < k}."""
    r = ranks(similarity, targets)
    return {f"R@{k}": float(np.mean(r < k)) for k in ks}


def evaluate_scenes(
    model: clip.CLIP,
    params,
    tokenizer: Tokenizer,
    dataset: scenes.ScenesDataset,
    batch_size: int,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Zero-shot shape/colour accuracy on held-out combinations and text->image retrieval.

    Returns the metrics with their chance levels (``*_chance``) and prints a table.
    """
    encoder = Encoder(model, params, batch_size, mesh)
    size = model.config.vision.image_size
    things = pipeline.load_eval_set([dataset.heldout_things], tokenizer, size)
    image_emb = encoder.images(things["image"])
    results: dict[str, float] = {}
    for attribute, names, templates in (
        ("shape", scenes.SHAPES, scenes.SHAPE_TEMPLATES),
        ("colour", list(scenes.COLOURS), scenes.COLOUR_TEMPLATES),
    ):
        weights = classifier_weights(encoder, tokenizer, [scenes.prompts(templates, n) for n in names])
        scores = image_emb @ weights.T
        results[f"zero_shot_{attribute}_top1"] = topk_accuracy(scores, things["labels"][attribute])
        results[f"zero_shot_{attribute}_top1_chance"] = 1 / len(names)

    gallery = pipeline.load_eval_set([dataset.heldout_scenes], tokenizer, size)
    similarity = encoder.texts(gallery["tokens"]) @ encoder.images(gallery["image"]).T
    n = len(similarity)
    for name, value in recall_at_k(similarity, np.arange(n), (1, 5)).items():
        k = int(name.split("@")[1])
        results[f"t2i_{name}"] = value
        results[f"t2i_{name}_chance"] = k / n
    if jax.process_index() == 0:
        print_table("held-out scenes (never-seen colour+shape pairs)", results)
    return results


def print_table(title: str, results: dict[str, float]) -> None:
    print(f"\n{title}\n{'metric':<26}{'value':>8}{'chance':>9}")
    for name, value in results.items():
        if not name.endswith("_chance"):
            chance = results.get(f"{name}_chance", float("nan"))
            print(f"{name:<26}{value:>8.1%}{chance:>9.1%}")
    print(flush=True)
