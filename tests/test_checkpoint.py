"""Checkpoints: exact resume after a crash; integrity checks and fallback; non-finite states
never saved; data-config fingerprints; retention; restore on another topology."""

import json
import pathlib

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from jax.sharding import NamedSharding, PartitionSpec

from clip_jax import checkpoint, data_fingerprint, recipe, sharding, step, train
from clip_jax.data import elastic


def small_demo(scenes_dataset):
    config = load_config("demo")
    config.data.scenes.dir = str(pathlib.Path(scenes_dataset.tokenizer).parent)
    config.data.scenes.update(num_train=512, num_heldout_things=64, num_heldout_scenes=64)
    config.train.update(batch_size=32, total_steps=9, log_every=1)
    config.optim.warmup_steps = 2
    config.checkpoint.every = 3
    return config


class Crash(Exception):
    pass


def crashing_compile(at_step: int):
    """A `step.compile_train_step` whose step raises Crash once ``at_step`` steps are done."""
    real_compile = step.compile_train_step

    def compile_train_step(*args, **kwargs):
        step_fn = real_compile(*args, **kwargs)

        def step(state, batch):
            if int(state.step) == at_step:
                raise Crash
            return step_fn(state, batch)

        return step

    return compile_train_step


def assert_trees_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_interrupted_run_resumes_bitwise_equal(tmp_path, scenes_dataset, monkeypatch):
    config = small_demo(scenes_dataset)
    reference = train.run(config, str(tmp_path / "reference"))["state"]

    # Crash right after step 5's update (its checkpoint is step 3), then restart.
    with monkeypatch.context() as patch:
        patch.setattr(step, "compile_train_step", crashing_compile(5))
        with pytest.raises(Crash):
            train.run(config, str(tmp_path / "resumed"))
    saved = [int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) == 3  # (orbax also keeps the run's first step)
    resumed = train.run(config, str(tmp_path / "resumed"))["state"]

    assert int(resumed.step) == int(reference.step) == 9
    assert_trees_bitwise_equal(resumed.params, reference.params)
    assert_trees_bitwise_equal(resumed.opt_state, reference.opt_state)
    # The restarted run logged steps 4..9 only (it did not redo 1..3), in place of the crashed
    # run's rows 4..5: one row per step.
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 10))


# --- Unit tests on a toy state: integrity, non-finite states, data fingerprint, retention ---

FINGERPRINT = {"train_files": ["a.ar", "b.ar"], "shuffle_seed": 0, "batch_size": 32, "process_count": 1}


def checkpoint_config(**overrides):
    config = load_config("demo").checkpoint
    config.update({"every": 2, "keep": 3, **overrides})
    return config


def toy_iterator():
    return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def toy_state(n, mesh, value=None):
    """A TrainState at step ``n`` of a few sharded arrays; ``value`` fills the params (default: ``n``)."""
    fsdp = NamedSharding(mesh, PartitionSpec("fsdp"))
    w = jnp.arange(64, dtype=jnp.float32) + (n if value is None else value)
    params = {"w": jax.device_put(w, fsdp), "b": jnp.float32(n)}
    return step.TrainState(
        step=jnp.int32(n), params=params, opt_state={"mu": jax.device_put(w * 2, fsdp)}, model_state={}
    )


def abstract_and_shardings(mesh):
    state = jax.eval_shape(lambda: toy_state(0, mesh))
    shardings = jax.tree.map(lambda x: x.sharding, toy_state(0, mesh))
    return state, shardings


def save_steps(directory, steps, mesh, fingerprint=FINGERPRINT, **config):
    checkpoints = checkpoint.Checkpoints(str(directory), checkpoint_config(**config), fingerprint)
    iterator = toy_iterator()
    for n in steps:
        next(iterator)
        checkpoints.save(n, toy_state(n, mesh), iterator, {"loss": jnp.float32(1.0)}, force=True)
    checkpoints.close()
    return checkpoints


def restore(directory, mesh, fingerprint=FINGERPRINT, **config):
    checkpoints = checkpoint.Checkpoints(str(directory), checkpoint_config(**config), fingerprint)
    iterator = toy_iterator()
    try:
        state = checkpoints.restore(*abstract_and_shardings(mesh), iterator)
    finally:
        checkpoints.close()
    return state, next(iterator)


@pytest.fixture
def mesh8():
    return sharding.make_mesh({"data": 1, "fsdp": -1, "model": 1})


def test_each_committed_step_has_a_manifest_of_its_files(tmp_path, mesh8):
    save_steps(tmp_path / "ckpt", [2, 4], mesh8)
    for saved in (2, 4):
        manifest = json.loads((tmp_path / "ckpt" / str(saved) / checkpoint.MANIFEST).read_text())
        files = {
            str(p.relative_to(tmp_path / "ckpt" / str(saved)))
            for p in (tmp_path / "ckpt" / str(saved)).rglob("*")
        }
        assert set(manifest) == {f for f in files if (tmp_path / "ckpt" / str(saved) / f).is_file()} - {
            "checksums.json"
        }
        assert any(name.startswith("state/") for name in manifest) and any("data" in n for n in manifest)
    state, next_batch = restore(tmp_path / "ckpt", mesh8)
    assert int(state.step) == 4 and float(state.params["b"]) == 4.0
    np.testing.assert_array_equal(next_batch, [8, 9, 10, 11])  # the iterator resumes after 2 batches


