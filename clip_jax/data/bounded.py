"""Bounded reads of files others made: a size ceiling, regular files only, paths kept inside a root.

A table row or a tar member names what to read, and a crafted one can name
``/dev/zero`` (endless), a FIFO (blocks forever), a device, a path outside the
data (``../../etc/passwd``, ``/home/...``) or a member that claims gigabytes.
Each read here answers such a record with `skips.BadRecord` (counted and
skipped, its detail naming the path) before it allocates or blocks; a shard
that is not a plain tar at all is `BadShard`, an error naming the file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from clip_jax import cli, storage
from clip_jax.data import skips

MAX_MEMBER_BYTES = 64 * 2**20  # an image, caption or metadata member larger than this is skipped
MAX_LINE_BYTES = 2**20  # a line of a JSON-lines file (a metrics row is a few hundred bytes)

# Magic bytes of the compressions a shard may arrive in; the readers take plain tar only.
COMPRESSED = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
)


class BadShard(cli.UserError):
    """A shard that cannot hold samples as given (compressed, empty, not a tar); names the file."""


def compression(head: bytes) -> str | None:
    """The compression ``head`` (a file's first bytes) starts with, or None."""
    return next((name for magic, name in COMPRESSED if head.startswith(magic)), None)


def inside(path: str, root: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def resolve(root: str, name: str, allow_outside: bool = False) -> str:
    """``root/name``; raises `skips.BadRecord` ``outside_root`` when it resolves outside ``root``
    (``../``, an absolute path, a symlink out), unless ``allow_outside``."""
    path = os.path.join(root, name)
    if storage.is_remote(root):  # an object store: no symlinks, only the name can leave root
        parts = name.replace("\\", "/").split("/")
        if not allow_outside and (name.startswith("/") or ".." in parts or "://" in name):
            raise skips.BadRecord("outside_root", f"{name!r} is outside {root}")
        return path
    if not allow_outside and not inside(path, root):
        raise skips.BadRecord("outside_root", f"{name!r} is outside {root}")
    return path


def read_file(path: str, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes``.

    Raises `skips.BadRecord`: ``missing_image`` (cannot be opened), ``not_regular_file``
    (a FIFO, device, directory, socket: opened without blocking, never read),
    ``too_large`` (over ``max_bytes``, by its size or by what it yields).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        reason = "not_regular_file" if e.errno == errno.ENXIO else "missing_image"
        raise skips.BadRecord(reason, f"{path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise skips.BadRecord("not_regular_file", path)
        if info.st_size > max_bytes:
            raise skips.BadRecord("too_large", f"{path}: {info.st_size} bytes > {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # a file that grew since fstat still stops here
    except OSError as e:
        raise skips.BadRecord("missing_image", f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise skips.BadRecord("too_large", f"{path}: over {max_bytes} bytes")
    return data


def read_bytes(path: str, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
    """`read_file` for a local path; a ``gs://`` object is read whole only when its listed size
    is at most ``max_bytes`` (``too_large`` otherwise)."""
    if not storage.is_remote(path):
        return read_file(path, max_bytes)
    try:
        size = storage.size(path)
    except (FileNotFoundError, OSError) as e:
        raise skips.BadRecord("missing_image", f"{path}: {e}") from None
    if size > max_bytes:
        raise skips.BadRecord("too_large", f"{path}: {size} bytes > {max_bytes}")
    return storage.read_bytes(path)


def lines(path: str, max_line_bytes: int = MAX_LINE_BYTES, chunk: int = 2**20) -> Iterator[bytes]:
    """The lines of ``path`` (local or ``gs://``), streamed: a file of any length is read in
    ``chunk``-byte pieces, and a line longer than ``max_line_bytes`` (a file that is no
    JSON lines, or a crafted one) raises `BadShard` naming the file instead of filling memory."""
    pending = b""
    with storage.open_file(path, "rb") as f:
        while piece := f.read(chunk):
            *complete, pending = (pending + piece).split(b"\n")
            if any(len(line) > max_line_bytes for line in complete) or len(pending) > max_line_bytes:
                raise BadShard(f"{path}: a line over {max_line_bytes} bytes; not clip_jax JSON lines")
            yield from complete
    if pending:
        yield pending
