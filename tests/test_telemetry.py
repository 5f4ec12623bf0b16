"""Step telemetry (MFU, data wait), the accelerator table, goodput records and the profile window."""

import json

import jax.numpy as jnp
import pytest

from clip_jax import aot, chips, goodput, metrics, profiling, telemetry, validation
from clip_jax.config_defaults import base_config
from clip_jax.models import clip, shapes

VALUES = {"loss": 2.0, "i2t_acc": 0.5, "t2i_acc": 0.25, "logit_scale": 14.3, "grad_norm": 1.0, "lr": 1e-3}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += seconds


def test_mfu_and_rates_from_a_known_flop_count_and_time():
    # 10 steps in 12 s, of which 2 s evaluation: 1 s per step; 4 s of it waiting for data.
    fields = telemetry.interval_fields(
        steps=10,
        seconds=12.0,
        data_wait_s=4.0,
        not_steps_s=2.0,
        global_batch=256,
        devices=4,
        flops_per_pair=1e9,
        peak_flops=1e12,
    )
    assert fields["step_time_s"] == pytest.approx(1.0)
    assert fields["data_wait_s"] == pytest.approx(0.4)
    assert fields["data_wait_share"] == pytest.approx(0.4)
    assert fields["pairs_per_sec_per_device"] == pytest.approx(64.0)
    # 256 pairs x 1 GFLOP each in 1 s over 4 devices of 1 TFLOP/s each: 256 / 4000.
    assert fields["mfu"] == pytest.approx(0.064)
    no_peak = telemetry.interval_fields(10, 12.0, 4.0, 2.0, 256, 4, 1e9, None)
    assert "mfu" not in no_peak and no_peak["step_time_s"] == pytest.approx(1.0)


def test_train_flops_are_three_forwards_on_the_patches_flip_keeps():
    model_config = shapes.from_sections("ViT-B/16", None, None, None)
    patches = model_config.vision.num_patches  # 196
    assert telemetry.train_flops_per_pair(model_config) == 3 * clip.forward_flops_per_pair(
        model_config, patches
    )
    kept = patches - int(patches * 0.5)  # 98, as the benchmark counts them
    assert telemetry.train_flops_per_pair(model_config, 0.5) == 3 * clip.forward_flops_per_pair(
        model_config, kept
    )
    # The same count aot's roofline uses (one formula).
    config = base_config()
    config.model.update(variant="ViT-B/16", patch_dropout=0.5)
    config.train.batch_size = 8
    assert aot.model_flops(config) == 8 * telemetry.train_flops_per_pair(model_config, 0.5)


@pytest.mark.parametrize(
    "kind, dtype, peak",
    [
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5e", "bfloat16", 197e12),
        ("TPU v5", "bfloat16", 459e12),  # v5p's device_kind
        ("TPU v5p", "float32", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
        ("cpu", "float32", None),
        ("NVIDIA GeForce RTX 4090", "bfloat16", None),
    ],
)
def test_peak_flops_table(kind, dtype, peak):
    assert chips.peak_flops(kind, dtype) == peak


def test_aot_reads_the_same_table():
    for name in ("v4", "v5e", "v5p", "v6e"):
        assert aot.GENERATIONS[name].peak_flops == chips.CHIPS[name].bf16_flops
        assert aot.GENERATIONS[name].hbm_bandwidth == chips.CHIPS[name].hbm_bandwidth


def test_an_unknown_device_without_peak_flops_says_how_to_set_it():
    peak, line = telemetry.resolve_peak("cpu", "float32", None)
    assert peak is None and "--config.logging.peak_flops" in line
    peak, line = telemetry.resolve_peak("cpu", "float32", 2e12)
    assert peak == 2e12 and "config.logging.peak_flops" in line


def test_the_log_line_and_row_carry_the_telemetry(tmp_path, capsys):
    clock = FakeClock()
    recorder = goodput.Recorder(str(tmp_path), True, clock)
    recorder.switch("train")
    meter = telemetry.Meter(32, 2, 1e9, 1e12, recorder.totals)
    logger = metrics.MetricsLogger(str(tmp_path), 100, 32, True, tensorboard=False, meter=meter)
    with recorder.phase("data"):
        clock.tick(3.0)  # time.perf_counter in the logger does not see this; the meter's parts do
    logger.write(1, {k: jnp.float32(v) for k, v in VALUES.items()})
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step_time_s", "data_wait_s", "data_wait_share", "pairs_per_sec_per_device", "mfu"} <= set(row)
    assert row["data_wait_s"] == pytest.approx(3.0)
    assert "pairs/s/device" in capsys.readouterr().out


def test_goodput_parts_nest_and_sum_to_the_wall_time(tmp_path):
    clock = FakeClock()
    recorder = goodput.Recorder(str(tmp_path), True, clock)
    clock.tick(2.0)  # startup
    with recorder.phase("restore"):
        clock.tick(1.0)
    recorder.begin(0)
    recorder.switch("train")
    with recorder.phase("compile"):
        clock.tick(5.0)
    clock.tick(10.0)  # steps
    with recorder.phase("data"):
        clock.tick(4.0)
    with recorder.phase("eval"):
        clock.tick(3.0)
    with recorder.phase("checkpoint"):
        clock.tick(1.5)
    recorder.switch("other")
    clock.tick(0.5)
    recorder.finish("completed")
    record = json.loads((tmp_path / goodput.FILE).read_text())
    parts = record["attempts"][0]["parts_s"]
    expected = {
        "startup": 2,
        "restore": 1,
        "compile": 5,
        "train": 10,
        "data": 4,
        "eval": 3,
        "checkpoint": 1.5,
    }
    assert parts == pytest.approx({**expected, "other": 0.5})
    assert record["attempts"][0]["wall_s"] == pytest.approx(27.0) == sum(parts.values())
    assert record["total"]["goodput"] == pytest.approx(10 / 27)
    assert record["attempts"][0]["status"] == "completed"


def test_goodput_accumulates_over_attempts_and_replaces_a_corrupt_file(tmp_path, capsys):
    for _ in range(2):
        clock = FakeClock()
        recorder = goodput.Recorder(str(tmp_path), True, clock)
        recorder.begin(0)
        recorder.switch("train")
        clock.tick(4.0)
        recorder.finish("preempted")
    record = json.loads((tmp_path / goodput.FILE).read_text())
    assert len(record["attempts"]) == 2 and record["total"]["wall_s"] == pytest.approx(8.0)
    assert "goodput 100.0% of 8 s" in capsys.readouterr().out

    (tmp_path / goodput.FILE).write_text('{"attempts": [{"wall_s": "a lot"}]}')
    assert goodput.read_attempts(str(tmp_path / goodput.FILE)) == []
    assert "not a goodput record" in capsys.readouterr().out
    (tmp_path / goodput.FILE).write_bytes(b"[" * 100_000)  # too deep for json
    assert goodput.read_attempts(str(tmp_path / goodput.FILE)) == []
    (tmp_path / goodput.FILE).write_bytes(b" " * (goodput.MAX_BYTES + 1))
    assert goodput.read_attempts(str(tmp_path / goodput.FILE)) == []


def test_nothing_is_written_before_the_run_decided_to_start(tmp_path):
    recorder = goodput.Recorder(str(tmp_path), True, FakeClock())
    recorder.finish("failed: DataChangedError")  # a refused resume: the workdir stays as it was
    assert not (tmp_path / goodput.FILE).exists()
    secondary = goodput.Recorder(str(tmp_path), False, FakeClock())
    secondary.begin(0)
    secondary.finish("completed")
    assert not (tmp_path / goodput.FILE).exists()


@pytest.mark.parametrize("steps", [(0, 2), (5, 3), (3, 11), (1,), (1, 2, 3), (1.5, 2)])
def test_a_bad_profile_window_is_one_clear_error(steps):
    with pytest.raises(validation.ConfigError, match="profile_steps"):
        profiling.window(steps, total_steps=10)


def test_profile_window_accepts_a_range_or_nothing():
    assert profiling.window((), 10) is None and profiling.window(None, 10) is None
    assert profiling.window((3, 5), 10) == (3, 5) and profiling.window([10, 10], 10) == (10, 10)


def test_the_runs_meter_from_its_config(capsys):
    config = base_config()
    config.model.update(variant="tiny", dtype="float32", patch_dropout=0.25)
    config.train.batch_size = 64
    model_config = shapes.from_sections("tiny", None, None, None)
    m = telemetry.meter(config, model_config, dict, primary=True)
    assert (m.global_batch, m.devices, m.peak_flops) == (64, 8, None)  # CPU: not in the table
    assert m.flops_per_pair == telemetry.train_flops_per_pair(model_config, 0.25)
    assert "--config.logging.peak_flops" in capsys.readouterr().out
    config.logging.peak_flops = 3e12
    assert telemetry.meter(config, model_config, dict, primary=False).peak_flops == 3e12
    assert capsys.readouterr().out == ""  # only process 0 says it
