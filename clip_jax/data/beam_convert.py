"""Conversion on Apache Beam: the same records as `clip_jax.data.convert`, on many machines.

The pipeline (DirectRunner locally and in tests, DataflowRunner on Google Cloud)::

    inputs -> Reshuffle -> read + `convert.prepare_hashed` (filters, decode, re-encode)
      -> drop --exclude matches -> group by sha256 (exact copies) -> group by dhash (re-encoded
      copies) -> one group per output shard -> ArrayRecord shards -> PREFIX-stats.json

The inputs are the local converter's own readers (`clip_jax.data.convert_readers`:
`TarReader` per tar shard, `FolderReader` per chunk of table rows, `TfdsReader` per
index range of a TFDS split: `inputs`), and each record is made by its own per-sample
function, so both write the same records. Duplicates are dropped globally, across all inputs
(group-bys on the hashes, not per shard); of each group the copy with the
smallest key survives. With ``near_dup_bits`` > 0 the dhashes are grouped by band
(`dedup.band_keys`) and a record is dropped when another within that many bits has a
smaller key (a chain a~b~c then loses b and c, where the local converter, first seen
first kept, keeps c). A flat image (dhash 0: every solid colour shares it) is
deduplicated by its bytes only. Within a shard records are in no set order.

Every shard is written under a private temporary name (local) or uploaded in one
piece (``gs://``, through `clip_jax.storage`), so none looks finished before it is;
the run refuses an output prefix that already has shards. The per-image
``timeout_s`` of `convert.Options` needs a main thread (SIGALRM); Beam runs
DoFns in threads, so here it does not apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from array_record.python.array_record_module import ArrayRecordWriter

from clip_jax import cli, storage
from clip_jax.data import convert, convert_readers, dedup, records, skips

STATS = "stats"  # the tag of the counters each stage emits: (name, n)
Reader = Callable[[], Iterable[convert.Item]]  # one unit of work: a picklable convert_readers.*Reader


def _stat(name: str, n: int = 1) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(STATS, (name, n))


class _Prepare(beam.DoFn):
    """A reader (`inputs`) -> (sha256, (key, dhash, record bytes)) per kept sample; counters to `STATS`."""

    def __init__(self, opts: convert.Options):
        self.opts = opts

    def setup(self):
        self.exclude = dedup.load_exclude(self.opts.exclude) if self.opts.exclude else frozenset()

    def process(self, read: Reader) -> Iterator[Any]:
        hashes = self.opts.dedup or bool(self.exclude)
        for item in read():
            yield _stat("bytes_in", convert.item_size(item.image))
            try:
                record, digest = convert.prepare_hashed(item, self.opts, hashes=hashes)
            except skips.BadRecord as e:
                yield _stat(f"skipped/{e.reason}")
                continue
            if dedup.drop_reason(digest, self.exclude, None):
                yield _stat("skipped/eval_excluded")
                continue
            digest = digest or {"sha256": "key:" + item.key, "dhash": dedup.FLAT}  # no dedup: all distinct
            yield digest["sha256"], (item.key, digest["dhash"], records.encode(record))


def _survivor(group: tuple[str, Iterable[tuple]], reason: str) -> Iterator[Any]:
    """The copy with the smallest key of one hash group; the others counted under ``reason``.
    Streams the group (a hash shared by millions of records never sits in memory)."""
    _, copies = group
    best, n = None, 0
    for copy in copies:
        n += 1
        if best is None or copy[0] < best[0]:
            best = copy
    if n > 1:
        yield _stat(f"skipped/{reason}", n - 1)
    yield best


def _with_id(copy: tuple[str, str, bytes]) -> tuple[str, tuple[str, str, bytes]]:
    """(record id, copy): the key and a hash of the record, so records of two inputs that share
    a key stay apart in the join."""
    key, _, data = copy
    return f"{key}\0{hashlib.blake2b(data, digest_size=8).hexdigest()}", copy


def _band_entries(item: tuple[str, tuple[str, str, bytes]]) -> Iterator[tuple[str, tuple[str, str]]]:
    """(band key, (record id, dhash hex)) per non-zero band of a record's dhash (`dedup.band_keys`)."""
    uid, (_, near, _) = item
    if near != dedup.FLAT:
        for band in dedup.band_keys(near):
            yield band, (uid, near)


