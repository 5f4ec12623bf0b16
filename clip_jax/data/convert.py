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
when complete, after its stats sidecar (``.stats/SHARD.json``); a rerun skips
shards that exist and adds their saved stats to the summary, so an interrupted
conversion resumes where it stopped and never leaves a half shard that looks
finished. The summary (``PREFIX-stats.json``): records kept, skipped by
reason, bytes in and out, seconds and images per second.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from clip_jax.data import captions, records, skips, transforms


class Item(NamedTuple):
    """One input pair; ``bad``: a reason (of `skips.REASONS`) the reader already knows."""

    key: str
    image: bytes | np.ndarray | None  # encoded bytes, or uint8 [H, W, C] pixels (TFDS)
    caption: str | bytes | list | None  # a list: several captions (captions.record_fields)
    label: int | None = None
    bad: str | None = None


@dataclasses.dataclass(frozen=True)
class Options:
    size: int = 256  # the short side is reduced to this (never enlarged)
    quality: int = 95  # JPEG quality of the re-encoded image
    max_pixels: int = transforms.MAX_PIXELS
    timeout_s: float = 10.0  # per image: decode + resize + encode


@dataclasses.dataclass(frozen=True)
class Task:
    """One output shard: ``read()`` yields its items (runs in a worker process)."""

    out_path: str
    read: Callable[[], Iterable[Item]]


def reencode(data: bytes | np.ndarray, opts: Options) -> bytes:
    """Decodes robustly (or takes uint8 [H, W, C] pixels), reduces the short side to
    ``opts.size`` (bicubic), encodes JPEG."""
    if isinstance(data, np.ndarray):
        transforms.check_pixels((data.shape[1], data.shape[0]), opts.max_pixels)
        img = transforms.to_rgb(Image.fromarray(data.squeeze(-1) if data.shape[-1] == 1 else data))
    else:
        img = transforms.decode_image(data, opts.max_pixels)
    w, h = img.size
    if min(w, h) > opts.size:
        scale = opts.size / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.quality)
    return buf.getvalue()


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
    if item.bad:
        raise skips.BadRecord(item.bad, item.key)
    caption = captions.record_fields(item.caption)
    with time_limit(opts.timeout_s):
        image = item.image if item.image is not None else b""
        record = {"key": item.key, "image": reencode(image, opts), **caption}
    if item.label is not None:
        record["label"] = int(item.label)
    return record


def new_stats() -> dict[str, Any]:
    return {"kept": 0, "skipped": {}, "bytes_in": 0, "bytes_out": 0, "seconds": 0.0, "shards": 0}


def merge(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    for field in ("kept", "bytes_in", "bytes_out", "seconds", "shards"):
        total[field] += part[field]
    for reason, n in part["skipped"].items():
        total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    return total


def stats_sidecar(shard: str) -> str:
    """``DIR/.stats/SHARD.json``: hidden, so a glob for the shards never matches it."""
    directory, name = os.path.split(shard)
    return os.path.join(directory, ".stats", name + ".json")


def run_task(task: Task, opts: Options) -> dict[str, Any]:
    """Writes one shard (skipped when it already exists); returns its stats."""
    sidecar = stats_sidecar(task.out_path)
    if os.path.exists(task.out_path):
        if os.path.exists(sidecar):
            with open(sidecar) as f:
                return {**json.load(f), "seconds": 0.0, "resumed": True}
        return {**new_stats(), "shards": 1, "resumed": True}
    stats, start = new_stats(), time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(task.out_path)), exist_ok=True)
    tmp = f"{task.out_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer = ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
    try:
        for item in task.read():
            stats["bytes_in"] += _size(item.image)
            try:
                data = records.encode(prepare(item, opts))
            except skips.BadRecord as e:
                stats["skipped"][e.reason] = stats["skipped"].get(e.reason, 0) + 1
                continue
            writer.write(data)
            stats["kept"] += 1
            stats["bytes_out"] += len(data)
    finally:
        writer.close()
    stats.update(seconds=time.perf_counter() - start, shards=1)
    os.makedirs(os.path.dirname(sidecar), exist_ok=True)
    records.write_atomically(sidecar, json.dumps(stats).encode())
    os.replace(tmp, task.out_path)  # last: the shard exists only when complete
    return stats


def _size(image: bytes | np.ndarray | None) -> int:
    return 0 if image is None else image.nbytes if isinstance(image, np.ndarray) else len(image)


def _run_one(args: tuple[Task, Options]) -> dict[str, Any]:
    return run_task(*args)


