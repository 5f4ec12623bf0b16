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


@pytest.fixture(scope="module")
def tiny_summary():
    """The tiny step compiled for 8 simulated CPU devices (one compile shared by the tests below)."""
    return aot.report(tiny_config(32), aot.parse_topology("v5e-8"), "cpu")


def test_cpu_fallback_compiles_the_tiny_step_for_8_simulated_devices(tiny_summary):
    summary = tiny_summary
    assert summary["compiled_for"].startswith("simulated CPU")
    assert summary["mesh"] == {"data": 8, "fsdp": 1, "model": 1} and summary["per_device_batch"] == 4
    memory = summary["memory"]
    assert memory["temporaries"] > 0 and memory["aliased"] > 0  # the state's buffers are donated
    assert memory["total"] < 1 << 30 and summary["fits"]


# The tiny variant's forward FLOPs per pair, by hand (layer = 24 n d^2 + 4 n^2 d; a tower's
# last block computes its pooled row alone: 4 n d^2 + 20 d^2 + 4 n d):
# image: 3 layers x (24*26*128^2 + 4*26^2*128) + (4*26*128^2 + 20*128^2 + 4*26*128)
#   + patch embedding 2*25*3*8^2*128 = 34,982,912;
# text: 2 x (24*16*128^2 + 4*16^2*128) + (4*16*128^2 + 20*128^2 + 4*16*128) = 14,229,504;
# projections 2*128*(128+128) = 65,536.
TINY_FORWARD_FLOPS = 34_982_912 + 14_229_504 + 65_536


def test_model_flops_of_a_step_is_three_forward_passes_of_the_batch():
    assert aot.model_flops(tiny_config(32)) == 3 * 32 * TINY_FORWARD_FLOPS


def test_cost_analysis_of_the_tiny_step_is_per_device_and_close_to_the_model_flops(tiny_summary):
    cost, bound = tiny_summary["cost"], tiny_summary["roofline"]
    per_device_model_flops = 3 * 32 * TINY_FORWARD_FLOPS / 8
    assert 0.95 < cost["flops"] / per_device_model_flops < 1.3  # plus the loss and the optimizer
    assert cost["bytes_accessed"] > 0
    assert bound["xla_to_model_flops"] == pytest.approx(cost["flops"] * 8 / (3 * 32 * TINY_FORWARD_FLOPS))
    assert bound["caveat"] is None
    # The same step on ONE device: XLA reports about 8x the FLOPs, so the figure is per device, not
    # the whole program's (a bit under 8x: the replicated optimizer update is not split).
    one = aot.compile_step(tiny_config(32), jax.devices()[:1])
    assert 7 < one["cost"]["flops"] / cost["flops"] <= 8.01
    line = aot.verdict(tiny_summary)
    assert "roofline: step >= " in line and "XLA:CPU's cost analysis: indicative only" in line


V5E = aot.GENERATIONS["v5e"]  # 197 TFLOP/s, 819 GB/s per chip


def test_roofline_arithmetic_on_numbers_worked_by_hand():
    # 1.97 TFLOP / 197 TFLOP/s = 10 ms; 3.276 GB / 819 GB/s = 4 ms: compute-bound, 10 ms.
    # Model FLOPs 2.5216e14 on 256 chips for 10 ms at 197e12: 2.5216e14 / 5.0432e14 = 50% MFU;
    # XLA's 256 x 1.97e12 = 5.0432e14 FLOPs are twice the model's.
    bound = aot.roofline({"flops": 1.97e12, "bytes_accessed": 3.276e9}, 2.5216e14, 256, V5E)
    assert bound["compute_s"] == pytest.approx(0.010) and bound["memory_s"] == pytest.approx(0.004)
    assert bound["step_s"] == pytest.approx(0.010) and bound["bound"] == "compute"
    assert bound["mfu_bound"] == pytest.approx(0.5) and bound["xla_to_model_flops"] == pytest.approx(2.0)
    # 16.38 GB / 819 GB/s = 20 ms > 10 ms: HBM-bound, and the MFU cap halves to 25%.
    bound = aot.roofline({"flops": 1.97e12, "bytes_accessed": 16.38e9}, 2.5216e14, 256, V5E)
    assert bound["step_s"] == pytest.approx(0.020) and bound["bound"] == "HBM bandwidth"
    assert bound["mfu_bound"] == pytest.approx(0.25)
    bound["caveat"] = None
    line = aot.roofline_line(bound, "TPU (libtpu AOT)")
    assert line.startswith("roofline: step >= 20.0 ms (HBM bandwidth-bound: FLOPs 10.0 ms, HBM 20.0 ms")
    assert "MFU <= 25.0%; XLA FLOPs / model FLOPs = 2.00" in line and "indicative" not in line


def test_published_chip_peaks():
    """Google's per-chip bf16 peak and HBM bandwidth (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e)."""
    peaks = {name: (g.peak_flops, g.hbm_bandwidth) for name, g in aot.GENERATIONS.items()}
    assert peaks == {
        "v4": (275e12, 1200e9),
        "v5e": (197e12, 819e9),
        "v5p": (459e12, 2765e9),
        "v6e": (918e12, 1638e9),
    }


def test_loops_are_flagged_as_under_counted():
    config = tiny_config(32)
    assert aot.loop_caveat(config) is None
    config.model.scan = True
    config.train.accum_steps = 2
    assert aot.loop_caveat(config).startswith("scan and accum_steps > 1: XLA counts a loop body once")


@pytest.mark.slow
def test_xla_counts_a_scanned_tower_once_not_once_per_layer(tiny_summary):
    """Why loop_caveat exists: with scan the tiny towers (4 and 3 layers) lose most of their FLOPs.
    If this fails, XLA now multiplies by the trip count: drop the caveat."""
    config = tiny_config(32)
    config.model.scan = True
    scanned = aot.compile_step(config, jax.devices())
    assert scanned["cost"]["flops"] < 0.5 * tiny_summary["cost"]["flops"]


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
    assert "roofline: step >= " in proc.stdout and "indicative" not in proc.stdout


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
    assert "roofline" not in summary and "roofline" not in line  # nothing compiled: no cost to bound


def test_other_compile_errors_are_not_read_as_out_of_memory(monkeypatch):
    def compile_step(config, devices):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(aot, "compile_step", compile_step)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        aot.report(tiny_config(32), aot.parse_topology("v5e-8"), "cpu")


def test_libtpu_temporaries_wording_gives_the_gib_needed():
    """libtpu 0.0.42 words the same refusal differently (seen on ViT-L/14, v5e-256)."""
    message = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. The total memory required for HLO "
        "temporaries (17.30G) exceeds the available memory of 15.75G."
    )
    assert aot.out_of_memory(message)["used_gib"] == 17.3
    assert aot.out_of_memory("RESOURCE_EXHAUSTED: no figure here")["used_gib"] is None