def _near_losers(group: tuple[str, Iterable[tuple[str, str]]], bits: int) -> Iterator[tuple[str, bool]]:
    """(record id, True) for each record of one band group with another within ``bits`` of it that
    has a smaller id (key first). The group is held as arrays: about 4 N / 65536 of N spread hashes."""
    _, entries = group
    ids, hashes = zip(*sorted(entries), strict=True)
    values = np.asarray([int(h, 16) for h in hashes], np.uint64)  # hex on the wire: Beam's ints are signed
    for i in range(1, len(ids)):
        if (np.bitwise_count(values[:i] ^ values[i]) <= bits).any():
            yield ids[i], True


def _unless_near(joined: tuple[str, dict[str, list]]) -> Iterator[Any]:
    """(key, record bytes) of a record no `_near_losers` named; the others counted."""
    _, parts = joined
    for key, _, data in parts["record"]:
        if parts["near"]:
            yield _stat("skipped/duplicate_near")
        else:
            yield key, data


def _near_copies(kept: beam.PCollection, bits: int) -> tuple[beam.PCollection, beam.PCollection]:
    """(key, record bytes) of ``kept`` (key, dhash, bytes) less the records with another within
    ``bits`` bits that has a smaller key, and the counters. Only keys and hashes are grouped by
    band; the record bytes meet the verdict in one join by record id."""
    with_id = kept | "record ids" >> beam.Map(_with_id)
    losers = (
        with_id
        | "band keys" >> beam.FlatMap(_band_entries)
        | "by band" >> beam.GroupByKey()
        | "near pairs" >> beam.FlatMap(_near_losers, bits)
    )
    out = (
        {"record": with_id, "near": losers}
        | "join by id" >> beam.CoGroupByKey()
        | "near copies" >> beam.FlatMap(_unless_near).with_outputs(STATS, main="kept")
    )
    return out.kept, out[STATS]


def _by_dhash(copy: tuple[str, str, bytes]) -> tuple[str, tuple[str, bytes]]:
    key, near, data = copy
    return ("key:" + key if near == dedup.FLAT else near), (key, data)


def _shard_of(copy: tuple[str, bytes], num_shards: int) -> tuple[int, bytes]:
    return zlib.crc32(copy[0].encode()) % num_shards, copy[1]


