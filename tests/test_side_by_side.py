"""``benchmark --torch`` (issue 16): each framework in a process of its own, the PyTorch one
without JAX; warm-up and medians; a failing or hanging child ends in one line; the medians
over runs are the per-run figures' medians."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from clip_jax import cli, side_by_side, torch_reference
from clip_jax.models import clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.benchmark", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def _record(jax_step, torch_step, peak, batch=4, flops=8.0e9):
    """A run as the children report it: made-up seconds, rates derived from them."""
    side = lambda s: {"step_s": s, "pairs_per_s": batch / s, "achieved_flops_per_s": flops / s}
    jax_result = {"matmul_peak": {"flops_per_s": peak, "size": 1024}, "clip_jax": side(jax_step)}
    return side_by_side.run_record("clip_jax", jax_result, side(torch_step))


def test_run_record_ratio_and_mfu():
    r = _record(jax_step=2.0, torch_step=3.0, peak=10e9)
    assert r["ratio"] == pytest.approx(1.5)  # pairs/s: 2 / (4/3)
    assert r["mfu"] == pytest.approx(0.4)  # 8e9 / 2 s = 4 GFLOP/s of 10
    assert r["torch_mfu"] == pytest.approx(8 / 3 / 10)
    assert (r["clip_jax_step_s"], r["torch_step_s"], r["peak_flops_per_s"]) == (2.0, 3.0, 10e9)


def test_summarize_is_the_median_of_each_runs_figures():
    records = [_record(2.0, 3.0, 10e9), _record(1.0, 4.0, 20e9), _record(4.0, 5.0, 16e9)]
    s = side_by_side.summarize(records)
    # Per run: ratios 1.5, 4.0, 1.25; MFU 0.4, 0.4, 0.125; torch MFU 0.267, 0.1, 0.1.
    assert s["runs"] == 3
    assert (s["clip_jax_step_s"], s["torch_step_s"], s["peak_flops_per_s"]) == (2.0, 4.0, 16e9)
    assert s["ratio"] == pytest.approx(1.5)  # not the ratio of the median steps (4 / 2 = 2)
    assert s["mfu"] == pytest.approx(0.4)
    assert s["torch_mfu"] == pytest.approx(0.1)
    two = side_by_side.summarize(records[:2])  # an even count: the mean of the middle two
    assert two["ratio"] == pytest.approx((1.5 + 4.0) / 2) and two["clip_jax_step_s"] == 1.5
    with pytest.raises(ValueError):
        side_by_side.summarize([])


def test_child_failure_is_one_line(tmp_path):
    code = "import sys; print('noise', file=sys.stderr); raise RuntimeError('boom')"
    argv = [sys.executable, "-c", code]
    with pytest.raises(cli.UserError, match=r"^side \(-c .*\) failed \(exit 1\): RuntimeError: boom$"):
        side_by_side.run_child(argv, "side", str(tmp_path / "out.json"), timeout_s=60)


def test_child_timeout_ends_the_wait(tmp_path):
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(cli.UserError, match="did not finish within --child_timeout_s=1"):
        side_by_side.run_child(argv, "side", str(tmp_path / "out.json"), timeout_s=1)


def test_child_without_result(tmp_path):
    argv = [sys.executable, "-c", "pass"]
    with pytest.raises(cli.UserError, match="exited 0 but left no result"):
        side_by_side.run_child(argv, "side", str(tmp_path / "out.json"), timeout_s=60)


def test_torch_child_bad_spec_is_its_error_line(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("{not json")
    argv = side_by_side.child_argv("torch", {}, str(spec), str(tmp_path / "out.json"))
    with pytest.raises(cli.UserError, match=r"HF.*failed \(exit 2\): --spec=.*spec.json: not valid JSON"):
        side_by_side.run_child(argv, side_by_side.LABELS["torch"], str(tmp_path / "out.json"), 120)


def test_torch_spec_refuses_resnet_and_unknown_variants():
    with pytest.raises(cli.UserError, match="ViT variants"):
        side_by_side.torch_spec("tiny-rn", 2, "float32", 1, 1)
    with pytest.raises(cli.UserError, match="--variant"):
        side_by_side.torch_spec("ViT-X/99", 2, "float32", 1, 1)


def test_parent_starts_no_jax_backend():
    """What the orchestrating process does with JAX (the PyTorch spec) starts no XLA client."""
    code = (
        "from jax._src import xla_bridge; from clip_jax import side_by_side; "
        "side_by_side.torch_spec('ViT-B/32', 32, 'float32', 5, 3); "
        "print(xla_bridge.backends_are_initialized())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_torch_child_protocol(tmp_path):
    """The PyTorch side alone: the spec in, the result out, JAX never imported, all cores."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = side_by_side.torch_spec("tiny", 2, "float32", steps=2, warmup=1)
    config = clip.get_variant("tiny")
    assert spec["model_flops_per_step"] == 3 * clip.forward_flops_per_pair(config) * 2
    assert spec["hf_config"]["vision_config"]["hidden_size"] == config.vision.width
    spec_path, out = tmp_path / "spec.json", str(tmp_path / "out.json")
    spec_path.write_text(json.dumps(spec))
    argv = side_by_side.child_argv("torch", {}, str(spec_path), out)
    result = side_by_side.run_child(argv, "torch", out, timeout_s=300)
    assert result["jax_imported"] is False
    assert result["threads"] == torch_reference.available_cores()
    assert result["warmup"] == 1 and len(result["step_s_all"]) == 2
    assert result["step_s"] == statistics.median(result["step_s_all"])
    times = result["step_s_all"]
    assert (result["step_s_min"], result["step_s_max"]) == (min(times), max(times))
    assert result["achieved_flops_per_s"] == pytest.approx(spec["model_flops_per_step"] / result["step_s"])


