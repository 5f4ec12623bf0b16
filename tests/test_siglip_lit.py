"""LiT from an imported SigLIP-layout model: a tiny two-towers model saved as a big_vision
``.npz`` is ``train.init_from``; the image tower stays bitwise the file's while the text
tower learns with the sigmoid ring loss (as test_finetune's LiT test does for CLIP).
Run with ``-s`` to see the figures."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import load_config

from clip_jax import inference, recipe, train
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.interop import big_vision, files
from clip_jax.models import clip


def bits(tree):
    return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def siglip_config(scenes_dataset, **train_overrides):
    config = load_config("demo_siglip")
    config.data.scenes.update(
        dir=os.path.dirname(scenes_dataset.tokenizer),
        num_train=512,
        num_heldout_things=64,
        num_heldout_scenes=64,
    )
    config.train.update(batch_size=64, total_steps=25, log_every=1, **train_overrides)
    config.optim.update(warmup_steps=3, lr=2e-3)
    config.checkpoint.every = 1000
    return config


@pytest.mark.slow
def test_lit_from_a_big_vision_npz_keeps_the_image_tower_bitwise(tmp_path, scenes_dataset, capsys):
    config = siglip_config(scenes_dataset)
    model = recipe.build_model(config, Tokenizer(scenes_dataset.tokenizer, 16).vocab_size)
    variables = jax.jit(model.init)(jax.random.key(7), *clip.dummy_inputs(model.config))
    params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
    weights, _ = files.save(str(tmp_path / "bv"), params, model.config, "big_vision", eos_id=1, bos_id=0)
    assert weights.endswith(big_vision.WEIGHTS)

    config.train.init_from = weights  # the .npz itself
    config.optim.freeze = ("^visual/",)
    result = train.run(config, str(tmp_path / "run"))
    _, start, _ = inference.load_weights(weights)
    end = jax.tree.map(np.asarray, result["state"].params)
    assert len(bits(start["visual"])) == len(bits(end["visual"]))
    for old, new in zip(bits(start["visual"]), bits(end["visual"]), strict=True):
        np.testing.assert_array_equal(old, new)  # loaded exactly, then never touched
    moved = [not np.array_equal(a, b) for a, b in zip(bits(start["text"]), bits(end["text"]), strict=True)]
    assert all(moved)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert last < first - 0.3, losses
    assert "initialised from" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\nSigLIP LiT from a big_vision npz (image frozen): loss {first:.3f} -> {last:.3f}")
