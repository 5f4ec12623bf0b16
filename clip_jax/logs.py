"""A quiet terminal: libraries' INFO lines go to a log file, the terminal keeps the run's own.

Orbax, JAX and absl log through Python logging, which an absl program sends to absl's
handler (stderr by default, a few hundred INFO lines in a demo run). `quiet` (called by
the entry point once the flags are parsed) holds those lines in memory and lets WARNING
and above through to stderr as well; `to_file` (called once the run holds its workdir and
has decided to resume or start) writes what was held to ``WORKDIR/logs/process_N.log``
and sends the rest there. A gs:// workdir's log goes to a local directory instead,
``~/.cache/clip_jax/BUCKET_PATH/logs/`` (`storage.local_dir`). Nothing is written
into the workdir before `to_file`: a refused resume or a workdir locked by another run
leaves it as it was (the INFO lines held until then are dropped; warnings and errors
were on stderr).

The run's own lines (progress, checkpoints, evaluations) are prints, untouched.
``--logtostderr`` or ``--alsologtostderr`` keep absl's behaviour (everything on stderr).
"""

from __future__ import annotations

import io
import os

from absl import flags
from absl import logging as absl_logging

from clip_jax import storage

# Lines held before the log file exists are capped (the first ones are kept).
MAX_HELD_CHARS = 4 * 2**20


class _Held(io.StringIO):
    """A bounded in-memory stream: what comes past ``MAX_HELD_CHARS`` is counted, not kept."""

    dropped = 0

    def write(self, text: str) -> int:
        if self.tell() + len(text) > MAX_HELD_CHARS:
            self.dropped += 1
            return len(text)
        return super().write(text)


def _handler():
    return absl_logging.get_absl_handler().python_handler


def quiet() -> bool:
    """Holds library log lines in memory (WARNING+ still on stderr); False when the user asked
    for absl's stderr logging (--logtostderr / --alsologtostderr), which is then kept."""
    values = flags.FLAGS
    if values["logtostderr"].value or values["alsologtostderr"].value:
        return False
    handler = _handler()
    if isinstance(handler.stream, _Held):
        return True
    handler.stream = _Held()
    values.stderrthreshold = "warning"  # absl also writes these to stderr
    return True


def log_path(workdir: str, process_index: int) -> str:
    """Where process ``process_index`` of a run in ``workdir`` writes its library log (local)."""
    return os.path.join(storage.local_dir(workdir, "logs"), f"process_{process_index}.log")


def to_file(workdir: str, process_index: int) -> str | None:
    """From now on library log lines go to `log_path` (appended: a resumed run adds to it),
    starting with the ones held since `quiet`; returns the path, or None when `quiet` is
    not in effect (library use, tests, --logtostderr: nothing changes)."""
    handler = _handler()
    if not isinstance(handler.stream, _Held):
        return None
    path = log_path(workdir, process_index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler.acquire()
    try:
        held = handler.stream
        stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run's life; absl closes it)
        stream.write(held.getvalue())
        if held.dropped:
            stream.write(f"[{held.dropped} log lines before this run's start were dropped]\n")
        stream.flush()
        handler.stream = stream
    finally:
        handler.release()
    return path
