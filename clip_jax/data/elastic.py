"""The data position as one global number, so a run resumes on any number of processes.

The training stream is global: element ``g`` (``g`` = 0, 1, 2, ... over all epochs) is
the same example whatever the number of JAX processes (a global shuffle per epoch over
random-access records, or a mixture whose schedule is a function of ``g``). Global
batch ``s`` is elements ``[s * B, (s + 1) * B)``; process ``p`` of ``P`` reads the
contiguous block ``[s * B + p * b, s * B + (p + 1) * b)`` of it (``b = B / P``). The
position saved in a checkpoint is the number of elements consumed, ``g``; a run
resumed on ``P'`` processes continues at ``g`` with its own blocks of the same global
batches: every example not yet seen is seen exactly once, none twice. The global
batch size ``B`` must stay the same (the checkpoint's data fingerprint refuses a
change).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import grain

from clip_jax import storage

# The iterator-state kind written by `GlobalIterator` (older checkpoints hold Grain's own
# per-process index, which cannot be carried over).
KIND = "clip_jax.global_position"
_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


class PositionError(ValueError):
    """A saved data position that does not fit this pipeline."""


class ProcessView(grain.MapDataset):
    """This process's elements of a global stream, from global element ``start`` on:
    local element ``i`` is global element ``start + (i // b) * B + p * b + i % b``."""

    def __init__(self, parent: grain.MapDataset, start: int, local_batch: int, index: int, count: int):
        super().__init__(parent)
        if not 0 <= index < count:
            raise ValueError(f"process index {index} not in [0, {count})")
        self._start, self._local, self._index, self._count = start, local_batch, index, count

    def __len__(self) -> int:
        return (len(self._parent) - self._start) // (self._local * self._count) * self._local

    def __str__(self) -> str:
        return f"ProcessView(start={self._start}, process={self._index}/{self._count})"

    def global_index(self, index: int) -> int:
        step, offset = divmod(index, self._local)
        return self._start + step * self._local * self._count + self._index * self._local + offset

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.global_index(index)]


class GlobalIterator(grain.DatasetIterator):
    """Host-local batches of a global stream; its state is the global position.

    ``build(start)``: a fresh iterator of this process's batches from global element
    ``start`` on (rebuilt on `set_state`). ``describe(position)``: extra, informative
    fields for the saved state (epochs, per-source counts).
    """

    def __init__(
        self,
        build: Callable[[int], grain.DatasetIterator],
        global_batch: int,
        describe: Callable[[int], dict[str, Any]] = lambda _: {},
    ):
        super().__init__()
        self._build, self._global_batch, self._describe = build, global_batch, describe
        self._position = 0
        # Built now, as a plain Grain iterator would be: reading can start during the compile.
        self._inner: grain.DatasetIterator | None = build(0)

    @property
    def position(self) -> int:
        """Global elements consumed (by all processes together)."""
        return self._position

    def describe(self) -> dict[str, Any]:
        """Informative fields of the current position (epochs, examples per source)."""
        return self._describe(self._position)

    def __next__(self) -> dict:
        if self._inner is None:
            self._inner = self._build(self._position)
        batch = next(self._inner)
        self._position += self._global_batch
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "global_example": self._position,
            "global_batch": self._global_batch,
            **self._describe(self._position),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != KIND:
            raise PositionError(
                "the checkpoint's data position is an older per-process Grain index, not a global "
                "position; resume with --config.checkpoint.allow_data_change=True (the epoch restarts)"
            )
        if state["global_batch"] != self._global_batch:
            raise PositionError(
                f"the checkpoint's data position was saved with global batch {state['global_batch']}, "
                f"this run's is {self._global_batch}"
            )
        self.close()
        self._position = int(state["global_example"])
        self._inner = self._build(self._position)

    def close(self) -> None:
        """Stops the current pipeline: every iterator of the chain (worker processes included)."""
        # Each one, not only the outermost: a Grain worker-process iterator left unreachable
        # but open is closed twice at interpreter exit (by its finalizer and its collection),
        # which raises inside Grain.
        stack, seen = [self._inner], set()
        while stack:
            it = stack.pop()
            if it is None or id(it) in seen:
                continue
            seen.add(id(it))
            if callable(getattr(it, "close", None)):
                it.close()
            stack.extend(getattr(it, "_parents", ()))
        self._inner = None


def source_metrics(batches) -> dict[str, int]:
    """``data/NAME_examples``: examples drawn from each source of a mixture so far (all hosts
    together; a function of the data position, so exact after a resume); {} for one source
    or an iterator without a global position."""
    describe = getattr(batches, "describe", None)
    sources = describe().get("sources", {}) if describe else {}
    return {f"data/{name}_examples": s["examples"] for name, s in sources.items()}


def saved_state(data_dir: str, process_index: int, process_count: int) -> dict | None:
    """The position saved in a checkpoint's ``data`` directory by ANOTHER number of processes
    (every process saved the same global position), or None when this process's own file is
    there (Grain restores it). Raises `PositionError` when the saved states disagree or are
    not global positions."""
    own = os.path.join(data_dir, f"process_{process_index}-of-{process_count}.json")
    if storage.exists(own):
        return None
    names = sorted(n for n in storage.listdir(data_dir) if _STATE_FILE.search(n))
    if not names:
        raise PositionError(f"{data_dir}: no saved data position")
    states = [storage.read_json(os.path.join(data_dir, n)) for n in names]
    if any(not isinstance(s, dict) or s.get("kind") != KIND for s in states):
        raise PositionError(
            f"{data_dir}: saved by {len(names)} processes as per-process Grain indices, which cannot "
            "move to another number of processes; resume with --config.checkpoint.allow_data_change=True"
        )
    if len({s["global_example"] for s in states}) != 1:
        raise PositionError(f"{data_dir}: the processes saved different positions")
    return states[0]
