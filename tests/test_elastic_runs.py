"""Data position across real interruptions of ``python -m clip_jax.main`` (issue 15's must-shows).

- 2 processes x 2 devices, SIGTERM after step 20, resumed as 1 x 4 and as 4 x 1: the
  record keys of the rest of the epoch are the uninterrupted run's (one epoch = 40 steps
  of 8 = every record once), and the final parameters match it.
- A 0.8/0.2 mixture of two sources, SIGKILLed after step 25's checkpoint and resumed:
  steps 26-50 log the same losses and per-source counts, and the final parameters are
  bitwise equal to an uninterrupted run's.

The keys are not recorded by the loop (no test hook): they are recomputed from the
global positions the runs saved in their checkpoints, with the pipeline's own stream
functions (`pipeline.open_records`, `mixture.Schedule`, `elastic.ProcessView`) over the
raw records. The losses and parameters, which the runs did compute, check that the
runs read those batches.
"""

import collections
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clip_jax import checkpoint
from clip_jax.data import elastic, mixture, pipeline, records, scenes

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per launch: nothing hangs
BATCH, RECORDS = 8, 320  # one epoch = 40 steps
SEED = 0

CONFIG = """
import importlib.util

_spec = importlib.util.spec_from_file_location("demo", {demo!r})
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config(arg=None):
    c = _demo.get_config().unlock()
    del c.data["scenes"]  # given records: no generation, no zero-shot evaluation at the end
    c.eval.evaluators = {{}}  # the demo's scenes evaluator needs the scenes
    c.data.tokenizer = {tokenizer!r}
    c.data.update({data!r})
    c.data.shuffle_seed = {seed}
    c.train.update(batch_size={batch}, total_steps={steps}, log_every=1)
    c.optim.warmup_steps = 2
    c.checkpoint.every = {every}
    c.checkpoint.keep = 20  # every step's saved position stays readable
    return c.lock()
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> scenes.ScenesDataset:
    """320 scenes of 40 px in 4 shards (the tiny model's input size: no resize)."""
    return scenes.ensure_dataset(
        str(tmp_path_factory.mktemp("scenes")),
        num_train=RECORDS,
        num_heldout_things=8,
        num_heldout_scenes=8,
        image_size=40,
        vocab_size=128,
        seed=0,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))  # later launches skip most compiles


