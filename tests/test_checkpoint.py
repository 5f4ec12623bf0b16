"""Checkpoints: a run interrupted mid-way and restarted ends bitwise equal to an uninterrupted one."""

import pathlib

import jax
import numpy as np
import pytest
from conftest import load_config

from clip_jax import train


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


def assert_trees_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_interrupted_run_resumes_bitwise_equal(tmp_path, scenes_dataset, monkeypatch):
    config = small_demo(scenes_dataset)
    reference = train.run(config, str(tmp_path / "reference"))["state"]

    # Crash right after step 5's update (its checkpoint is step 3), then restart.
    real_compile = train.compile_train_step

    def crashing_compile(*args, **kwargs):
        step_fn = real_compile(*args, **kwargs)

        def step(state, batch):
            if int(state.step) == 5:
                raise Crash
            return step_fn(state, batch)

        return step

    monkeypatch.setattr(train, "compile_train_step", crashing_compile)
    with pytest.raises(Crash):
        train.run(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(train, "compile_train_step", real_compile)
    saved = [int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) == 3  # (orbax also keeps the run's first step)
    resumed = train.run(config, str(tmp_path / "resumed"))["state"]

    assert int(resumed.step) == int(reference.step) == 9
    assert_trees_bitwise_equal(resumed.params, reference.params)
    assert_trees_bitwise_equal(resumed.opt_state, reference.opt_state)
    # The restarted run logged steps 4..9 only: it did not redo 1..3.
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 + 6
