"""The streamed evaluators give identical numbers on 1 process x 4 devices and 2 processes x 2.

Each process reads only its rows of every global batch (`clip_jax.eval.stream`); the
workers are fresh subprocesses (jax.distributed over 127.0.0.1 with gloo), the worker
being ``tests/eval_stream_setup.py``.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import eval_stream_setup as setup
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = str(pathlib.Path(__file__).resolve().parent / "eval_stream_setup.py")
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs_args, env, tmp_path, name):
    logs = [open(tmp_path / f"{name}{i}.log", "w") for i in range(len(procs_args))]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        for args, log in zip(procs_args, logs, strict=True)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{name}: hung for {TIMEOUT_S} s")
    tails = [(tmp_path / f"{name}{i}.log").read_text()[-3000:] for i in range(len(procs))]
    assert codes == [0] * len(procs), tails


@pytest.mark.slow
def test_two_processes_of_two_devices_give_the_numbers_of_one_process_of_four(tmp_path):
    data = tmp_path / "data"
    setup.write_sets(str(data))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.update(  # a shared compilation cache: the 2-process run reuses the compiles it can
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    run(
        [[str(data), str(tmp_path / "one.json")]],
        dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        tmp_path,
        "one",
    )
    address = f"127.0.0.1:{free_port()}"
    two_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run(
        [[str(data), str(tmp_path / "two.json"), address, "2", str(i)] for i in range(2)],
        two_env,
        tmp_path,
        "two",
    )
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    print("\n1x4:", json.dumps({k: {m: v for m, v in r.items() if m != "confusion"} for k, r in one.items()}))
    assert one["zs"]["n_images"] == 20 and one["ret"]["n_captions"] == 25 and one["val"]["n_batches"] == 2
    assert set(one) == set(two)
    for name in one:
        assert one[name].keys() == two[name].keys(), name
        for metric, value in one[name].items():
            np.testing.assert_allclose(two[name][metric], value, atol=1e-6, err_msg=f"{name} {metric}")
