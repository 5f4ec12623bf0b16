"""Where a run's files live: local paths and object stores (``gs://bucket/run``) alike.

A workdir may be a local directory or a ``gs://`` prefix. orbax writes the
checkpoint arrays itself (tensorstore speaks GCS); every other file of a run
(config.json, tokenizer, metrics.jsonl, eval results, checksum manifests,
exports) goes through these helpers, built on ``etils.epath`` (fsspec/gcsfs for
``gs://``). What an object store does differently is handled here, not at the
call sites:

- no append: `JsonLines` rewrites the whole object (GCS would silently
  overwrite on append; gcsfs only warns);
- no directories: making one is a no-op, a "directory" exists once it holds
  an object, and moving one moves its objects one by one;
- whole-object writes are atomic (the upload commits on close), local writes
  go through a temporary file and ``os.replace``;
- listings are cached by gcsfs; files written by tensorstore bypass that
  cache, so listings used for integrity checks are taken fresh;
- the store keeps a checksum of every object: `file_fingerprints` reads it
  from one listing instead of downloading the files again.

Training data is not read from here: ArrayRecord reads local files only, so a
dataset in a bucket is mounted with gcsfuse (README), or streamed as webdataset
tar shards (`clip_jax.data.webdataset` opens ``gs://`` shards through `open`).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import shutil
from typing import IO, Any

from etils import epath
from etils.epath import backend as epath_backend

from clip_jax import cli


class BadFileError(cli.UserError, ValueError):
    """A file that is not what it should be (corrupt JSON, ...); the message names it."""


class MissingFileError(cli.UserError, FileNotFoundError):
    """A file that should be there and is not; the message names it."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs (``gs://...``, ``s3://...``), False for local paths."""
    return "://" in os.fspath(path)


def absolute(path: str) -> str:
    """An absolute local path; URLs unchanged."""
    return path if is_remote(path) else os.path.abspath(path)


def _path(path: str) -> epath.Path:
    """epath's Path; for a URL, with the listing cache dropped (questions get fresh answers)."""
    if is_remote(path):
        _fs(path)
    return epath.Path(path)


def exists(path: str) -> bool:
    return _path(path).exists()


def isdir(path: str) -> bool:
    return _path(path).is_dir()


def size(path: str) -> int:
    return _path(path).stat().length


