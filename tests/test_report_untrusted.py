"""The report treats a workdir as untrusted: its text is escaped, its keys never steer a file out."""

import json
import pathlib

from clip_jax import report

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