def run(tasks: list[Task], opts: Options, num_processes: int, summary_path: str) -> dict[str, Any]:
    """Runs ``tasks`` on a pool of ``num_processes`` with a progress bar; writes and returns the summary."""
    from tqdm import tqdm  # a converter dependency only

    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    total, resumed, start = new_stats(), 0, time.perf_counter()
    bar = tqdm(total=len(tasks), unit="shard", desc="converting")
    with contextlib.ExitStack() as stack:
        if num_processes > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(num_processes))
            results = pool.imap_unordered(_run_one, [(t, opts) for t in tasks])
        else:
            results = (run_task(t, opts) for t in tasks)
        for stats in results:
            resumed += bool(stats.pop("resumed", False))
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
    """The items of one webdataset tar shard; a member cut short is marked ``truncated``."""

    path: str

    def __call__(self) -> Iterator[Item]:
        from clip_jax.data import webdataset  # imports the Grain pipeline; only needed here

        for sample in webdataset.iter_tar_file(self.path):
            label = sample.get("cls")
            label = int(label) if label and not sample["bad"] else None
            caption = captions.from_webdataset(sample["caption"], sample["json"])
            yield Item(sample["key"], sample["image"], caption, label, sample["bad"])


def webdataset_tasks(shards: list[str], out_dir: str, prefix: str) -> list[Task]:
    """One task per tar shard, written to ``OUT_DIR/PREFIX-i-of-n.array_record``."""
    paths = records.shard_paths(os.path.join(out_dir, prefix), len(shards))
    return [Task(out, TarReader(src)) for src, out in zip(shards, paths, strict=True)]


# Image folder + caption table ---------------------------------------------------------


def read_table(path: str) -> list[dict[str, Any]]:
    """Rows of a .csv, .tsv or .parquet file as dicts (parquet needs pyarrow)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))


@dataclasses.dataclass(frozen=True)
class FolderReader:
    """Items of ``rows`` ((key, image path, caption, label)); a missing file is ``missing_image``."""

    rows: tuple[tuple[str, str, Any, int | None], ...]

    def __call__(self) -> Iterator[Item]:
        for key, path, caption, label in self.rows:
            try:
                with open(path, "rb") as f:
                    yield Item(key, f.read(), caption, label)
            except OSError:
                yield Item(key, None, caption, label, "missing_image")


def folder_tasks(
    table: str,
    image_dir: str,
    out_dir: str,
    prefix: str,
    rows_per_shard: int = 10_000,
    image_column: str = "file",
    caption_column: str | Sequence[str] = "caption",
    label_column: str | None = None,
    merge_rows: bool = False,
) -> list[Task]:
    """Tasks for an image folder and a caption table, ``rows_per_shard`` rows per output shard.

    Several ``caption_column`` s (COCO-style tables): every non-blank one is kept
    (``captions``). ``merge_rows``: rows naming the same image are one record with all
    their captions (tables with one row per caption), in table order.
    """
    rows = read_table(table)
    columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    if rows and (image_column not in rows[0] or any(c not in rows[0] for c in columns)):
        raise KeyError(f"{table} needs columns {image_column!r} and {columns}; has {list(rows[0])}")
    items, where = [], {}
    for i, row in enumerate(rows):
        label = row.get(label_column) if label_column else None
        path = os.path.join(image_dir, str(row[image_column]))
        key = os.path.splitext(str(row[image_column]))[0] or str(i)
        caption = row[columns[0]] if len(columns) == 1 else captions.for_table([row[c] for c in columns])
        if merge_rows and path in where:
            items[where[path]][2].extend(caption if isinstance(caption, list) else [caption])
            continue
        where[path] = len(items)
        caption = caption if len(columns) > 1 or not merge_rows else [caption]
        items.append((key, path, caption, int(label) if label not in (None, "") else None))
    chunks = [tuple(items[i : i + rows_per_shard]) for i in range(0, len(items), rows_per_shard)]
    paths = records.shard_paths(os.path.join(out_dir, prefix), len(chunks))
    return [Task(out, FolderReader(chunk)) for chunk, out in zip(chunks, paths, strict=True)]


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
    """Tasks over ``tfds.data_source(name, split)``, ``per_shard`` examples each (``kw``: `TfdsReader`)."""
    import tensorflow_datasets as tfds

    count = len(tfds.data_source(name, split=split, data_dir=data_dir))
    starts = list(range(0, count, per_shard))
    paths = records.shard_paths(os.path.join(out_dir, prefix), len(starts))
    return [
        Task(out, TfdsReader(name, split, data_dir, s, min(s + per_shard, count), **kw))
        for s, out in zip(starts, paths, strict=True)
    ]
