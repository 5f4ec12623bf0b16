"""Non-finite steps: a NaN loss or gradient (injected by the test, wrapping the loss given to
`step.make_train_step`) is not applied, is counted, and the run goes on; N in a row stop it
naming the step and the last good checkpoint; a killed run with a skipped step resumes
bitwise equal to the uninterrupted one."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_checkpoint import Crash, assert_trees_bitwise_equal, crashing_compile, small_demo
from test_train import ROOT, SMALL_SCENES

from clip_jax import cli, losses, nonfinite, optim, recipe, sharding, step, train
from clip_jax.config_defaults import base_config
from clip_jax.data import transforms
from clip_jax.models import clip


@jax.custom_vjp
def poison_gradient(x, bad):
    """The identity, whose derivative is NaN where ``bad``: a finite loss with a NaN gradient."""
    return x


poison_gradient.defvjp(lambda x, bad: (x, bad), lambda bad, g: (g * jnp.where(bad, jnp.nan, 1.0), None))


def injecting(loss_fn, nan_loss, nan_grad):
    """``loss_fn`` with a NaN loss where ``nan_loss`` and a NaN gradient (finite loss) where
    ``nan_grad`` (traced booleans); elsewhere the same values bit for bit (times 1.0)."""

    def wrapped(*args):
        loss, stats = loss_fn(*args)
        return poison_gradient(loss * jnp.where(nan_loss, jnp.nan, 1.0), nan_grad), stats

    return wrapped


def injecting_step(nan_loss_steps=(), nan_grad_steps=()):
    """A `step.make_train_step` whose steps numbered ``nan_loss_steps`` (1-based) get a NaN
    loss, and ``nan_grad_steps`` a NaN gradient: the test's injection, not a config flag."""
    real = step.make_train_step

    def make_train_step(model, tx, schedule, loss_fn, *args, **kwargs):
        def train_step(state, batch):
            now = state.step + 1
            bad = [jnp.isin(now, jnp.asarray(s, jnp.int32)) for s in (nan_loss_steps, nan_grad_steps)]
            return real(model, tx, schedule, injecting(loss_fn, *bad), *args, **kwargs)(state, batch)

        return train_step

    return make_train_step


# --- The step, on a tiny model sharded over 8 devices -------------------------------------

