"""The emoji demo's data (`clip_jax.data.emoji`): img2dataset tar shards -> ArrayRecord, a held-out
split by key, a tokenizer, made once into ``WORKDIR/data`` by ``train.run`` (`resolve`) under
the workdir's lock, and not remade under a run that has checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import zlib

from clip_jax import data_fingerprint, storage
from clip_jax.data import convert, convert_readers, pipeline, records, tokenizer

VERSION = 1  # of what DONE.json records


@dataclasses.dataclass(frozen=True)
class EmojiDataset:
    train_files: list[str]
    heldout_file: str
    tokenizer: str
    stats: dict


def is_heldout(key: str, fraction: float) -> bool:
    """A stable split by key (crc32), independent of shard order and process."""
    return zlib.crc32(key.encode()) % 1000 < fraction * 1000


def dataset_spec(shards: list[str], heldout_fraction: float, vocab_size: int, size: int) -> dict:
    """What `ensure_dataset` records in ``DONE.json`` for these arguments."""
    return {
        "version": VERSION,
        "source": sorted(shards),
        "heldout_fraction": heldout_fraction,
        "vocab_size": vocab_size,
        "image_size": size,
    }


def recorded_spec(directory: str) -> dict | None:
    """The spec of the complete dataset in ``directory`` (its ``DONE.json``), or None."""
    try:
        with open(os.path.join(directory, "DONE.json")) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def ensure_dataset(
    directory: str,
    source: str,
    heldout_fraction: float,
    vocab_size: int,
    size: int,
    has_checkpoints: bool = False,
) -> EmojiDataset:
    """Converts, splits and tokenises, unless ``DONE.json`` records the same spec: then nothing is
    written. A different spec (another vocab_size, image size, split or source) is made anew,
    except under a run that ``has_checkpoints``: its data would change (DataChangedError)."""
    shards = records.expand(source, "config.data.emoji.source")
    wanted, recorded = dataset_spec(shards, heldout_fraction, vocab_size, size), recorded_spec(directory)
    train_prefix, heldout_prefix = os.path.join(directory, "train"), os.path.join(directory, "heldout")
    heldout, tok = records.shard_paths(heldout_prefix, 1)[0], os.path.join(directory, "tokenizer.model")
    if recorded not in (None, wanted) and has_checkpoints:
        changed = ", ".join(
            f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in wanted.items() if recorded.get(k) != v
        )
        raise data_fingerprint.DataChangedError(
            f"{directory} holds the data this run was trained on ({changed}); remaking it would change "
            "its data. Use a new --workdir."
        )
    if recorded != wanted:
        converted = os.path.join(directory, "converted")
        tasks = convert_readers.webdataset_tasks(shards, converted, "emoji")
        # overwrite: shards converted with other options are remade, not refused
        convert.run(tasks, convert.Options(size=size), 1, os.path.join(converted, "emoji-stats.json"), True)
        recs = pipeline.read_all([t.out_path for t in tasks])
        train = [r for r in recs if not is_heldout(r["key"], heldout_fraction)]
        records.write_shards(train, train_prefix, 4)
        records.write_shards([r for r in recs if is_heldout(r["key"], heldout_fraction)], heldout_prefix, 1)
        tokenizer.train_sentencepiece((r["caption"] for r in train), tok, vocab_size)
        records.write_atomically(os.path.join(directory, "DONE.json"), json.dumps(wanted).encode())  # last
    with open(os.path.join(directory, "converted", "emoji-stats.json")) as f:
        stats = json.load(f)
    return EmojiDataset(records.shard_paths(train_prefix, 4), heldout, tok, stats)


def resolve(config, workdir: str, image_size: int, has_checkpoints: bool) -> EmojiDataset:
    """`ensure_dataset` for ``config.data.emoji``, into ``WORKDIR/data`` (called by train.run)."""
    spec = config.data.emoji
    directory = storage.local_dir(workdir, "data")
    data = ensure_dataset(
        directory, spec.source, spec.heldout_fraction, spec.vocab_size, image_size, has_checkpoints
    )
    print(convert.summary_line(data.stats), flush=True)
    return data
