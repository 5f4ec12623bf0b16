"""Multi-host training on one machine: 2 processes x 2 CPU devices (jax.distributed + gloo).

- 2 x 2 matches 1 x 4 on the same global batches: the same loss at every step, the
  same parameters (FSDP over all 4 devices, so parameters and the optimizer state
  are sharded across the two processes).
- SIGKILL one of two processes: the other exits non-zero with an error within
  seconds (the coordination service's heartbeat timeout), never hangs.
- Both processes killed, relaunched with launch/local.py: the run resumes from its
  checkpoint and ends bitwise equal to an uninterrupted 2-process run.

Every process is a fresh subprocess under a hard timeout; the jax compilation cache
is shared so later processes skip most compiles. This file is also the worker of the
first test: ``python tests/test_multihost.py OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]``.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, BATCH, TIMEOUT_S = 4, 16, 240
TOTAL_STEPS, HEARTBEAT_S = 8, 5  # the clip_jax.main runs


def worker(out: str, coordinator: str | None = None, num_processes: int = 1, process_id: int = 0) -> None:
    """Trains the tiny model STEPS steps on fixed random global batches; process 0 writes
    the losses and the final (gathered) parameters to ``out``."""
    import jax

    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    import flax.linen as nn
    import numpy as np
    from jax.experimental import multihost_utils

    from clip_jax import losses, optim, recipe, sharding, step

    spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config().unlock()  # (not conftest's loader: it sets 8 devices)
    config.sharding.mesh = {"data": 1, "fsdp": -1, "model": 1}
    config.train.batch_size = BATCH
    config.optim.warmup_steps = 1
    mesh = sharding.make_mesh(config.sharding.mesh)
    model = recipe.build_model(config, vocab_size=128)
    tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        abstract, shardings = step.state_shardings(model, tx, mesh)
        state = jax.jit(lambda rng: step.init_state(model, tx, rng), out_shardings=shardings)(
            jax.random.key(0)
        )
        init = multihost_utils.process_allgather(state.params, tiled=True)
        train_step = step.make_train_step(model, tx, schedule, losses.make_loss("softmax", mesh))
        step_fn = step.compile_train_step(train_step, shardings, mesh)
        rng, size = np.random.default_rng(0), model.config.vision.image_size
        batch_sharding = sharding.batch_sharding(mesh)
        batches = [
            {
                "image": rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8),
                "tokens": rng.integers(1, 128, (BATCH, model.config.text.context_length), dtype=np.int32),
            }
            for _ in range(2)
        ]
        losses_seen = []
        for i in range(STEPS):
            # Each process supplies the rows of its own devices: the same global batch either way.
            batch = {
                k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
                for k, v in batches[i % 2].items()
            }
            state, metrics = step_fn(state, batch)
            losses_seen.append(float(metrics["loss"]))
        params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(params)[0]}
        moved = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init), strict=True)
        )
        np.savez(out, losses=np.array(losses_seen), moved=np.array(moved), **flat)


if __name__ == "__main__":
    args = sys.argv[1:]
    worker(args[0], *(args[1:2]), *(int(a) for a in args[2:4]))
    sys.exit(0)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

from clip_jax import checkpoint  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two CPU devices per process, gloo, a shared compilation cache."""
    cache = tmp_path_factory.mktemp("jax_cache")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def wait_all(procs, what: str) -> list[int]:
    deadline = time.monotonic() + TIMEOUT_S
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what}: hung for {TIMEOUT_S} s")
    return codes


def test_two_processes_of_two_devices_match_one_process_of_four(env, tmp_path):
    script = str(pathlib.Path(__file__))
    start = time.monotonic()
    log = lambda name: open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (the child writes it)
    tail = lambda name: (tmp_path / f"{name}.log").read_text()[-3000:]
    one = subprocess.Popen(
        [sys.executable, script, str(tmp_path / "one.npz")],
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        cwd=ROOT,
        stdout=log("one"),
        stderr=subprocess.STDOUT,
    )
    assert wait_all([one], "1 x 4") == [0], tail("one")
    one_s = time.monotonic() - start
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path / "two.npz"), address, "2", str(i)],
            env=env,
            cwd=ROOT,
            stdout=log(f"two{i}"),
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    codes = wait_all(procs, "2 x 2")
    assert codes == [0, 0], [tail(f"two{i}") for i in range(2)]
    two_s = time.monotonic() - start - one_s
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    worst = max(float(np.max(np.abs(one[k] - two[k]))) for k in one.files if k not in ("losses", "moved"))
    print(f"\n1x4 losses {one['losses']}\n2x2 losses {two['losses']}")
    print(f"max |param diff| {worst:.3g}; 1x4 took {one_s:.1f} s, 2x2 {two_s:.1f} s")
    assert one["moved"] > 1e-3  # the parameters did change
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert sorted(one.files) == sorted(two.files)
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---- clip_jax.main with 2 processes on the demo's scenes ----