def _array_data(step_dir):
    """The largest file of array bytes (OCDBT data) of the train state."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def flip_bytes(step_dir):
    path = _array_data(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(step_dir):
    path = _array_data(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove_commit_marker(step_dir):
    (step_dir / "commit_success.txt").unlink()  # orbax's


def remove_manifest(step_dir):
    (step_dir / "checksums.json").unlink()  # ours, written after orbax's commit


def remove_a_file(step_dir):
    _array_data(step_dir).unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (flip_bytes, "sha256 differs"),
        (truncate, "truncated"),
        (remove_commit_marker, "commit_success.txt is missing"),
        (remove_manifest, "never confirmed complete"),
        (remove_a_file, "is missing"),
    ],
)
def test_damaged_latest_step_is_detected_and_the_run_falls_back(tmp_path, mesh8, capsys, damage, reason):
    save_steps(tmp_path / "ckpt", [2, 4], mesh8)
    damage(tmp_path / "ckpt" / "4")
    assert checkpoint.damage(str(tmp_path / "ckpt" / "4")) is not None
    state, next_batch = restore(tmp_path / "ckpt", mesh8)
    out = capsys.readouterr().out
    print(out)
    assert "checkpoint step 4 is damaged: " in out and reason in out
    assert int(state.step) == 2 and float(state.params["b"]) == 2.0
    np.testing.assert_array_equal(next_batch, [4, 5, 6, 7])  # step 2's data position, not step 4's
    assert not (tmp_path / "ckpt" / "4").exists() and (tmp_path / "checkpoints_damaged" / "4").is_dir()
    # Training goes on past the moved-aside step: step 4 can be saved again.
    save_steps(tmp_path / "ckpt", [4], mesh8)
    assert int(restore(tmp_path / "ckpt", mesh8)[0].step) == 4


@pytest.mark.parametrize(
    "bad",
    [{"loss": jnp.float32(jnp.nan)}, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(jnp.inf)}, "params"],
)
def test_a_non_finite_state_is_never_saved(tmp_path, mesh8, capsys, bad):
    checkpoints = save_steps(tmp_path / "ckpt", [2], mesh8)
    state, step_metrics = toy_state(4, mesh8), bad
    if bad == "params":
        state, step_metrics = toy_state(4, mesh8, value=jnp.nan), {"loss": jnp.float32(1.0)}
    checkpoints = checkpoint.Checkpoints(str(tmp_path / "ckpt"), checkpoint_config(), FINGERPRINT)
    with pytest.raises(checkpoint.NonFiniteError, match="step 4.*last good checkpoint is step 2"):
        checkpoints.save(4, state, toy_iterator(), step_metrics, force=True)
    checkpoints.close()
    assert "NOT saving step 4: non-finite" in capsys.readouterr().out
    assert checkpoints.manager.all_steps() == [2] and not (tmp_path / "ckpt" / "4").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 64}, "batch_size: 32 -> 64"),
        ({"shuffle_seed": 1}, "shuffle_seed: 0 -> 1"),
        ({"train_files": ["a.ar"]}, "train_files: 2 -> 1 files (added [], removed ['b.ar'])"),
        ({"process_count": 2}, "process_count: 1 -> 2"),
    ],
)
def test_resuming_with_changed_data_is_refused_unless_allowed(tmp_path, mesh8, capsys, change, message):
    save_steps(tmp_path / "ckpt", [2], mesh8)
    changed = {**FINGERPRINT, **change}
    with pytest.raises(data_fingerprint.DataChangedError, match="allow_data_change") as error:
        restore(tmp_path / "ckpt", mesh8, fingerprint=changed)
    assert message in str(error.value)
    state, _ = restore(tmp_path / "ckpt", mesh8, fingerprint=changed, allow_data_change=True)
    assert int(state.step) == 2 and message in capsys.readouterr().out
    assert int(restore(tmp_path / "ckpt", mesh8)[0].step) == 2  # the same config resumes silently


def test_the_fingerprint_follows_the_data_config(scenes_dataset):
    config = load_config("demo")
    files, tokenizer = scenes_dataset.train_files, scenes_dataset.tokenizer
    base = data_fingerprint.data_fingerprint(config.data, files, tokenizer, 32, 40)
    assert base["train_files"] == [pathlib.Path(f).name for f in files]
    # The position is global: another process count resumes (only the streaming reader's is not).
    assert "process_count" not in base and base["stream"] == elastic.KIND
    config.data.format = "webdataset"
    assert data_fingerprint.data_fingerprint(config.data, files, tokenizer, 32, 40)["process_count"] == 1
    config.data.format = "array_record"
    assert base == data_fingerprint.data_fingerprint(config.data, files, tokenizer, 32, 40)
    config.data.shuffle_seed = 7
    other = data_fingerprint.data_fingerprint(config.data, files[:-1], tokenizer, 64, 48)
    changes = data_fingerprint.data_changes(base, other)
    assert [c.split(":")[0] for c in changes] == ["batch_size", "image_size", "shuffle_seed", "train_files"]


def test_keeps_the_last_k_and_every_mth_step(tmp_path, mesh8):
    save_steps(tmp_path / "ckpt", range(1, 12), mesh8, every=1, keep=2, keep_period=4)
    kept = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert kept == [4, 8, 10, 11]


def test_a_checkpoint_saved_on_4_devices_restores_on_8_bitwise_equal(tmp_path, scenes_dataset):
    """The real train state (tiny CLIP + AdamW), FSDP over 4 devices -> over 8."""
    shift_floats = lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3  # non-zero moments
    config = load_config("demo")
    model = recipe.build_model(config, vocab_size=128)
    tx, _ = train.optim.make_optimizer(config.optim, 10)
    mesh4 = sharding.make_mesh({"data": 1, "fsdp": -1, "model": 1}, devices=jax.devices()[:4])
    mesh8 = sharding.make_mesh({"data": 1, "fsdp": -1, "model": 1})
    with jax.set_mesh(mesh4), nn.logical_axis_rules(sharding.RULES):
        abstract, shardings4 = step.state_shardings(model, tx, mesh4)
        init = jax.jit(lambda rng: step.init_state(model, tx, rng), out_shardings=shardings4)
        state4 = init(jax.random.key(3))
        state4 = state4.replace(opt_state=jax.tree.map(shift_floats, state4.opt_state))
        checkpoints = checkpoint.Checkpoints(str(tmp_path / "ckpt"), checkpoint_config(), FINGERPRINT)
        checkpoints.save(6, state4, toy_iterator(), force=True)
        checkpoints.close()
    with jax.set_mesh(mesh8), nn.logical_axis_rules(sharding.RULES):
        _, shardings8 = step.state_shardings(model, tx, mesh8)
        checkpoints = checkpoint.Checkpoints(str(tmp_path / "ckpt"), checkpoint_config(), FINGERPRINT)
        state8 = checkpoints.restore(abstract, shardings8, toy_iterator())
        checkpoints.close()
    devices = lambda state: {len(x.sharding.device_set) for x in jax.tree.leaves(state.params)}
    assert devices(state4) == {4} and devices(state8) == {8}
    assert int(state8.step) == 0
    assert_trees_bitwise_equal(state8.params, state4.params)
    assert_trees_bitwise_equal(state8.opt_state, state4.opt_state)


class CountingIterator(elastic.GlobalIterator):
    """A GlobalIterator over the integers (global batch 4), without a data pipeline."""

    def __init__(self):
        super().__init__(lambda start: iter(range(start, 10**6, 4)), 4)


def test_a_position_saved_by_two_processes_resumes_on_one(tmp_path, mesh8):
    checkpoints = checkpoint.Checkpoints(str(tmp_path / "ckpt"), checkpoint_config(), FINGERPRINT)
    iterator = CountingIterator()
    for _ in range(5):
        next(iterator)
    checkpoints.save(5, toy_state(5, mesh8), iterator, {"loss": jnp.float32(1.0)}, force=True)
    checkpoints.close()
    # What two processes write: the same global position in process_0-of-2 and process_1-of-2.
    step_dir = tmp_path / "ckpt" / "5"
    saved = step_dir / "data" / "process_0-of-1.json"
    for p in range(2):
        (step_dir / "data" / f"process_{p}-of-2.json").write_text(saved.read_text())
    saved.unlink()
    checkpoint.write_manifest(str(step_dir))
    checkpoints = checkpoint.Checkpoints(str(tmp_path / "ckpt"), checkpoint_config(), FINGERPRINT)
    resumed = CountingIterator()
    try:
        state = checkpoints.restore(*abstract_and_shardings(mesh8), resumed)
    finally:
        checkpoints.close()
    assert int(state.step) == 5 and resumed.position == 20 and next(resumed) == 20
    # A per-process Grain index saved by 2 processes cannot move: refused, naming the override.
    for p in range(2):
        (step_dir / "data" / f"process_{p}-of-2.json").write_text(json.dumps({"next_index": 5}))
    checkpoint.write_manifest(str(step_dir))
    checkpoints = checkpoint.Checkpoints(str(tmp_path / "ckpt"), checkpoint_config(), FINGERPRINT)
    with pytest.raises(data_fingerprint.DataChangedError, match="allow_data_change"):
        checkpoints.restore(*abstract_and_shardings(mesh8), CountingIterator())
    checkpoints.close()
