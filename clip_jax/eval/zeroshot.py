"""Zero-shot classification: prompt-ensemble classifiers, top-k, per-class recall,
confusion matrices and the per-template (prompt sensitivity) report.

Ranks count strictly better-scoring candidates, so a tie is resolved in the
target's favour (with continuous embeddings ties are practically absent).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip_jax.data.scenes import fix_articles
from clip_jax.eval.encode import progress

# Confusion matrices are kept (and drawn by the report) up to this many classes.
MAX_CONFUSION_CLASSES = 20


def prompt_sets(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """C class names x T templates ('a photo of a {}.') -> C lists of T prompts."""
    return [[fix_articles(t.format(name)) for t in templates] for name in class_names]


def classifier_weights(
    encoder, tokenizer, class_prompts: Sequence[Sequence[str]], show_progress: bool = False
) -> np.ndarray:
    """Prompt ensembling: per class, the renormalised mean of its prompts' unit embeddings.

    class_prompts: C lists of prompts -> [C, E]. Prompts are encoded in chunks of
    whole classes (ImageNet: 1,000 x 80), so batches stay full.
    """
    chunk = max(1, getattr(encoder, "batch_size", 256) * 8 // max(len(p) for p in class_prompts))
    starts = range(0, len(class_prompts), chunk)
    weights = []
    for start in progress(starts, len(starts), "zero-shot classifier", show_progress and len(starts) > 1):
        group = class_prompts[start : start + chunk]
        emb = encoder.texts(tokenizer([p for prompts in group for p in prompts]))
        bounds = np.cumsum([0] + [len(p) for p in group])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            mean = emb[lo:hi].mean(axis=0)
            weights.append(mean / np.linalg.norm(mean))
    return np.stack(weights)


def ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """scores [N, C], targets [N] -> [N] how many candidates score strictly above the target."""
    target_scores = scores[np.arange(len(targets)), targets]
    return np.sum(scores > target_scores[:, None], axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    return float(np.mean(ranks(scores, labels) < k))


def mean_per_class_recall(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 recall of each class present in ``labels``, averaged with equal weight."""
    hits = ranks(scores, labels) == 0
    return float(np.mean([hits[labels == c].mean() for c in np.unique(labels)]))


def confusion_matrix(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted (argmax) class."""
    num_classes = scores.shape[1]
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (labels, scores.argmax(axis=1)), 1)
    return out


def classification_metrics(scores: np.ndarray, labels: np.ndarray, prefix: str = "") -> dict:
    """top-1 (top-5 with more than 5 classes), mean per-class recall, each with its chance level;
    the confusion matrix (as lists) for at most `MAX_CONFUSION_CLASSES` classes."""
    num_classes = scores.shape[1]
    out = {f"{prefix}top1": topk_accuracy(scores, labels, 1), f"{prefix}top1_chance": 1 / num_classes}
    if num_classes > 5:
        out[f"{prefix}top5"] = topk_accuracy(scores, labels, 5)
        out[f"{prefix}top5_chance"] = 5 / num_classes
    out[f"{prefix}mean_per_class_recall"] = mean_per_class_recall(scores, labels)
    out[f"{prefix}mean_per_class_recall_chance"] = 1 / num_classes
    if num_classes <= MAX_CONFUSION_CLASSES:
        out[f"{prefix}confusion"] = confusion_matrix(scores, labels).tolist()
    return out


def prompt_sensitivity(
    encoder, tokenizer, image_emb: np.ndarray, labels: np.ndarray, class_names, templates
) -> dict:
    """Top-1 accuracy with each template alone and with the ensemble of all of them.

    Returns {"per_template": {template: acc}, "ensemble", "best_single", "worst_single",
    "spread" (best - worst), "std", "chance"}.
    """
    prompts = prompt_sets(class_names, templates)
    # One encoding pass: [C, T, E] unit prompt embeddings.
    flat = encoder.texts(tokenizer([p for row in prompts for p in row]))
    emb = flat.reshape(len(class_names), len(templates), -1)
    per_template = {t: topk_accuracy(image_emb @ emb[:, i].T, labels) for i, t in enumerate(templates)}
    mean = emb.mean(axis=1)
    ensemble = topk_accuracy(image_emb @ (mean / np.linalg.norm(mean, axis=1, keepdims=True)).T, labels)
    accs = np.array(list(per_template.values()))
    return {
        "per_template": per_template,
        "ensemble": ensemble,
        "best_single": float(accs.max()),
        "worst_single": float(accs.min()),
        "spread": float(accs.max() - accs.min()),
        "std": float(accs.std()),
        "chance": 1 / len(class_names),
    }