def main_args(scenes_dataset, workdir) -> list[str]:
    overrides = {
        "data.scenes.dir": os.path.dirname(scenes_dataset.tokenizer),
        "data.scenes.num_train": 512,
        "data.scenes.num_heldout_things": 64,
        "data.scenes.num_heldout_scenes": 64,
        "train.batch_size": BATCH,
        "train.total_steps": TOTAL_STEPS,
        "train.log_every": 1,
        "optim.warmup_steps": 2,
        "checkpoint.every": 2,
        "eval.batch_size": 64,
    }
    args = [f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={workdir}"]
    return (
        args + [f"--config.{k}={v}" for k, v in overrides.items()] + [f"--heartbeat_timeout_s={HEARTBEAT_S}"]
    )


def start_two(env, scenes_dataset, workdir: pathlib.Path) -> list[subprocess.Popen]:
    """The two processes of one launch, started directly (launch/local.py would stop the survivor)."""
    workdir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "clip_jax.main", *main_args(scenes_dataset, workdir)]
        cmd += [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
        log = open(workdir / f"log{i}.txt", "a")  # noqa: SIM115 (the child writes it)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    return procs


def logged_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def logs(workdir: pathlib.Path) -> str:
    return "\n".join(f"--- log{i}:\n" + (workdir / f"log{i}.txt").read_text()[-2000:] for i in range(2))


def wait_for_step(procs, workdir, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while step not in logged_steps(workdir):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"no step {step}:\n{logs(workdir)}")
        time.sleep(0.01)


def final_params(workdir: pathlib.Path):
    directory = workdir / "checkpoints" / str(TOTAL_STEPS)
    assert checkpoint.damage(str(directory)) is None
    # Onto this process's first device: the saved shardings name the 2-process run's devices.
    metadata = ocp.StandardCheckpointer().metadata(directory / "state").item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return ocp.StandardCheckpointer().restore(directory / "state", target)


def run_to_end(env, scenes_dataset, workdir: pathlib.Path) -> float:
    start = time.monotonic()
    codes = wait_all(start_two(env, scenes_dataset, workdir), "2-process run")
    assert codes == [0, 0], logs(workdir)
    return time.monotonic() - start


@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_of_one_process_stops_the_other_with_an_error_within_seconds(
    env, scenes_dataset, tmp_path, victim
):
    """victim 0 is the coordinator's process: the survivor loses the coordination service too."""
    procs = start_two(env, scenes_dataset, tmp_path)
    wait_for_step(procs, tmp_path, 3)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = procs[1 - victim]
    try:
        code = survivor.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail(f"the survivor hung for {TIMEOUT_S} s after process {victim} was killed")
    exit_s = time.monotonic() - killed_at
    procs[victim].wait()
    log = (tmp_path / f"log{1 - victim}.txt").read_text()
    errors = [
        line for line in log.splitlines() if "rror" in line or "UNAVAILABLE" in line or "heartbeat" in line
    ]
    last = max(logged_steps(tmp_path))
    print(
        f"\nkilled process {victim} after step {last}: "
        f"process {1 - victim} exited {code} after {exit_s:.1f} s"
    )
    print(f"(heartbeat timeout {HEARTBEAT_S} s); its error: {errors[-3:]}")
    assert code != 0, log[-3000:]
    assert errors, log[-3000:]
    assert max(logged_steps(tmp_path)) < TOTAL_STEPS


@pytest.fixture(scope="module")
def reference(env, scenes_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    seconds = run_to_end(env, scenes_dataset, workdir)
    print(f"\nuninterrupted 2-process run: {seconds:.1f} s")
    assert logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))
    return final_params(workdir)


@pytest.mark.slow  # three 2-process launches (~3 min on 2 busy cores)
def test_both_processes_killed_then_relaunched_resume_and_end_bitwise_equal(
    env, scenes_dataset, reference, tmp_path
):
    procs = start_two(env, scenes_dataset, tmp_path)
    wait_for_step(procs, tmp_path, 5)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)
    killed_after = max(logged_steps(tmp_path))
    seconds = run_to_end(env, scenes_dataset, tmp_path)
    resumed = [
        line for line in (tmp_path / "log0.txt").read_text().splitlines() if "resumed from step" in line
    ]
    print(f"\nboth killed after step {killed_after}; {resumed}; the relaunch took {seconds:.1f} s")
    assert len(resumed) == 1 and int(resumed[0].split()[-1]) in (2, 4)  # checkpoints every 2 steps
    actual = final_params(tmp_path)
    paths_a, paths_b = jax.tree.flatten_with_path(actual)[0], jax.tree.flatten_with_path(reference)[0]
    assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
    for (path, x), (_, y) in zip(paths_a, paths_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