NAN_LOSS_STEP, NAN_GRAD_STEP = 2, 4


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its optimizer, a mesh, a batch, and the first 5 steps' (state, metrics)
    from one compiled step: a NaN loss at step 2, a NaN gradient at step 4."""
    config = base_config()
    config.model.update(variant="tiny", dtype="float32")
    model = recipe.build_model(config)
    tx, schedule = optim.make_optimizer(config.optim, 20)
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 256, size=(16, 16)).astype(np.int32)
    tokens[:, 0], tokens[:, 10], tokens[:, 11:] = 2, 3, 0
    images = rng.integers(0, 256, size=(16, 40, 40, 3)).astype(np.uint8)
    batch = {"image": images, "tokens": tokens}
    make = injecting_step([NAN_LOSS_STEP], [NAN_GRAD_STEP])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        _, shardings = step.state_shardings(model, tx, mesh)
        state = jax.jit(lambda r: step.init_state(model, tx, r), out_shardings=shardings)(jax.random.key(0))
        loss_fn = losses.make_loss("softmax", mesh)
        step_fn = step.compile_train_step(make(model, tx, schedule, loss_fn), shardings, mesh)
        states = [(jax.device_get(state), None)]
        for _ in range(5):
            state, metrics = step_fn(state, sharding.to_global(batch, mesh))
            states.append(jax.device_get((state, metrics)))
    return model, tx, mesh, batch, shardings, states


def counts(opt_state):
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return [int(v) for path, v in leaves if nonfinite._is_count(path)]


def without_counts(opt_state):
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return [v for path, v in leaves if not nonfinite._is_count(path)]


@pytest.mark.parametrize("step", [NAN_LOSS_STEP, NAN_GRAD_STEP])
def test_a_nonfinite_step_leaves_the_state_and_the_next_step_trains(tiny, step):
    states = tiny[-1]
    (before, _), (skipped, metrics), (after, next_metrics) = states[step - 1 : step + 2]
    assert float(metrics["nonfinite"]) == 1.0 and float(next_metrics["nonfinite"]) == 0.0
    if step == NAN_LOSS_STEP:
        assert np.isnan(metrics["loss"])
    else:
        assert np.isfinite(metrics["loss"]) and np.isnan(metrics["grad_norm"])
    # Skipped: params and the optimizer's moments bitwise as they were; the step and the
    # optimizer's counts (its schedule) advanced.
    assert_trees_bitwise_equal(skipped.params, before.params)
    assert_trees_bitwise_equal(without_counts(skipped.opt_state), without_counts(before.opt_state))
    assert (int(before.step), int(skipped.step), int(after.step)) == (step - 1, step, step + 1)
    assert set(counts(skipped.opt_state)) == {step}
    # The next step trains again.
    pairs = zip(jax.tree.leaves(after.params), jax.tree.leaves(skipped.params), strict=True)
    changed = [not np.array_equal(a, b) for a, b in pairs]
    assert sum(changed) > len(changed) // 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after.params))


def test_a_finite_step_is_the_plain_update(tiny):
    """With no NaN the step's new state is the unguarded update's, bit for bit (step 3, after
    a skipped one)."""
    model, tx, mesh, batch, shardings, states = tiny
    (s2, _), (s3, m3) = states[2:4]
    loss_fn = injecting(losses.make_loss("softmax", mesh), False, False)
    gradient_fn = step.make_gradient_fn(model, loss_fn, 1)

    def plain(state, batch):  # make_train_step's update, without the non-finite guard
        images = transforms.normalize(batch["image"])
        rng = jax.random.fold_in(jax.random.key(0), state.step)
        (loss, _), grads = gradient_fn(state.params, images, batch["tokens"], rng, state.model_state)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return clip.clamp_logit_scale(optax.apply_updates(state.params, updates)), opt_state, loss

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        plain_step = jax.jit(plain, in_shardings=(shardings, sharding.batch_sharding(mesh)))
        params, opt_state, loss = jax.device_get(
            plain_step(jax.device_put(s2, shardings), sharding.to_global(batch, mesh))
        )
    assert float(m3["nonfinite"]) == 0.0
    np.testing.assert_array_equal(m3["loss"], loss)
    assert_trees_bitwise_equal(s3.params, params)
    assert_trees_bitwise_equal(s3.opt_state, opt_state)


# --- The host's count -------------------------------------------------------------------


def test_watch_counts_and_stops_after_n_in_a_row(capsys):
    watch = nonfinite.Watch(3, lambda: 6)
    for n, skipped in [(1, False), (2, True), (3, True), (4, False), (5, True), (6, True)]:
        watch.observe(n, skipped)
    assert (watch.total, watch.consecutive) == (4, 2)
    with pytest.raises(nonfinite.NonFiniteStepsError) as e:
        watch.observe(7, True)
    assert str(e.value) == (
        "training stopped at step 7: 3 consecutive steps (5-7) had a non-finite loss or gradient "
        "(train.max_nonfinite_steps=3); none was applied, the last good checkpoint is step 6"
    )
    assert "step 2: non-finite loss or gradient, update not applied (1 in a row, 1 in this run)" in (
        capsys.readouterr().out
    )
    assert isinstance(e.value, cli.UserError)  # the entry point ends with one `error:` line, exit 2


# --- Runs of the demo, in process ------------------------------------------------------


def metric_rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_skips_a_nan_step_goes_on_and_resumes_bitwise_equal(tmp_path, scenes_dataset, monkeypatch):
    config = small_demo(scenes_dataset)  # 9 steps, a checkpoint every 3
    config.eval.evaluators.scenes.diagnostics = False
    monkeypatch.setattr(step, "make_train_step", injecting_step([4]))
    reference = train.run(config, str(tmp_path / "reference"))["state"]
    rows = metric_rows(tmp_path / "reference")
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["nonfinite"] for r in rows] == [0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert np.isnan(rows[3]["loss"]) and all(np.isfinite(r["loss"]) for r in rows if r["step"] != 4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(reference.params)))

    # Killed after step 5 (the skipped step 4 is past its checkpoint, step 3), then restarted.
    with monkeypatch.context() as patch:
        patch.setattr(step, "compile_train_step", crashing_compile(5))
        with pytest.raises(Crash):
            train.run(config, str(tmp_path / "resumed"))
    resumed = train.run(config, str(tmp_path / "resumed"))["state"]
    assert int(resumed.step) == int(reference.step) == 9
    assert_trees_bitwise_equal(resumed.params, reference.params)
    assert_trees_bitwise_equal(resumed.opt_state, reference.opt_state)


@pytest.mark.slow
def test_n_consecutive_nan_steps_stop_the_run_naming_the_step_and_checkpoint(
    tmp_path, scenes_dataset, monkeypatch
):
    config = small_demo(scenes_dataset)
    config.train.max_nonfinite_steps = 3
    monkeypatch.setattr(step, "make_train_step", injecting_step([2, 4, 5, 6, 7, 8, 9]))
    stop = r"^training stopped at step 6: 3 consecutive steps \(4-6\) .* the last good checkpoint is step 3$"
    with pytest.raises(nonfinite.NonFiniteStepsError, match=stop):
        train.run(config, str(tmp_path))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert max(saved) == 3
    rows = metric_rows(tmp_path)  # (step 6 stops the run before its row)
    assert [(r["nonfinite"], r["nonfinite_steps"]) for r in rows] == [(0, 0), (1, 1), (0, 1), (1, 2), (1, 3)]


# The entry point with every step's loss NaN (the test's injection, as above).
NAN_MAIN = """
import jax.numpy as jnp
from clip_jax import cli, main, step

real = step.make_train_step


def make_train_step(model, tx, schedule, loss_fn, *args, **kwargs):
    def nan_loss(*a):
        loss, stats = loss_fn(*a)
        return loss * jnp.nan, stats

    return real(model, tx, schedule, nan_loss, *args, **kwargs)


step.make_train_step = make_train_step
cli.run(main.main)
"""


@pytest.mark.slow
def test_the_entry_point_stops_with_one_error_line(tmp_path, scenes_dataset):
    script = tmp_path / "nan_main.py"
    script.write_text(NAN_MAIN)
    cmd = [
        sys.executable,
        str(script),
        f"--config={ROOT / 'configs' / 'demo.py'}",
        f"--workdir={tmp_path / 'w'}",
    ]
    cmd += [f"--config.data.scenes.dir={os.path.dirname(scenes_dataset.tokenizer)}"]
    cmd += [f"--config.data.scenes.{n}={v}" for n, v in SMALL_SCENES]
    cmd += [
        "--config.train.batch_size=16",
        "--config.train.max_nonfinite_steps=2",
        "--config.train.log_every=1",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's clip_jax (the script lies elsewhere)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.match(
        r"error: training stopped at step 2: 2 consecutive steps \(1-2\) had a non-finite loss or gradient "
        r"\(train.max_nonfinite_steps=2\); none was applied, the last good checkpoint is ",
        errors[0],
    ), errors[0]
