"""The embedded default: a tiny CLIP trained on CPU in a few minutes, no downloads.

Data: procedurally generated captioned scenes (clip_jax/data/scenes.py),
written as ArrayRecord shards and read through the same Grain pipeline as
real data. At the end it reports zero-shot accuracy on never-seen colour+shape
combinations and text->image retrieval, next to chance.

    python -m clip_jax.main --config=configs/demo.py --workdir=/tmp/clip_demo
"""

from ml_collections import ConfigDict, config_dict

from clip_jax.config_defaults import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.variant = "tiny"
    c.model.dtype = "float32"
    c.data.scenes = ConfigDict(
        {
            "dir": config_dict.placeholder(str),  # None: WORKDIR/scenes
            "num_train": 20_000,
            "num_heldout_things": 300,
            "num_heldout_scenes": 300,
            "vocab_size": 128,
            "seed": 0,
        }
    )
    c.train.batch_size = 128
    c.train.total_steps = 500
    c.train.log_every = 50
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.sharding.mesh = {"data": -1, "fsdp": 1, "model": 1}
    c.eval.batch_size = 128
    # The scene evaluation (clip_jax/eval/scenes_suite.py): every N steps (0: at the end only);
    # diagnostics: counting, spatial relations, binding, size; probes: caption pairs per diagnostic.
    c.eval.evaluators = ConfigDict(
        {"scenes": {"kind": "scenes", "every": 0, "diagnostics": True, "probes": 200, "linear_probe": False}}
    )
    c.checkpoint.every = 100
    return c.lock()
