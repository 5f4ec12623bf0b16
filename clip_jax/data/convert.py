"""Offline conversion of image-text data to ArrayRecord shards of `clip_jax.data.records`.

Inputs: webdataset tar shards (the img2dataset layout), an image folder with a
CSV/TSV/parquet table of captions, or a TFDS dataset (``tfds.data_source``).
Each input is split into tasks, one output shard per task, run by a
multiprocessing pool. Every kept record::

    {"key": str, "image": JPEG bytes (RGB, short side <= size, quality 95),
     "caption": str, "label": int (optional)}

Bad inputs (see `clip_jax.data.skips`) are skipped and counted by reason; a
decode that runs past ``timeout_s`` is abandoned (reason ``timeout``).

Restartable: a shard is written under a private temporary name and renamed
when complete, after its stats sidecar (``.stats/SHARD.json``, which also records
its input and options: `clip_jax.data.provenance`); a rerun skips shards that
exist when made from the same input with the same options (anything else stops
the run unless ``overwrite``) and adds their saved stats to the summary, so an
interrupted conversion resumes where it stopped and never leaves a half shard
that looks finished. The summary (``PREFIX-stats.json``): records kept, skipped by
reason, bytes in and out, seconds and images per second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from clip_jax.data import bounded, captions, dedup, filters, provenance, records, skips, transforms


class Item(NamedTuple):
    """One input pair; ``bad``: a reason (of `skips.REASONS`) the reader already knows."""

    key: str
    image: bytes | np.ndarray | None  # encoded bytes, or uint8 [H, W, C] pixels (TFDS)
    caption: str | bytes | list | None  # a list: several captions (captions.record_fields)
    label: int | None = None
    bad: str | None = None
    detail: str | None = None  # for a bad one: what and where (a file, a tar member)


@dataclasses.dataclass(frozen=True)
class Options:
    size: int = 256  # the short side is reduced to this (never enlarged)
    quality: int = 95  # JPEG quality of the re-encoded image
    max_pixels: int = transforms.MAX_PIXELS
    timeout_s: float = 10.0  # per image: decode + resize + encode
    filters: filters.Filters = filters.Filters()
    dedup: bool = False  # drop exact (sha256) and re-encoded (dhash) copies (see clip_jax.data.dedup)
    near_dup_bits: int = 0  # dhashes this many bits apart are copies too (0: equal ones; at most 3)
    exclude: str | None = None  # a file of hashes (data_pipelines/eval_hashes.py): matches dropped


@dataclasses.dataclass(frozen=True)
class Task:
    """One output shard: ``read()`` yields its items (runs in a worker process)."""

    out_path: str
    read: Callable[[], Iterable[Item]]


def decode(data: bytes | np.ndarray, opts: Options) -> Image.Image:
    """Decodes robustly (or takes uint8 [H, W, C] pixels) to an RGB image."""
    if isinstance(data, np.ndarray):
        transforms.check_pixels((data.shape[1], data.shape[0]), opts.max_pixels)
        return transforms.to_rgb(Image.fromarray(data.squeeze(-1) if data.shape[-1] == 1 else data))
    return transforms.decode_image(data, opts.max_pixels)


def shrink_encode(img: Image.Image, opts: Options) -> bytes:
    """Reduces the short side to ``opts.size`` (bicubic, never enlarged), encodes JPEG."""
    w, h = img.size
    if min(w, h) > opts.size:
        scale = opts.size / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.quality)
    return buf.getvalue()


def reencode(data: bytes | np.ndarray, opts: Options) -> bytes:
    """`decode` then `shrink_encode`."""
    return shrink_encode(decode(data, opts), opts)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises BadRecord("timeout") after ``seconds`` (SIGALRM: only in a main thread, else no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise skips.BadRecord("timeout", f"image took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def prepare(item: Item, opts: Options) -> dict[str, Any]:
    """An input item -> a record; raises `skips.BadRecord`."""
    return prepare_hashed(item, opts)[0]


def prepare_hashed(item: Item, opts: Options, hashes: bool = False) -> tuple[dict[str, Any], dict | None]:
    """An input item -> (a record, its `dedup.image_hashes` when ``hashes`` else None), after the
    ``opts.filters``; raises `skips.BadRecord`. The one per-sample function of every converter."""
    if item.bad:
        raise skips.BadRecord(item.bad, item.detail or item.key)
    fields = filters.keep_captions(captions.record_fields(item.caption), opts.filters)
    with time_limit(opts.timeout_s):
        image = item.image if item.image is not None else b""
        img = decode(image, opts)
        filters.check_image(img.size, opts.filters)
        digest = dedup.image_hashes(image, img) if hashes else None
        record = {"key": item.key, "image": shrink_encode(img, opts), **fields}
    if item.label is not None:
        record["label"] = int(item.label)
    return record, digest


MAX_EXAMPLES = 5  # skipped records named per reason in the stats (which file, which member)


def new_stats() -> dict[str, Any]:
    return {
        "kept": 0,
        "skipped": {},
        "skipped_examples": {},
        "bytes_in": 0,
        "bytes_out": 0,
        "seconds": 0.0,
        "shards": 0,
    }


def merge(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    for field in ("kept", "bytes_in", "bytes_out", "seconds", "shards"):
        total[field] += part[field]
    for reason, n in part["skipped"].items():
        total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    for reason, names in part.get("skipped_examples", {}).items():
        kept = total["skipped_examples"].setdefault(reason, [])
        kept.extend(names[: MAX_EXAMPLES - len(kept)])
    return total


def stats_sidecar(shard: str) -> str:
    """``DIR/.stats/SHARD.json``: hidden, so a glob for the shards never matches it."""
    directory, name = os.path.split(shard)
    return os.path.join(directory, ".stats", name + ".json")


def run_task(task: Task, opts: Options, overwrite: bool = False) -> dict[str, Any]:
    """Writes one shard; returns its stats. A finished shard made from the same input with the
    same options is kept (another one raises `provenance.ShardMismatchError`, unless ``overwrite``)."""
    sidecar = stats_sidecar(task.out_path)
    source = provenance.describe(task.read, dataclasses.asdict(opts))
    if os.path.exists(task.out_path) and not overwrite:
        stats = provenance.finished_stats(task.out_path, sidecar, source)
        return {**stats, "seconds": 0.0, "resumed": True}
    stats, start = new_stats(), time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(task.out_path)), exist_ok=True)
    tmp = f"{task.out_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer = ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
    exclude = _load_exclude(opts.exclude) if opts.exclude else frozenset()
    seen = dedup.Seen(opts.near_dup_bits) if opts.dedup else None  # this shard's; Beam's: global
    try:
        for item in task.read():
            stats["bytes_in"] += item_size(item.image)
            try:
                record, digest = prepare_hashed(item, opts, hashes=opts.dedup or bool(exclude))
            except skips.BadRecord as e:
                count_skip(stats, e.reason, e.detail or item.key)
                continue
            if reason := dedup.drop_reason(digest, exclude, seen):
                count_skip(stats, reason, item.key)
                continue
            data = records.encode(record)
            writer.write(data)
            stats["kept"] += 1
            stats["bytes_out"] += len(data)
    finally:
        writer.close()
    stats.update(seconds=time.perf_counter() - start, shards=1)
    os.makedirs(os.path.dirname(sidecar), exist_ok=True)
    records.write_atomically(sidecar, json.dumps({**stats, "source": source}).encode())
    os.replace(tmp, task.out_path)  # last: the shard exists only when complete
    return stats


_load_exclude = functools.lru_cache(maxsize=4)(dedup.load_exclude)  # once per worker process


def count_skip(stats: dict[str, Any], reason: str, detail: str) -> None:
    """Counts a dropped record under ``reason``, naming the first few."""
    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
    if len(examples := stats["skipped_examples"].setdefault(reason, [])) < MAX_EXAMPLES:
        examples.append(detail)


def item_size(image: bytes | np.ndarray | None) -> int:
    """The input bytes of an item's image (encoded bytes or pixels)."""
    return 0 if image is None else image.nbytes if isinstance(image, np.ndarray) else len(image)


