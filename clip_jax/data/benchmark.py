"""Input-pipeline throughput: read + decode + augment + tokenise, images/s per core.

    python -m clip_jax.data.benchmark --tar='../shared/data/emoji/*.tar' \
        --stored_size=256 --size=224 --num_images=2000

Three readers over the same records: a plain single-process PIL loop (the
baseline), the Grain ArrayRecord pipeline and the streaming tar pipeline, each
producing ``{"image": uint8 [b, size, size, 3], "tokens": int32 [b, L]}``.
Per core = images/s divided by the CPU cores the process may use (the plain
loop uses one). The ratio compares per-core throughput with the plain loop's.

``--stored_size``: the records are first re-encoded (JPEG q95, short side
resized, enlarged if need be) into a temporary ArrayRecord file, so small
images (the 64 px emoji) cost what web images stored at 256 px would. The last
lines compare the Grain rate with what a host must deliver to keep a TPU v4-256
busy training B/16, and say how many cores of this machine's speed that takes.
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

from clip_jax import cli
from clip_jax.data import pipeline, records, skips, tokenizer, transforms, webdataset

_ARRAY_RECORD = flags.DEFINE_string("array_record", None, "Glob of ArrayRecord shards.")
_TAR = flags.DEFINE_string("tar", None, "Glob of webdataset tar shards.")
_SIZE = flags.DEFINE_integer("size", 224, "Output image side.")
_NUM = flags.DEFINE_integer("num_images", 2000, "Images timed per reader.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of the Grain pipelines.")
_THREADS = flags.DEFINE_integer("num_threads", 0, "Grain decode threads (0: the cores available).")
_STORED = flags.DEFINE_integer("stored_size", 0, "Re-encode images at this short side first (0: as stored).")

# TPU v4-256: 128 chips, 4 per host, 32 hosts. B/16 at 224 px trains at roughly 900-1,275
# images/s per v4 chip (bf16, ~55-60% MFU), so each host must feed ~3.6k-5.1k images/s.
V4_256_HOSTS, V4_HOST_VCPUS = 32, 240
B16_PER_HOST = (3600, 5100)


def restored(recs: list[dict], size: int) -> list[dict]:
    """The records with images re-encoded as JPEG q95 at short side ``size`` (enlarged if smaller)."""
    out = []
    for record in recs:
        img = transforms.decode_image(record["image"])
        scale = size / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        out.append({**record, "image": buf.getvalue()})
    return out


def print_tpu_target(rate: float, cores: int) -> None:
    """What a TPU v4-256 host needs for B/16 next to the measured Grain rate."""
    per_core = rate / cores
    low, high = B16_PER_HOST
    print(
        f"\nTPU v4-256 ({V4_256_HOSTS} hosts x 4 chips), ViT-B/16: each host must feed "
        f"~{low:,}-{high:,} images/s.\nAt the measured {per_core:,.0f} images/s per core that takes "
        f"{low / per_core:.0f}-{high / per_core:.0f} cores of this machine's speed per host "
        f"(a v4 host has {V4_HOST_VCPUS} vCPUs; set config.data.num_workers accordingly)."
    )


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
    tmp = tempfile.TemporaryDirectory()
    path = tokenizer.train_sentencepiece((r["caption"] for r in recs), f"{tmp.name}/tok.model", 1024)
    tok = tokenizer.Tokenizer(path, 77)
    if _STORED.value:
        recs = restored(recs, _STORED.value)
        files = records.write_shards(recs, f"{tmp.name}/stored", 1)
    size, n, b = _SIZE.value, _NUM.value, _BATCH.value
    stored = f"stored at {_STORED.value} px" if _STORED.value else "as stored"
    rows = [("plain PIL loop (1 core)", plain_loop(recs, tok, size, n), 1)]
    if files:
        it = pipeline.train_iterator(files, tok, size, b, seed=0, num_threads=threads, stall_timeout_s=None)
        rows.append((f"Grain ArrayRecord ({threads} threads)", timed(it, b, n), cores))
    if tars:
        it = webdataset.train_iterator(tars, tok, size, b, seed=0, stall_timeout_s=None)
        rows.append(("Grain tar stream (1 thread, tar as is)", timed(it, b, n), 1))
    base = rows[0][1]
    print(f"\n{len(recs)} records, {stored}; output {size} px")
    print(f"{'reader':<36}{'images/s':>10}{'cores':>7}{'per core':>10}{'ratio':>7}")
    for name, rate, used in rows:
        print(f"{name:<36}{rate:>10.0f}{used:>7}{rate / used:>10.0f}{rate / used / base:>7.2f}")
    grain_rows = [(rate, used) for name, rate, used in rows if name.startswith("Grain ArrayRecord")]
    print_tpu_target(*(grain_rows[0] if grain_rows else rows[0][1:]))
    tmp.cleanup()


if __name__ == "__main__":
    cli.run(main)
