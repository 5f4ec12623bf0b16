"""A quiet terminal: libraries' INFO lines go to WORKDIR/logs/process_N.log, the terminal keeps
the run's own lines and warnings; the evaluation table stays aligned whatever the names."""

import os
import re
import sys

import pytest
from absl import flags
from test_train import SMALL_SCENES, run_main

from clip_jax import logs
from clip_jax.eval import table

# absl's log line prefix: "I1206 12:42:27.428441 140308860152704 file.py:701] ..."
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\]")


@pytest.fixture
def restored_handler():
    """Puts absl's handler stream and --stderrthreshold back as they were."""
    handler = logs._handler()
    stream, threshold = handler.stream, flags.FLAGS["stderrthreshold"].value
    yield handler
    if handler.stream is not stream and not isinstance(handler.stream, logs._Held):
        handler.stream.close()
    handler.stream = stream
    flags.FLAGS["stderrthreshold"].value = threshold


def test_held_lines_go_to_the_process_log_file_then_the_rest(tmp_path, restored_handler):
    assert logs.to_file(str(tmp_path), 0) is None  # not quiet: nothing changes
    assert logs.quiet()
    assert flags.FLAGS["stderrthreshold"].value == "warning"
    restored_handler.stream.write("held before the run\n")
    path = logs.to_file(str(tmp_path), 3)
    assert path == str(tmp_path / "logs" / "process_3.log")
    restored_handler.stream.write("after\n")
    restored_handler.stream.flush()
    assert (tmp_path / "logs" / "process_3.log").read_text() == "held before the run\nafter\n"


def test_held_lines_are_bounded(monkeypatch):
    monkeypatch.setattr(logs, "MAX_HELD_CHARS", 10)
    held = logs._Held()
    for _ in range(5):
        held.write("1234\n")
    assert held.getvalue() == "1234\n1234\n" and held.dropped == 3


def test_the_evaluation_table_is_aligned_whatever_the_names(capsys):
    results = {
        "top1": 0.5,
        "top1_chance": 0.1,
        "a_much_longer_metric_name_than_the_old_34_columns": 0.25,
        "a_much_longer_metric_name_than_the_old_34_columns_chance": 0.125,
        "mid_name_recall": 1.0,
        "mid_name_recall_chance": 0.5,
    }
    table.print_table("title", results)
    lines = [line for line in capsys.readouterr().out.splitlines()[2:] if line]
    assert [line.split()[0] for line in lines] == ["metric", *(k for k in results if "chance" not in k)]
    # Every column ends at the same place on every line.
    assert len({len(line) for line in lines}) == 1
    assert len({line.index("%") for line in lines[1:]}) == 1


@pytest.mark.slow
def test_a_run_shows_no_library_info_lines_and_its_log_file_has_them(tmp_path, scenes_dataset):
    proc = run_main(
        tmp_path,
        f"--config.data.scenes.dir={os.path.dirname(scenes_dataset.tokenizer)}",
        *(f"--config.data.scenes.{n}={v}" for n, v in SMALL_SCENES),
        "--config.train.batch_size=16",
        "--config.train.total_steps=2",
        "--config.checkpoint.every=2",
        "--config.eval.batch_size=64",
        "--config.eval.evaluators.scenes.diagnostics=False",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in terminal if ABSL_LINE.match(line)], proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout  # the run's own lines stay
    log = (tmp_path / "logs" / "process_0.log").read_text().splitlines()
    infos = [line for line in log if ABSL_LINE.match(line) and line.startswith("I")]
    assert any("checkpoint_manager.py" in line for line in infos), log[:20]  # orbax's
    assert any("distributed.py" in line for line in infos), log[:20]  # jax's, held from before the run
    print(f"terminal: {len(terminal)} lines; log file: {len(log)} lines", file=sys.stderr)


def test_the_table_shows_baselines_beside_rates_and_numbers_as_they_are(capsys):
    results = {"top1": 0.4, "top1_chance": 0.05, "top1_majority": 0.288, "loss": 2.5, "n_images": 200}
    table.print_table("clip-art", results)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["metric", "value", "chance", "majority"]
    assert lines[3].split() == ["top1", "40.0%", "5.0%", "28.8%"]
    assert lines[4].split() == ["loss", "2.5", "-", "-"]
    assert lines[5].split() == ["n_images", "200", "-", "-"]
