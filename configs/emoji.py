"""A tiny CLIP on 3,629 real emoji image-caption pairs (shared/data/emoji), CPU, a few minutes.

The img2dataset tar shards are converted to ArrayRecord, 10% of the pairs are
held out by key, a tokenizer is trained on the rest, and at the end text->image
retrieval of the held-out captions among the held-out images is reported next
to chance:

    python -m clip_jax.data.emoji --config=configs/emoji.py --workdir=/tmp/clip_emoji
"""

import os

from ml_collections import ConfigDict

from clip_jax.config_defaults import base_config

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "emoji")


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.variant = "tiny"  # 40 px, patch 8
    c.model.dtype = "float32"
    c.data.emoji = ConfigDict(
        {"source": os.path.join(SHARED, "0000*.tar"), "heldout_fraction": 0.1, "vocab_size": 1024}
    )
    c.data.crop_scale = (0.8, 1.0)  # emoji fill the frame: keep most of it
    c.train.batch_size = 128
    c.train.total_steps = 600
    c.train.log_every = 50
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.sharding.mesh = {"data": -1, "fsdp": 1, "model": 1}
    c.eval.batch_size = 128
    c.checkpoint.every = 200
    return c.lock()
