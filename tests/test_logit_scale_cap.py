"""The sigmoid losses' initial t and b from the config, and the cap on exp(logit_scale)
after each update: CLIP's 100 for the softmax losses, none for the sigmoid ones (an
imported SigLIP's learned scale may exceed 100), or ``config.train.max_logit_scale``."""

import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax import cli, losses, step
from clip_jax.models import clip
from clip_jax.recipe import build_model

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def recipe(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def scale_after_one_step(model, loss, start):
    """exp(logit_scale) after one step that changes nothing else (SGD at lr 0) from ``start``."""
    images, tokens = clip.dummy_inputs(model.config, 4)
    params = nn.meta.unbox(model.init(jax.random.key(0), images, tokens)["params"])
    params["logit_scale"] = jnp.float32(math.log(start))
    tx = optax.sgd(0.0)
    state = step.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), {})
    train_step = step.make_train_step(model, tx, optax.constant_schedule(0.0), losses.BUILDERS[loss](None))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, images.shape, dtype=np.uint8),
        "tokens": rng.integers(1, model.config.text.vocab_size, tokens.shape).astype(np.int32),
    }
    new_state, _ = jax.jit(train_step)(state, batch)
    return float(np.exp(new_state.params["logit_scale"]))


def test_softmax_keeps_clips_cap_and_sigmoid_has_none():
    softmax = build_model(recipe("demo"))
    sigmoid = build_model(recipe("demo_siglip"))
    assert clip.scale_cap(softmax) == 100.0 and clip.scale_cap(sigmoid) is None
    assert scale_after_one_step(softmax, "softmax_dense", 150.0) == pytest.approx(100.0, rel=1e-5)
    # An imported SigLIP's scale above 100 is kept as it is (bitwise: the step changes nothing).
    assert scale_after_one_step(sigmoid, "sigmoid_dense", 150.0) == pytest.approx(150.0, rel=1e-6)
    assert scale_after_one_step(sigmoid, "sigmoid_dense", 150.0) > 100.0 + 1e-3


def test_the_cap_is_a_config_value():
    config = recipe("demo_siglip").unlock()
    config.train.max_logit_scale = 120.0
    assert scale_after_one_step(build_model(config), "sigmoid_dense", 150.0) == pytest.approx(120.0)
    config.train.max_logit_scale = float("inf")  # no cap, for a softmax model too
    config.train.loss = "softmax_dense"
    model = build_model(config)
    assert clip.scale_cap(model) is None
    config.train.max_logit_scale = 0.0
    with pytest.raises(cli.UserError, match="config.train.max_logit_scale=0.0 must be > 0"):
        clip.scale_cap(build_model(config))


def test_clamp_logit_scale():
    params = {"logit_scale": jnp.float32(math.log(150.0))}
    assert float(clip.clamp_logit_scale(params, 120.0)["logit_scale"]) == pytest.approx(math.log(120.0))
    assert clip.clamp_logit_scale(params, None) is params
    assert float(clip.clamp_logit_scale(params)["logit_scale"]) == pytest.approx(math.log(100.0))


def test_the_sigmoid_init_is_a_config_value():
    config = recipe("demo_siglip").unlock()
    # The demo's bias: the log-odds of a positive among its 128 x 128 pairs, not SigLIP's -10.
    assert build_model(config).config.logit_bias_init == pytest.approx(-math.log(128))
    config.train.update(sigmoid_init_scale=None, sigmoid_init_bias=None)
    model = build_model(config)
    assert model.config.logit_scale_init == pytest.approx(math.log(10.0))  # SigLIP's t' = log 10
    assert model.config.logit_bias_init == -10.0
    config.train.update(sigmoid_init_scale=30.0, sigmoid_init_bias=-7.0)
    model = build_model(config)
    values = model.init(jax.random.key(0), *clip.dummy_inputs(model.config))["params"]
    assert float(np.exp(values["logit_scale"].value)) == pytest.approx(30.0, rel=1e-6)
    assert float(values["logit_bias"].value) == -7.0
    config.train.sigmoid_init_scale = -1.0
    with pytest.raises(cli.UserError, match="sigmoid_init_scale=-1.0 must be > 0"):
        build_model(config)
    softmax = recipe("demo")  # the softmax demo keeps CLIP's init: no bias, t = 1 / 0.07
    assert build_model(softmax).config.logit_bias_init is None
    assert build_model(softmax).config.logit_scale_init == pytest.approx(math.log(1 / 0.07))