def write_config(path: pathlib.Path, dataset, data: dict, steps: int, every: int) -> pathlib.Path:
    text = CONFIG.format(
        demo=str(ROOT / "configs" / "demo.py"),
        tokenizer=dataset.tokenizer,
        data=data,
        seed=SEED,
        batch=BATCH,
        steps=steps,
        every=every,
    )
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, workdir: pathlib.Path, cache: str, processes: int, devices: int) -> list[subprocess.Popen]:
    """``processes`` x ``devices`` CPU devices of one run (a coordinator on loopback when > 1)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    cmd = [sys.executable, "-m", "clip_jax.main", f"--config={config}", f"--workdir={workdir}"]
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(processes):
        extra = []
        if processes > 1:
            extra = [f"--coordinator_address={address}", f"--num_processes={processes}", f"--process_id={i}"]
            extra.append("--heartbeat_timeout_s=20")
        log = open(workdir / f"log{i}.txt", "a")  # noqa: SIM115 (the child writes it)
        procs.append(subprocess.Popen(cmd + extra, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    return procs


def tail(workdir: pathlib.Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(workdir.glob("log*.txt")))


def finish(procs, workdir: pathlib.Path) -> list[int]:
    deadline, codes = time.monotonic() + TIMEOUT_S, []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"hung; logs:\n{tail(workdir)}")
    return codes


def metrics(workdir: pathlib.Path) -> dict[int, dict]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {m["step"]: m for m in (json.loads(line) for line in lines if line.endswith("}"))}


def wait_for(procs, workdir, condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"exited before {what}; logs:\n{tail(workdir)}")
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"no {what} within {TIMEOUT_S} s")
        time.sleep(0.005)


def saved_positions(workdir: pathlib.Path, step: int) -> list[dict]:
    """Every process's saved data state at ``step`` (each one's own file)."""
    data = workdir / "checkpoints" / str(step) / "data"
    return [json.loads(p.read_text()) for p in sorted(data.glob("process_*-of-*.json"))]


def params(workdir: pathlib.Path, step: int):
    assert checkpoint.damage(str(workdir / "checkpoints" / str(step))) is None
    # As numpy arrays: saved by other processes on other devices than this one's.
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))["params"]


def key_stream(files, seed: int):
    """The raw records' keys in the order of a source's training stream (`pipeline.source_stream`)."""
    stream = pipeline.open_records(files).shuffle(seed=seed).repeat(None)
    return stream.map(lambda r: records.decode(r)["key"])


def consumed(stream, start: int, steps: int, processes: int) -> list[str]:
    """The keys ``processes`` processes read in ``steps`` steps from global position ``start``."""
    local = BATCH // processes
    views = [elastic.ProcessView(stream, start, local, p, processes) for p in range(processes)]
    return [view[i] for view in views for i in range(steps * local)]


def assert_params_close(a, b, exact: bool) -> None:
    flat_a, flat_b = jax.tree.flatten_with_path(a)[0], jax.tree.flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        name = jax.tree_util.keystr(path)
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
        else:  # another device count: reductions in another order
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_sigterm_2x2_resumed_as_1x4_and_4x1_reads_the_rest_of_the_epoch(dataset, cache, tmp_path):
    steps = RECORDS // BATCH
    config = write_config(
        tmp_path / "config.py", dataset, {"train_files": ",".join(dataset.train_files)}, steps, every=10
    )
    started = time.monotonic()
    reference = tmp_path / "reference"
    assert finish(launch(config, reference, cache, 2, 2), reference) == [0, 0], tail(reference)

    preempted = tmp_path / "preempted"
    procs = launch(config, preempted, cache, 2, 2)
    wait_for(procs, preempted, lambda: max(metrics(preempted), default=0) >= 20, "step 20")
    for p in procs:  # a preemption notice reaches every host
        p.send_signal(signal.SIGTERM)
    assert finish(procs, preempted) == [0, 0], tail(preempted)
    log = (preempted / "log0.txt").read_text()
    saved = [int(line.split()[3].rstrip(",")) for line in log.splitlines() if line.startswith("preempted")]
    assert len(saved) == 1 and 20 <= saved[0] < steps, log[-2000:]
    at = saved[0]
    assert {s["global_example"] for s in saved_positions(preempted, at)} == {at * BATCH}

    resumed = {}
    for shape in ((1, 4), (4, 1)):
        workdir = tmp_path / f"resumed_{shape[0]}x{shape[1]}"
        shutil.copytree(preempted, workdir, ignore=shutil.ignore_patterns("log*.txt", "*.lock"))
        resumed[shape] = (workdir, launch(config, workdir, cache, *shape))
    for shape, (workdir, procs) in resumed.items():
        assert finish(procs, workdir) == [0] * shape[0], tail(workdir)
        assert f"resumed from step {at}" in (workdir / "log0.txt").read_text()
    wall_s = time.monotonic() - started

    stream = key_stream(dataset.train_files, SEED)
    before = consumed(stream, 0, at, 2)
    expected = consumed(stream, at * BATCH, steps - at, 2)  # the uninterrupted 2 x 2 run's
    assert sorted(before + expected) == sorted(
        records.decode(r)["key"] for r in pipeline.open_records(dataset.train_files)
    )  # one epoch: every record once
    ref_params = params(reference, steps)
    assert {s["global_example"] for s in saved_positions(reference, steps)} == {RECORDS}
    for (processes, _), (workdir, _) in resumed.items():
        final = saved_positions(workdir, steps)
        assert len(final) == processes and {s["global_example"] for s in final} == {RECORDS}
        restart = at * BATCH  # what the resumed run restored (checked in its log above)
        rest = consumed(stream, restart, steps - at, processes)
        assert collections.Counter(rest) == collections.Counter(expected)
        assert_params_close(params(workdir, steps), ref_params, exact=False)
    print(f"\nSIGTERM saved step {at}; rest of the epoch: {len(expected)} keys equal; wall {wall_s:.0f} s")


@pytest.mark.slow
def test_mixture_sigkill_after_step_25_resumes_bitwise_equal(dataset, cache, tmp_path):
    steps = 50
    sources = {
        "a": {"files": ",".join(dataset.train_files[:2]), "weight": 0.8},
        "b": {"files": ",".join(dataset.train_files[2:]), "weight": 0.2},
    }
    config = write_config(tmp_path / "config.py", dataset, {"sources": sources}, steps, every=5)
    started = time.monotonic()
    reference = tmp_path / "reference"
    assert finish(launch(config, reference, cache, 1, 2), reference) == [0], tail(reference)

    killed = tmp_path / "killed"
    procs = launch(config, killed, cache, 1, 2)
    committed = lambda: checkpoint.damage(str(killed / "checkpoints" / "25")) is None
    wait_for(procs, killed, lambda: max(metrics(killed), default=0) >= 25 and committed(), "checkpoint 25")
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    killed_at = max(metrics(killed))
    assert finish(launch(config, killed, cache, 1, 2), killed) == [0], tail(killed)
    log = (killed / "log0.txt").read_text()
    wall_s = time.monotonic() - started
    assert "resumed from step 25" in log, log[-2000:]

    ref_metrics, run_metrics = metrics(reference), metrics(killed)
    fields = ["loss", "data/a_examples", "data/b_examples"]
    for step in range(26, steps + 1):
        assert [run_metrics[step][f] for f in fields] == [ref_metrics[step][f] for f in fields], step
    assert_params_close(params(killed, steps), params(reference, steps), exact=True)

    # The keys of steps 26-50, from the positions both runs saved.
    (position,) = saved_positions(killed, 25)
    assert saved_positions(reference, 25) == [position] and position["global_example"] == 25 * BATCH
    assert saved_positions(killed, steps) == saved_positions(reference, steps)
    streams = [key_stream(dataset.train_files[:2], mixture.source_seed(SEED, 0))]
    streams.append(key_stream(dataset.train_files[2:], mixture.source_seed(SEED, 1)))
    schedule = mixture.Schedule.from_weights([0.8, 0.2], SEED)
    positions = range(position["global_example"], steps * BATCH)
    keys = [streams[s][i] for s, i in map(schedule.locate, positions)]
    from_a = sum(schedule.locate(g)[0] == 0 for g in positions)
    assert run_metrics[steps]["data/a_examples"] - run_metrics[25]["data/a_examples"] == from_a
    a_share = from_a / len(positions)
    print(
        f"\nSIGKILL at step {killed_at}, resumed from 25; steps 26-50: {len(keys)} keys, "
        f"{len(set(keys))} distinct, source a share {a_share:.3f}; wall {wall_s:.0f} s"
    )
