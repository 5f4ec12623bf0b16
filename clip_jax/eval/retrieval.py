"""Image-text retrieval with any number of captions per image (COCO: 5, Flickr30k: 5).

image->text: an image's query is a hit at k when ANY of its captions is among the
k best-scoring captions. text->image: every caption is a query with one target
image. Ranks count strictly better-scoring candidates (ties resolved for the target).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np

from clip_jax.eval.zeroshot import ranks


def recall_at_k(similarity: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Queries [Q, G] against a gallery with one target each -> {"R@k": share ranked < k}."""
    r = ranks(similarity, targets)
    return {f"R@{k}": float(np.mean(r < k)) for k in ks}


def image_to_text_ranks(similarity: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """similarity [N images, T captions], caption_image [T] (image index of each caption)
    -> [N] rank of each image's best caption: how many captions score strictly above it.
    Images without a caption get rank T (never a hit)."""
    num_images, num_captions = similarity.shape
    own = caption_image[None, :] == np.arange(num_images)[:, None]  # [N, T]
    best_own = np.where(own, similarity, -np.inf).max(axis=1)  # [N]
    r = np.sum(similarity > best_own[:, None], axis=1)
    return np.where(own.any(axis=1), r, num_captions)


def _chance_i2t(caption_image: np.ndarray, num_images: int, k: int) -> float:
    """Expected R@k under a random caption order: 1 - C(T - m, k) / C(T, k) per image, m own captions."""
    total = len(caption_image)
    counts = np.bincount(caption_image, minlength=num_images)
    return float(np.mean([1 - comb(total - m, k) / comb(total, k) for m in counts]))


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """image_emb [N, E], text_emb [T, E] (unit norm), caption_image [T] in [0, N).

    -> {"i2t_R@k", "t2i_R@k", each with "_chance"} for k in ``ks`` (k < gallery size).
    """
    caption_image = np.asarray(caption_image)
    similarity = image_emb @ text_emb.T  # [N, T]
    num_images, num_captions = similarity.shape
    i2t = image_to_text_ranks(similarity, caption_image)
    t2i = ranks(similarity.T, caption_image)
    out: dict[str, float] = {}
    for k in ks:
        if k < num_captions:
            out[f"i2t_R@{k}"] = float(np.mean(i2t < k))
            out[f"i2t_R@{k}_chance"] = _chance_i2t(caption_image, num_images, k)
    for k in ks:
        if k < num_images:
            out[f"t2i_R@{k}"] = float(np.mean(t2i < k))
            out[f"t2i_R@{k}_chance"] = k / num_images
    return out


def top_matches(similarity: np.ndarray, k: int) -> np.ndarray:
    """[Q, G] -> int [Q, k] gallery indices, best first (for galleries)."""
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]
