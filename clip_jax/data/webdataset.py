"""Streaming webdataset tar shards (the img2dataset layout) as a Grain source.

A shard holds samples as consecutive members ``KEY.jpg`` (or png, webp, ...),
``KEY.txt`` (caption), ``KEY.json`` (metadata), ``KEY.cls`` (label). Reading
is sequential; a shard cut short (an interrupted download) yields its complete
samples, then the last one marked ``bad="truncated"``, and ends: never an
exception, never a hang.

`TarShards` is a Grain ``IterDataset``: the shards are split by JAX process
(``shards[process_index::process_count]``) and again by Grain worker
(``set_slice``); each epoch visits its shards in a seeded order through a
seeded shuffle buffer. The iterator state is ``(epoch, emitted)``; restoring
replays the epoch's raw reads up to that point (no decoding), which yields the
same sequence, buffer included. Records go to `DecodeSkipBad`, which drops bad
ones and carries their count by reason to the `pipeline.CountSkips` stage.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import grain
import jax
import numpy as np

from clip_jax import storage
from clip_jax.data import captions, pipeline, skips
from clip_jax.data.tokenizer import Tokenizer

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the basename."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def _sample(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    return {
        "key": key,
        "image": members.get(image_ext) if image_ext else None,
        "image_ext": image_ext,
        "caption": members.get("txt"),
        "json": members.get("json"),
        "cls": members.get("cls"),
        "bad": None,
    }


def iter_tar(fileobj: BinaryIO) -> Iterator[dict[str, Any]]:
    """Samples of one tar stream, in order: {"key", "image" bytes|None, "image_ext",
    "caption" bytes|None, "json", "cls", "bad": None or "truncated"}."""
    key, members = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = _split_name(info.name)
                if member_key != key and key is not None:
                    yield _sample(key, members)
                    members = {}
                key = member_key
                members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        # The stream ended inside a member: the sample being assembled is incomplete.
        if key is not None:
            yield {**_sample(key, members), "bad": "truncated", "detail": str(e)}
        return
    if key is not None:
        yield _sample(key, members)


def iter_tar_file(path: str) -> Iterator[dict[str, Any]]:
    with storage.open_file(path, "rb") as f:  # local, or streamed from gs://
        yield from iter_tar(f)


class TarShards(grain.IterDataset):
    """Samples of tar ``shards``, this process's share, shuffled per epoch; endless unless ``num_epochs``."""

    def __init__(
        self,
        shards: Sequence[str],
        seed: int,
        shuffle_buffer: int = 1000,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        super().__init__()
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        if len(shards) < count:
            raise ValueError(f"{len(shards)} tar shards cannot feed {count} processes; use more shards")
        self._all = list(shards)
        self._ids = list(range(index, len(shards), count))  # global shard numbers of this process
        self._seed, self._buffer, self._epochs = seed, shuffle_buffer, num_epochs

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Grain calls this per worker process: each worker reads a disjoint subset of the shards."""
        del sequential_slice
        self._ids = self._ids[sl]
        if not self._ids:
            raise ValueError("a Grain worker got no tar shard: use fewer workers or more shards")

    def __iter__(self) -> _TarIterator:
        return _TarIterator(self)

    def __str__(self) -> str:
        return f"TarShards({len(self._ids)} shards)"

    def epoch_stream(self, epoch: int) -> Iterator[dict[str, Any]]:
        """One epoch's samples in order, each with ``"rng_seed"`` for its augmentation."""
        rng = np.random.default_rng([self._seed, epoch, self._ids[0] if self._ids else 0])
        buffer: list[dict] = []
        for shard in rng.permutation(self._ids):
            for n, sample in enumerate(iter_tar_file(self._all[shard])):
                sample["rng_seed"] = [self._seed, epoch, int(shard), n]
                if len(buffer) < self._buffer:
                    buffer.append(sample)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], sample = sample, buffer[j]
                yield sample
        rng.shuffle(buffer)
        yield from buffer


class _TarIterator(grain.DatasetIterator):
    def __init__(self, ds: TarShards):
        super().__init__()
        self._ds = ds
        self._start(0, 0)

    def _start(self, epoch: int, emitted: int) -> None:
        self._epoch, self._emitted = epoch, 0
        self._stream = self._ds.epoch_stream(epoch)
        for _ in range(emitted):  # replay (raw reads only) to the saved position
            next(self._stream)
            self._emitted += 1

    def __next__(self) -> dict[str, Any]:
        while True:
            try:
                sample = next(self._stream)
            except StopIteration:
                if self._ds._epochs is not None and self._epoch + 1 >= self._ds._epochs:
                    raise
                if self._emitted == 0:
                    raise ValueError("the tar shards hold no samples") from None
                self._start(self._epoch + 1, 0)
                continue
            self._emitted += 1
            return sample

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._start(int(state["epoch"]), int(state["emitted"]))


@dataclasses.dataclass(frozen=True)
class _DecodeSample:
    decode: pipeline.DecodeExample

    def __call__(self, sample: dict) -> dict:
        rng = np.random.default_rng(sample["rng_seed"])
        texts = captions.from_webdataset(sample["caption"], sample.get("json"))
        return self.decode({**sample, "caption": texts}, rng)


class DecodeSkipBad(grain.IterDataset):
    """Decodes samples; bad ones are dropped and their reasons ride on the next good example
    (``"skipped"`` int32 [len(REASONS)], ``"drawn"`` = 1 + the number dropped)."""

    def __init__(self, parent: grain.IterDataset, decode: pipeline.DecodeExample):
        super().__init__(parent)
        self._decode = _DecodeSample(decode)

    def __iter__(self) -> _DecodeSkipBadIterator:
        return _DecodeSkipBadIterator(self._parent.__iter__(), self._decode)


class _DecodeSkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, decode: _DecodeSample):
        super().__init__(parent)
        self._decode = decode

    def __next__(self) -> dict[str, Any]:
        skipped = np.zeros(len(skips.REASONS), np.int32)
        while True:
            sample = next(self._parent)
            try:
                example = self._decode(sample)
            except skips.BadRecord as e:
                skipped += skips.one_hot(e.reason)
                if skipped.sum() >= pipeline.MAX_REPLACE_TRIES:
                    raise skips.TooManyBadRecords(
                        f"{skipped.sum()} consecutive bad samples in tar shards: {skips.REASONS} = {skipped}"
                    ) from None
                continue
            return {**example, "skipped": skipped, "drawn": np.int32(1 + skipped.sum())}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def train_iterator(
    shards: Sequence[str],
    tokenizer: Tokenizer,
    image_size: int,
    local_batch_size: int,
    seed: int,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    crop: pipeline.Crop | None = pipeline.DEFAULT_CROP,
    counter: skips.SkipCounter | None = None,
    stall_timeout_s: float | None = 600.0,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """Host-local training batches read straight from tar shards (see `pipeline.train_iterator`)."""
    decode = pipeline.DecodeExample(tokenizer, image_size, crop)
    ds = (
        TarShards(shards, seed, shuffle_buffer, num_epochs)
        .pipe(DecodeSkipBad, decode)
        .batch(local_batch_size, drop_remainder=True)
    )
    return pipeline.finish(ds, num_workers, counter, stall_timeout_s)
