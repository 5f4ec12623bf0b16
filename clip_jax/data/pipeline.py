"""Grain input pipelines over ArrayRecord files (`clip_jax.data.records`), a TFDS
split prepared in array_record format (`clip_jax.data.tfds_source`) or tar shards.

Training: random access, a global shuffle by seed re-drawn every epoch, epochs
repeated without end (the loop counts steps), each JAX process reading its own
equal share, decode + augment + tokenise in worker threads (or processes),
batches of host-local numpy arrays::

    {"image": uint8 [b, S, S, 3], "tokens": int32 [b, L]}

With ``canvas_size`` C > 0 (``config.data.canvas_size``) each crop is sent unresized in a
C x C canvas and resized in the train step (`clip_jax.data.canvas`)::

    {"image": uint8 [b, C, C, 3], "box": float32 [b, 4], "extent": int32 [b, 2], "tokens": ...}

Bad records (see `clip_jax.data.skips`) never stop or shorten the stream: the
example at index i whose record is bad is replaced by the next good record
(i+1, i+2, ...) of the same shuffled order, deterministically, so every batch
is full, every host runs the same number of steps and a resumed run sees the
same batches. Each bad record is counted once per epoch, by reason, in the
`SkipCounter` passed in (the train loop logs it); it stops the run with
`TooManyBadRecords` when the share passes ``max_skip_fraction``. A watchdog
raises `DataStallError` when no batch arrives for ``stall_timeout_s``.

The stream is global (`clip_jax.data.elastic`): an epoch holds every record once,
each global batch is split into equal blocks, one per process, so every host runs
the same steps; batches run across epoch ends. Several sources are mixed by weight
(`clip_jax.data.mixture`); a record with several captions shows one drawn per
example (`clip_jax.data.captions`). The returned iterator's state is the global
position, saved in the orbax checkpoint and restored on any number of processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

from clip_jax.data import (
    canvas,
    captions,
    elastic,
    mixture,
    records,
    sized_decode,
    skips,
    transforms,
    watchdog,
)
from clip_jax.data.tokenizer import Tokenizer

# The readers `from_config` knows (config.data.format).
FORMATS = ("array_record", "webdataset", "tfds")
# Consecutive bad records tolerated before a replacement search gives up.
MAX_REPLACE_TRIES = 64


@dataclasses.dataclass(frozen=True)
class Crop:
    """Random-resized-crop parameters (area share and aspect-ratio ranges)."""

    scale: tuple[float, float] = (0.9, 1.0)  # open_clip's CLIP training default
    ratio: tuple[float, float] = transforms.CROP_RATIO


DEFAULT_CROP = Crop()


@dataclasses.dataclass(frozen=True)
class DecodeExample:
    """A record (msgpack bytes or dict) -> {"image": uint8 [S, S, 3], "tokens": int32 [L]}.

    ``crop``: random-resized crop drawn from the ``rng`` given (training); None:
    resize + centre crop (evaluation). ``reduced_decode``: a JPEG larger than the crop
    needs is decoded at 1/2, 1/4 or 1/8 scale (`clip_jax.data.sized_decode`); False: the
    full decode. ``canvas_size`` > 0: the example is `canvas.place`'s (a random crop left
    for the step to resize; a centre crop resized here, with the identity box). Raises
    `skips.BadRecord`.
    """

    tokenizer: Tokenizer
    image_size: int
    crop: Crop | None = None
    max_pixels: int = transforms.MAX_PIXELS
    caption_field: str | None = None  # None: "captions" (a list) or "caption"
    reduced_decode: bool = False
    canvas_size: int = 0

    def __call__(self, element: bytes | dict, rng: np.random.Generator | None = None) -> dict[str, Any]:
        record = element if isinstance(element, dict) else _unpack(element)
        if record.get("bad"):  # a reader marked it (e.g. a tar member cut short)
            raise skips.BadRecord(record["bad"], record.get("detail") or record.get("key", ""))
        # Drawn first: the crop's randomness then does not depend on the number of captions.
        caption = captions.choose(record, rng, self.caption_field)
        data, size, reduced = record.get("image") or b"", self.image_size, self.reduced_decode
        if self.crop is None or rng is None:
            image = sized_decode.resize_center_crop(data, size, self.max_pixels, reduced)
            example = canvas.identity(image, self.canvas_size) if self.canvas_size else {"image": image}
        else:
            crop = (data, size, rng, self.crop.scale, self.crop.ratio, self.max_pixels, reduced)
            if self.canvas_size:
                example = canvas.place(*sized_decode.random_region(*crop), size, self.canvas_size)
            else:
                example = {"image": sized_decode.random_resized_crop(*crop)}
        return {**example, "tokens": self.tokenizer([caption])[0]}


def _unpack(data: bytes) -> dict:
    try:
        record = records.decode(data)
    except Exception as e:  # corrupt msgpack: any of several exception types
        raise skips.BadRecord("decode_error", f"record: {type(e).__name__}") from None
    if not isinstance(record, dict):
        raise skips.BadRecord("decode_error", "record is not a map")
    return record


class DecodeOrReplace(grain.MapDataset):
    """Decodes element i; a bad one is replaced by the next good element (i+1, ...).

    Each example also carries ``"skipped"`` int32 [len(REASONS)] (the reason of
    element i when it was bad, so each bad record is counted once) and
    ``"drawn"`` (1). Randomness: ``np.random.default_rng([seed, i, attempt])``.
    """

    def __init__(self, parent: grain.MapDataset, decode: DecodeExample, seed: int):
        super().__init__(parent)
        self._decode = decode
        self._seed = seed

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "DecodeOrReplace"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        reason, reasons = None, []
        for attempt in range(min(MAX_REPLACE_TRIES, len(self._parent))):
            rng = np.random.default_rng([self._seed, index, attempt])
            try:
                example = self._decode(self._parent[(index + attempt) % len(self._parent)], rng)
            except skips.BadRecord as e:
                reason = reason or e.reason
                reasons.append(e.reason)
                continue
            return {**example, "skipped": skips.one_hot(reason), "drawn": np.int32(1)}
        raise skips.TooManyBadRecords(
            f"{len(reasons)} consecutive bad records from index {index} ({sorted(set(reasons))}): "
            "the data is mostly broken"
        )


@dataclasses.dataclass(frozen=True)
class CountSkips(grain.transforms.Map):
    """Main-process stage: moves a batch's "skipped"/"drawn" into the counter (which may raise)."""

    counter: skips.SkipCounter

    def map(self, batch: dict) -> dict:
        batch = dict(batch)
        skipped, drawn = batch.pop("skipped"), batch.pop("drawn")
        self.counter.add(int(np.sum(drawn)), skipped)
        return batch


