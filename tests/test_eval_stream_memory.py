"""Streamed zero-shot's peak host memory does not grow with the set: 2,000 vs 20,000 images.

At 64 px, holding 18,000 more images would take 18,000 x 64 x 64 x 3 bytes = 211 MiB; the
streamed evaluation keeps a few integers per image (tests/eval_memory.py prints the
numbers, and the in-memory path's with --inmemory).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent / "eval_memory.py"


@pytest.mark.slow
def test_peak_rss_of_streamed_zero_shot_does_not_grow_with_the_set():
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[1]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2000,20000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, large = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    print(f"\npeak RSS: {small['peak_rss_mib']} MiB (2,000 images), {large['peak_rss_mib']} MiB (20,000)")
    assert (small["n_images"], large["n_images"]) == (2000, 20000)
    assert large["peak_rss_mib"] - small["peak_rss_mib"] < 64  # the images alone would add 211 MiB