def test_runs_without_torch_is_a_user_error():
    done = _cli("--variant=tiny", "--runs=2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --runs=2 repeats the side-by-side: add --torch"


@pytest.mark.slow
def test_failing_jax_side_ends_the_benchmark_in_one_line(tmp_path):
    """clip_jax goes first in run 1; its error (an unknown loss) is the parent's one line, exit 2."""
    done = _cli("--torch", "--variant=tiny", "--batch=2", "--loss=bogus", "--peak_sizes=64", "--devices=1")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: clip_jax (-m clip_jax.benchmark) failed (exit 1): ValueError: ")
    assert "config.train.loss='bogus' is unknown" in last
    assert "Traceback" not in done.stderr  # the child's traceback stays in its own stderr file


@pytest.mark.slow
def test_side_by_side_two_runs(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    args = ["--torch", "--variant=tiny", "--batch=2", "--steps=1", "--warmup=1", "--runs=2"]
    done = _cli(*args, "--peak_sizes=128,256", "--devices=1", f"--json={out}", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert [r["first"] for r in runs] == ["clip_jax", "torch"]  # alternating
    for r in runs:
        assert r["torch"]["jax_imported"] is False
        assert r["torch"]["threads"] == torch_reference.available_cores()
        assert r["matmul_peak"]["size"] in (128, 256)
        for side in (r["clip_jax"], r["torch"]):
            assert side["warmup"] == 1 and len(side["step_s_all"]) == 1
        assert r["ratio"] == pytest.approx(r["clip_jax"]["pairs_per_s"] / r["torch"]["pairs_per_s"])
        peak = r["matmul_peak"]["flops_per_s"]
        assert r["mfu"] == pytest.approx(r["clip_jax"]["achieved_flops_per_s"] / peak)
    median = results["median"]
    assert median["runs"] == 2
    for key in side_by_side.SUMMARY_KEYS:
        assert median[key] == pytest.approx(statistics.median(r[key] for r in runs))
    assert done.stdout.count("clip_jax / HF transformers pairs/s") == 2
    assert "median over 2 run(s)" in done.stdout
