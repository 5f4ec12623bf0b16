"""One run per workdir: an exclusive lock file, ``WORKDIR/.lock``, held while a run writes there.

Two runs in one workdir would interleave their metrics and fight over the checkpoints
(both die at the save). The lock is taken before anything is written and holds JSON
``{"host", "pid", "since", "token"}``; a second run stops at once with one line naming
the holder. A lock left by a process that died on this host (its pid is gone) is stale:
it is taken over, with a log line. The file is created create-only (`storage.create_exclusive`:
``O_EXCL`` locally, GCS's ``ifGenerationMatch=0`` precondition on ``gs://``), so of two
starts exactly one holds it.

Only process 0 of a multi-process run takes it (the others are the same run).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from clip_jax import cli, storage

LOCK_FILE = ".lock"


class WorkdirBusyError(cli.UserError):
    """Another live process holds the workdir's lock."""


def lock_path(workdir: str) -> str:
    return os.path.join(workdir, LOCK_FILE)


def _holder_text(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"host {holder.get('host')!r}, pid {holder.get('pid')}, since {since}"


def _read_holder(path: str) -> dict | None:
    """The lock's holder, {} when the file is unreadable, None when there is no lock."""
    try:
        holder = json.loads(storage.read_bytes(path)[:4096])
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a zombie (killed, not yet reaped by its parent) answers the signal but is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_stale(holder: dict) -> bool:
    """True for a lock from a process of this host that no longer runs."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _create(path: str, record: dict) -> bool:
    """Creates the lock file holding ``record``; False when one exists (create-only: atomic)."""
    # On gs:// also looked for first and read back after: a store that ignores the precondition
    # (gcp-storage-emulator) still refuses a second start that comes after the first one's upload.
    remote = storage.is_remote(path)
    if remote and storage.exists(path):
        return False
    try:
        storage.create_exclusive(path, json.dumps(record).encode())
    except FileExistsError:
        return False
    return not remote or (_read_holder(path) or {}).get("token") == record["token"]


def acquire(workdir: str) -> dict:
    """Takes ``workdir``'s lock (the directory must exist); returns the record written.

    Raises WorkdirBusyError naming the holder when a live process holds it.
    """
    path = lock_path(workdir)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    record["token"] = uuid.uuid4().hex
    for _ in range(3):  # a stale lock is removed, then the creation is tried again
        if _create(path, record):
            return record
        holder = _read_holder(path)
        if holder is None:  # released in between
            continue
        if not _is_stale(holder):
            raise WorkdirBusyError(
                f"{workdir} is in use by another run ({_holder_text(holder)}); wait for it to end or "
                f"use another --workdir (if that process is gone, delete {path})"
            )
        print(f"{path}: taking over a stale lock ({_holder_text(holder)}: no such process)", flush=True)
        with contextlib.suppress(FileNotFoundError):
            storage.remove(path)
    raise WorkdirBusyError(f"{workdir}: could not take its lock {path}; another run is starting there")


def release(workdir: str, record: dict) -> None:
    """Removes the lock if it is still ``record``'s (a lock taken over is left alone)."""
    path = lock_path(workdir)
    holder = _read_holder(path)
    if holder and holder.get("token") == record["token"]:
        storage.remove(path)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``workdir``'s lock for the block (creating the directory). Process 0 takes it; the
    other processes of the run learn whether it did, and stop with it when it did not."""
    record, busy = None, None
    if jax.process_index() == 0:
        storage.makedirs(workdir)
        try:
            record = acquire(workdir)
        except WorkdirBusyError as e:
            busy = e
    if jax.process_count() > 1:
        taken = int(multihost_utils.broadcast_one_to_all(np.int32(busy is None)))
        if not taken and busy is None:
            raise WorkdirBusyError(f"{workdir} is in use by another run (process 0 names it)")
    if busy is not None:
        raise busy
    try:
        yield
    finally:
        if record is not None:
            release(workdir, record)
