"""clip_jax.aot: the train step compiled ahead of time for a target slice."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest
from conftest import load_config

from clip_jax import aot, validation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_topology_names():
    assert aot.parse_topology("v5e-256") == aot.Topology("v5e-256", "v5e", 256, "v5e:16x16")
    assert aot.parse_topology("v5litepod-16").libtpu_name == "v5e:4x4"
    v4 = aot.parse_topology("v4-128")  # v4/v5p names count TensorCores: 64 chips
    assert (v4.chips, v4.libtpu_name, v4.hbm_bytes) == (64, "v4:4x4x4", 32 << 30)
    assert aot.parse_topology("v5p-8").libtpu_name == "v5p:2x2x1"
    assert aot.parse_topology("v6e-64").libtpu_name == "v6e:8x8"
    with pytest.raises(ValueError, match="v3-8"):
        aot.parse_topology("v3-8")
    with pytest.raises(ValueError, match="no v5e slice of 12 chips"):
        aot.parse_topology("v5e-12")


def tiny_config(batch_size: int):
    config = load_config("demo")
    config.train.batch_size = batch_size
    return config


def test_cpu_fallback_compiles_the_tiny_step_for_8_simulated_devices():
    summary = aot.report(tiny_config(32), aot.parse_topology("v5e-8"), "cpu")
    print(summary)
    assert summary["compiled_for"].startswith("simulated CPU")
    assert summary["mesh"] == {"data": 8, "fsdp": 1, "model": 1} and summary["per_device_batch"] == 4
    memory = summary["memory"]
    assert memory["temporaries"] > 0 and memory["aliased"] > 0  # the state's buffers are donated
    assert memory["total"] < 1 << 30 and summary["fits"]


def test_a_batch_that_does_not_split_over_the_slice_is_refused_before_compiling():
    with pytest.raises(validation.ConfigError, match="batch_size=12"):
        aot.report(tiny_config(12), aot.parse_topology("v5e-8"), "cpu")


def test_tpu_aot_for_a_v5e_8_slice_without_a_tpu():
    pytest.importorskip("libtpu")
    cmd = [
        sys.executable,
        "-m",
        "clip_jax.aot",
        f"--config={ROOT / 'configs' / 'demo.py'}",
        "--topology=v5e-8",
    ]
    cmd += ["--config.train.batch_size=32"]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(TPU_ACCELERATOR_TYPE="v5litepod-8", TPU_WORKER_HOSTNAMES="localhost")  # quieter libtpu
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"compiled_for": "TPU (libtpu AOT)"' in proc.stdout and "fits in 16 GiB HBM" in proc.stdout


OOM = (
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
    "Used 17.30G of 15.75G hbm. Exceeded hbm capacity by 1.55G."
)


def test_xla_refusing_to_compile_for_lack_of_hbm_is_a_does_not_fit_answer(monkeypatch):
    """What libtpu says for ViT-L/14 at batch 32k on v5e-256 (17.3 GB of temporaries, 15.75 GB HBM)."""

    def compile_step(config, devices):
        aot.abstract_inputs(config, devices)  # the shapes and shardings are still checked
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(aot, "compile_step", compile_step)
    summary = aot.report(tiny_config(32), aot.parse_topology("v5e-8"), "cpu")
    assert summary["fits"] is False and summary["memory"] is None
    assert summary["per_device_gib"] == 17.3 and summary["compile_error"].startswith("RESOURCE_EXHAUSTED")
    line = aot.verdict(summary)
    assert "17.3 GiB per device, does NOT fit in 16 GiB HBM" in line
    assert "--config.model.remat=full" in line and "batch_size" in line and "--topology" in line


def test_other_compile_errors_are_not_read_as_out_of_memory(monkeypatch):
    def compile_step(config, devices):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(aot, "compile_step", compile_step)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        aot.report(tiny_config(32), aot.parse_topology("v5e-8"), "cpu")
