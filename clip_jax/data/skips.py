"""Bad records: why one is skipped, and a running count that stops a run on mostly-broken data.

A record is skipped, never fatal, for one of `REASONS`. Readers raise
`BadRecord(reason, detail)`; the pipeline replaces the record with a good one
(so batches stay full) and counts the reason in a `SkipCounter`, which raises
`TooManyBadRecords` once the skipped share of the records drawn passes the
configured ceiling (``config.data.max_skip_fraction``).
"""

from __future__ import annotations

import threading

import numpy as np

REASONS = (
    "decode_error",  # bytes Pillow cannot read (corrupt, cut short, an HTML error page)
    "truncated",  # the tar member ends early (the shard itself is cut short)
    "bomb",  # more pixels in the header than the limit (checked before decoding)
    "missing_image",  # no image, or zero bytes
    "missing_caption",  # no caption field
    "empty_caption",  # caption empty or only whitespace
    "timeout",  # reading or decoding took longer than the limit
    "too_large",  # a member or file over the size limit (bounded.MAX_MEMBER_BYTES): never read
    "not_regular_file",  # a table names a FIFO, device or directory: never read
    "outside_root",  # a table path leaving the image folder (../, absolute, a symlink out)
    # Conversion filters (clip_jax.data.filters), off unless asked for:
    "too_small",  # short side under the minimum
    "extreme_aspect",  # long side / short side over the maximum
    "caption_too_short",
    "caption_too_long",
)
REASON_INDEX = {r: i for i, r in enumerate(REASONS)}


class BadRecord(Exception):
    """A record to skip; ``reason`` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASON_INDEX:
            raise ValueError(f"unknown skip reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TooManyBadRecords(RuntimeError):
    """The share of skipped records passed the ceiling: the data is mostly broken."""


def caption_text(raw: str | bytes | None) -> str:
    """A record's caption as text: bytes are UTF-8, invalid bytes replaced (latin-1 stays readable).

    Raises `BadRecord` ``missing_caption`` (None) or ``empty_caption`` (blank).
    """
    if raw is None:
        raise BadRecord("missing_caption")
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    text = text.replace("\x00", " ").strip()
    if not text:
        raise BadRecord("empty_caption")
    return text


def one_hot(reason: str | None) -> np.ndarray:
    """int32 [len(REASONS)]: 1 at ``reason`` (zeros for None): what an example carries to the counter."""
    out = np.zeros(len(REASONS), np.int32)
    if reason is not None:
        out[REASON_INDEX[reason]] = 1
    return out


class SkipCounter:
    """Records drawn and skipped per reason in this process; thread-safe.

    ``max_fraction``: the ceiling on skipped / drawn, checked once at least
    ``min_records`` were drawn (a few bad records at the start are no signal).
    """

    def __init__(self, max_fraction: float = 0.1, min_records: int = 256):
        self.max_fraction = max_fraction
        self.min_records = min_records
        self.drawn = 0
        self.skipped = np.zeros(len(REASONS), np.int64)
        self._lock = threading.Lock()

    def add(self, drawn: int, skipped: np.ndarray) -> None:
        """Adds ``drawn`` records of which ``skipped`` ([len(REASONS)] or [N, len(REASONS)]) were bad."""
        with self._lock:
            self.drawn += int(drawn)
            self.skipped += np.asarray(skipped).reshape(-1, len(REASONS)).sum(0)
        self.check()

    def add_reason(self, reason: str | None) -> None:
        self.add(1, one_hot(reason))

    @property
    def total_skipped(self) -> int:
        return int(self.skipped.sum())

    def as_dict(self) -> dict[str, int]:
        """{"drawn": n, "skipped": n, "skipped/REASON": n, ...} (reasons with a zero count left out)."""
        out = {"drawn": self.drawn, "skipped": self.total_skipped}
        out.update({f"skipped/{r}": int(n) for r, n in zip(REASONS, self.skipped, strict=True) if n})
        return out

    def check(self) -> None:
        """Raises `TooManyBadRecords` when the skipped share passes the ceiling."""
        if self.drawn < self.min_records or self.total_skipped <= self.max_fraction * self.drawn:
            return
        raise TooManyBadRecords(
            f"{self.total_skipped} of {self.drawn} records drawn were bad "
            f"({self.total_skipped / self.drawn:.1%} > config.data.max_skip_fraction={self.max_fraction}): "
            f"{self.as_dict()}. Fix or re-convert the data (data_pipelines/), or raise the ceiling."
        )
