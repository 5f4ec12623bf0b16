"""Evaluators in the training loop (`clip_jax.eval.suite`): the demo's scene evaluator runs at
its cadence and at the end, writes eval/STEP.json as {evaluator: metrics} and TensorBoard's
``eval/NAME/metric``; ``python -m clip_jax.evaluate --evaluators`` on the same checkpoints
gives the same numbers, in files that evaluations with other options do not overwrite."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import load_config
from ml_collections import ConfigDict
from test_metrics import _read_events

from clip_jax import evaluate, train, validation
from clip_jax import workdir as workdir_files
from clip_jax.eval import scenes_suite, suite

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_demo(scenes_dataset, total_steps=4, every=2):
    config = load_config("demo")
    config.data.scenes.dir = str(pathlib.Path(scenes_dataset.tokenizer).parent)
    config.data.scenes.update(num_train=512, num_heldout_things=64, num_heldout_scenes=64)
    config.train.update(batch_size=32, total_steps=total_steps, log_every=1)
    config.optim.warmup_steps = 2
    config.checkpoint.every = 2
    config.eval.batch_size = 64
    config.eval.evaluators.scenes.update(every=every, diagnostics=False)
    return config


def scalars(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(v, float)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scenes_dataset):
    workdir = tmp_path_factory.mktemp("run")
    result = train.run(tiny_demo(scenes_dataset), str(workdir))
    return workdir, result


@pytest.mark.slow
def test_the_loop_evaluates_at_its_cadence_and_at_the_end(trained):
    workdir, result = trained
    assert sorted(p.name for p in (workdir / "eval").glob("*.json")) == ["2.json", "4.json"]
    for step in (2, 4):
        results = json.loads((workdir / "eval" / f"{step}.json").read_text())
        assert list(results) == ["scenes"]  # {evaluator: metrics}
        assert {"zero_shot_shape_top1", "zero_shot_shape_top1_chance", "t2i_R@1"} <= set(results["scenes"])
        assert "diag_binding_acc" not in results["scenes"]  # diagnostics=False reached the evaluator
    final = json.loads((workdir / "eval" / "4.json").read_text())["scenes"]
    assert scalars(result["eval"]["scenes"]) == pytest.approx(scalars(final), abs=0)
    events = _read_events(workdir / "tensorboard")
    shape = [(s, v) for tag, s, v in events if tag == "eval/scenes/zero_shot_shape_top1"]
    assert [s for s, _ in shape] == [2, 4] and shape[-1][1] == pytest.approx(final["zero_shot_shape_top1"])


@pytest.mark.slow
def test_evaluate_command_gives_the_loops_numbers_on_every_checkpoint(trained):
    workdir, _ = trained
    out = evaluate.run_evaluators(str(workdir), "all")
    assert sorted(out) == workdir_files.steps(str(workdir)) and {2, 4} <= set(out)
    for step in (2, 4):  # the loop's evaluation steps
        results = out[step]
        loop = json.loads((workdir / "eval" / f"{step}.json").read_text())["scenes"]
        ours = scalars(results["scenes"])
        assert ours.keys() == scalars(loop).keys()
        for name, value in ours.items():
            assert value == pytest.approx(loop[name], abs=1e-6), name
        written = list((workdir / "eval").glob(f"{step}_scenes_*.json"))
        assert len(written) == 1 and json.loads(written[0].read_text())["t2i_R@1"] == loop["t2i_R@1"]


@pytest.mark.slow
def test_evaluations_with_other_options_do_not_overwrite_each_other(trained):
    workdir, _ = trained
    evaluate.run_evaluators(str(workdir), "4")
    before = {p.name for p in (workdir / "eval").glob("4_scenes_*.json")}
    eval_config = tiny_demo_eval(probes=16, diagnostics=True)
    results = evaluate.run_evaluators(str(workdir), None, eval_config)[4]["scenes"]
    assert "diag_binding_acc" in results
    after = {p.name for p in (workdir / "eval").glob("4_scenes_*.json")}
    assert len(after) == 2 and before < after  # its own file beside the first
    evaluate.run_evaluators(str(workdir), "4", eval_config)  # the same options: its own file again
    assert {p.name for p in (workdir / "eval").glob("4_scenes_*.json")} == after


def tiny_demo_eval(**options):
    return ConfigDict({"batch_size": 64, "evaluators": {"scenes": {"kind": "scenes", "every": 0, **options}}})


@pytest.mark.slow
def test_the_evaluate_command_line_runs_the_evaluators(trained, scenes_dataset):
    """--config=FILE's eval section; the run's own options give the run's own file name."""
    workdir, _ = trained
    cmd = [sys.executable, "-m", "clip_jax.evaluate", f"--workdir={workdir}", "--evaluators", "--step=2"]
    cmd += [f"--config={ROOT / 'configs' / 'demo.py'}", "--config.eval.evaluators.scenes.diagnostics=False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = suite.sections(tiny_demo(scenes_dataset).eval)["scenes"]  # every differs: same hash
    assert f"wrote {workdir}/eval/2_scenes_{suite.options_hash(section)}.json" in proc.stdout
    bad = subprocess.run(cmd + ["--task=retrieval"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --evaluators")


# ------------------------------------------------------------------ the suite's config


def test_suite_builds_the_scenes_evaluator_with_its_options(scenes_dataset):
    config = tiny_demo(scenes_dataset, every=7)
    (built,) = suite.build(config.eval, scenes_dataset=scenes_dataset, image_size=40)
    assert built == scenes_suite.ScenesEvaluator("scenes", 7, scenes_dataset, False, 200, False)


def test_a_config_from_before_evaluators_gets_its_scene_evaluation(scenes_dataset):
    legacy = ConfigDict(
        {"batch_size": 8, "every": 5, "diagnostics": False, "probes": 20, "linear_probe": True}
    )
    (built,) = suite.build(legacy, scenes_dataset=scenes_dataset, image_size=40)
    assert built == scenes_suite.ScenesEvaluator("scenes", 5, scenes_dataset, False, 20, True)
    assert suite.build(legacy, scenes_dataset=None, image_size=40) == []  # a real run: none


@pytest.mark.parametrize(
    "evaluators, message",
    [
        ({"x": {"kind": "imagenet"}}, r"config.eval.evaluators.x.kind='imagenet' is unknown; known: \["),
        ({"x": {"kind": "scenes", "every": -1}}, r"config.eval.evaluators.x.every=-1"),
        ({"x": {"kind": "scenes", "prbes": 3}}, r"config.eval.evaluators.x: unknown options \['prbes'\]"),
        ([{"name": "a", "kind": "scenes"}, {"name": "a", "kind": "scenes"}], "the name 'a' is used twice"),
        ({"x": {"kind": "zeroshot"}}, "config.eval.evaluators.x.dataset is not set: folder:ROOT, wds:DIR"),
        ({"x": {"kind": "val_loss", "templates": "a"}}, r"x: unknown options \['templates'\]"),
    ],
)
def test_evaluator_config_mistakes_are_one_clear_error(scenes_dataset, evaluators, message):
    eval_config = ConfigDict({"batch_size": 8})
    eval_config.evaluators = evaluators
    with pytest.raises(suite.EvaluatorConfigError, match=message):
        suite.build(eval_config, scenes_dataset=scenes_dataset, image_size=40)


def test_check_config_refuses_a_scenes_evaluator_without_scenes():
    config = load_config("b16")
    config.eval.evaluators = {"s": {"kind": "scenes"}}
    with pytest.raises(validation.ConfigError, match="kind 'scenes' needs the demo's scenes"):
        validation.check_config(config)


def test_the_options_hash_follows_the_options_not_the_cadence():
    a = {"kind": "scenes", "every": 10, "probes": 200}
    assert suite.options_hash(a) == suite.options_hash({**a, "every": 50})
    assert suite.options_hash(a) != suite.options_hash({**a, "probes": 100})
    assert len(suite.options_hash(a)) == 8 and np.char.isalnum(suite.options_hash(a))
