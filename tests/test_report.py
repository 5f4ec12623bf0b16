"""The report builds from a very short demo run: curves, evaluation tables, confusion, gallery."""

import json
import os
import pathlib

import pytest
from test_train import SMALL_SCENES, run_main

from clip_jax import report


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, scenes_dataset):
    workdir = tmp_path_factory.mktemp("run")
    proc = run_main(
        workdir,
        f"--config.data.scenes.dir={os.path.dirname(scenes_dataset.tokenizer)}",
        *(f"--config.data.scenes.{n}={v}" for n, v in SMALL_SCENES),
        "--config.train.batch_size=32",
        "--config.train.total_steps=3",
        "--config.train.log_every=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_report_builds_from_a_short_run(short_run):
    # A second evaluation file (as python -m clip_jax.evaluate writes) shows up as its own section.
    (short_run / "eval" / "3_zeroshot_cifar10.json").write_text(
        json.dumps({"step": 3, "top1": 0.4, "top1_chance": 0.1, "confusion": [[2, 1], [0, 3]]})
    )
    path = report.build(str(short_run))
    page = pathlib.Path(path).read_text()
    out = short_run / "report"
    for png in (
        "training.png",
        "scenes_zero_shot_shape_confusion.png",  # the loop's evaluator "scenes"
        "zeroshot_cifar10_confusion.png",
        "gallery.png",
    ):
        assert (out / png).stat().st_size > 1000, png
        assert f"src='{png}'" in page
    assert "Evaluation: scenes (step 3)" in page
    assert "zero_shot_shape_top1" in page and "Evaluation: zeroshot_cifar10 (step 3)" in page
    assert "no gallery" not in page
    assert (short_run / "tensorboard").is_dir()  # the loop's logger writes events too


def test_eval_history_is_ordered_by_step(tmp_path):
    (tmp_path / "eval").mkdir()
    for step in (20, 3, 100):
        (tmp_path / "eval" / f"{step}.json").write_text(json.dumps({"a": step / 100, "a_chance": 0.1}))
    (tmp_path / "eval" / "notes.json").write_text("{}")
    history = report.read_evals(str(tmp_path))
    assert [s for s, _ in history[""]] == [3, 20, 100]
    path = report.build(str(tmp_path))  # no metrics, no checkpoints: still a page
    assert (tmp_path / "report" / "eval_steps.png").exists() and "<table>" in pathlib.Path(path).read_text()


def test_the_loops_eval_files_give_one_history_per_evaluator(tmp_path):
    """eval/STEP.json of the loop is {evaluator: metrics}; a run from before evaluators wrote the
    metrics themselves (group "", above)."""
    (tmp_path / "eval").mkdir()
    for step in (4, 2):
        results = {"scenes": {"a": step / 10, "a_chance": 0.1}, "zs": {"top1": step / 20}}
        (tmp_path / "eval" / f"{step}.json").write_text(json.dumps(results))
    history = report.read_evals(str(tmp_path))
    assert history == {
        "scenes": [(2, {"a": 0.2, "a_chance": 0.1}), (4, {"a": 0.4, "a_chance": 0.1})],
        "zs": [(2, {"top1": 0.1}), (4, {"top1": 0.2})],
    }
