"""The emoji end-to-end run: real img2dataset shards -> ArrayRecord -> training -> held-out retrieval.

    python -m clip_jax.data.emoji --config=configs/emoji.py --workdir=/tmp/clip_emoji

Prepares ``WORKDIR/data`` once (converts the tar shards of
``config.data.emoji.source``, holds out ``heldout_fraction`` of the pairs by a
hash of their key, trains a sentencepiece tokenizer on the training captions),
trains with ``train.run`` on the training shards, then reports text->image
R@1 / R@5 of the held-out captions against all held-out images, beside chance,
in ``WORKDIR/eval/heldout.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from clip_jax import cli
from clip_jax.data import convert, pipeline, records, tokenizer


@dataclasses.dataclass(frozen=True)
class EmojiDataset:
    train_files: list[str]
    heldout_file: str
    tokenizer: str
    stats: dict


def is_heldout(key: str, fraction: float) -> bool:
    """A stable split by key (crc32), independent of shard order and process."""
    return zlib.crc32(key.encode()) % 1000 < fraction * 1000


def ensure_dataset(directory: str, source: str, heldout_fraction: float, vocab_size: int, size: int):
    """Converts, splits and tokenises once; later calls find the files and return them."""
    converted = os.path.join(directory, "converted")
    tasks = convert.webdataset_tasks(records.expand(source, "config.data.emoji.source"), converted, "emoji")
    stats = convert.run(tasks, convert.Options(size=size), 1, os.path.join(converted, "emoji-stats.json"))
    heldout = os.path.join(directory, "heldout-00000-of-00001.array_record")
    tok = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(tok):
        recs = pipeline.read_all([t.out_path for t in tasks])
        train = [r for r in recs if not is_heldout(r["key"], heldout_fraction)]
        held = [r for r in recs if is_heldout(r["key"], heldout_fraction)]
        records.write_shards(train, os.path.join(directory, "train"), 4)
        records.write_shards(held, os.path.join(directory, "heldout"), 1)
        tokenizer.train_sentencepiece((r["caption"] for r in train), tok, vocab_size)
    train_files = records.expand(os.path.join(directory, "train-*.array_record"), "emoji train")
    return EmojiDataset(train_files, heldout, tok, stats)


def heldout_retrieval(model, params, tok, heldout_file: str, batch_size: int, mesh) -> dict[str, float]:
    """Text->image R@1/R@5 of every held-out caption against all held-out images, with chance."""
    from clip_jax import evaluate

    gallery = pipeline.load_eval_set([heldout_file], tok, model.config.vision.image_size)
    encoder = evaluate.Encoder(model, params, batch_size, mesh)
    similarity = encoder.texts(gallery["tokens"]) @ encoder.images(gallery["image"]).T
    n = len(similarity)
    results = {"heldout_pairs": n}
    for name, value in evaluate.recall_at_k(similarity, np.arange(n), (1, 5)).items():
        results[f"t2i_{name}"] = value
        results[f"t2i_{name}_chance"] = int(name.split("@")[1]) / n
    return results


_CONFIG = config_flags.DEFINE_config_file("config", "configs/emoji.py", "configs/emoji.py")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/clip_emoji", "Where data, checkpoints and results go.")


def main(argv):
    del argv
    from clip_jax import sharding, train

    config = _CONFIG.value.unlock()
    spec = config.data.emoji
    size = train.build_model(config).config.vision.image_size
    data = ensure_dataset(
        os.path.join(_WORKDIR.value, "data"), spec.source, spec.heldout_fraction, spec.vocab_size, size
    )
    print(convert.summary_line(data.stats), flush=True)
    config.data.train_files = ",".join(data.train_files)
    config.data.tokenizer = data.tokenizer
    config.lock()
    result = train.run(config, _WORKDIR.value)
    context_length = train.build_model(config).config.text.context_length
    tok = tokenizer.Tokenizer(data.tokenizer, context_length)
    model = train.build_model(config, tok.vocab_size)
    mesh = sharding.make_mesh(config.sharding.mesh)
    with jax.set_mesh(mesh):
        results = heldout_retrieval(model, result["state"].params, tok, data.heldout_file, 128, mesh)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
        os.makedirs(os.path.join(_WORKDIR.value, "eval"), exist_ok=True)
        with open(os.path.join(_WORKDIR.value, "eval", "heldout.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
