"""Several captions per image: which one a training example shows, and all of them for evaluation.

A record carries one ``caption`` (str) or a list ``captions`` (COCO's five, synthetic
recaptions), optionally with ``caption_weights`` (one non-negative number per caption).
Training draws one caption per example from the example's own random generator, which the
pipeline seeds with (seed, global example index): an example's caption is fixed by the
seed and its place in the stream (so a resumed run draws the same), and differs between
epochs (the index grows with the epoch). Evaluation uses every caption (`all_texts`).

A source may name the field its captions are in (``caption_field``: e.g. "recaptions"
for a synthetic set); a str field is one caption, a list field several.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clip_jax.data import skips

# Bounds for untrusted records: more captions than this are cut, not all decoded.
MAX_CAPTIONS = 64
# A webdataset ``.json`` sidecar larger than this is not parsed for captions.
MAX_JSON_BYTES = 1 << 20


def raw_captions(record: Mapping[str, Any], field: str | None = None) -> list:
    """The caption values of ``record``: ``field`` when given, else ``captions`` (a list) or ``caption``.

    Raises `skips.BadRecord` ``missing_caption`` when there is none.
    """
    value = record.get(field) if field else record.get("captions") or record.get("caption")
    if value is None or (isinstance(value, (list, tuple)) and not value):
        raise skips.BadRecord("missing_caption", str(record.get("key", "")))
    return list(value[:MAX_CAPTIONS]) if isinstance(value, (list, tuple)) else [value]


def all_texts(record: Mapping[str, Any], field: str | None = None) -> list[str]:
    """Every usable caption of ``record`` as text (blank ones left out); for evaluation.

    Raises `skips.BadRecord` when none is usable.
    """
    texts = []
    for raw in raw_captions(record, field):
        try:
            texts.append(skips.caption_text(raw))
        except skips.BadRecord:
            continue
    if not texts:
        raise skips.BadRecord("empty_caption", str(record.get("key", "")))
    return texts


def weights(record: Mapping[str, Any], count: int) -> np.ndarray | None:
    """``caption_weights`` normalised to sum 1 (float64 [count]), or None for uniform.

    Weights that do not fit (wrong length, negative, not finite, all zero) are ignored
    (uniform): a record from others never stops the run for its weights.
    """
    raw = record.get("caption_weights")
    if raw is None or not isinstance(raw, (list, tuple)) or len(raw) < count:
        return None
    try:
        w = np.asarray(raw[:count], np.float64)
    except (TypeError, ValueError):
        return None
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        return None
    return w / w.sum()


def choose(record: Mapping[str, Any], rng: np.random.Generator | None, field: str | None = None) -> str:
    """One caption of ``record`` as text: drawn by ``caption_weights`` with ``rng``; the
    first usable one when ``rng`` is None (evaluation) or there is only one.

    Raises `skips.BadRecord` (missing or empty caption). A drawn caption that is blank is
    replaced by the first usable one, so the record still counts once.
    """
    values = raw_captions(record, field)
    if rng is not None and len(values) > 1:
        pick = _draw(rng, weights(record, len(values)), len(values))
        try:
            return skips.caption_text(values[pick])
        except skips.BadRecord:
            pass
    return all_texts(record, field)[0]


def _draw(rng: np.random.Generator, p: np.ndarray | None, count: int) -> int:
    """An index in [0, count): by ``p``, or uniform. One uniform number either way, so the
    rest of the example's randomness (the crop) does not depend on the weights."""
    u = rng.random()
    if p is None:
        return min(int(u * count), count - 1)
    return min(int(np.searchsorted(np.cumsum(p), u, side="right")), count - 1)


def for_table(values: Sequence[Any]) -> list[str]:
    """The non-blank captions among a table row's values (several caption columns)."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        text = str(v).strip()
        if text:
            out.append(text)
    return out


def record_fields(raw: str | bytes | Sequence | None) -> dict[str, Any]:
    """A converter's caption value(s) -> the record's fields: ``{"caption": text}`` for one,
    ``{"caption": first, "captions": [all]}`` for several (blank ones left out).

    Raises `skips.BadRecord` (missing or empty caption).
    """
    texts = all_texts({"captions": list(raw)} if isinstance(raw, (list, tuple)) else {"caption": raw})
    return {"caption": texts[0]} if len(texts) == 1 else {"caption": texts[0], "captions": texts}


def from_webdataset(txt: bytes | None, json_bytes: bytes | None) -> bytes | list | None:
    """The caption(s) of a webdataset sample: a list from the ``.json`` sidecar's
    ``"captions"`` (or a ``.json`` that is a list of str), else ``.txt`` with one caption
    per line (a list when it has several non-blank lines), else None."""
    if json_bytes and len(json_bytes) <= MAX_JSON_BYTES:
        try:
            meta = json.loads(json_bytes)
        except ValueError:
            meta = None
        listed = meta.get("captions") if isinstance(meta, dict) else meta
        if isinstance(listed, list) and listed and all(isinstance(c, str) for c in listed):
            return listed[:MAX_CAPTIONS]
    if txt is None:
        return None
    lines = [line for line in txt.splitlines() if line.strip()]
    return lines[:MAX_CAPTIONS] if len(lines) > 1 else txt
