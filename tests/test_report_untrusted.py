"""The report treats a workdir as untrusted: its text is escaped, its keys never steer a file out."""

import json
import pathlib

import pytest

from clip_jax import cli, report
from clip_jax.data import bounded

SCRIPT = "<script>alert(1)</script>"


def hostile_workdir(root: pathlib.Path) -> pathlib.Path:
    workdir = root / "a" / "b" / "run"
    (workdir / "eval").mkdir(parents=True)
    rows = [
        {"step": 1, "loss": 2.0, "lr": 0.1},
        {"step": SCRIPT, "loss": 1.0, SCRIPT: 3, "lr": 0.1},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {
        "step": 3,
        f"{SCRIPT}_top1": 0.5,
        f"{SCRIPT}_top1_chance": 0.1,
        "../../../pwned_confusion": [[1, 0], [0, 1]],
        "/tmp/abs_pwned_confusion": [[1, 0], [0, 1]],
        "x' onerror='alert(1)_confusion": [[1]],
        "prompt_sensitivity": {
            "../../../pwned_prompts": {"per_template": {SCRIPT: 0.5}, "ensemble": 0.5, "chance": 0.1}
        },
    }
    for step in (2, 3):
        (workdir / "eval" / f"{step}_<b>grp<i>.json").write_text(json.dumps(results))
    return workdir


def test_hostile_metric_names_values_and_keys_are_escaped_and_kept_inside(tmp_path):
    workdir = hostile_workdir(tmp_path)
    page = pathlib.Path(report.build(str(workdir))).read_text()
    assert "<script" not in page.lower() and "<b>grp" not in page
    assert "&lt;script&gt;" in page  # shown, as text
    assert "onerror='" not in page
    out = (workdir / "report").resolve()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    outside = [p for p in written if not (tmp_path / p).resolve().is_relative_to(out)]
    assert outside == [
        pathlib.Path("a/b/run/eval/2_<b>grp<i>.json"),
        pathlib.Path("a/b/run/eval/3_<b>grp<i>.json"),
        pathlib.Path("a/b/run/metrics.jsonl"),
    ]
    assert not pathlib.Path("/tmp/abs_pwned_confusion.png").exists()
    pngs = [p.name for p in out.glob("*.png")]
    assert len(pngs) == 6  # training, steps, three confusions, one prompts plot
    for name in pngs:
        assert f"src='{name}'" in page


def test_metrics_are_streamed_and_each_line_is_capped(tmp_path):
    """A long run's metrics.jsonl is read line by line (any length); one line over the cap (no
    clip_jax row is) is refused naming the file, before it is held in memory."""
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(300)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [json.loads(x) for x in bounded.lines(str(tmp_path / "metrics.jsonl"), chunk=7)] == rows
    assert report.read_metrics(str(tmp_path)) == rows
    huge = json.dumps({"step": 300, "loss": "x" * (bounded.MAX_LINE_BYTES + 1)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(huge + "\n")
    with pytest.raises(cli.UserError, match="metrics.jsonl: a line over"):
        report.read_metrics(str(tmp_path))


def test_an_eval_file_over_the_size_cap_is_refused(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "2.json").write_text(json.dumps({"step": 2, "top1": 0.5}))
    assert report.read_evals(str(tmp_path)) == {"": [(2, {"step": 2, "top1": 0.5})]}
    padding = "x" * report.MAX_EVAL_BYTES
    (tmp_path / "eval" / "3.json").write_text(json.dumps({"step": 3, "top1": 0.5, "pad": padding}))
    with pytest.raises(cli.UserError, match="3.json: .* bytes, over"):
        report.read_evals(str(tmp_path))
