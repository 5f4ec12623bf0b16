"""Grain input pipelines over ArrayRecord files of `clip_jax.data.records`.

Training: random access, a global shuffle by seed re-drawn every epoch, epochs
repeated without end (the loop counts steps), each JAX process reading its own
equal share, decode + tokenise in worker threads (or processes), batches of
host-local numpy arrays::

    {"image": uint8 [b, S, S, 3], "tokens": int32 [b, L]}

Every process gets the same number of records (the remainder of the record
count modulo the process count is dropped), so every host runs the same number
of steps and no host waits on another for data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np

from clip_jax.data import records, transforms
from clip_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DecodeExample(grain.transforms.Map):
    """Record bytes -> {"image": uint8 [S, S, 3], "tokens": int32 [L]}."""

    tokenizer: Tokenizer
    image_size: int

    def map(self, data: bytes) -> dict[str, np.ndarray]:
        return self.from_record(records.decode(data))

    def from_record(self, record: dict) -> dict[str, np.ndarray]:
        image = transforms.resize_center_crop(transforms.decode_image(record["image"]), self.image_size)
        return {"image": image, "tokens": self.tokenizer([record["caption"]])[0]}


def process_share(files: Sequence[str]) -> grain.MapDataset:
    """The records of ``files`` that this JAX process reads: an equal, disjoint share."""
    source = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(files)))
    count = jax.process_count()
    usable = len(source) - len(source) % count
    return source[jax.process_index() : usable : count]


def train_iterator(
    files: Sequence[str],
    tokenizer: Tokenizer,
    image_size: int,
    local_batch_size: int,
    seed: int,
    num_workers: int = 0,
    num_threads: int = 4,
    prefetch_batches: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """An endless iterator of host-local training batches."""
    ds = (
        process_share(files)
        .shuffle(seed=seed)
        .repeat(None)
        .map(DecodeExample(tokenizer, image_size))
        .batch(local_batch_size, drop_remainder=True)
    )
    # Threads decode ahead up to `prefetch_batches` batches; more only competes with
    # the step for CPU on small hosts.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


def read_all(files: Sequence[str]) -> list[dict]:
    """Every decoded record of ``files`` in order (small evaluation sets)."""
    source = grain.sources.ArrayRecordDataSource(list(files))
    return [records.decode(source[i]) for i in range(len(source))]


def load_eval_set(files: Sequence[str], tokenizer: Tokenizer, image_size: int) -> dict:
    """A small evaluation set in memory, in file order::

    {"image": uint8 [N, S, S, 3], "tokens": int32 [N, L], "caption": [N] str,
     "labels": {name: int64 [N]}}  (labels when the records carry them)
    """
    decoder = DecodeExample(tokenizer, image_size)
    recs = read_all(files)
    examples = [decoder.from_record(r) for r in recs]
    label_names = recs[0].get("labels", {}) if recs else {}
    return {
        "image": np.stack([e["image"] for e in examples]),
        "tokens": np.stack([e["tokens"] for e in examples]),
        "caption": [r["caption"] for r in recs],
        "labels": {n: np.asarray([r["labels"][n] for r in recs]) for n in label_names},
    }
