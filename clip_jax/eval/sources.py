"""Labelled image sets for zero-shot classification and linear probes, in memory::

    {"image": uint8 [N, S, S, 3], "label": int64 [N], "class_names": [C] str | None}

from a TFDS split (`clip_jax.data.tfds_source`, no TensorFlow), an image-folder
tree (one folder per class, classes in sorted folder order, as torchvision's
ImageFolder), or ArrayRecord shards whose records carry ``label`` (or
``labels[label_key]``). Images are resized and centre-cropped as in evaluation.
"""

from __future__ import annotations

import os

import numpy as np

from clip_jax.data import records, skips, transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _decode(data: bytes, image_size: int) -> np.ndarray:
    return transforms.resize_center_crop(transforms.decode_image(data), image_size)


def image_folder(root: str, image_size: int, limit_per_class: int | None = None) -> dict:
    """ROOT/CLASS/*.jpg -> the set above; class names are the folder names ('_' -> ' ')."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        for file in files[:limit_per_class]:
            with open(os.path.join(root, name, file), "rb") as f:
                try:
                    images.append(_decode(f.read(), image_size))
                except Exception as e:  # unreadable image: left out, like a bad record
                    print(f"skipping {name}/{file}: {type(e).__name__}", flush=True)
                    continue
            labels.append(label)
    return {
        "image": np.stack(images),
        "label": np.asarray(labels, np.int64),
        "class_names": [c.replace("_", " ") for c in classes],
    }


def array_record(
    pattern: str, image_size: int, label_key: str | None = None, limit: int | None = None
) -> dict:
    """ArrayRecord shards (glob) with integer labels: ``record["label"]``, or
    ``record["labels"][label_key]`` when ``label_key`` is given. Class names are unknown (None)."""
    files = records.expand(pattern, "array_record")
    images, labels = [], []
    for record in records.read_all(files)[:limit]:
        label = record.get("label") if label_key is None else record.get("labels", {}).get(label_key)
        if label is None:
            raise records.ShardError(
                f"{pattern}: record {record.get('key')!r} has no label ({label_key or 'label'}); "
                "give --label_key or --task=retrieval"
            )
        try:
            images.append(_decode(record["image"], image_size))
        except (skips.BadRecord, OSError, ValueError):
            continue
        labels.append(int(label))
    return {"image": np.stack(images), "label": np.asarray(labels, np.int64), "class_names": None}


def tfds(name: str, split: str, image_size: int, tokenizer, data_dir: str | None = None, limit=None) -> dict:
    """A TFDS split prepared in array_record format (`tfds_source.load_eval_set`)."""
    from clip_jax.data import tfds_source

    spec = tfds_source.TfdsSpec(name=name, split=split, data_dir=data_dir)
    data = tfds_source.load_eval_set(spec, tokenizer, image_size, limit)
    names = [n.replace("_", " ") for n in data["class_names"]] if data["class_names"] else None
    return {"image": data["image"], "label": data["label"], "class_names": names}


def read_class_names(path: str) -> list[str]:
    """One class name per line (blank lines ignored), in label order."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def read_templates(path: str) -> list[str]:
    """One template with a '{}' per line."""
    templates = read_class_names(path)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: templates without '{{}}': {bad[:3]}")
    return templates
