"""Fine-tuning: frozen parameters (bitwise unchanged), learning-rate multipliers, and
``train.init_from`` (exactly the file's weights; a checkpoint still wins), with a short
LiT run on the tiny model. Run with ``-s`` to see the LiT figures."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from clip_jax import inference, optim, recipe, train, validation
from clip_jax.config_defaults import base_config
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.interop import files, mapping
from clip_jax.models import clip


def toy_params():
    rng = np.random.default_rng(0)
    shapes = {"visual": {"proj": (4, 3), "ln_pre": {"bias": (3,)}}, "text": {"proj": (4, 3)}}
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def run_steps(optim_config, params, steps=3):
    """``steps`` updates with fixed random gradients; returns (params, first update)."""
    tx, _ = optim.make_optimizer(optim_config, total_steps=100)
    state, first = tx.init(params), None
    for i in range(steps):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1.0)) + 0.3, params)
        updates, state = tx.update(grads, state, params)
        first = updates if first is None else first
        params = jax.tree.map(jnp.add, params, updates)
    return params, first


def adam_config(**overrides):
    c = base_config().optim
    c.lr, c.warmup_steps, c.weight_decay = 0.1, 0, 0.0
    c.update(overrides)
    return c


def bits(tree):
    return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def test_frozen_parameters_stay_bitwise_unchanged_while_the_rest_move():
    params = toy_params()
    params["visual"]["ln_pre"]["bias"] = jnp.asarray([-0.0, 0.0, 1.0])  # signed zeros survive
    new, _ = run_steps(adam_config(freeze=("^visual/",), weight_decay=0.5), params)
    for old, now in zip(bits(params["visual"]), bits(new["visual"]), strict=True):
        np.testing.assert_array_equal(old, now)
    assert np.all(np.asarray(new["text"]["proj"]) != np.asarray(params["text"]["proj"]))


def test_multiplier_zero_equals_freezing_and_half_halves_the_first_step():
    params = toy_params()
    frozen, _ = run_steps(adam_config(freeze=("^visual/",)), params)
    zero, _ = run_steps(adam_config(lr_multipliers={"^visual/": 0.0}), params)
    for a, b in zip(bits(frozen), bits(zero), strict=True):
        np.testing.assert_array_equal(a, b)
    _, full = run_steps(adam_config(), params, steps=1)
    _, half = run_steps(adam_config(lr_multipliers={"^text/": 0.5, "proj$": 0.5}), params, steps=1)
    np.testing.assert_allclose(half["visual"]["proj"], 0.5 * full["visual"]["proj"], rtol=1e-6)
    np.testing.assert_allclose(half["text"]["proj"], 0.25 * full["text"]["proj"], rtol=1e-6)  # product
    np.testing.assert_array_equal(half["visual"]["ln_pre"]["bias"], full["visual"]["ln_pre"]["bias"])


def test_frozen_gradients_do_not_count_in_clipping():
    # Clipped over the trained tower only, text's step equals a run without the visual tower.
    params = toy_params()
    _, frozen = run_steps(adam_config(freeze=("^visual/",), grad_clip_norm=0.1, eps=1.0), params, 1)
    _, alone = run_steps(adam_config(grad_clip_norm=0.1, eps=1.0), {"text": params["text"]}, 1)
    np.testing.assert_allclose(frozen["text"]["proj"], alone["text"]["proj"], rtol=1e-6)


def test_bad_patterns_and_factors_are_refused():
    with pytest.raises(ValueError, match="matches no parameter"):
        run_steps(adam_config(freeze=("^vision/",)), toy_params(), 1)
    config = base_config()
    config.data.train_files, config.data.tokenizer = "x", "y"
    config.optim.lr_multipliers = {"^text/": -1.0}
    with pytest.raises(validation.ConfigError, match="lr_multipliers"):
        validation.check_finetune(config)
    config.optim.lr_multipliers, config.optim.freeze = {}, ("(",)
    with pytest.raises(validation.ConfigError, match="not a regex"):
        validation.check_finetune(config)
    config.optim.freeze, config.train.init_from = (), "/nonexistent/weights"
    with pytest.raises(validation.ConfigError, match="init_from"):
        validation.check_finetune(config)


@pytest.fixture(scope="module")
def export(tmp_path_factory, scenes_dataset):
    """A params export of a randomly initialised tiny model, with the scenes tokenizer."""
    config = lit_config(scenes_dataset)
    vocab = Tokenizer(scenes_dataset.tokenizer, 16).vocab_size
    model = recipe.build_model(config, vocab)
    variables = jax.jit(model.init)(jax.random.key(7), *clip.dummy_inputs(model.config))
    params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
    out = str(tmp_path_factory.mktemp("export"))
    files.save(out, params, model.config, "params", eos_id=3, bos_id=2)
    shutil.copy(scenes_dataset.tokenizer, os.path.join(out, "tokenizer.model"))
    return out


def lit_config(scenes_dataset, **train_overrides):
    config = load_config("demo")
    config.data.scenes.update(
        dir=os.path.dirname(scenes_dataset.tokenizer),
        num_train=512,
        num_heldout_things=64,
        num_heldout_scenes=64,
    )
    config.train.update(batch_size=64, total_steps=30, log_every=1, **train_overrides)
    config.optim.update(warmup_steps=3, lr=2e-3)
    config.checkpoint.every = 1000
    return config


def test_lit_run_from_init_from_keeps_the_image_tower_bitwise(tmp_path, scenes_dataset, export, capsys):
    config = lit_config(scenes_dataset, init_from=export)
    config.optim.freeze = ("^visual/",)
    result = train.run(config, str(tmp_path))
    _, start, _ = inference.load_weights(export)
    end = jax.tree.map(np.asarray, result["state"].params)
    for old, new in zip(bits(start["visual"]), bits(end["visual"]), strict=True):
        np.testing.assert_array_equal(old, new)  # loaded exactly, then never touched
    moved = [not np.array_equal(a, b) for a, b in zip(bits(start["text"]), bits(end["text"]), strict=True)]
    assert all(moved)
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert last < first - 0.3, losses
    assert "initialised from" in capsys.readouterr().out
    with capsys.disabled():
        print(
            f"\nLiT (image tower frozen, random init): loss {first:.3f} -> {last:.3f} in {len(losses)} steps"
        )

    # A checkpoint wins over init_from: the run resumes, the weights are not read again.
    config.train.total_steps = 32
    resumed = train.run(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "resumed from step 30" in out and "initialised from" not in out
    assert int(resumed["state"].step) == 32


def test_init_from_loads_exactly_the_files_weights(export):
    _, start, _ = inference.load_weights(export)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), start)
    loaded, _ = inference.matching_variables(export, shapes)
    assert mapping.flatten(loaded).keys() == mapping.flatten(start).keys()
    for a, b in zip(bits(start), bits(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    shapes["text"]["token_embedding"]["embedding"] = jax.ShapeDtypeStruct((999, 8), jnp.float32)
    with pytest.raises(ValueError, match="token_embedding"):
        inference.matching_variables(export, shapes)
