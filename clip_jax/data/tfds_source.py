"""TFDS datasets prepared in array_record format, read directly (no TensorFlow).

``tfds.data_source`` gives random access to a split's records. They are read as
raw bytes and parsed here with the dataset's own features (TFDS's numpy
backend) into the pipeline's record layout::

    {"key": "name/split[i]", "image": bytes (encoded), "caption": str | bytes, "label": int}

The image stays encoded so the pipeline's decoder (EXIF, CMYK, 16-bit, bomb
checks) decodes it; a record that does not parse becomes a bad record
(skipped, replaced and counted) like a corrupt ArrayRecord one. The caption is
``caption_key``'s text, or ``caption_template`` filled with the name of the
``label_key`` class (ClassLabel), as for ImageNet-style datasets. A split is read
as ``config.data.format='tfds'`` or as one weighted source of a mixture
(``config.data.sources.NAME.format='tfds'``: `TfdsSpec.from_source`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from clip_jax.data import pipeline, skips
from clip_jax.data.tokenizer import Tokenizer


class TfdsError(ValueError):
    """The dataset, split or feature keys named in ``config.data`` do not fit the prepared data."""


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """Which TFDS split to read and how its features map to image, caption and label."""

    name: str  # "name[/config][:version]"
    split: str = "train"  # TFDS split syntax: "train", "train[:90%]", ...
    data_dir: str | None = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    image_key: str = "image"
    caption_key: str | None = None  # None: caption_template + the class name of label_key
    label_key: str | None = "label"
    caption_template: str = "a photo of a {}."
    where: str = dataclasses.field(default="config.data", compare=False)  # errors name its fields

    @classmethod
    def from_source(cls, name: str, source) -> TfdsSpec:
        """From a mixture source ``config.data.sources.NAME`` (format "tfds"): the same fields as
        ``config.data``'s (``tfds_name``, ``tfds_split``, ``tfds_data_dir``, ``image_key``,
        ``caption_key``, ``label_key``, ``caption_template``), the same defaults."""
        return cls(
            name=source.tfds_name,
            split=source.get("tfds_split") or "train",
            data_dir=source.get("tfds_data_dir"),
            image_key=source.get("image_key") or "image",
            caption_key=source.get("caption_key"),
            label_key=source.get("label_key", "label"),  # None: no label
            caption_template=source.get("caption_template") or "a photo of a {}.",
            where=f"config.data.sources.{name}",
        )

    @classmethod
    def from_config(cls, data, split: str | None = None) -> TfdsSpec:
        """From ``config.data`` (``split`` replaces ``config.data.tfds_split``)."""
        return cls(
            name=data.tfds_name,
            split=split or data.tfds_split,
            data_dir=data.tfds_data_dir,
            image_key=data.image_key,
            caption_key=data.caption_key,
            label_key=data.label_key,
            caption_template=data.caption_template,
        )


def open_source(spec: TfdsSpec):
    """``tfds.data_source`` of the split, records as raw bytes; checks the feature keys.

    Raises `TfdsError` naming the config field when the data is not there or does not fit.
    """
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(
            spec.name,
            split=spec.split,
            data_dir=spec.data_dir,
            download=False,  # prepared beforehand; never downloads during training
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        )
    except Exception as e:  # DatasetNotFoundError, unknown split, not prepared, wrong format
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TfdsError(
            f"{spec.where}.tfds_name={spec.name!r} split {spec.split!r} (data_dir {spec.data_dir!r}): "
            f"{first_line}. Prepare it with download_and_prepare(file_format='array_record')."
        ) from None
    features = source.dataset_info.features
    for field, key in (("image_key", spec.image_key), ("caption_key", spec.caption_key)):
        if key is not None and key not in features:
            raise TfdsError(f"{spec.where}.{field}={key!r} is not a feature of {spec.name}: {list(features)}")
    if not isinstance(features[spec.image_key], tfds.features.Image):
        raise TfdsError(f"{spec.where}.image_key={spec.image_key!r} is not an Image feature")
    label = _feature(features, spec.label_key)
    if spec.caption_key is None and not isinstance(label, tfds.features.ClassLabel):
        raise TfdsError(
            f"{spec.where}.label_key={spec.label_key!r} is not a ClassLabel feature of {spec.name} "
            f"(needed for captions when {spec.where}.caption_key is None)"
        )
    return source


def _feature(features, key: str | None):
    """features[key], None when absent (a FeaturesDict has no ``get``)."""
    try:
        return features[key] if key else None
    except KeyError:
        return None


def class_names(source, spec: TfdsSpec) -> list[str] | None:
    """The ``label_key`` ClassLabel's names (None without one)."""
    feature = _feature(source.dataset_info.features, spec.label_key)
    return list(feature.names) if getattr(feature, "names", None) else None


