"""End to end: the entry point trains the demo, writes metrics and evaluations."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

METRIC_KEYS = {
    "step", "loss", "i2t_acc", "t2i_acc", "logit_scale", "grad_norm", "lr",
    "steps_per_sec", "pairs_per_sec", "elapsed_s", "eta_s", "nonfinite", "nonfinite_steps",
    "step_time_s", "data_wait_s", "data_wait_share", "pairs_per_sec_per_device",  # no "mfu" on CPU
}  # fmt: skip


# The conftest's scenes_dataset: reused, not regenerated, when these match.
SMALL_SCENES = (("num_train", 512), ("num_heldout_things", 64), ("num_heldout_scenes", 64))


def run_main(workdir, *overrides, timeout=600):
    """``python -m clip_jax.main --config=configs/demo.py`` in a fresh process (8 CPU devices)."""
    cmd = [sys.executable, "-m", "clip_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}"]
    cmd += [f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ, cwd=ROOT)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_short_demo_run_trains_and_writes_metrics(tmp_path, scenes_dataset):
    proc = run_main(
        tmp_path,
        f"--config.data.scenes.dir={os.path.dirname(scenes_dataset.tokenizer)}",
        *(f"--config.data.scenes.{n}={v}" for n, v in SMALL_SCENES),
        "--config.train.batch_size=64",
        "--config.train.total_steps=40",
        "--config.train.log_every=1",
        "--config.optim.warmup_steps=5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert set(rows[0]) == METRIC_KEYS
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)  # ln(64) = 4.16 at the start
    assert "mesh {'data': 8, 'fsdp': 1, 'model': 1}" in proc.stdout
    with open(tmp_path / "eval" / "40.json") as f:
        results = json.load(f)["scenes"]  # {evaluator: metrics}
    assert {"zero_shot_shape_top1", "zero_shot_colour_top1", "t2i_R@1", "t2i_R@5"} <= set(results)
    assert "ETA" in proc.stdout and "scenes (step 40)" in proc.stdout  # the evaluator's table


def test_two_processes_with_two_devices_each_train(tmp_path, scenes_dataset):
    """The multi-host path (jax.distributed + gloo) through launch/local.py."""
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=2"]
    cmd += ["--", f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={tmp_path}"]
    cmd += [f"--config.data.scenes.dir={os.path.dirname(scenes_dataset.tokenizer)}"]
    cmd += [f"--config.data.scenes.{n}={v}" for n, v in SMALL_SCENES]
    cmd += ["--config.train.batch_size=32", "--config.train.total_steps=6", "--config.train.log_every=2"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)  # written once, by process 0
    assert [r["step"] for r in rows] == [1, 2, 4, 6]
    assert proc.stdout.count("mesh {'data': 4, 'fsdp': 1, 'model': 1}") == 1
    assert (tmp_path / "eval" / "6.json").exists()


def test_bad_override_fails_fast_with_the_field_name(tmp_path):
    proc = run_main(tmp_path, "--config.train.batch_size=100", timeout=120)
    assert proc.returncode != 0
    assert "config.train.batch_size=100 is not divisible" in proc.stderr


@pytest.mark.slow
def test_demo_reaches_far_above_chance_on_held_out_scenes(tmp_path):
    """The README's demo command, as is (on the 8 simulated devices of the tests)."""
    proc = run_main(tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(next((tmp_path / "eval").glob("*.json"))) as f:
        results = json.load(f)["scenes"]
    for name in ("zero_shot_shape_top1", "zero_shot_colour_top1"):
        assert results[name] > 2 * results[f"{name}_chance"], results
    assert results["t2i_R@1"] > 20 * results["t2i_R@1_chance"], results
    assert results["t2i_R@5"] > 10 * results["t2i_R@5_chance"], results
