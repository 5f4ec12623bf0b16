"""A command's outputs never damage what it was pointed at.

- `check_target`: before anything is written, refuses an output that is (or holds, or is
  inside) one of the command's inputs, and an existing non-empty output unless
  ``--overwrite`` was given;
- `staged_dir`: a local output directory is written under a temporary sibling name and
  renamed into place once complete (a crash leaves the old one, or none; never a half).
  On an object store every object is committed whole by its upload, so files are
  written in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator

from clip_jax import cli, storage


def _norm(path: str) -> str:
    if storage.is_remote(path):
        return path.rstrip("/")
    return os.path.realpath(path)


def overlaps(a: str, b: str) -> bool:
    """Whether one of the paths is, or lies inside, the other."""
    a, b = _norm(a), _norm(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def check_target(out: str, inputs: Iterable[str], overwrite: bool, flag: str = "--out") -> None:
    """Raises cli.UserError when writing ``out`` could destroy an input, or replace an existing
    non-empty file or directory and ``overwrite`` is False."""
    for source in inputs:
        if source and overlaps(out, source):
            raise cli.UserError(
                f"{flag}={out} would overwrite the command's input {source}; choose another {flag}"
            )
    if not storage.exists(out):
        return
    non_empty = storage.listdir(out) if storage.isdir(out) else storage.size(out) > 0
    if non_empty and not overwrite:
        raise cli.UserError(
            f"{flag}={out} exists and is not empty; choose another {flag} or pass --overwrite"
        )


@contextlib.contextmanager
def staged_dir(out: str) -> Iterator[str]:
    """Yields the directory to write into; on success it becomes ``out`` (replacing it)."""
    if storage.is_remote(out):
        storage.makedirs(out)
        yield out
        return
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(out):  # moved away first: os.replace cannot replace a non-empty directory
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)
