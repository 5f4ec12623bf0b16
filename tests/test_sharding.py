"""The mesh, the rules table, and the whole step on a mesh against one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import losses, optim, sharding, step
from clip_jax.config_defaults import base_config
from clip_jax.data import transforms
from clip_jax.models import clip


def test_mesh_resolves_minus_one():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert sharding.batch_devices(mesh) == 4


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"data": 3, "fsdp": 1, "model": 1}, "needs 3 devices"),
        ({"data": -1, "fsdp": -1}, "one may be -1"),
        ({"data": -1, "model": 3}, "not divisible"),
        ({"tensor": 2}, "unknown axes"),
    ],
)
def test_bad_mesh_is_named(axes, message):
    with pytest.raises(ValueError, match=message) as info:
        sharding.make_mesh(axes)
    assert "config.sharding.mesh" in str(info.value)


def tiny_setup(mesh_shape, devices=None):
    config = base_config()
    config.optim.warmup_steps = 0
    config.optim.lr = 1e-3
    model = clip.CLIP(clip.get_variant("tiny"))
    tx, schedule = optim.make_optimizer(config.optim, total_steps=10)
    mesh = sharding.make_mesh(mesh_shape, devices)
    return model, tx, schedule, mesh


def random_batch(batch=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 256, size=(batch, 16)).astype(np.int32)
    tokens[:, 0], tokens[:, 10], tokens[:, 11:] = 2, 3, 0
    return {"image": rng.integers(0, 256, size=(batch, 40, 40, 3), dtype=np.uint8), "tokens": tokens}


def grads_on(mesh_shape, devices=None):
    """Loss and gradients of the full model on the given mesh (a fresh, sharded state)."""
    model, tx, schedule, mesh = tiny_setup(mesh_shape, devices)
    loss_fn = losses.make_softmax_contrastive(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        _, shardings = step.state_shardings(model, tx, mesh)
        state = jax.jit(lambda r: step.init_state(model, tx, r), out_shardings=shardings)(jax.random.key(0))
        batch = sharding.to_global(random_batch(), mesh)

        def loss_of(params):
            images = transforms.normalize(batch["image"])
            return loss_fn(*model.apply({"params": params}, images, batch["tokens"]))[0]

        loss, grads = jax.jit(jax.value_and_grad(loss_of))(state.params)
    return float(loss), jax.device_get(grads), state


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 2, "model": 2}, {"data": 8}], ids=str)
def test_model_loss_and_gradients_on_mesh_equal_one_device(mesh_shape):
    ref_loss, ref_grads, _ = grads_on({"data": 1}, devices=jax.devices()[:1])
    loss, grads, _ = grads_on(mesh_shape)
    assert abs(loss - ref_loss) < 1e-5
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), grads, ref_grads)
    assert max(jax.tree.leaves(diffs)) < 1e-5, diffs
    assert optax.global_norm(ref_grads) > 1e-2  # not a comparison of zeros


def test_parameters_are_sharded_by_the_rules():
    *_, state = grads_on({"data": 1, "fsdp": 4, "model": 2})
    block = state.params["visual"]["transformer"]["block_0"]
    assert block["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "model", None)
    assert block["mlp"]["fc"]["kernel"].sharding.spec == P("fsdp", "model")
    assert block["ln_1"]["scale"].sharding.spec == P(None)
    # Optimizer moments follow their parameters.
    adam = state.opt_state[1][0]
    mu = adam.mu["visual"]["transformer"]["block_0"]["mlp"]["fc"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "model")
    assert state.params["text"]["token_embedding"]["embedding"].sharding.spec == P("model", "fsdp")


def test_indivisible_dimensions_are_replicated():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "model": 1})
    abstract = jax.ShapeDtypeStruct((12, 16), jnp.float32)
    (out,) = sharding.logical_to_shardings([P("embed", "mlp")], [abstract], mesh)
    assert out.spec == P(None, "model")  # 12 % 8 != 0: replicated; 16 % 1 == 0: kept


def test_train_step_on_mesh_matches_one_device():
    def two_steps(mesh_shape, devices=None):
        model, tx, schedule, mesh = tiny_setup(mesh_shape, devices)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            _, shardings = step.state_shardings(model, tx, mesh)
            init = jax.jit(lambda r: step.init_state(model, tx, r), out_shardings=shardings)
            state = init(jax.random.key(0))
            initial = jax.device_get(state.params)
            train_step = step.make_train_step(model, tx, schedule, losses.make_softmax_contrastive(mesh))
            step_fn = step.compile_train_step(train_step, shardings, mesh)
            for seed in range(2):
                state, metrics = step_fn(state, sharding.to_global(random_batch(seed=seed), mesh))
        return jax.device_get(state), jax.device_get(metrics), initial

    ref_state, ref_metrics, initial = two_steps({"data": 1}, jax.devices()[:1])
    state, metrics, _ = two_steps({"data": 2, "fsdp": 2, "model": 2})
    assert int(state.step) == 2
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # Adam divides by sqrt(v): where a gradient is ~eps (rare tokens' embedding rows),
    # float noise of 1e-7 becomes a few % of one step (lr 1e-3). A sharding bug moves
    # parameters by ~lr. The attention key bias has an exactly-zero gradient (softmax
    # ignores a shift shared by all logits; OpenAI's layout has it), so it does not move.
    diffs = max_abs_diff_by_path(state.params, ref_state.params)
    moved = max_abs_diff_by_path(state.params, initial)
    for path, diff in diffs.items():
        assert diff < 1e-4, (path, diff)
        assert "key/bias" in path or moved[path] > 1e-4, path  # every other param took its steps


def max_abs_diff_by_path(a, b) -> dict[str, float]:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return {optim.param_path(p): d for p, d in jax.tree_util.tree_leaves_with_path(diffs)}