def makedirs(path: str) -> None:
    """``mkdir -p`` (a no-op on object stores, where prefixes need no creating)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def open_file(path: str, mode: str = "r") -> IO:
    """Opens a local file or an object (``mode`` without "a": see `JsonLines`)."""
    if "a" in mode and is_remote(path):
        raise ValueError(f"{path}: object stores cannot append; use storage.JsonLines")
    return epath.Path(path).open(mode)


def read_bytes(path: str) -> bytes:
    return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def remove(path: str) -> None:
    epath.Path(path).unlink()


def read_json(path: str) -> Any:
    """The JSON value in ``path``; `MissingFileError` or `BadFileError` (a file that is not JSON)
    naming it otherwise."""
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFileError(f"{path}: not valid JSON ({e}); is it the right file, complete?") from None


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """``obj`` as JSON (keys in their order), written atomically like `write_bytes`."""
    write_text(path, json.dumps(obj, indent=indent))


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` atomically: readers see the old file or the new one, never a part."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)  # one upload, committed when complete
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def create_exclusive(path: str, data: bytes) -> None:
    """Creates ``path`` holding ``data``; raises FileExistsError when it exists, atomically: of
    two concurrent creators exactly one succeeds (locally ``O_EXCL``; on GCS the create-only
    precondition ``ifGenerationMatch=0``, answered 412 when the object exists)."""
    if is_remote(path):
        _fs(path).pipe_file(path, data, mode="create")  # gcsfs: 412 -> FileExistsError
        return
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy_file(src: str, dst: str) -> None:
    write_bytes(dst, read_bytes(src))


def _fs(path: str):
    """The fsspec file system epath uses for ``path`` (a URL), with its listing cache dropped."""
    fs = epath_backend.fsspec_backend.fs(path)
    fs.invalidate_cache()
    return fs


def _strip_protocol(path: str) -> str:
    return re.sub(r"^[a-z0-9]+://", "", path).rstrip("/")


def listdir(path: str) -> list[str]:
    """Names in the directory ``path`` (a fresh listing for URLs)."""
    return sorted(p.name for p in _path(path).iterdir())


def glob(pattern: str) -> list[str]:
    """Sorted paths matching ``pattern`` (wildcards in the last component for URLs)."""
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern))
    parent, name = pattern.rsplit("/", 1)
    return sorted(os.fspath(p) for p in _path(parent).glob(name))


def files_under(root: str) -> list[str]:
    """Relative paths of every file under ``root``, sorted (a fresh listing for URLs)."""
    if not is_remote(root):
        found = []
        for parent, _, names in os.walk(root):
            found += [os.path.relpath(os.path.join(parent, n), root) for n in names]
        return sorted(found)
    return sorted(_file_infos(root))


def _file_infos(root: str) -> dict[str, dict]:
    prefix = _strip_protocol(root) + "/"
    infos = _fs(root).find(root, detail=True)
    return {
        name[len(prefix) :]: info
        for name, info in infos.items()
        if name.startswith(prefix) and info.get("type") != "directory"
    }


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprints(root: str, names: list[str] | None = None) -> dict[str, dict]:
    """{relative path: {"size", and "sha256" (local) or the store's "crc32c"/"md5"}} under ``root``.

    Local files are hashed; objects are described by the checksums the store computed
    when they were written (one listing, no download). ``names`` limits which files.
    """
    if not is_remote(root):
        names = files_under(root) if names is None else names
        out = {}
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                out[name] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
        return out
    wanted = None if names is None else set(names)
    out = {}
    for name, info in _file_infos(root).items():
        if wanted is not None and name not in wanted:
            continue
        entry = {"size": int(info["size"])}
        if info.get("crc32c"):
            entry["crc32c"] = info["crc32c"]
        if info.get("md5Hash"):
            entry["md5"] = info["md5Hash"]
        out[name] = entry
    return out


def move_tree(src: str, dst: str) -> None:
    """Moves the directory ``src`` (every object under the prefix, for URLs) to ``dst``."""
    if not is_remote(src):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        shutil.move(src, dst)
        return
    fs = _fs(src)
    for name in files_under(src):  # a server-side copy, then the delete (gcsfs's mv can stall)
        fs.cp_file(f"{src.rstrip('/')}/{name}", f"{dst.rstrip('/')}/{name}")
        fs.rm_file(f"{src.rstrip('/')}/{name}")
    fs.invalidate_cache()


def local_dir(workdir: str, name: str) -> str:
    """``workdir/name`` for a local workdir; for a URL, a local cache directory for it.

    For files that libraries read only from local disk (generated demo datasets),
    and for tools that want a local directory (W&B's run files).
    """
    if not is_remote(workdir):
        return os.path.join(workdir, name)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", _strip_protocol(workdir))
    return os.path.join(cache, "clip_jax", slug, name)


class JsonLines:
    """A ``.jsonl`` file that grows by lines: appended locally, rewritten whole on object stores.

    On an object store the lines already there are read once, then every `append`
    uploads the whole text (a metrics log is small; a lost append would be silent).
    `last` and `replace_last` let a writer complete its latest line (evaluation results
    joining the row of their step).
    """

    TAIL_BYTES = 1 << 20  # `last` reads at most this much of a local file's end

    def __init__(self, path: str):
        self.path = path
        self._text: str | None = None
        if is_remote(path):
            self._text = read_text(path) if exists(path) else ""

    def append(self, line: str) -> None:
        if self._text is None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
            return
        self._text += line + "\n"
        write_text(self.path, self._text)

    def _split_last(self) -> tuple[int, str]:
        """(offset of the last line, the last line without its newline); (size, "") when none."""
        if self._text is not None:
            body = self._text.rstrip("\n")
            start = body.rfind("\n") + 1
            return start, body[start:]
        if not os.path.exists(self.path):
            return 0, ""
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            begin = max(0, size - self.TAIL_BYTES)
            f.seek(begin)
            tail = f.read()
        body = tail.rstrip(b"\n")
        cut = body.rfind(b"\n")
        if cut < 0 and begin > 0:  # a last line longer than the tail read: none we can use
            return size, ""
        return begin + cut + 1, body[cut + 1 :].decode("utf-8", "replace")

    def last(self) -> str:
        """The last line ("" when the file is empty or missing)."""
        return self._split_last()[1]

    def replace_last(self, line: str) -> None:
        """Replaces the last line by ``line`` (appends it when there is none)."""
        start, old = self._split_last()
        if not old:
            self.append(line)
        elif self._text is not None:
            self._text = self._text[:start] + line + "\n"
            write_text(self.path, self._text)
        else:
            with open(self.path, "r+b") as f:
                f.seek(start)
                f.write((line + "\n").encode())
                f.truncate()
