"""The on-disk record format: ArrayRecord files of msgpack-encoded dicts.

One record::

    {"key": str, "image": bytes (encoded JPEG/PNG/WebP), "caption": str,
     "label": int (optional), "labels": {name: int} (optional)}

Converters in ``data_pipelines/`` and the synthetic-scenes generator write this
format; the Grain pipeline reads it with random access.
"""

from __future__ import annotations

import collections
import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grain
import msgpack
from array_record.python.array_record_module import ArrayRecordWriter

from clip_jax import cli, storage

# One record per chunk: fastest random access for a globally shuffled read.
WRITER_OPTIONS = "group_size:1"


class ShardError(cli.UserError, ValueError):
    """A shard that cannot serve (not an ArrayRecord file, records without a needed field); names it."""


class NoFilesError(cli.UserError, FileNotFoundError):
    """A glob that matches nothing; the message names the flag or config field."""


def encode(record: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(record), use_bin_type=True)


def decode(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False)


def shard_paths(prefix: str, num_shards: int) -> list[str]:
    """``prefix-00000-of-00004.array_record`` ... (the naming TFDS uses)."""
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def write_shards(records: Iterable[Mapping[str, Any]], prefix: str, num_shards: int) -> list[str]:
    """Writes records round-robin into ``num_shards`` files; returns their paths.

    Each file is written under a temporary name of its own and renamed when
    complete, so an interrupted write never leaves a file that looks finished,
    and processes writing the same (deterministic) files at once do not clash.
    """
    paths = shard_paths(prefix, num_shards)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writers = [ArrayRecordWriter(p + tmp, WRITER_OPTIONS) for p in paths]
    try:
        for i, record in enumerate(records):
            writers[i % num_shards].write(encode(record))
    finally:
        for w in writers:
            w.close()
    for p in paths:
        os.replace(p + tmp, p)
    return paths


def write_atomically(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a private temporary file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def expand(pattern: str, field: str) -> list[str]:
    """Sorted files matching a glob (or a comma-separated list of globs).

    ``field`` names the config entry in the error raised when nothing matches.
    """
    files = sorted(f for part in pattern.split(",") for f in storage.glob(part.strip()))
    if not files:
        raise NoFilesError(f"{field}={pattern!r} matches no files")
    return files


def open_shard(path: str) -> grain.sources.ArrayRecordDataSource:
    """Random access to the records of one ArrayRecord file; `ShardError` naming it when it is not one
    (a text file, a tar, a file cut short)."""
    try:
        return grain.sources.ArrayRecordDataSource([path])
    except (RuntimeError, OSError) as e:  # array_record's C++ reader raises RuntimeError
        raise ShardError(f"{path} is not an ArrayRecord shard ({str(e).splitlines()[0][:120]})") from None


def read_shard(path: str, skipped: collections.Counter) -> Iterator[tuple[int, dict]]:
    """(index, record) of each record of the shard ``path`` that decodes to a map. A corrupt one
    is reported on stderr (``path#index``), counted in ``skipped["decode_error"]`` and skipped."""
    source = open_shard(path)
    for i in range(len(source)):
        try:
            record = decode(source[i])
        except Exception as e:  # corrupt msgpack raises any of several exception types
            record = e
        if not isinstance(record, dict):
            print(f"skipped {path}#{i}: corrupt record ({type(record).__name__})", file=sys.stderr)
            skipped["decode_error"] += 1
            continue
        yield i, record


def read_all(files: Iterable[str], skipped: collections.Counter | None = None) -> list[dict]:
    """Every record of ``files`` that decodes (small evaluation sets); corrupt ones reported on stderr,
    counted in ``skipped`` and left out."""
    skipped = collections.Counter() if skipped is None else skipped
    return [record for path in files for _, record in read_shard(path, skipped)]
