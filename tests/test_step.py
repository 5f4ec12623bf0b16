"""How the step runs, checked against the plain computation: gradient accumulation,
scanned and rematerialised blocks, FLIP patch dropout, and the SigLIP model."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scan_layout

from clip_jax import losses, recipe, sharding, step
from clip_jax.config_defaults import base_config
from clip_jax.models import clip, layers
from clip_jax.models.vit import drop_patches

TINY = clip.get_variant("tiny")


def init_params(model):
    return nn.meta.unbox(model.init(jax.random.key(0), *clip.dummy_inputs(model.config))["params"])


def random_inputs(batch=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 256, size=(batch, 16)).astype(np.int32)
    tokens[:, 0], tokens[:, 10], tokens[:, 11:] = 2, 3, 0
    images = rng.normal(size=(batch, 40, 40, 3)).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(tokens)


def max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


@pytest.mark.parametrize("loss_name", ["softmax", "softmax_ring", "sigmoid_ring"])
def test_accumulated_gradient_equals_whole_batch(loss_name):
    """4 micro-batches on an 8-device mesh give the one-big-batch loss, accuracies and gradient."""
    config = base_config()
    config.model.update(variant="tiny", dtype="float32")
    config.train.loss = loss_name
    model = recipe.build_model(config)
    params = init_params(model)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    images, tokens = random_inputs(32)
    loss_fn = losses.make_loss(loss_name, mesh)
    rng = jax.random.key(7)
    results = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        placed = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (images, tokens)]
        for accum in (1, 4):
            fn = jax.jit(step.make_gradient_fn(model, loss_fn, accum))
            results[accum] = jax.device_get(fn(params, *placed, rng))
    (loss, stats), grads = results[4]
    (ref_loss, ref_stats), ref_grads = results[1]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert {k: float(v) for k, v in stats.items()} == {k: float(v) for k, v in ref_stats.items()}
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
    assert max_diff(grads, ref_grads) < 1e-4 * scale
    assert float(np.abs(ref_grads["visual"]["proj"]).max()) > 0  # gradients reach the towers


def test_scanned_blocks_compute_what_unrolled_blocks_do():
    unrolled = clip.CLIP(TINY)
    scanned = clip.CLIP(TINY, scan=True)
    params = init_params(unrolled)
    scan_params = scan_layout.stacked(params)
    # The stacked layout is what the scanned model initialises, and unstacks back exactly.
    want = jax.tree.map(jnp.shape, init_params(scanned))
    assert jax.tree.map(jnp.shape, scan_params) == want
    assert max_diff(layers.unstack_layers(scan_params), params) == 0.0
    images, tokens = random_inputs(4)
    out = scanned.apply({"params": scan_params}, images, tokens)
    ref = unrolled.apply({"params": params}, images, tokens)
    assert max_diff(out, ref) < 1e-5


@pytest.mark.parametrize("policy", ["full", "dots"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_remat_keeps_gradients(policy, scan):
    images, tokens = random_inputs(4)
    params = init_params(clip.CLIP(TINY, scan=scan))

    def grads(model):
        def loss_of(p):
            return losses.softmax_contrastive(*model.apply({"params": p}, images, tokens))[0]

        return jax.jit(jax.grad(loss_of))(params)

    ref = grads(clip.CLIP(TINY, scan=scan))
    assert max_diff(grads(clip.CLIP(TINY, remat=policy, scan=scan)), ref) < 1e-6


def test_patch_dropout_only_in_training():
    model = clip.CLIP(TINY, patch_dropout=0.5)
    params = init_params(model)
    images, _ = random_inputs(4)
    encode = lambda train, seed=0: model.apply(
        {"params": params},
        images,
        train,
        method=clip.CLIP.encode_image,
        rngs={"patch_dropout": jax.random.key(seed)},
    )
    plain = clip.CLIP(TINY).apply({"params": params}, images, method=clip.CLIP.encode_image)
    assert max_diff(encode(False), plain) == 0.0  # evaluation sees every patch
    assert max_diff(encode(True), plain) > 1e-3
    assert max_diff(encode(True, 1), encode(True, 2)) > 1e-3  # a fresh choice per rng
    assert max_diff(encode(True, 1), encode(True, 1)) == 0.0


def test_drop_patches_keeps_a_random_subset_per_image():
    patches = jnp.arange(2 * 25 * 1, dtype=jnp.float32).reshape(2, 25, 1)
    kept = drop_patches(patches, 12, jax.random.key(0))
    assert kept.shape == (2, 12, 1)
    for i in range(2):
        values = set(np.asarray(kept[i, :, 0]).tolist())
        assert len(values) == 12 and values <= set(np.asarray(patches[i, :, 0]).tolist())
    assert set(np.asarray(kept[0, :, 0]) % 25) != set(np.asarray(kept[1, :, 0]) % 25)


def test_sigmoid_loss_gives_the_model_siglip_bias_and_temperature():
    config = base_config()
    config.model.variant = "tiny"
    config.train.loss = "sigmoid_ring"
    params = init_params(recipe.build_model(config))
    assert float(params["logit_bias"]) == -10.0
    assert float(params["logit_scale"]) == pytest.approx(math.log(10.0))
    config.train.loss = "softmax"
    assert "logit_bias" not in init_params(recipe.build_model(config))


def test_config_checks_accumulation_and_execution_options():
    from clip_jax import validation

    config = base_config()
    config.data.train_files, config.data.tokenizer = "x", "y"
    config.train.accum_steps = 3
    mesh = sharding.make_mesh({"data": 8})
    with pytest.raises(validation.ConfigError, match="config.train.accum_steps=3"):
        validation.check_batch(config, mesh)
    for field, value in (("remat", "most"), ("patch_dropout", 1.0)):
        config = base_config()
        config.data.train_files, config.data.tokenizer = "x", "y"
        config.model[field] = value
        with pytest.raises(validation.ConfigError, match=f"config.model.{field}"):
            validation.check_config(config)