def _run_one(args: tuple[Task, Options, bool]) -> dict[str, Any]:
    return run_task(*args)


def _check_strays(tasks: list[Task], overwrite: bool) -> None:
    """Shards of the same prefix this run does not write (another shard count) would be mixed
    in by a glob: an error, or with ``overwrite`` removed."""
    strays = provenance.stray_shards([t.out_path for t in tasks])
    if strays and not overwrite:
        raise provenance.ShardMismatchError(
            f"{len(strays)} shards of an earlier conversion with another shard count are in the output "
            f"directory ({', '.join(os.path.basename(p) for p in strays[:3])}); delete them, write to "
            "another --out_dir, or rerun with --overwrite"
        )
    for path in strays:
        print(f"--overwrite: removing {path}, a shard of an earlier conversion", flush=True)
        os.remove(path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(stats_sidecar(path))


def run(
    tasks: list[Task], opts: Options, num_processes: int, summary_path: str, overwrite: bool = False
) -> dict[str, Any]:
    """Runs ``tasks`` on a pool of ``num_processes`` with a progress bar; writes and returns the summary.

    ``overwrite``: rewrite finished shards and remove other shards of the prefix, instead of
    stopping at one that another input or other options made.
    """
    from tqdm import tqdm  # a converter dependency only

    _check_strays(tasks, overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    total, resumed, start = new_stats(), 0, time.perf_counter()
    bar = tqdm(total=len(tasks), unit="shard", desc="converting")
    with contextlib.ExitStack() as stack:
        if num_processes > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(num_processes))
            results = pool.imap_unordered(_run_one, [(t, opts, overwrite) for t in tasks])
        else:
            results = (run_task(t, opts, overwrite) for t in tasks)
        for stats in results:
            resumed += bool(stats.pop("resumed", False))
            stats.pop("source", None)
            merge(total, stats)
            bar.update(1)
            bar.set_postfix(kept=total["kept"], skipped=sum(total["skipped"].values()))
    bar.close()
    wall = time.perf_counter() - start
    done = total["kept"] + sum(total["skipped"].values())
    total.update(
        wall_seconds=round(wall, 3),
        shards_resumed=resumed,
        images_per_sec=round(done / wall, 1) if wall and resumed < len(tasks) else None,
        options=dataclasses.asdict(opts),
    )
    records.write_atomically(summary_path, json.dumps(total, indent=2).encode())
    return total


def summary_line(stats: dict[str, Any]) -> str:
    skipped = ", ".join(f"{r} {n}" for r, n in sorted(stats["skipped"].items())) or "none"
    return (
        f"kept {stats['kept']:,}; skipped {sum(stats['skipped'].values()):,} ({skipped}); "
        f"{stats['bytes_in'] / 1e6:.1f} MB in, {stats['bytes_out'] / 1e6:.1f} MB out; "
        f"{stats['shards']} shards ({stats['shards_resumed']} already done); "
        f"{stats['wall_seconds']:.1f} s, {stats['images_per_sec']} images/s"
    )


# Sources ------------------------------------------------------------------------


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
