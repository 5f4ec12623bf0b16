"""Input-pipeline throughput: read + decode + augment + tokenise, images/s per core.

    python -m clip_jax.data.benchmark --array_record='shards/emoji-*.array_record' \
        --tar='../shared/data/emoji/*.tar' --size=224 --num_images=2000

Three readers over the same records: a plain single-process PIL loop (the
baseline), the Grain ArrayRecord pipeline and the streaming tar pipeline, each
producing ``{"image": uint8 [b, size, size, 3], "tokens": int32 [b, L]}``.
Per core = images/s divided by the CPU cores the process may use (the plain
loop uses one). The ratio compares per-core throughput with the plain loop's.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from clip_jax.data import pipeline, records, skips, tokenizer, transforms, webdataset

_ARRAY_RECORD = flags.DEFINE_string("array_record", None, "Glob of ArrayRecord shards.")
_TAR = flags.DEFINE_string("tar", None, "Glob of webdataset tar shards.")
_SIZE = flags.DEFINE_integer("size", 224, "Output image side.")
_NUM = flags.DEFINE_integer("num_images", 2000, "Images timed per reader.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of the Grain pipelines.")
_THREADS = flags.DEFINE_integer("num_threads", 0, "Grain decode threads (0: the cores available).")


def plain_loop(recs: list[dict], tok: tokenizer.Tokenizer, size: int, n: int) -> float:
    """The baseline: decode, random-resized crop and tokenise one record at a time; images/s."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for record in itertools.islice(itertools.cycle(recs), n):
        img = transforms.decode_image(record["image"])
        transforms.random_resized_crop(img, size, rng, (0.9, 1.0))
        tok([record["caption"]])
    return n / (time.perf_counter() - start)


def timed(it, batch_size: int, n: int) -> float:
    """images/s of an iterator of batches, after one warm-up batch."""
    next(it)
    batches = max(1, n // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    cores = len(os.sched_getaffinity(0))
    threads = _THREADS.value or cores
    files = records.expand(_ARRAY_RECORD.value, "--array_record") if _ARRAY_RECORD.value else []
    tars = records.expand(_TAR.value, "--tar") if _TAR.value else []
    if files:
        recs = pipeline.read_all(files)
    else:
        recs = [
            {"image": s["image"], "caption": skips.caption_text(s["caption"])}
            for s in webdataset.iter_tar_file(tars[0])
            if s["image"] and s["caption"]
        ]
    with tempfile.TemporaryDirectory() as tmp:
        path = tokenizer.train_sentencepiece((r["caption"] for r in recs), f"{tmp}/tok.model", 1024)
        tok = tokenizer.Tokenizer(path, 77)
    size, n, b = _SIZE.value, _NUM.value, _BATCH.value
    rows = [("plain PIL loop (1 core)", plain_loop(recs, tok, size, n), 1)]
    if files:
        it = pipeline.train_iterator(files, tok, size, b, seed=0, num_threads=threads, stall_timeout_s=None)
        rows.append((f"Grain ArrayRecord ({threads} threads)", timed(it, b, n), cores))
    if tars:
        it = webdataset.train_iterator(tars, tok, size, b, seed=0, stall_timeout_s=None)
        rows.append(("Grain tar stream (1 thread)", timed(it, b, n), 1))
    base = rows[0][1]
    print(f"\n{'reader':<36}{'images/s':>10}{'cores':>7}{'per core':>10}{'ratio':>7}   ({size} px)")
    for name, rate, used in rows:
        print(f"{name:<36}{rate:>10.0f}{used:>7}{rate / used:>10.0f}{rate / used / base:>7.2f}")


if __name__ == "__main__":
    app.run(main)