def open_records(files: Sequence[str] | grain.MapDataset) -> grain.MapDataset:
    """All records of ArrayRecord ``files`` (or a random-access MapDataset of records, e.g.
    `tfds_source.records`), in file order."""
    if isinstance(files, grain.MapDataset):
        return files
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(files)))


def process_share(files: Sequence[str] | grain.MapDataset) -> grain.MapDataset:
    """An equal, disjoint, fixed share of the records per JAX process (for jobs that split a
    record set once, e.g. offline scoring). Training does not use it: it splits each
    global batch instead (`clip_jax.data.elastic`), so the process count may change."""
    source = open_records(files)
    count = jax.process_count()
    usable = len(source) - len(source) % count
    return source[jax.process_index() : usable : count]


def source_stream(source: mixture.Source, decode: DecodeExample, seed: int) -> tuple[grain.MapDataset, int]:
    """(the endless decoded stream of one source, its record count): shuffled by ``seed``,
    reshuffled every epoch; element ``g`` is example ``g % n`` of epoch ``g // n``."""
    records_ = source.records() if source.records is not None else open_records(source.files)
    if len(records_) == 0:
        raise ValueError(f"data source {source.name!r} has no records")
    decode = dataclasses.replace(decode, caption_field=source.caption_field)
    return records_.shuffle(seed=seed).repeat(None).pipe(DecodeOrReplace, decode, seed), len(records_)


