"""Weighted mixtures of training sources (LAION + CC12M + a curated set, ...).

Each source is its own endless stream (its records shuffled by its own seed, reshuffled
every epoch); a source that runs out starts its next epoch on its own, whatever the
others do. The mixed stream takes its examples in blocks of `BLOCK` positions: in every
block each source fills a fixed number of positions (its weight's share of the block,
largest remainder), at places given by a permutation drawn from (seed, block). So:

- the share of each source is its weight within 1/BLOCK at every block boundary, with
  no drift over a run of any length (a seeded i.i.d. draw would wander);
- the order is random (drawn by seed), the same on every host;
- the source and the source's own example index of mixed position ``g`` are a pure
  function of ``g``: the whole mixture's position is one number (the global example
  index), restored exactly and independent of the number of processes, and the count
  of examples drawn from each source so far (`Schedule.counts`) needs no state.

(Grain's ``MapDataset.mix`` interleaves in a fixed order, not drawn by seed;
``IterDataset.mix`` keeps per-process iterator states, which cannot move to another
number of processes.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import grain
import numpy as np

# Positions per block: the share is exact at every multiple of this; a source's weight
# must give it at least one position per block (weight share >= 1 / BLOCK).
BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class Source:
    """One training source: its files, reader, weight and caption field.

    ``records``: for a source that is no list of ArrayRecord files, a function returning its
    records as a random-access MapDataset (format "tfds": `tfds_source.records` of its split;
    ``files`` then only name the split's files in the checkpoint's fingerprint).
    """

    name: str
    files: tuple[str, ...]
    weight: float = 1.0
    format: str = "array_record"
    caption_field: str | None = None  # None: "captions" or "caption"
    records: Callable[[], grain.MapDataset] | None = None


def allocate(weights: Sequence[float], total: int = BLOCK) -> tuple[int, ...]:
    """Positions per block for each weight: proportional, summing to ``total`` (largest remainder)."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return tuple(int(c) for c in counts)


def source_seed(seed: int, index: int) -> int:
    """Source ``index``'s shuffle seed (uint32), independent of the others'."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@functools.lru_cache(maxsize=16)
def _block(seed: int, counts: tuple[int, ...], block: int) -> tuple[np.ndarray, np.ndarray]:
    """(source int32 [BLOCK], rank int64 [BLOCK]): the source of each position of ``block`` and
    how many earlier positions of the block belong to the same source."""
    labels = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    labels = np.random.default_rng([seed, block]).permutation(labels)
    rank = np.empty(len(labels), np.int64)
    for s in range(len(counts)):
        where = np.flatnonzero(labels == s)
        rank[where] = np.arange(len(where))
    return labels, rank


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which source fills each position of the mixed stream (see the module docstring)."""

    counts: tuple[int, ...]  # positions per block, per source
    seed: int

    @classmethod
    def from_weights(cls, weights: Sequence[float], seed: int) -> Schedule:
        counts = allocate(weights)
        if min(counts) < 1:
            raise ValueError(f"weights {list(weights)}: each needs a share of at least 1/{BLOCK}")
        return cls(counts, seed)

    def locate(self, position: int) -> tuple[int, int]:
        """(source, index in that source's stream) of mixed ``position``."""
        block, offset = divmod(position, BLOCK)
        labels, rank = _block(self.seed, self.counts, block)
        source = int(labels[offset])
        return source, block * self.counts[source] + int(rank[offset])

    def counts_before(self, position: int) -> list[int]:
        """Examples drawn from each source at mixed positions [0, ``position``)."""
        block, offset = divmod(position, BLOCK)
        labels, _ = _block(self.seed, self.counts, block)
        within = np.bincount(labels[:offset], minlength=len(self.counts))
        return [block * c + int(n) for c, n in zip(self.counts, within, strict=True)]


class Mixed(grain.MapDataset):
    """The mixed stream: element ``g`` is element `Schedule.locate(g)` of the source streams
    (each endless), with ``"source"`` (int32, the source's index) added."""

    def __init__(self, parents: Sequence[grain.MapDataset], schedule: Schedule):
        super().__init__(list(parents))
        self._schedule = schedule

    def __len__(self) -> int:
        return min(len(p) for p in self._parents)

    def __str__(self) -> str:
        return f"Mixed(counts={self._schedule.counts})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        source, inner = self._schedule.locate(index)
        return {**self._parents[source][inner], "source": np.int32(source)}
