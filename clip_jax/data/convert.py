"""Offline conversion of image-text data to ArrayRecord shards of `clip_jax.data.records`.

Inputs: webdataset tar shards (the img2dataset layout), an image folder with a
CSV/TSV/parquet table of captions, or a TFDS dataset (``tfds.data_source``); their
readers are in `clip_jax.data.convert_readers`. Each input is split into tasks,
one output shard per task, run by a multiprocessing pool. Every kept record::

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
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from clip_jax.data import captions, dedup, filters, provenance, records, skips, transforms


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
