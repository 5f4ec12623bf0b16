"""Issue 13's must-show evaluation run: the demo trains with two evaluators on a cadence,
zero-shot on a folder of held-out scene images (ROOT/SHAPE/KEY.png: the class names are
the shapes) and retrieval on held-out scenes in CLIP_benchmark's webdataset retrieval
layout (DIR/test/0.tar of KEY.png + KEY.txt). Their results reach eval/STEP.json,
TensorBoard and metrics.jsonl at every cadence step; ``python -m clip_jax.evaluate
--evaluators --step=all`` gives the same numbers on the checkpoints, and so does the same
command run by two processes of two devices each (jax.distributed) against one of four."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
from eval_stream_setup import write_wds
from test_eval_loop import scalars, tiny_demo
from test_metrics import _read_events

from clip_jax import report, train
from clip_jax.data import records, scenes

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = (2, 4), 2  # 4 training steps, the evaluators every 2
NAMES = ("zeroshot", "retrieval")


def write_heldout_sets(scenes_dataset, out: pathlib.Path) -> tuple[str, str]:
    """The held-out things as a folder of shapes, the held-out scenes as a retrieval tar."""
    folder = out / "things"
    for record in records.read_all([scenes_dataset.heldout_things]):
        shape = scenes.SHAPES[record["labels"]["shape"]]
        (folder / shape).mkdir(parents=True, exist_ok=True)
        (folder / shape / f"{record['key']}.png").write_bytes(record["image"])
    pairs = [(r["image"], [r["caption"]]) for r in records.read_all([scenes_dataset.heldout_scenes])]
    write_wds(str(out / "scenes_wds"), pairs, per_shard=len(pairs))  # test/0.tar
    return f"folder:{folder}", f"wds:{out / 'scenes_wds'}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, scenes_dataset):
    """One 4-step training run with both evaluators every 2 steps (8 CPU devices)."""
    base = tmp_path_factory.mktemp("eval_demo")
    folder, wds = write_heldout_sets(scenes_dataset, base)
    config = tiny_demo(scenes_dataset, total_steps=STEPS[-1], every=EVERY)
    config.eval.evaluators = {
        "zeroshot": {"kind": "zeroshot", "every": EVERY, "dataset": folder},
        "retrieval": {"kind": "retrieval", "every": EVERY, "dataset": wds},
    }
    workdir = base / "run"
    train.run(config, str(workdir))
    loop = {s: json.loads((workdir / "eval" / f"{s}.json").read_text()) for s in STEPS}
    print(f"eval demo: the loop's results {json.dumps(loop)}")
    return workdir, loop


@pytest.mark.slow
def test_both_evaluators_at_every_cadence_step_in_eval_tensorboard_and_metrics(demo):
    workdir, loop = demo
    assert sorted(p.name for p in (workdir / "eval").glob("*.json")) == [f"{s}.json" for s in STEPS]
    for step in STEPS:
        assert sorted(loop[step]) == sorted(NAMES)
        assert {"top1", "top1_majority", "mean_per_class_recall"} <= set(loop[step]["zeroshot"])
        assert {"i2t_R@1", "t2i_R@1", "t2i_R@5", "t2i_R@1_chance"} <= set(loop[step]["retrieval"])
    events = _read_events(workdir / "tensorboard")
    rows = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3, 4] and "loss" in rows[2]  # one row per step, log_every=1
    for name in NAMES:
        for metric in scalars(loop[STEPS[-1]][name]):
            tag_name = re.sub(r"[^-/\w.]", "_", f"eval/{name}/{metric}")  # TensorBoard's: R@1 -> R_1
            tagged = [(s, v) for tag, s, v in events if tag == tag_name]
            assert [s for s, _ in tagged] == list(STEPS), (name, metric)
            for step, v in tagged:
                assert v == pytest.approx(loop[step][name][metric], rel=1e-6)
                assert rows[step][f"eval/{name}/{metric}"] == loop[step][name][metric]
    assert not any(k.startswith("eval/") for k in rows[1])


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def _evaluate_cmd(workdir) -> list[str]:
    return [sys.executable, "-m", "clip_jax.evaluate", f"--workdir={workdir}", "--evaluators", "--step=all"]


def _written(workdir: pathlib.Path) -> dict[int, dict[str, dict]]:
    """The command's eval/STEP_NAME_HASH.json files -> {step: {evaluator: metrics}}."""
    out: dict[int, dict] = {}
    for path in (workdir / "eval").glob("*_*_*.json"):
        result = json.loads(path.read_text())
        out.setdefault(result["step"], {})[result["evaluator"]] = result
    return out


def _differences(ours: dict, loop: dict) -> float:
    """The largest |difference| over every scalar of every evaluator at every loop step."""
    worst = 0.0
    for step in STEPS:
        for name in NAMES:
            expected = scalars(loop[step][name])
            got = {k: ours[step][name][k] for k in expected}
            worst = max(worst, *(abs(got[k] - v) for k, v in expected.items()))
    return worst


@pytest.mark.slow
def test_the_evaluate_command_on_one_and_on_two_processes_gives_the_loops_numbers(demo):
    workdir, loop = demo
    one = subprocess.run(
        _evaluate_cmd(workdir), capture_output=True, text=True, timeout=300, env=_env(4), cwd=ROOT
    )
    assert one.returncode == 0, one.stderr[-3000:]
    single = _written(workdir)
    assert set(STEPS) <= set(single)
    diff_single = _differences(single, loop)
    for path in (workdir / "eval").glob("*_*_*.json"):
        path.unlink()  # the two processes write the same files again

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    logs = [open(workdir.parent / f"evaluate{i}.log", "w+") for i in range(2)]  # noqa: SIM115
    procs = [  # to files: a full pipe of one process would stall both
        subprocess.Popen(
            [
                *_evaluate_cmd(workdir),
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            env=_env(2),
            cwd=ROOT,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for p, log in zip(procs, logs, strict=True):
        log.seek(0)
        outputs.append(log.read())
        log.close()
        assert p.returncode == 0, outputs[-1][-3000:]
    assert f"wrote {workdir}" in outputs[0] and f"wrote {workdir}" not in outputs[1]  # process 0 writes
    double = _written(workdir)
    diff_double = _differences(double, loop)
    diff_between = _differences(double, {s: single[s] for s in STEPS})
    print(
        f"eval demo: |evaluate 1x4 - loop| {diff_single:.2e}, |2x2 - loop| {diff_double:.2e}, "
        f"|2x2 - 1x4| {diff_between:.2e}"
    )
    assert diff_single <= 1e-6 and diff_double <= 1e-6 and diff_between <= 1e-6


@pytest.mark.slow
def test_the_report_plots_every_evaluators_metrics_over_steps(demo):
    workdir, loop = demo
    page = pathlib.Path(report.build(str(workdir))).read_text()
    for name in NAMES:
        assert f"Evaluation: {name} (step {STEPS[-1]})" in page
        assert (
            f"src='{name}_steps.png'" in page
            and (workdir / "report" / f"{name}_steps.png").stat().st_size > 1000
        )
    assert report.curve_names(loop[STEPS[-1]]["zeroshot"]) == ["top1", "mean_per_class_recall"]
    assert report.curve_names(loop[STEPS[-1]]["retrieval"]) == [
        f"{way}_R@{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)
    ]
