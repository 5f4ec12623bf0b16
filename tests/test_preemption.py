"""Kills and preemptions of the entry point, in fresh processes under hard timeouts.

- kill -9 at arbitrary points (after a given step; during an async save), restart
  until done: final params AND optimizer state bitwise equal to an uninterrupted run.
- SIGTERM: a checkpoint at the step the processes agreed on, exit 0 within seconds;
  the relaunch ends bitwise equal.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clip_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 12
TIMEOUT_S = 240  # per process: nothing hangs


@pytest.fixture(scope="module")
def launcher(scenes_dataset, tmp_path_factory):
    """``python -m clip_jax.main`` on a tiny demo: 2 CPU devices, batch 16, a checkpoint every 2 steps."""
    cache = tmp_path_factory.mktemp("jax_cache")  # later processes skip most compiles
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    overrides = {
        "data.scenes.dir": os.path.dirname(scenes_dataset.tokenizer),
        "data.scenes.num_train": 512,
        "data.scenes.num_heldout_things": 64,
        "data.scenes.num_heldout_scenes": 64,
        "train.batch_size": 16,
        "train.total_steps": TOTAL_STEPS,
        "train.log_every": 1,
        "optim.warmup_steps": 2,
        "checkpoint.every": 2,
        "eval.batch_size": 64,
    }

    def start(workdir: pathlib.Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "clip_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}"]
        cmd += [f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(workdir / "log.txt", "a")  # noqa: SIM115 (the child writes it)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    return start


def finish(proc: subprocess.Popen, workdir: pathlib.Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"hung; log:\n{(workdir / 'log.txt').read_text()[-3000:]}")


def logged_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(proc, workdir, condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"exited ({proc.returncode}) before {what}; log:\n{(workdir / 'log.txt').read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {TIMEOUT_S} s")
        time.sleep(0.002)


def saving_now(workdir: pathlib.Path) -> list[str]:
    directory = workdir / "checkpoints"
    return [p for p in os.listdir(directory) if "tmp" in p] if directory.exists() else []


def final_state(workdir: pathlib.Path):
    """The last checkpoint's train state, as numpy arrays."""
    checkpoints = workdir / "checkpoints"
    assert checkpoint.damage(str(checkpoints / str(TOTAL_STEPS))) is None
    return ocp.StandardCheckpointer().restore(checkpoints / str(TOTAL_STEPS) / "state")


def assert_bitwise_equal(a, b) -> None:
    paths_a, paths_b = jax.tree.flatten_with_path(a)[0], jax.tree.flatten_with_path(b)[0]
    assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
    for (path, x), (_, y) in zip(paths_a, paths_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(launcher, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    assert finish(launcher(workdir), workdir) == 0, (workdir / "log.txt").read_text()[-3000:]
    assert logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))
    return final_state(workdir)


def test_kill_9_anywhere_then_restart_ends_bitwise_equal(launcher, reference, tmp_path):
    workdir = tmp_path / "killed"
    landed = []

    # 1. After step 3 is logged (between checkpoints 2 and 4).
    proc = launcher(workdir)
    wait_for(proc, workdir, lambda: 3 in logged_steps(workdir), "step 3")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    landed.append(f"after step {max(logged_steps(workdir))} was logged")

    # 2. While an async save is being written (orbax's temporary directory exists); the
    # save may commit between the poll and the kill (a millisecond window): then again.
    for _ in range(3):
        seen = len(logged_steps(workdir))
        proc = launcher(workdir)
        in_save = lambda seen=seen: len(logged_steps(workdir)) > seen and saving_now(workdir)
        wait_for(proc, workdir, in_save, "a save")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        left = saving_now(workdir)
        landed.append(f"at step {max(logged_steps(workdir))}, during the save of {left}")
        if left:
            break
    assert left, "no kill landed during a save"

    # 3. Restart until done.
    for _ in range(3):
        if finish(launcher(workdir), workdir) == 0:
            break
    else:
        pytest.fail((workdir / "log.txt").read_text()[-3000:])
    log = (workdir / "log.txt").read_text()
    print("kill -9 landed:", "; ".join(landed))
    print("resumed:", [line for line in log.splitlines() if "resumed" in line or "damaged" in line])
    assert log.count("resumed from step") == len(landed)
    assert_bitwise_equal(final_state(workdir), reference)


def test_sigterm_saves_at_an_agreed_step_exits_0_and_resumes_bitwise_equal(launcher, reference, tmp_path):
    workdir = tmp_path / "preempted"
    proc = launcher(workdir)
    wait_for(proc, workdir, lambda: 5 in logged_steps(workdir), "step 5")
    signalled_at, step_at_signal = time.monotonic(), max(logged_steps(workdir))
    proc.send_signal(signal.SIGTERM)
    code = finish(proc, workdir)
    exit_s = time.monotonic() - signalled_at
    log = (workdir / "log.txt").read_text()
    assert code == 0, log[-3000:]
    saved = [
        int(line.split()[3].rstrip(",")) for line in log.splitlines() if line.startswith("preempted: saved")
    ]
    print(f"SIGTERM after step {step_at_signal}; saved step {saved}; exit 0 after {exit_s:.2f} s")
    assert len(saved) == 1 and step_at_signal <= saved[0] <= step_at_signal + 3
    assert saved[0] < TOTAL_STEPS and max(logged_steps(workdir)) == saved[0]
    assert checkpoint.damage(str(workdir / "checkpoints" / str(saved[0]))) is None  # committed, confirmed
    assert not (workdir / "eval").exists()  # a preempted run stops at once
    (attempt,) = json.loads((workdir / "goodput.json").read_text())["attempts"]
    assert attempt["status"] == "preempted" and attempt["last_step"] == saved[0]

    assert finish(launcher(workdir), workdir) == 0
    assert f"resumed from step {saved[0]}" in (workdir / "log.txt").read_text()
    assert_bitwise_equal(final_state(workdir), reference)
    record = json.loads((workdir / "goodput.json").read_text())  # both attempts, and their total
    assert [a["status"] for a in record["attempts"]] == ["preempted", "completed"]
    assert record["attempts"][1]["resumed_step"] == saved[0]
    assert record["total"]["wall_s"] == sum(a["wall_s"] for a in record["attempts"])
