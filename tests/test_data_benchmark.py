"""The input-pipeline benchmark's command on a tiny input: every reader's row, the TPU table
from the stated assumptions (bf16 peak x MFU / 3 x forward FLOPs per pair), also at the
canvas rows' rate, and the step's resize cost."""

import io
import re

import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from clip_jax import cli
from clip_jax.data import benchmark, records
from clip_jax.models import clip


def test_benchmark_prints_every_reader_and_the_cores_per_host(tmp_path, capsys):
    recs = []
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (40 + i, 30), (30 * i, 80, 160)).save(buf, format="JPEG")
        recs.append({"key": str(i), "image": buf.getvalue(), "caption": f"a blue box number {i}"})
    files = records.write_shards(recs, str(tmp_path / "bench"), 1)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    options = dict(array_record=files[0], size=16, num_images=8, batch_size=4, repeats=1)
    options.update(num_threads=2, num_workers=1, canvas_size=24)
    with flagsaver.flagsaver(stored_size=64, **options):  # re-encoded at 64 px: the reduced decode applies
        benchmark.main([])
    out = capsys.readouterr().out
    for reader in (
        "plain PIL loop (1 core)",
        "Grain ArrayRecord, before (2 thr)",
        "Grain ArrayRecord, exact decode (2 thr)",
        "Grain ArrayRecord, reduced decode (1 thr)",
        "Grain ArrayRecord, reduced decode (2 thr)",
        "Grain ArrayRecord, reduced decode + canvas 24 (1 thr)",
        "Grain ArrayRecord, reduced decode + canvas 24 (2 thr)",
    ):
        assert re.search(re.escape(reader) + r"\s+\d+\s+\d\s+\d+\s+[\d.]+\s+\d+", out), reader
    # A worker process's CPU time is not this process's: no CPU-time rate, not a wrong one.
    workers = r"Grain ArrayRecord, reduced decode \(1 procs x 1 thr\)\s+\d+\s+1\s+\d+\s+[\d.]+\s+-\s+-\s+-$"
    assert re.search(workers, out, re.M), out
    assert re.search(workers.replace("decode", "decode \\+ canvas 24"), out, re.M), out
    # The canvas rows' host table, and what the step pays for the resize here.
    assert "Cores per host at Grain ArrayRecord, reduced decode + canvas 24 (2 thr)" in out
    resize = r"^Canvas 24: (\d+)% of crops left for the step to resize; .* of 4 on cpu: [\d.]+ ms \(\d+ us"
    assert (m := re.search(resize, out, re.M)) and int(m[1]) > 0, out
    # The per-stage costs: every stage a number, and the whole element.
    stages = re.findall(r"^  (.+?)\s+([\d.]+)\s+([\d.]+)%$", out, re.M)
    names = [name for name, _, _ in stages]
    assert names[0] == "shuffle index (Grain)" and names[-1] == "whole element (DecodeOrReplace)", names
    assert "bicubic resize (Pillow)" in names and float(stages[-1][2]) == 100.0
    assert re.search(r"^  plain loop has \(sum\)\s+[\d.]+$", out, re.M)
    # v4: 275 TFLOP/s bf16 (Google's v4 page) at 50% MFU over 3 x B/16's forward FLOPs per pair.
    b16 = round(275e12 * 0.5 / (3 * clip.forward_flops_per_pair(clip.VARIANTS["ViT-B/16"])))
    assert 1000 < b16 < 1300  # ~41 GFLOP per pair forward
    row = re.search(r"^v4\s+ViT-B/16\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+240$", out, re.M)
    assert row and int(row[1]) == b16 and abs(int(row[2]) - 4 * b16) <= 2
    assert "ct5lp-hightpu-4t: 112 vCPUs" in out and re.search(r"^v5p\s+ViT-L/14\s", out, re.M)


def test_benchmark_without_records_is_one_line():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    no_records = flagsaver.flagsaver(array_record=None, tar=None)
    with no_records, pytest.raises(cli.UserError, match="--array_record=GLOB or --tar=GLOB"):
        benchmark.main([])
