"""Weight-decay mask, schedule, and the optimizer's effect on parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax import nonfinite, optim
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


# --- The step's update: optim.update_if against optax's own chain ---------------------------


def small_tree(seed, scale):
    rng = np.random.default_rng(seed)
    shapes = {"dense": {"kernel": (6, 5), "bias": (5,)}, "proj": (5, 3), "logit_scale": ()}
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s) * scale, jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def optax_reference(config):
    """The optimizer as optax spells it (clip, then adamw with the decay mask)."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            optim.make_schedule(config, 100),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=lambda p: optim.weight_decay_mask(p, config.wd_exclude),
        ),
    )


def trees_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b, strict=True)
    )


@pytest.mark.parametrize("clip_norm", [0.5, 1e9])  # clipping on every step / never
def test_update_if_is_optax_adamw_bitwise_and_skips_nonfinite_steps(clip_norm):
    config = base_config().optim
    config.lr, config.warmup_steps, config.weight_decay, config.grad_clip_norm = 0.01, 2, 0.1, clip_norm
    tx, _ = optim.make_optimizer(config, total_steps=100)
    reference = optax_reference(config)
    clamp = lambda p: {**p, "logit_scale": jnp.minimum(p["logit_scale"], 0.3)}

    def ours(params, opt_state, grads, ok):
        grad_norm = optax.tree.norm(grads)
        return optim.update_if(ok, tx, grads, opt_state, params, clamp, grad_norm)

    def theirs(params, opt_state, grads, ok):  # the step's code before update_if: a select
        updates, new_state = reference.update(grads, opt_state, params)
        new_params = clamp(optax.apply_updates(params, updates))
        return nonfinite.keep_if_finite(ok, new_params, params, new_state, opt_state)

    ours, theirs = jax.jit(ours, donate_argnums=(0, 1)), jax.jit(theirs, donate_argnums=(0, 1))
    params = small_tree(0, 1.0)
    a = (params, tx.init(params))
    b = (jax.tree.map(jnp.copy, params), reference.init(params))
    assert jax.tree.structure(a[1]) == jax.tree.structure(b[1])  # checkpoints keep their layout
    for step in range(5):
        grads, ok = small_tree(step + 1, 3.0), step != 2  # step 2: a skipped (non-finite) step
        before = jax.tree.map(np.asarray, a)
        a, b = ours(*a, grads, jnp.bool_(ok)), theirs(*b, grads, jnp.bool_(ok))
        assert trees_bitwise_equal(a, b), step
        changed = not trees_bitwise_equal(a[0], before[0])
        assert changed == ok
    assert [int(c) for c in (a[1][1][0].count, a[1][1][2].count)] == [5, 5]


def test_the_clip_takes_the_norm_it_is_given_and_a_freezing_chain_ignores_it():
    config = base_config().optim
    config.lr, config.warmup_steps, config.eps, config.weight_decay = 1.0, 0, 1.0, 0.0
    clip = optim.clip_by_global_norm(1.0)
    grads = {"w": jnp.full(4, 10.0)}  # global norm 20
    np.testing.assert_allclose(clip.update(grads, None)[0]["w"], 0.5)
    np.testing.assert_allclose(clip.update(grads, None, grad_norm=jnp.float32(40.0))[0]["w"], 0.25)
    # Freezing zeroes gradients before the clip, so the clip must measure them itself.
    config.freeze = ("^b",)
    tx, _ = optim.make_optimizer(config, total_steps=100)
    params = {"a": jnp.zeros(4), "b": jnp.zeros(4)}
    grads = {"a": jnp.full(4, 10.0), "b": jnp.full(4, 10.0)}
    given = tx.update(grads, tx.init(params), params, grad_norm=optax.tree.norm(grads))[0]
    measured = tx.update(grads, tx.init(params), params)[0]
    assert trees_bitwise_equal(given, measured)
    # a alone has norm 20: clipped to 0.5 each (Adam, eps 1: 0.5 / 1.5); with both, 0.35 each.
    np.testing.assert_allclose(given["a"], -0.5 / 1.5, rtol=1e-5)
