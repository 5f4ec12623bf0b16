"""The training iterator of ``config.data``: each ``format`` (array_record, webdataset, tfds)
or a weighted mixture of sources, read by its own module."""

from __future__ import annotations

from collections.abc import Sequence

import grain

from clip_jax.data import mixture, pipeline, skips, tfds_source, webdataset
from clip_jax.data.tokenizer import Tokenizer


def from_config(
    data_config,
    files: Sequence[str],
    tokenizer: Tokenizer,
    image_size: int,
    local_batch_size: int,
    counter: skips.SkipCounter,
    sources: Sequence[mixture.Source] = (),
) -> grain.DatasetIterator:
    """The training iterator ``config.data`` describes (``format``: one of `pipeline.FORMATS`).

    ``files``: the ArrayRecord or tar files; for "tfds" the split named in
    ``config.data`` is read (``files`` only name it in the checkpoint fingerprint).
    ``sources``: a weighted mixture (``config.data.sources``, resolved); then ``files``
    is not read.
    """
    crop = None
    if data_config.random_crop:
        crop = pipeline.Crop(tuple(data_config.crop_scale), tuple(data_config.crop_ratio))
    common = dict(
        tokenizer=tokenizer,
        image_size=image_size,
        local_batch_size=local_batch_size,
        seed=data_config.shuffle_seed,
        num_workers=data_config.num_workers,
        crop=crop,
        counter=counter,
        stall_timeout_s=data_config.stall_timeout_s,
        reduced_decode=data_config.get("reduced_decode", True),
        canvas_size=data_config.get("canvas_size", 0),
    )
    if sources:
        return pipeline.train_iterator(list(sources), **common)
    field = data_config.get("caption_field")
    if data_config.format == "array_record":
        return pipeline.train_iterator([mixture.Source("train", tuple(files), caption_field=field)], **common)
    if data_config.format == "webdataset":
        limit = data_config.get("max_member_bytes")
        return webdataset.train_iterator(
            files, shuffle_buffer=data_config.shuffle_buffer, max_member_bytes=limit, **common
        )
    if data_config.format == "tfds":
        return pipeline.train_iterator(
            tfds_source.records(tfds_source.TfdsSpec.from_config(data_config)), **common
        )
    raise ValueError(f"config.data.format={data_config.format!r}: use one of {list(pipeline.FORMATS)}")