class _WriteShard(beam.DoFn):
    """(shard index, {"records": [bytes...]}) -> shard ``index`` of ``paths``, written atomically."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def process(self, element: tuple[int, dict[str, Iterable[bytes]]]) -> Iterator[Any]:
        index, groups = element
        path = self.paths[index]
        remote = storage.is_remote(path)
        tmp_dir = tempfile.mkdtemp() if remote else os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(tmp_dir, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        writer, kept, size = ArrayRecordWriter(tmp, records.WRITER_OPTIONS), 0, 0
        try:
            for data in groups["records"]:
                writer.write(data)
                kept, size = kept + 1, size + len(data)
        finally:
            writer.close()
        if remote:  # one upload, visible only when complete
            storage.copy_file(tmp, path)
            os.remove(tmp)
            os.rmdir(tmp_dir)
        else:
            os.replace(tmp, path)
        yield from (_stat("kept", kept), _stat("bytes_out", size), _stat("shards"))


def _summary(counts: dict[str, int]) -> dict[str, Any]:
    """Counters -> the summary layout of `convert.run` (skipped by reason)."""
    stats = convert.new_stats()
    del stats["skipped_examples"], stats["seconds"]
    for name, n in sorted(counts.items()):
        if name.startswith("skipped/"):
            stats["skipped"][name.removeprefix("skipped/")] = n
        else:
            stats[name] = n
    return stats


def build(
    p: beam.Pipeline, readers: list[Reader], paths: list[str], stats_path: str, opts: convert.Options
) -> None:
    """Adds the conversion of the items of ``readers`` into the shards ``paths`` to pipeline ``p``."""
    prepared = (
        p
        | "inputs" >> beam.Create(readers)
        | "spread" >> beam.Reshuffle()  # else a runner may fuse all reads into one worker
        | "prepare" >> beam.ParDo(_Prepare(opts)).with_outputs(STATS, main="records")
    )
    counters = [prepared[STATS]]
    if opts.dedup:
        exact = (
            prepared.records
            | "by sha256" >> beam.GroupByKey()
            | "exact copies" >> beam.FlatMap(_survivor, "duplicate_exact").with_outputs(STATS, main="kept")
        )
        if opts.near_dup_bits:
            kept, near_counts = _near_copies(exact.kept, opts.near_dup_bits)
        else:
            near = (
                exact.kept
                | "key by dhash" >> beam.Map(_by_dhash)
                | "by dhash" >> beam.GroupByKey()
                | "near copies" >> beam.FlatMap(_survivor, "duplicate_near").with_outputs(STATS, main="kept")
            )
            kept, near_counts = near.kept, near[STATS]
        counters += [exact[STATS], near_counts]
    else:
        kept = prepared.records | "drop hashes" >> beam.Map(lambda kv: (kv[1][0], kv[1][2]))
    indices = p | "shard indices" >> beam.Create([(i, None) for i in range(len(paths))])  # empty ones too
    written = (
        {"records": kept | "to shards" >> beam.Map(_shard_of, len(paths)), "index": indices}
        | "by shard" >> beam.CoGroupByKey()
        | "write" >> beam.ParDo(_WriteShard(paths)).with_outputs(STATS, main="none")
    )
    counters.append(written[STATS])
    _ = (
        counters
        | "all counters" >> beam.Flatten()
        | "sum" >> beam.CombinePerKey(sum)
        | "as dict" >> beam.combiners.ToDict()
        | "write stats" >> beam.Map(lambda c: storage.write_json(stats_path, _summary(c)))
    )


def inputs(sources: list[str | Reader], **reader: Any) -> list[Reader]:
    """The readers of ``sources``: a tar shard path becomes a `convert_readers.TarReader`
    (``reader``: its ``max_bytes``, ``timeout_s``); a reader (`convert_readers.folder_readers`,
    `convert_readers.tfds_readers`) is kept."""
    return [convert_readers.TarReader(s, **reader) if isinstance(s, str) else s for s in sources]


def _remote_paths(read: Reader) -> list[str]:
    """The paths a Dataflow worker must reach for ``read`` (a tar, an image folder, a TFDS data_dir)."""
    if isinstance(read, convert_readers.TarReader):
        return [read.path]
    if isinstance(read, convert_readers.FolderReader):
        return [read.root]
    return [read.data_dir or ""] if isinstance(read, convert_readers.TfdsReader) else []


def run(
    sources: list[str | Reader],
    out_dir: str,
    prefix: str,
    opts: convert.Options,
    num_shards: int = 0,
    reader: dict | None = None,
    beam_args: Iterable[str] = (),
) -> dict[str, Any]:
    """Converts ``sources`` (tar shard paths, or readers: `inputs`) into ``num_shards`` (0: as
    many as inputs) ArrayRecord shards ``OUT_DIR/PREFIX-i-of-n.array_record``; writes and
    returns the summary ``PREFIX-stats.json``. ``reader``: `convert_readers.TarReader`'s options.
    ``beam_args``: Beam's own flags (``--runner``, ``--direct_num_workers``, Dataflow's ...)."""
    readers = inputs(sources, **(reader or {}))
    if not readers:
        raise cli.UserError("nothing to convert: the input has no shards, rows or examples")
    beam_opts = PipelineOptions(list(beam_args))
    runner = str(beam_opts.get_all_options().get("runner") or "")
    needed = [x for r in readers for x in _remote_paths(r)]
    if "Dataflow" in runner and not all(
        storage.is_remote(x) for x in (out_dir, *needed, opts.exclude or "gs:")
    ):
        raise cli.UserError(
            "--runner=DataflowRunner: the inputs (tars, --image_dir, --tfds_data_dir), --out_dir and "
            "--exclude must be gs:// paths"
        )
    if existing := storage.glob(os.path.join(out_dir, f"{prefix}-*.array_record")):
        raise cli.UserError(
            f"--out_dir={out_dir} already has {len(existing)} shards {prefix}-*.array_record; "
            "choose another --prefix or --out_dir (nothing is overwritten)"
        )
    paths = records.shard_paths(os.path.join(out_dir, prefix), num_shards or len(readers))
    stats_path = os.path.join(out_dir, f"{prefix}-stats.json")
    storage.makedirs(out_dir)
    start = time.perf_counter()
    with beam.Pipeline(options=beam_opts) as p:
        build(p, readers, paths, stats_path, opts)
    wall = time.perf_counter() - start
    stats = storage.read_json(stats_path)
    done = stats["kept"] + sum(stats["skipped"].values())
    stats.update(
        wall_seconds=round(wall, 3),
        shards_resumed=0,
        images_per_sec=round(done / wall, 1),
        options={**dataclasses.asdict(opts), "runner": runner or "DirectRunner"},
    )
    storage.write_json(stats_path, stats)
    return stats
