"""The emoji end-to-end run: real img2dataset shards -> ArrayRecord -> training -> held-out retrieval.

    python -m clip_jax.data.emoji --config=configs/emoji.py --workdir=/tmp/clip_emoji

``train.run`` prepares ``WORKDIR/data`` (`emoji_data`, under the workdir lock; converts the tar shards of
``config.data.emoji.source``, holds out ``heldout_fraction`` of the pairs by a
hash of their key, trains a sentencepiece tokenizer on the training captions),
trains with ``train.run`` on the training shards, then reports text->image
R@1 / R@5 of the held-out captions against all held-out images, beside chance,
in ``WORKDIR/eval/heldout.json``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from clip_jax import cli, recipe, sharding, storage, train
from clip_jax.data import pipeline, records
from clip_jax.eval.encode import Encoder
from clip_jax.eval.retrieval import recall_at_k


def heldout_retrieval(model, params, tok, heldout_file: str, batch_size: int, mesh) -> dict[str, float]:
    """Text->image R@1/R@5 of every held-out caption against all held-out images, with chance."""
    gallery = pipeline.load_eval_set([heldout_file], tok, model.config.vision.image_size)
    encoder = Encoder(model, params, batch_size, mesh)
    similarity = encoder.texts(gallery["tokens"]) @ encoder.images(gallery["image"]).T
    n = len(similarity)
    results = {"heldout_pairs": n}
    for name, value in recall_at_k(similarity, np.arange(n), (1, 5)).items():
        results[f"t2i_{name}"] = value
        results[f"t2i_{name}_chance"] = int(name.split("@")[1]) / n
    return results


_CONFIG = config_flags.DEFINE_config_file("config", "configs/emoji.py", "configs/emoji.py")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/clip_emoji", "Where data, checkpoints and results go.")


def main(argv):
    del argv
    config = _CONFIG.value
    # train.run makes WORKDIR/data (recipe.resolve_data -> resolve) under the workdir's lock,
    # after deciding whether the run may change it.
    result = train.run(config, _WORKDIR.value)
    directory = storage.local_dir(_WORKDIR.value, "data")
    heldout_file = records.shard_paths(os.path.join(directory, "heldout"), 1)[0]
    model, tok = recipe.model_and_tokenizer(config, os.path.join(directory, "tokenizer.model"))
    mesh = sharding.make_mesh(config.sharding.mesh)
    with jax.set_mesh(mesh):
        results = heldout_retrieval(model, result["state"].params, tok, heldout_file, 128, mesh)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
        os.makedirs(os.path.join(_WORKDIR.value, "eval"), exist_ok=True)
        with open(os.path.join(_WORKDIR.value, "eval", "heldout.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
