"""Weight-decay mask, schedule, and the optimizer's effect on parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import optim
from clip_jax.config_defaults import NO_WEIGHT_DECAY, base_config
from clip_jax.models import clip


@pytest.fixture(scope="module")
def params():
    config = clip.get_variant("tiny")
    abstract = jax.eval_shape(
        lambda: clip.CLIP(config).init(jax.random.key(0), *clip.dummy_inputs(config))["params"]
    )
    return nn.meta.unbox(abstract)


def decayed_paths(params):
    mask = optim.weight_decay_mask(params, NO_WEIGHT_DECAY)
    return {optim.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}


def test_weight_decay_skips_biases_gains_positions_class_token_and_scale(params):
    decay = decayed_paths(params)
    excluded = {p for p, v in decay.items() if not v}
    assert "logit_scale" in excluded
    assert "visual/class_token" in excluded
    assert {"visual/pos_embedding", "text/pos_embedding"} <= excluded
    assert "visual/ln_pre/scale" in excluded and "text/ln_final/bias" in excluded
    assert "visual/transformer/block_0/attn/query/bias" in excluded
    assert "text/transformer/block_2/ln_2/scale" in excluded
    # Every weight matrix decays (kernels, embeddings, projections), and nothing else.
    for name, decays in decay.items():
        assert decays == name.endswith(("kernel", "token_embedding/embedding", "proj")), name


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    config = base_config().optim
    config.lr, config.warmup_steps, config.end_lr_factor = 1e-3, 10, 0.1
    schedule = optim.make_schedule(config, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    halfway = 1e-4 + (1e-3 - 1e-4) * 0.5  # cosine at half of the decay
    np.testing.assert_allclose(float(schedule(60)), halfway, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-5)


def test_adamw_decays_only_masked_parameters():
    config = base_config().optim
    config.lr, config.warmup_steps, config.weight_decay = 0.1, 0, 0.5
    tx, _ = optim.make_optimizer(config, total_steps=100)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "logit_scale": jnp.float32(1.0)}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
    assert float(updates["logit_scale"]) == 0.0


@pytest.mark.parametrize("clip_norm, grad_seen", [(1.0, 0.5), (1e9, 10.0)])
def test_gradients_are_clipped_by_global_norm(clip_norm, grad_seen):
    # With eps = 1 Adam's first step is lr * g / (|g| + 1): it shows the gradient it saw.
    config = base_config().optim
    config.grad_clip_norm, config.warmup_steps, config.weight_decay = clip_norm, 0, 0.0
    config.lr, config.eps = 1.0, 1.0
    tx, _ = optim.make_optimizer(config, total_steps=100)
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)  # global norm 20
    np.testing.assert_allclose(updates["w"], -grad_seen / (grad_seen + 1.0), rtol=1e-5)