def split_files(spec: TfdsSpec) -> list[str]:
    """The array_record files the split reads (what the checkpoint's data fingerprint names)."""
    source = open_source(spec)
    instructions = source.dataset_info.splits[spec.split].file_instructions
    return sorted({str(fi.filename) for fi in instructions})


@dataclasses.dataclass(frozen=True)
class ToRecord(grain.transforms.MapWithIndex):
    """Raw TFDS bytes (record ``index`` of the split) -> the pipeline's record dict."""

    features: Any  # the dataset's tfds.features.FeaturesDict
    spec: TfdsSpec
    names: tuple[str, ...] | None

    def map_with_index(self, index: int, raw: bytes) -> dict[str, Any]:
        import tensorflow_datasets as tfds

        key = f"{self.spec.name}/{self.spec.split}[{index}]"
        try:
            example = self.features.deserialize_example_np(
                raw, decoders={self.spec.image_key: tfds.decode.SkipDecoding()}
            )
        except Exception as e:  # a corrupt proto: several exception types
            return {"key": key, "bad": "decode_error", "detail": type(e).__name__}
        record = {"key": key, "image": example.get(self.spec.image_key)}
        if self.spec.label_key and self.spec.label_key in example:
            record["label"] = int(example[self.spec.label_key])
        if self.spec.caption_key is not None:
            record["caption"] = example.get(self.spec.caption_key)
        else:
            name = self.names[record["label"]].replace("_", " ")
            record["caption"] = self.spec.caption_template.format(name)
        return record


def records(spec: TfdsSpec) -> grain.MapDataset:
    """The split as a random-access Grain MapDataset of record dicts (see the module docstring)."""
    source = open_source(spec)
    names = class_names(source, spec)
    to_record = ToRecord(source.dataset_info.features, spec, tuple(names) if names else None)
    return grain.MapDataset.source(source).map_with_index(to_record)


def load_eval_set(spec: TfdsSpec, tokenizer: Tokenizer, image_size: int, limit: int | None = None) -> dict:
    """A zero-shot evaluation set in memory, in split order, bad records left out::

    {"image": uint8 [N, S, S, 3], "tokens": int32 [N, L], "caption": [N] str,
     "label": int64 [N], "class_names": [C] str, "prompts": [C][1] str}

    ``prompts``: ``caption_template`` per class, for `evaluate.classifier_weights`.
    """
    source = open_source(spec)
    names = class_names(source, spec)
    ds = records(spec)
    decoder = pipeline.DecodeExample(tokenizer, image_size)
    images, tokens, captions, labels = [], [], [], []
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        record = ds[i]
        try:
            example = decoder(record)
        except skips.BadRecord:
            continue
        images.append(example["image"])
        tokens.append(example["tokens"])
        captions.append(skips.caption_text(record["caption"]))
        labels.append(record.get("label", -1))
    template = spec.caption_template
    return {
        "image": np.stack(images),
        "tokens": np.stack(tokens),
        "caption": captions,
        "label": np.asarray(labels, np.int64),
        "class_names": names,
        "prompts": [[template.format(n.replace("_", " "))] for n in names] if names else None,
    }
