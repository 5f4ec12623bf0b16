"""Goodput: where a run's wall time went, in ``WORKDIR/goodput.json``.

The wall time of an attempt runs from the call of `train.run` (after JAX and the
imports are up; before the mesh, the data and the model are built) to its end.
`Recorder` splits it into parts, each moment counted in exactly one:

- ``startup``: building the mesh, data, model, state shardings (a fresh state), the run files;
- ``restore``: reading the checkpoint to resume from;
- ``compile``: the first step's call (tracing and XLA compilation);
- ``train``: the training loop's own time, the steps (less what is below);
- ``data``: the loop blocked in ``next(batches)`` (data stalls);
- ``checkpoint``: checkpoint saves; ``eval``: evaluation (in the loop and at the end);
- ``other``: the rest (after the loop: closing, the final summaries).

Parts nest (an evaluation inside the loop counts as ``eval``, not ``train``): the
innermost open part gets the time. The host only waits for the device where it
fetches results: device work still queued when a save or an evaluation starts is
counted there; as the loop syncs at every log step, with save and evaluation
cadences that are multiples of ``train.log_every`` there is none.

Goodput is the ``train`` share of the wall time; badput the rest. Every attempt of
a run (a resume after preemption or a crash) is one record in the file, with a
total over them: the previous file is read when the run has decided to start or
resume (bounded; a corrupt one is replaced, with a warning), and the file is
rewritten (staged, by process 0) at log steps and when the attempt ends, however
it ends. The ``restore`` part is the checkpoint read only; a fresh state's
initialisation counts as ``startup``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Callable, Iterator

from clip_jax import storage
from clip_jax.data import bounded, skips

FILE = "goodput.json"
PARTS = ("startup", "restore", "compile", "train", "data", "checkpoint", "eval", "other")
MAX_BYTES = 4 * 2**20  # thousands of attempts; a larger file is not ours
MAX_ATTEMPTS = 10_000


class Recorder:
    """Seconds per part of this attempt; process 0 writes ``WORKDIR/goodput.json``."""

    def __init__(self, workdir: str, primary: bool, clock: Callable[[], float] = time.perf_counter):
        self.path = os.path.join(workdir, FILE)
        self.primary = primary
        self.clock = clock
        self.start = self._mark = clock()
        self.started_utc = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._stack = ["startup"]  # the base part, then the open phases
        self.previous: list[dict] | None = None  # None until `begin`: nothing is written before
        self.resumed_step = self.last_step = 0

    def _attribute(self) -> None:
        now = self.clock()
        self.seconds[self._stack[-1]] += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def phase(self, part: str) -> Iterator[None]:
        """Counts the time inside the block as ``part`` (nested blocks win)."""
        assert part in PARTS, part
        self._attribute()
        self._stack.append(part)
        try:
            yield
        finally:
            self._attribute()
            self._stack.pop()

    def switch(self, part: str) -> None:
        """From now on, time outside any phase counts as ``part`` (the startup ends)."""
        self._attribute()
        self._stack[0] = part

    def totals(self) -> dict[str, float]:
        """Seconds per part so far, the open part included up to now."""
        self._attribute()
        return dict(self.seconds)

    def begin(self, resumed_step: int) -> None:
        """The run starts or resumes at ``resumed_step``: reads the previous attempts; from now on
        the record is written."""
        self.resumed_step = self.last_step = resumed_step
        self.previous = read_attempts(self.path) if self.primary else []

    def attempt(self, status: str) -> dict:
        parts = self.totals()
        wall = self._mark - self.start  # up to the moment the parts were read: they sum to it
        return {
            "started_utc": self.started_utc,
            "resumed_step": self.resumed_step,
            "last_step": self.last_step,
            "status": status,
            "wall_s": wall,
            "parts_s": parts,
        }

    def record(self, status: str = "running") -> dict:
        """The whole file's content: the attempts so far and this one, and their total."""
        attempts = [*(self.previous or []), self.attempt(status)]
        return {"attempts": attempts, "total": total(attempts)}

    def write(self, step: int | None = None, status: str = "running") -> dict | None:
        """Rewrites the file (process 0, after `begin`); returns what was written."""
        if step is not None:
            self.last_step = step
        if self.previous is None or not self.primary:
            return None
        record = self.record(status)
        storage.write_json(self.path, record)
        return record

    def finish(self, status: str) -> None:
        """The attempt ended (``status``: completed | preempted | failed: ...): the file and one line."""
        record = self.write(status=status)
        if record is not None:
            print(summary_line(record), flush=True)


def total(attempts: list[dict]) -> dict:
    """Seconds per part and wall time summed over ``attempts``; goodput = train / wall."""
    parts = {p: sum(a["parts_s"].get(p, 0.0) for a in attempts) for p in PARTS}
    wall = sum(a["wall_s"] for a in attempts)
    good = parts["train"] / wall if wall > 0 else 0.0
    return {"attempts": len(attempts), "wall_s": wall, "parts_s": parts, "goodput": good, "badput": 1 - good}


def summary_line(record: dict) -> str:
    """goodput 81.0% of 12m03s over 2 attempts; badput 19.0%: compile 6.1%, data 9.0%, ..."""
    t = record["total"]
    wall = max(t["wall_s"], 1e-9)
    shares = sorted(((s / wall, p) for p, s in t["parts_s"].items() if p != "train" and s > 0), reverse=True)
    detail = ", ".join(f"{p} {100 * share:.1f}%" for share, p in shares)
    return (
        f"goodput {100 * t['goodput']:.1f}% of {wall:.0f} s wall time over {t['attempts']} attempt(s); "
        f"badput {100 * t['badput']:.1f}%: {detail}"
    )


def _valid_attempt(a) -> bool:
    number = lambda x: isinstance(x, int | float) and not isinstance(x, bool) and x >= 0
    return (
        isinstance(a, dict)
        and number(a.get("wall_s"))
        and isinstance(a.get("parts_s"), dict)
        and all(isinstance(k, str) and number(v) for k, v in a["parts_s"].items())
    )


def read_attempts(path: str) -> list[dict]:
    """The attempts recorded in ``path`` ([] when there is none); a file that is too large, not
    JSON or not shaped as ours is set aside with a warning (the new record replaces it)."""
    if not storage.exists(path):
        return []
    try:
        data = json.loads(bounded.read_bytes(path, MAX_BYTES))
        attempts = data["attempts"]
        shaped = isinstance(attempts, list) and len(attempts) <= MAX_ATTEMPTS
        if not (shaped and all(map(_valid_attempt, attempts))):
            raise ValueError("not a list of attempts")
    except (skips.BadRecord, ValueError, KeyError, TypeError, RecursionError) as e:
        print(f"warning: {path} is not a goodput record ({str(e)[:200]}); starting a new one", flush=True)
        return []
    return attempts
