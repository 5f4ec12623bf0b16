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
from clip_jax.data import bounded, captions, pipeline, skips
from clip_jax.data.tokenizer import Tokenizer

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the basename."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


_WANTED = frozenset((*IMAGE_EXTENSIONS, "txt", "json", "cls"))  # other members are never read


def _sample(key: str, members: dict[str, bytes], bad: str | None = None) -> dict[str, Any]:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    return {
        "key": key,
        "image": members.get(image_ext) if image_ext else None,
        "image_ext": image_ext,
        "caption": members.get("txt"),
        "json": members.get("json"),
        "cls": members.get("cls"),
        "bad": bad,
    }


class _Prepended:
    """A stream whose first bytes were already read (to look at them): ``head``, then the rest."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head, self._rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(size)
        if size is None or size < 0:
            out, self._head = self._head + self._rest.read(), b""
            return out
        out, self._head = self._head[:size], self._head[size:]
        return out if len(out) == size else out + self._rest.read(size - len(out))


def iter_tar(
    fileobj: BinaryIO, name: str = "<stream>", max_member_bytes: int = bounded.MAX_MEMBER_BYTES
) -> Iterator[dict[str, Any]]:
    """Samples of one tar stream, in order: {"key", "image" bytes|None, "image_ext",
    "caption" bytes|None, "json", "cls", "bad": None, "truncated" or "too_large"}.

    A member over ``max_member_bytes`` (by its header, sparse ones by their full size)
    is never read: its sample is marked ``too_large`` with ``"detail"`` naming it.
    Raises `bounded.BadShard` naming ``name`` for a compressed stream or one that is no
    tar at all; an empty shard yields nothing (callers decide whether that is an error).
    """
    head = fileobj.read(512)
    if not head:
        return
    if kind := bounded.compression(head):
        raise bounded.BadShard(f"{name}: a {kind}-compressed shard; tar readers take plain .tar (decompress)")
    key, members, bad, detail = None, {}, None, None
    try:
        with tarfile.open(fileobj=_Prepended(head, fileobj), mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = _split_name(info.name)
                if member_key != key and key is not None:
                    yield {**_sample(key, members, bad), "detail": detail}
                    members, bad, detail = {}, None, None
                key = member_key
                if ext not in _WANTED:
                    continue
                if info.size > max_member_bytes:  # tarfile skips its data by reading in blocks
                    bad, detail = "too_large", f"{name}: {info.name}: {info.size} bytes > {max_member_bytes}"
                    continue
                members[ext] = tar.extractfile(info).read(max_member_bytes + 1)
    except (tarfile.TarError, EOFError, OSError) as e:
        if key is None:  # not even one member header: no tar
            raise bounded.BadShard(f"{name}: not a tar file ({e})") from None
        # The stream ended inside a member: the sample being assembled is incomplete.
        yield {**_sample(key, members), "bad": bad or "truncated", "detail": detail or f"{name}: {e}"}
        return
    if key is not None:
        yield {**_sample(key, members, bad), "detail": detail}


def iter_tar_file(path: str, max_member_bytes: int = bounded.MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """`iter_tar` of a local or ``gs://`` file, errors naming ``path``; a local path must be a
    regular file (a FIFO would block the reader, ``/dev/zero`` never end)."""
    if not storage.is_remote(path) and os.path.exists(path) and not os.path.isfile(path):
        raise bounded.BadShard(f"{path}: not a regular file; a shard must be a plain .tar file")
    with storage.open_file(path, "rb") as f:  # local, or streamed from gs://
        yield from iter_tar(f, path, max_member_bytes)


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
        max_member_bytes: int | None = None,
    ):
        super().__init__()
        self._max_member_bytes = max_member_bytes or bounded.MAX_MEMBER_BYTES
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

    def shard_names(self, most: int = 5) -> str:
        """This reader's shards, the first ``most`` of them, for messages."""
        names = [self._all[i] for i in self._ids]
        return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")

    def epoch_stream(self, epoch: int) -> Iterator[dict[str, Any]]:
        """One epoch's samples in order, each with ``"rng_seed"`` for its augmentation."""
        rng = np.random.default_rng([self._seed, epoch, self._ids[0] if self._ids else 0])
        buffer: list[dict] = []
        for shard in rng.permutation(self._ids):
            for n, sample in enumerate(iter_tar_file(self._all[shard], self._max_member_bytes)):
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
                if self._emitted == 0:  # never silently zero samples: empty shards are a mistake
                    raise bounded.BadShard(f"tar shards with no samples: {self._ds.shard_names()}") from None
                if self._ds._epochs is not None and self._epoch + 1 >= self._ds._epochs:
                    raise
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
    max_member_bytes: int | None = None,
    reduced_decode: bool = True,
    canvas_size: int = 0,
) -> grain.DatasetIterator:
    """Host-local training batches read straight from tar shards (see `pipeline.train_iterator`);
    a member over ``max_member_bytes`` (default `bounded.MAX_MEMBER_BYTES`) is a ``too_large`` skip."""
    decode = pipeline.DecodeExample(
        tokenizer, image_size, crop, reduced_decode=reduced_decode, canvas_size=canvas_size
    )
    ds = (
        TarShards(shards, seed, shuffle_buffer, num_epochs, max_member_bytes=max_member_bytes)
        .pipe(DecodeSkipBad, decode)
        .batch(local_batch_size, drop_remainder=True)
    )
    return pipeline.finish(ds, num_workers, counter, stall_timeout_s)
