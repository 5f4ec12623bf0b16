"""A stall watchdog for Grain iterators: a clear error instead of an indefinite hang.

Grain has no timeout for a hung read (a stalled network file system, a dead
worker process, a decoder stuck in C). `Watchdog` asks its parent for the next
element on a helper thread and raises `DataStallError` when none arrives within
``timeout_s``. The iterator state passes through unchanged, so a watched
iterator is saved and restored in checkpoints like the bare one.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import grain


class DataStallError(TimeoutError):
    """No element arrived from the input pipeline within the timeout."""


class Watchdog(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, timeout_s: float):
        super().__init__(parent)
        self._timeout_s = timeout_s

    def __iter__(self) -> _WatchdogIterator:
        return _WatchdogIterator(self._parent.__iter__(), self._timeout_s)

    def __str__(self) -> str:
        return f"Watchdog(timeout_s={self._timeout_s})"


_STOP = object()


class _WatchdogIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, timeout_s: float):
        super().__init__(parent)
        self._timeout_s = timeout_s
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stalled = False

    def _serve(self) -> None:
        # A daemon thread: if the parent hangs for good, the process can still exit.
        while self._requests.get() is not _STOP:
            try:
                self._results.put((True, next(self._parent)))
            except BaseException as e:  # handed to the caller's thread
                self._results.put((False, e))

    def __next__(self) -> Any:
        if self._stalled:
            raise DataStallError("the input pipeline stalled earlier; restart the run")
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="grain-watchdog", daemon=True)
            self._thread.start()
        self._requests.put(True)
        try:
            ok, value = self._results.get(timeout=self._timeout_s)
        except queue.Empty:
            self._stalled = True
            raise DataStallError(
                f"no batch from the input pipeline for {self._timeout_s:.0f} s (stalled read or hung "
                "worker?); config.data.stall_timeout_s sets the limit"
            ) from None
        if not ok:
            raise value
        return value

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        if self._thread is not None:
            self._requests.put(_STOP)
