"""The data fingerprint: what decides a run's sequence of batches, saved with each checkpoint.

`data_fingerprint` records the data config that fixes which batches a run sees
(files by name, format, sources and weights, seed, batch size, image size, the
tokenizer's hash, augmentation, a TFDS source's config); `clip_jax.checkpoint`
saves it with every step and, on resume, compares it with the run's own
(`data_changes`). A difference refuses the resume (`DataChangedError`) unless the
config allows it, since the resumed run would train on other batches than the
interrupted one.
"""

from __future__ import annotations

import hashlib
import os

import jax
import ml_collections

from clip_jax import storage
from clip_jax.data import elastic


class DataChangedError(ValueError):
    """The run's data config differs from the one the checkpoint was saved with."""


def _tokenizer_hash(path: str) -> str:
    """sha256 of the tokenizer file (or of every file of a tokenizer directory)."""
    if storage.isdir(path):
        digest = hashlib.sha256()
        for name in storage.files_under(path):
            data = storage.read_bytes(os.path.join(path, name))
            digest.update(f"{name}:{hashlib.sha256(data).hexdigest()};".encode())
        return digest.hexdigest()
    return hashlib.sha256(storage.read_bytes(path)).hexdigest() if storage.exists(path) else path


def data_fingerprint(
    data: ml_collections.ConfigDict,
    train_files: list[str],
    tokenizer: str,
    batch_size: int,
    image_size: int,
    sources: list | tuple = (),
) -> dict:
    """What decides the sequence of batches. Files by name (a moved dataset may resume).

    The process count only for "webdataset" (its position is per process); ``sources``
    (`mixture.Source`: a mixture) by name, files, weight and caption field.
    """
    streaming = data.format == "webdataset" and not sources
    return {
        "train_files": [os.path.basename(f) for f in train_files],
        "format": data.format,
        "shuffle_seed": data.shuffle_seed,
        "batch_size": batch_size,
        **({"process_count": jax.process_count()} if streaming else {"stream": elastic.KIND}),
        **_caption_and_source_fields(data, sources),
        "image_size": image_size,
        "tokenizer_sha256": _tokenizer_hash(tokenizer),
        "augmentation": [
            data.get("random_crop"),
            list(data.get("crop_scale") or ()),
            list(data.get("crop_ratio") or ()),
        ],
        # A TFDS source is named by its config, not by its files alone (split slices, keys).
        "tfds": [data.get(k) for k in _TFDS_FIELDS] if data.format == "tfds" else None,
    }


def _caption_and_source_fields(data: ml_collections.ConfigDict, sources) -> dict:
    """The mixture and the caption field, only when set (older fingerprints lack them)."""
    fields = {}
    if sources:
        fields["sources"] = [
            [s.name, [os.path.basename(f) for f in s.files], s.weight, s.caption_field] for s in sources
        ]
    if data.get("caption_field"):
        fields["caption_field"] = data.caption_field
    return fields


_TFDS_FIELDS = ("tfds_name", "tfds_split", "image_key", "caption_key", "label_key", "caption_template")


def data_changes(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints ([] when equal)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if key == "train_files" and old is not None and new is not None:
            added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
            detail = f"added {added[:3]}, removed {removed[:3]}" if added or removed else "reordered"
            changes.append(f"train_files: {len(old)} -> {len(new)} files ({detail})")
        else:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes
