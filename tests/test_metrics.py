"""The metrics logger: JSON lines, throughput and ETA, primary process only."""

import json

import jax.numpy as jnp
import pytest

from clip_jax import metrics

VALUES = {"loss": 2.0, "i2t_acc": 0.5, "t2i_acc": 0.25, "logit_scale": 14.3, "grad_norm": 1.0, "lr": 1e-3}


def test_lines_throughput_and_eta(tmp_path, capsys):
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=100, global_batch=32, primary=True)
    first = logger.write(1, {k: jnp.float32(v) for k, v in VALUES.items()})
    second = logger.write(11, {k: jnp.float32(v) for k, v in VALUES.items()})
    assert first["eta_s"] is None and "compiled and ran in" in capsys.readouterr().out.splitlines()[0]
    assert second["pairs_per_sec"] == pytest.approx(second["steps_per_sec"] * 32)
    assert second["eta_s"] == pytest.approx(89 / second["steps_per_sec"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 11] and rows[1]["loss"] == 2.0


def test_only_the_primary_process_writes(tmp_path, capsys):
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=10, global_batch=8, primary=False)
    record = logger.write(1, {k: jnp.float32(v) for k, v in VALUES.items()})
    assert record["loss"] == 2.0
    assert not (tmp_path / "metrics.jsonl").exists() and capsys.readouterr().out == ""
