"""The converters' inputs: readers that yield `convert.Item` s, and the tasks made of them.

Three inputs, each split into picklable readers (one output shard each, run in a
worker process by `clip_jax.data.convert.run`, or one unit of work on Beam:
`clip_jax.data.beam_convert`): webdataset tar shards (`TarReader`, one per shard), an
image folder with a CSV/TSV/parquet caption table (`FolderReader`, one per chunk of
rows), and a TFDS dataset (`TfdsReader`, one per index range of
``tfds.data_source``). Tar members and image files are read bounded
(`clip_jax.data.bounded`) and timed (`convert.time_limit`); a bad input is an item
marked with its reason (`clip_jax.data.skips`), counted by the converter, not an
error. Each reader's ``describe()`` names its input for the shard's provenance
(`clip_jax.data.provenance`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

from clip_jax.data import bounded, captions, provenance, records, skips
from clip_jax.data.convert import Item, Task, time_limit

# Webdataset tar shards ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TarReader:
    """The items of one webdataset tar shard; a member cut short is marked ``truncated``, one
    over ``max_bytes`` ``too_large``; a sample read past ``timeout_s`` ends the shard (``timeout``).
    Raises `bounded.BadShard` for a shard with no samples (empty, compressed, not a tar)."""

    path: str
    max_bytes: int = bounded.MAX_MEMBER_BYTES
    timeout_s: float = 60.0

    def describe(self) -> dict[str, Any]:
        return provenance.file_identity(self.path)

    def __call__(self) -> Iterator[Item]:
        from clip_jax.data import webdataset  # imports the Grain pipeline; only needed here

        samples, count = webdataset.iter_tar_file(self.path, self.max_bytes), 0
        while True:
            try:
                with time_limit(self.timeout_s):
                    sample = next(samples, None)
            except skips.BadRecord as e:  # the stream stalled: what is left of it is lost
                yield Item(f"{self.path}#{count}", None, None, None, e.reason, f"{self.path}: {e.detail}")
                return
            if sample is None:
                break
            count += 1
            label = sample.get("cls")
            label = int(label) if label and not sample["bad"] else None
            bad, detail = sample["bad"], sample.get("detail")
            caption = captions.from_webdataset(sample["caption"], sample["json"])
            yield Item(sample["key"], sample["image"], caption, label, bad, detail)
        if not count:
            raise bounded.BadShard(f"{self.path}: an empty tar shard (no samples)")


def webdataset_tasks(shards: list[str], out_dir: str, prefix: str, **reader: Any) -> list[Task]:
    """One task per tar shard, written to ``OUT_DIR/PREFIX-i-of-n.array_record``
    (``reader``: `TarReader`'s ``max_bytes``, ``timeout_s``)."""
    paths = records.shard_paths(os.path.join(out_dir, prefix), len(shards))
    return [Task(out, TarReader(src, **reader)) for src, out in zip(shards, paths, strict=True)]


# Image folder + caption table ---------------------------------------------------------


def read_table(path: str) -> list[dict[str, Any]]:
    """Rows of a .csv, .tsv or .parquet file as dicts (parquet needs pyarrow)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise bounded.BadShard(f"{path}: not a parquet table ({str(e)[:120]})") from None
    import csv

    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    except (OSError, csv.Error) as e:
        raise bounded.BadShard(f"{path}: cannot read the table ({e.strerror or e})") from None


@dataclasses.dataclass(frozen=True)
class FolderReader:
    """Items of ``rows`` ((key, image name, caption, label)), each image ``root/name`` read by
    `bounded.read_bytes` (local or ``gs://``) within ``timeout_s``. A bad one is marked: ``missing_image``,
    ``not_regular_file``, ``too_large``, ``timeout``, or ``outside_root`` (``../``, absolute,
    a symlink out of ``root``) unless ``allow_outside_root``."""

    rows: tuple[tuple[str, str, Any, int | None], ...]
    root: str = "."
    max_bytes: int = bounded.MAX_MEMBER_BYTES
    timeout_s: float = 60.0
    allow_outside_root: bool = False

    def describe(self) -> dict[str, Any]:
        return provenance.rows_identity(self.rows)

    def __call__(self) -> Iterator[Item]:
        for key, name, caption, label in self.rows:
            try:
                with time_limit(self.timeout_s):  # a stalled file system counts as a timeout
                    path = bounded.resolve(self.root, name, self.allow_outside_root)
                    item = Item(key, bounded.read_bytes(path, self.max_bytes), caption, label)
            except skips.BadRecord as e:
                item = Item(key, None, caption, label, e.reason, e.detail)
            yield item


def folder_tasks(table: str, image_dir: str, out_dir: str, prefix: str, *args: Any, **kw: Any) -> list[Task]:
    """Tasks for an image folder and a caption table, one output shard per `folder_readers`
    chunk (``args``, ``kw``: its arguments after ``image_dir``)."""
    readers = folder_readers(table, image_dir, *args, **kw)
    paths = records.shard_paths(os.path.join(out_dir, prefix), len(readers))
    return [Task(out, read) for read, out in zip(readers, paths, strict=True)]


def folder_readers(
    table: str,
    image_dir: str,
    rows_per_shard: int = 10_000,
    image_column: str = "file",
    caption_column: str | Sequence[str] = "caption",
    label_column: str | None = None,
    merge_rows: bool = False,
    **reader: Any,
) -> list[FolderReader]:
    """Readers for an image folder and a caption table, ``rows_per_shard`` rows each
    (``reader``: `FolderReader`'s ``max_bytes``, ``timeout_s``, ``allow_outside_root``).

    Several ``caption_column`` s (COCO-style tables): every non-blank one is kept
    (``captions``). ``merge_rows``: rows naming the same image are one record with all
    their captions (tables with one row per caption), in table order.
    """
    rows = read_table(table)
    columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    if not rows or image_column not in rows[0] or any(c not in rows[0] for c in columns):
        has = f"columns {list(rows[0])[:5]}" if rows else "no rows"
        raise bounded.BadShard(
            f"{table}: {has}; a caption table (.csv/.tsv/.parquet) has a header with columns "
            f"{image_column!r} and {columns} (--image_column, --caption_column) and rows"
        )
    items, where = [], {}
    for i, row in enumerate(rows):
        label = row.get(label_column) if label_column else None
        name = str(row[image_column])
        key = os.path.splitext(name)[0] or str(i)
        caption = row[columns[0]] if len(columns) == 1 else captions.for_table([row[c] for c in columns])
        if merge_rows and name in where:
            items[where[name]][2].extend(caption if isinstance(caption, list) else [caption])
            continue
        where[name] = len(items)
        caption = caption if len(columns) > 1 or not merge_rows else [caption]
        items.append((key, name, caption, int(label) if label not in (None, "") else None))
    chunks = [tuple(items[i : i + rows_per_shard]) for i in range(0, len(items), rows_per_shard)]
    return [FolderReader(chunk, image_dir, **reader) for chunk in chunks]


# TFDS ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TfdsReader:
    """Examples [start, stop) of ``tfds.data_source(name, split)``; a caption from
    ``caption_key``, or ``template`` filled with the name of the ``label_key`` class."""

    name: str
    split: str
    data_dir: str | None
    start: int
    stop: int
    image_key: str = "image"
    caption_key: str | None = None
    label_key: str | None = "label"
    template: str = "a photo of a {}."

    def describe(self) -> dict[str, Any]:
        return {"tfds": dataclasses.asdict(self)}

    def __call__(self) -> Iterator[Item]:
        import tensorflow_datasets as tfds

        source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        names = None
        if self.caption_key is None:
            names = source.dataset_info.features[self.label_key].names
        for i in range(self.start, self.stop):
            example = source[i]
            label = int(example[self.label_key]) if self.label_key else None
            if self.caption_key is not None:
                caption = example.get(self.caption_key)
            else:
                caption = self.template.format(names[label].replace("_", " "))
            yield Item(f"{self.name}-{self.split}-{i}", example.get(self.image_key), caption, label)


def tfds_tasks(name: str, split: str, out_dir: str, prefix: str, data_dir=None, per_shard=10_000, **kw):
    """Tasks over ``tfds.data_source(name, split)``, one output shard per `tfds_readers` range."""
    readers = tfds_readers(name, split, data_dir, per_shard, **kw)
    paths = records.shard_paths(os.path.join(out_dir, prefix), len(readers))
    return [Task(out, read) for read, out in zip(readers, paths, strict=True)]


def tfds_readers(name: str, split: str, data_dir=None, per_shard=10_000, **kw) -> list[TfdsReader]:
    """Readers of ``tfds.data_source(name, split)`` by index ranges, ``per_shard`` examples
    each (``kw``: `TfdsReader`'s fields)."""
    import tensorflow_datasets as tfds

    count = len(tfds.data_source(name, split=split, data_dir=data_dir))
    return [
        TfdsReader(name, split, data_dir, s, min(s + per_shard, count), **kw)
        for s in range(0, count, per_shard)
    ]
