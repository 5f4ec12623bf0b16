"""``train.init_from`` into another layout: a new image size (positional embedding
resampled bilinearly on the grid, class token kept) and ``model.scan=True`` (blocks
stacked), against independent computations."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import torch

from clip_jax import inference, losses, step
from clip_jax.interop import adapt, files, mapping
from clip_jax.models import clip


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A params export of the tiny model (40 px: a 5 x 5 patch grid plus the class token)."""
    config = clip.get_variant("tiny")
    variables = jax.jit(clip.CLIP(config).init)(jax.random.key(7), *clip.dummy_inputs(config))
    params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
    out = str(tmp_path_factory.mktemp("export"))
    files.save(out, params, config, "params", eos_id=3, bos_id=2)
    return out, params


def abstract_params(model):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *clip.dummy_inputs(model.config)))
    return nn.meta.unbox(shapes["params"])


def test_init_from_a_new_image_size_resamples_the_positions_bilinearly(tiny_export):
    path, source = tiny_export
    config = clip.get_variant("tiny")
    bigger = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=56))
    params, _ = inference.matching_variables(path, abstract_params(clip.CLIP(bigger)))
    got = params["visual"]["pos_embedding"]
    assert got.shape == (1 + 7 * 7, 128)
    # PyTorch's bilinear, half-pixel centres (align_corners=False), no antialias: the same
    # sampling as jax.image.resize when enlarging; big_vision and open_clip resample so.
    grid = torch.tensor(source["visual"]["pos_embedding"][1:]).reshape(1, 5, 5, 128).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bilinear", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(49, 128).numpy()
    np.testing.assert_allclose(got[1:], want, atol=1e-6)
    np.testing.assert_array_equal(got[0], source["visual"]["pos_embedding"][0])  # the class token's row
    rest = lambda p: {k: v for k, v in mapping.flatten(p).items() if k != adapt.POS_EMBEDDING}
    assert all(np.array_equal(v, rest(source)[k]) for k, v in rest(params).items())


def test_a_grid_that_is_not_square_is_refused():
    with pytest.raises(ValueError, match="square patch grid"):
        adapt.resample_positions(np.zeros((1 + 25, 4), np.float32), 1 + 30, prefix=1)


def first_step_loss(model, params, batch):
    tx = optax.sgd(0.1)
    state = step.TrainState(jax.numpy.zeros((), jax.numpy.int32), params, tx.init(params), {})
    train_step = step.make_train_step(
        model, tx, optax.constant_schedule(0.1), losses.BUILDERS["softmax_dense"](None)
    )
    return float(jax.jit(train_step)(state, batch)[1]["loss"])


def test_scanned_model_from_unscanned_weights_has_the_unscanned_first_step_loss(tiny_export):
    path, _ = tiny_export
    config = clip.get_variant("tiny")
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (8, 40, 40, 3), dtype=np.uint8),
        "tokens": rng.integers(1, 256, (8, 16)).astype(np.int32),
    }
    loss = {}
    for scan in (False, True):
        model = clip.CLIP(config, scan=scan)
        params, _ = inference.matching_variables(path, abstract_params(model))
        if scan:
            assert params["visual"]["transformer"]["blocks"]["ln_1"]["scale"].shape == (4, 128)
        loss[scan] = first_step_loss(model, jax.tree.map(jax.numpy.asarray, params), batch)
    print("first-step loss unscanned, scanned:", loss)
    assert abs(loss[True] - loss[False]) < 1e-6
