"""``benchmark --torch``: clip_jax beside HF transformers (PyTorch), each in a process of its own.

The fairness rules (issue 16; one framework's warm-up, threads or resident buffers
moved the B/32 ratio between 1.3x and 1.8x when both ran in one process):

- each framework runs in a fresh process of its own: clip_jax as ``python -m
  clip_jax.benchmark`` (without ``--torch``), PyTorch as ``python -m
  clip_jax.torch_reference``, which never imports JAX; this parent only orchestrates
  (it imports JAX's modules for the model's shapes but starts no backend and holds
  no arrays), so neither side shares the cores with the other's thread pool;
- PyTorch uses as many threads as the cores available (the CPU affinity), XLA:CPU
  all of them by default;
- both run ``--warmup`` untimed steps (clip_jax after compiling) and report the median
  (and min, max) of ``--steps`` timed ones;
- the matmul peak (best over n = 1024..4096 on CPU) is measured in the clip_jax
  process, under the XLA:CPU conditions of its step, in every run; MFU is against it;
- ``--runs=N`` repeats the pair N times, alternating which goes first, and reports the
  median over runs of each figure (`summarize`).

A child that fails or outlasts its timeout ends the benchmark with one line naming
the side and the child's last message (cli.UserError).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

from clip_jax import cli, storage, torch_reference
from clip_jax.models import clip

SIDES = ("clip_jax", "torch")
LABELS = {"clip_jax": "clip_jax", "torch": "HF transformers (PyTorch)"}
MODULES = {"clip_jax": "clip_jax.benchmark", "torch": "clip_jax.torch_reference"}
# The per-run figures whose median over runs is reported.
SUMMARY_KEYS = ("clip_jax_step_s", "torch_step_s", "ratio", "mfu", "torch_mfu", "peak_flops_per_s")
TAIL_BYTES = 1 << 16


def torch_spec(variant: str, batch: int, dtype: str, steps: int, warmup: int) -> dict:
    """The PyTorch child's work (`torch_reference.make_spec`) for a clip_jax variant."""
    try:
        config = clip.get_variant(variant)
    except ValueError as e:
        raise cli.UserError(f"--variant: {e}") from None
    if isinstance(config.vision, clip.ResNetConfig):
        raise cli.UserError(
            f"--torch compares ViT variants (HF's CLIPModel has no ResNet tower): --variant={variant}"
        )
    flops = 3 * clip.forward_flops_per_pair(config) * batch
    return torch_reference.make_spec(config, batch, dtype, steps, warmup, flops)


def child_argv(side: str, options: dict, spec_path: str, out_path: str) -> list[str]:
    """The command of one side's process: the benchmark's own flags for clip_jax (``options``:
    flag name -> value), the spec file for PyTorch; each writes its JSON to ``out_path``."""
    argv = [sys.executable, "-m", MODULES[side]]
    if side == "clip_jax":
        return argv + [f"--{name}={value}" for name, value in options.items()] + [f"--json={out_path}"]
    return argv + [f"--spec={spec_path}", f"--json={out_path}"]