def global_stream(
    sources: Sequence[mixture.Source], decode: DecodeExample, seed: int
) -> tuple[grain.MapDataset, Callable[[int], dict[str, Any]]]:
    """(the global training stream, position -> {epoch, examples per source}).

    One source: its stream, shuffled by ``seed``. Several: each shuffled by its own
    seed and mixed by weight (`mixture.Schedule`, drawn from ``seed``).
    """
    if len(sources) == 1:
        stream, size = source_stream(sources[0], decode, seed)
        return stream, lambda g: {"epoch": g // size, "index_in_epoch": g % size}
    streams, sizes = zip(
        *(source_stream(s, decode, mixture.source_seed(seed, i)) for i, s in enumerate(sources)), strict=True
    )
    schedule = mixture.Schedule.from_weights([s.weight for s in sources], seed)

    def describe(g: int) -> dict[str, Any]:
        counts = schedule.counts_before(g)
        return {
            "sources": {
                s.name: {"examples": n, "epoch": n // size}
                for s, n, size in zip(sources, counts, sizes, strict=True)
            }
        }

    return mixture.Mixed(streams, schedule), describe


def train_iterator(
    files: Sequence[str] | grain.MapDataset | Sequence[mixture.Source],
    tokenizer: Tokenizer,
    image_size: int,
    local_batch_size: int,
    seed: int,
    num_workers: int = 0,
    num_threads: int = 4,
    prefetch_batches: int = 4,
    crop: Crop | None = DEFAULT_CROP,
    counter: skips.SkipCounter | None = None,
    stall_timeout_s: float | None = 600.0,
    process_index: int | None = None,
    process_count: int | None = None,
    reduced_decode: bool = True,
    canvas_size: int = 0,
) -> elastic.GlobalIterator:
    """An endless iterator of host-local training batches from ArrayRecord ``files``
    (or a MapDataset of records), or from a weighted mixture of `mixture.Source` s.

    This process reads its block of every global batch (`clip_jax.data.elastic`);
    ``process_index``/``process_count`` default to JAX's (tests pass others to simulate
    hosts). ``counter``: where skipped records are counted (a fresh one with the default
    ceiling when None). ``crop=None``: centre crops (no augmentation). ``reduced_decode``
    (``config.data.reduced_decode``): JPEGs decoded at the scale the crop needs (see
    `DecodeExample`); False: full decodes, the pixels of before. ``canvas_size``
    (``config.data.canvas_size``): crops resized in the step (`clip_jax.data.canvas`).
    """
    if isinstance(files, (list, tuple)) and files and isinstance(files[0], mixture.Source):
        sources = list(files)
    else:
        sources = [mixture.Source("train", files)]
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    stream, describe = global_stream(
        sources,
        DecodeExample(tokenizer, image_size, crop, reduced_decode=reduced_decode, canvas_size=canvas_size),
        seed,
    )

    def build(start: int) -> grain.DatasetIterator:
        ds = elastic.ProcessView(stream, start, local_batch_size, index, count)
        ds = ds.batch(local_batch_size, drop_remainder=True)
        # Threads decode ahead up to `prefetch_batches` batches; more only competes with
        # the step for CPU on small hosts.
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
        it = ds.to_iter_dataset(options)
        return finish(it, num_workers, counter, stall_timeout_s)

    return elastic.GlobalIterator(build, local_batch_size * count, describe)


def finish(
    it: grain.IterDataset,
    num_workers: int,
    counter: skips.SkipCounter | None,
    stall_timeout_s: float | None,
) -> grain.DatasetIterator:
    """Worker processes, then (in this process) skip counting and the stall watchdog."""
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    it = it.map(CountSkips(counter if counter is not None else skips.SkipCounter()))
    if stall_timeout_s:
        it = watchdog.Watchdog(it, stall_timeout_s)
    return iter(it)


def read_all(files: Sequence[str]) -> list[dict]:
    """Every decoded record of ``files`` in order (small evaluation sets)."""
    source = grain.sources.ArrayRecordDataSource(list(files))
    return [records.decode(source[i]) for i in range(len(source))]


def load_eval_set(files: Sequence[str], tokenizer: Tokenizer, image_size: int) -> dict:
    """A small evaluation set in memory, in file order, bad records left out::

    {"image": uint8 [N, S, S, 3], "tokens": int32 [N, L] (the first caption's),
     "caption": [N] str (the first), "captions": [N] lists of str (all),
     "labels": {name: int64 [N]}}  (labels when the records carry them)
    """
    decoder = DecodeExample(tokenizer, image_size)
    examples, recs, texts = [], [], []
    for record in read_all(files):
        try:
            examples.append(decoder(record))
        except skips.BadRecord:
            continue
        recs.append(record)
        texts.append(captions.all_texts(record))
    label_names = recs[0].get("labels", {}) if recs else {}
    return {
        "image": np.stack([e["image"] for e in examples]),
        "tokens": np.stack([e["tokens"] for e in examples]),
        "caption": [t[0] for t in texts],
        "captions": texts,
        "labels": {n: np.asarray([r["labels"][n] for r in recs]) for n in label_names},
    }
