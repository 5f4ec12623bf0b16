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


def _read_events(directory):
    """(tag, step, value) of every scalar in the event files, parsed with tensorboardX's protobufs."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in glob.glob(str(directory / "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecord: length u64, crc u32, payload, crc u32
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_events_without_tensorflow(tmp_path):
    pytest.importorskip("tensorboardX")
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=10, global_batch=8, primary=True)
    logger.write(1, {k: jnp.float32(v) for k, v in VALUES.items()})
    logger.write_eval(10, {"zero_shot_top1": 0.5, "confusion": [[1, 0], [0, 1]], "nested": {"a": 1.0}})
    logger.close()
    events = _read_events(tmp_path / "tensorboard")
    assert ("train/loss", 1, 2.0) in events and ("eval/zero_shot_top1", 10, 0.5) in events
    tags = {tag for tag, _, _ in events}
    assert not any(tag.startswith(("eval/confusion", "eval/nested")) for tag in tags)
    assert "train/step" not in tags
    assert "train/pairs_per_sec" in tags


def test_no_events_from_other_processes(tmp_path):
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=10, global_batch=8, primary=False)
    logger.write(1, {k: jnp.float32(v) for k, v in VALUES.items()})
    logger.write_eval(1, {"x": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_rates_after_a_resume_count_from_the_resumed_step(tmp_path, monkeypatch):
    """Resumed at step 100, the first row at 110 after 5 s ran 10 steps: 2 steps/s, not 22."""
    clock = iter([1000.0, 1005.0, 1010.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    logger = metrics.MetricsLogger(
        str(tmp_path), total_steps=200, global_batch=4, primary=False, resumed_step=100
    )
    first = logger.write(110, {k: jnp.float32(v) for k, v in VALUES.items()})
    second = logger.write(120, {k: jnp.float32(v) for k, v in VALUES.items()})
    assert first["steps_per_sec"] == pytest.approx(10 / 5) and first["pairs_per_sec"] == pytest.approx(8)
    assert first["eta_s"] is None  # the first interval after a start includes compilation
    assert second["steps_per_sec"] == pytest.approx(2) and second["eta_s"] == pytest.approx(80 / 2)


def _rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_eval_results_join_their_steps_row_in_metrics_jsonl(tmp_path):
    """One row per step: the evaluation of a log step joins its row; of a step not logged, a
    row of its own; a resumed run rolled back before the evaluations logs them again once."""
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=10, global_batch=8, primary=True)
    logger.write(2, {k: jnp.float32(v) for k, v in VALUES.items()})
    logger.write_eval(2, {"zs/top1": 0.5, "zs/confusion": [[1]], "ret/t2i_R@1": 1, "ok": True})
    logger.write(4, {k: jnp.float32(v) for k, v in VALUES.items()})
    logger.write_eval(5, {"zs/top1": 0.75})  # step 5 was not a log step
    logger.write_eval(5, {"ret/t2i_R@1": 0.25})  # a second evaluator at that step: the same row
    logger.close()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert rows[0]["loss"] == 2.0 and rows[0]["eval/zs/top1"] == 0.5 and rows[0]["eval/ret/t2i_R@1"] == 1.0
    assert not any(k.startswith(("eval/zs/confusion", "eval/ok")) for k in rows[0])
    assert "eval/zs/top1" not in rows[1]
    assert rows[2] == {"step": 5, "eval/zs/top1": 0.75, "eval/ret/t2i_R@1": 0.25}

    resumed = metrics.MetricsLogger(str(tmp_path), 10, 8, primary=True, resumed_step=2)
    resumed.write(4, {k: jnp.float32(v) for k, v in VALUES.items()})
    resumed.write_eval(4, {"zs/top1": 0.25})
    resumed.close()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4] and rows[1]["eval/zs/top1"] == 0.25
    assert rows[0]["eval/zs/top1"] == 0.5  # the row kept from before the rollback, whole


def test_a_json_lines_file_replaces_its_last_line(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = metrics.storage.JsonLines(str(path))
    assert lines.last() == ""
    lines.replace_last('{"a": 1}')  # none yet: appended
    lines.append('{"b": 2}')
    assert lines.last() == '{"b": 2}'
    lines.replace_last('{"b": 2, "c": 3}')
    lines.replace_last('{"d": 4}')  # shorter than the line it replaces
    assert path.read_text() == '{"a": 1}\n{"d": 4}\n'


def test_an_object_store_json_lines_file_replaces_its_last_line_in_the_text_it_uploads(tmp_path, monkeypatch):
    uploads = []
    monkeypatch.setattr(metrics.storage, "write_text", lambda path, text: uploads.append(text))
    lines = metrics.storage.JsonLines(str(tmp_path / "x.jsonl"))
    lines._text = '{"a": 1}\n{"b": 2}\n'  # as read from the bucket
    lines.replace_last('{"b": 2, "c": 3}')
    assert uploads == ['{"a": 1}\n{"b": 2, "c": 3}\n'] and lines.last() == '{"b": 2, "c": 3}'