def last_message(stderr_path: str) -> str:
    """The last non-empty line a child wrote to stderr (its error, or a traceback's exception)."""
    with open(stderr_path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
        lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "it wrote nothing to stderr"
    return lines[-1].removeprefix("error: ")[:400]


def run_child(argv: list[str], label: str, out_path: str, timeout_s: float) -> dict:
    """Runs ``argv`` (stdout shown as it comes, stderr kept aside) and returns the JSON it wrote to
    ``out_path``. A failure, a timeout or no result raises cli.UserError: one line, no hang."""
    stderr_path = out_path + ".stderr"
    command = " ".join(argv[1:3])
    sys.stdout.flush()
    with open(stderr_path, "wb") as stderr:
        try:
            done = subprocess.run(
                argv,
                stdout=None,
                stderr=stderr,
                timeout=timeout_s,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except subprocess.TimeoutExpired:
            raise cli.UserError(
                f"{label} ({command}) did not finish within --child_timeout_s={timeout_s:g}"
            ) from None
    if done.returncode != 0:
        raise cli.UserError(
            f"{label} ({command}) failed (exit {done.returncode}): {last_message(stderr_path)}"
        )
    try:
        return storage.read_json(out_path)
    except (storage.MissingFileError, storage.BadFileError) as e:
        raise cli.UserError(f"{label} ({command}) exited 0 but left no result: {e}") from None


def run_record(first: str, jax_result: dict, torch_result: dict) -> dict:
    """One run's figures: both sides' results, the ratio of pairs/s and MFU against the matmul
    peak the clip_jax process measured in that run."""
    peak = jax_result["matmul_peak"]["flops_per_s"]
    ours, theirs = jax_result["clip_jax"], torch_result
    return {
        "first": first,
        **jax_result,
        "torch": theirs,
        "clip_jax_step_s": ours["step_s"],
        "torch_step_s": theirs["step_s"],
        "ratio": ours["pairs_per_s"] / theirs["pairs_per_s"],
        "mfu": ours["achieved_flops_per_s"] / peak,
        "torch_mfu": theirs["achieved_flops_per_s"] / peak,
        "peak_flops_per_s": peak,
    }


def summarize(records: list[dict]) -> dict:
    """The median over runs of each of `SUMMARY_KEYS` (each run's own ratio and MFU: the median
    of ratios, not the ratio of medians), with the run count."""
    if not records:
        raise ValueError("no runs to summarize")
    return {"runs": len(records), **{k: statistics.median(r[k] for r in records) for k in SUMMARY_KEYS}}


def _row(label: str, r: dict, peak: float, threads: str) -> str:
    rate = r["achieved_flops_per_s"]
    return (
        f"  {label:26s} {r['step_s']:8.3f} {r['step_s_min']:8.3f} {r['step_s_max']:8.3f} "
        f"{r['pairs_per_s']:9.1f} {rate / 1e9:9.1f} {100 * rate / peak:6.1f}%  {threads}"
    )


def print_run(index: int, runs: int, record: dict) -> None:
    peak = record["matmul_peak"]
    print(
        f"run {index + 1}/{runs} ({LABELS[record['first']]} first); matmul peak "
        f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s at n={peak['size']} (clip_jax's process)\n"
        f"  {'framework':26s} {'median s':>8s} {'min s':>8s} {'max s':>8s} {'pairs/s':>9s} {'GFLOP/s':>9s} "
        f"{'MFU':>7s}  threads\n"
        + _row(
            "clip_jax", record["clip_jax"], peak["flops_per_s"], f"XLA, {record['clip_jax']['cores']} cores"
        )
        + "\n"
        + _row(LABELS["torch"], record["torch"], peak["flops_per_s"], str(record["torch"]["threads"]))
        + f"\n  clip_jax / HF transformers pairs/s: {record['ratio']:.2f}x",
        flush=True,
    )


def print_summary(summary: dict) -> None:
    print(
        f"median over {summary['runs']} run(s): clip_jax step {summary['clip_jax_step_s']:.3f} s, "
        f"HF transformers step {summary['torch_step_s']:.3f} s, ratio (pairs/s) {summary['ratio']:.2f}x, "
        f"MFU clip_jax {100 * summary['mfu']:.1f}% / HF {100 * summary['torch_mfu']:.1f}% "
        f"(matmul peak {summary['peak_flops_per_s'] / 1e9:.1f} GFLOP/s)",
        flush=True,
    )


def run(options: dict, runs: int, timeout_s: float) -> dict:
    """``runs`` side-by-sides, alternating which side goes first; per-run records and medians.
    ``options``: the clip_jax child's flags (variant, batch, dtype, steps, warmup, ...)."""
    spec = torch_spec(
        options["variant"], options["batch"], options["dtype"], options["steps"], options["warmup"]
    )
    print(
        f"side by side: each framework in a process of its own, {options['warmup']} untimed steps then the "
        f"median of {options['steps']}; {torch_reference.available_cores()} cores available",
        flush=True,
    )
    records = []
    with tempfile.TemporaryDirectory(prefix="clip_jax_benchmark_") as tmp:
        spec_path = os.path.join(tmp, "torch_spec.json")
        storage.write_json(spec_path, spec)
        for index in range(runs):
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            results = {}
            for side in order:
                out_path = os.path.join(tmp, f"run{index}_{side}.json")
                argv = child_argv(side, options, spec_path, out_path)
                results[side] = run_child(argv, LABELS[side], out_path, timeout_s)
            records.append(run_record(order[0], results["clip_jax"], results["torch"]))
            print_run(index, runs, records[-1])
    summary = summarize(records)
    print_summary(summary)
    return {"options": options, "runs": records, "median": summary}
