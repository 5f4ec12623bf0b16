"""What a converted shard was made from, so a rerun never keeps shards of another input.

Each finished shard's sidecar (``DIR/.stats/SHARD.json``, see `clip_jax.data.convert`)
records, next to its stats, ``source``: its input (file name, size and mtime; a hash of
a table's rows and their images' sizes and mtimes; a TFDS slice) and the conversion
options. A rerun resumes a shard only when both are the same; otherwise it stops,
naming the shard and the fix (``--overwrite``). Shards of the same prefix that the
rerun would not write (another shard count) are named too: a glob would mix them in.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any

from clip_jax import cli, storage

_SHARD = re.compile(r"^(?P<prefix>.*)-\d{5}-of-\d{5}\.array_record$")


class ShardMismatchError(cli.UserError):
    """An existing output shard was made from another input or with other options."""


def file_identity(path: str) -> dict[str, Any]:
    """{"name", "size", "mtime"} of an input file (mtime only for local files)."""
    identity = {"name": os.path.basename(path.rstrip("/")), "size": storage.size(path)}
    if not storage.is_remote(path):
        identity["mtime"] = int(os.stat(path).st_mtime)
    return identity


def rows_identity(rows) -> dict[str, Any]:
    """A hash of a table's rows (key, image path, caption, label) and their images' sizes and mtimes."""
    digest = hashlib.sha256()
    for key, path, caption, label in rows:
        try:
            stat = os.stat(path)
            found = [stat.st_size, int(stat.st_mtime)]
        except OSError:
            found = None
        digest.update(json.dumps([key, os.path.basename(path), str(caption), label, found]).encode())
    return {"rows": len(rows), "sha256": digest.hexdigest()}


def describe(read, options: dict[str, Any]) -> dict[str, Any]:
    """The ``source`` of a shard made by ``read`` (a reader with a ``describe()``) with ``options``."""
    identity = getattr(read, "describe", None)
    return {"input": identity() if identity else None, "options": options}


def finished_stats(shard: str, sidecar: str, source: dict[str, Any]) -> dict[str, Any]:
    """The stats recorded for the finished ``shard``, once its ``source`` matches; else raises
    ShardMismatchError naming the shard and the fix."""
    fix = "delete it, write to another --out_dir, or rerun with --overwrite"
    try:
        with open(sidecar) as f:
            recorded = json.load(f)
    except (FileNotFoundError, ValueError):
        raise ShardMismatchError(
            f"{shard} exists but {sidecar} does not say what it was made from; {fix}"
        ) from None
    saved = recorded.pop("source", None)
    if saved != source:
        parts = [p for p in ("input", "options") if (saved or {}).get(p) != source[p]] or ["source"]
        was = {p: (saved or {}).get(p) for p in parts}
        now = {p: source[p] for p in parts}
        raise ShardMismatchError(
            f"{shard} was made with another {' and '.join(parts)} ({was} -> {now}); {fix}"
        )
    return recorded


def stray_shards(out_paths: list[str]) -> list[str]:
    """Existing shards with the prefix of ``out_paths`` that are not among them (another count)."""
    prefixes = {m.group("prefix") for p in out_paths if (m := _SHARD.match(p))}
    wanted = {os.path.abspath(p) for p in out_paths}
    found = set()
    for prefix in prefixes:
        found |= {os.path.abspath(p) for p in glob.glob(f"{glob.escape(prefix)}-*-of-*.array_record")}
    return sorted(p for p in found - wanted if _SHARD.match(p))
