"""End to end: a slowed pipeline shows in the log, goodput.json sums to the wall time, a profile."""

import glob
import gzip
import json
import os
import pathlib
import time

import pytest
from conftest import load_config

from clip_jax import goodput, step, train
from clip_jax.data import formats

DELAY_S = 1.0  # per batch, test-only: well above the tiny step's time on 2 busy cores (~0.3 s)


def small_demo(scenes_dataset, total_steps):
    config = load_config("demo")
    config.data.scenes.dir = str(pathlib.Path(scenes_dataset.tokenizer).parent)
    config.data.scenes.update(num_train=512, num_heldout_things=64, num_heldout_scenes=64)
    config.train.update(batch_size=32, total_steps=total_steps, log_every=2)
    config.optim.warmup_steps = 2
    config.checkpoint.every = 100  # the final step only: a background save slows the steps after it
    config.eval.batch_size = 64
    config.eval.evaluators.scenes.diagnostics = False
    return config


def slowed(iterator, delay_s):
    """The same iterator object (its checkpointing untouched) whose batches each take ``delay_s`` more."""
    base = type(iterator)

    def slow_next(self):
        time.sleep(delay_s)
        return base.__next__(self)

    iterator.__class__ = type(f"Slowed{base.__name__}", (base,), {"__next__": slow_next})
    return iterator


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_slowed_pipeline_goodput_and_a_profile_of_three_steps(tmp_path, scenes_dataset, monkeypatch, capsys):
    original = formats.from_config
    monkeypatch.setattr(formats, "from_config", lambda *a, **k: slowed(original(*a, **k), DELAY_S))
    config = small_demo(scenes_dataset, total_steps=8)
    config.logging.profile_steps = (3, 5)
    workdir = str(tmp_path / "run")

    start = time.perf_counter()
    train.run(config, workdir)
    wall = time.perf_counter() - start

    # The log says the run is data-bound: most of every interval went to waiting for batches.
    rows = read_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 8]
    for row in rows[1:]:
        assert row["data_wait_share"] > 0.5, row
        assert row["data_wait_s"] >= DELAY_S * 0.99 and row["step_time_s"] >= row["data_wait_s"]
    out = capsys.readouterr().out
    assert "MFU not logged" in out and "--config.logging.peak_flops" in out  # CPU: not in the table
    assert "pairs/s/device" in out and "goodput " in out

    # goodput.json: the parts sum to the wall time measured here (within 2%).
    record = json.loads((tmp_path / "run" / goodput.FILE).read_text())
    (attempt,) = record["attempts"]
    parts = attempt["parts_s"]
    assert sum(parts.values()) == pytest.approx(attempt["wall_s"], rel=1e-6)
    assert attempt["wall_s"] == pytest.approx(wall, rel=0.02)
    assert parts["data"] >= 8 * DELAY_S * 0.99  # every next(batches) slept; none of it counted elsewhere
    assert parts["data"] <= 8 * DELAY_S + 0.3 * wall
    assert min(parts["compile"], parts["checkpoint"], parts["eval"], parts["train"], parts["startup"]) > 0
    assert attempt["status"] == "completed" and attempt["last_step"] == 8

    # The profile: TensorBoard's layout and a Perfetto trace holding steps 3, 4 and 5.
    runs = glob.glob(str(tmp_path / "run" / "profile" / "plugins" / "profile" / "*"))
    assert len(runs) == 1, runs
    files = sorted(os.listdir(runs[0]))
    assert any(f.endswith(".xplane.pb") for f in files), files
    with gzip.open(os.path.join(runs[0], "perfetto_trace.json.gz")) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    steps = {e.get("args", {}).get("step_num") for e in events if e.get("name") == "train"}
    assert steps == {"3", "4", "5"}, steps


class Crash(Exception):
    pass


def crashing_compile(at_step):
    """step.compile_train_step whose step raises once the state reaches ``at_step``."""
    original = step.compile_train_step

    def compile_train_step(*args):
        step_fn = original(*args)

        def step(state, batch):
            if int(state.step) == at_step:
                raise Crash
            return step_fn(state, batch)

        return step

    return compile_train_step


@pytest.mark.slow
def test_goodput_keeps_every_attempt_of_a_crashed_and_resumed_run(tmp_path, scenes_dataset, monkeypatch):
    config = small_demo(scenes_dataset, total_steps=6)
    config.checkpoint.every = 2
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        patch.setattr(step, "compile_train_step", crashing_compile(3))
        with pytest.raises(Crash):
            train.run(config, workdir)
    crashed = json.loads((tmp_path / "run" / goodput.FILE).read_text())
    assert [a["status"] for a in crashed["attempts"]] == ["failed: Crash"]
    assert crashed["attempts"][0]["last_step"] == 2  # the last logged step before the crash

    start = time.perf_counter()
    train.run(config, workdir)
    wall = time.perf_counter() - start
    record = json.loads((tmp_path / "run" / goodput.FILE).read_text())
    first, second = record["attempts"]
    assert first == crashed["attempts"][0]  # kept as it was
    assert second["status"] == "completed" and second["resumed_step"] == 2 and second["last_step"] == 6
    assert second["wall_s"] == pytest.approx(wall, rel=0.02)
    assert record["total"]["wall_s"] == pytest.approx(first["wall_s"] + second["wall_s"])
    for part in goodput.PARTS:
        assert record["total"]["parts_s"][part] == pytest.approx(
            first["parts_s"][part] + second["parts_s"][part]
        )
    assert second["parts_s"]["restore"] > 0
