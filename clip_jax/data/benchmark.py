"""Input-pipeline throughput: read + decode + augment + tokenise, images/s per core.

    python -m clip_jax.data.benchmark --tar='../shared/data/emoji/*.tar' \
        --stored_size=512 --size=224 --num_images=2000

Readers over the same records, one after the other in one run: a plain
single-process PIL loop (the baseline), the Grain ArrayRecord pipeline as it was
before (full decode, sentencepiece's list encode per caption), with today's full
(exact) decode, with the reduced-scale JPEG decode (`clip_jax.data.sized_decode`,
``config.data.reduced_decode``) on 1 thread and on ``--num_threads``, and the
streaming tar pipeline. Each produces ``{"image": uint8 [b, size, size, 3],
"tokens": int32 [b, L]}``.

Per core = images/s divided by the cores the reader may use (the plain loop and a
1-thread reader: one). On a shared machine wall-clock rates move with the load, so
the table also gives images per CPU-second of this process (all its threads): what
one core that is fully ours would do. CPU/wall near the thread count means the
threads run in parallel (Pillow releases the GIL while decoding and resizing).

``--stored_size``: the records are first re-encoded (JPEG q95, short side resized,
enlarged if need be) into a temporary ArrayRecord file, so small images (the 64 px
emoji) cost what web images stored at that size would. The reduced decode only
changes anything when the stored image is at least twice the crop's output size.

``--canvas_size=C`` adds the reduced decode with crops sent unresized in a C x C canvas
(``config.data.canvas_size``, `clip_jax.data.canvas`), on 1 thread and on ``--num_threads``,
the TPU table for it, and what the step then pays to resize a batch on this machine's
JAX device (on a TPU or GPU a small share of a step; on a CPU more than Pillow's resize).

``--num_workers=N`` adds the reduced decode in N worker processes (Grain's
``mp_prefetch``: no GIL between records; their CPU time is not this process's, so that
row has no CPU-time rate). The stage table then times each stage of the ArrayRecord
path alone on one thread (shuffle index, read, msgpack, the example's RNG, JPEG
header, decode, crop box, Pillow's bicubic resize, to numpy, tokenise) beside the whole
element, and sums the stages a plain loop has too: what the pipeline adds per record.

The last table gives the cores per TPU host that B/16 and L/14 training needs at the
measured rate, from stated assumptions (`HOSTS`, `MFU`, the models' FLOPs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import math
import os
import tempfile
import time
from collections.abc import Iterator

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from clip_jax import chips, cli
from clip_jax.data import canvas, mixture, pipeline, records, skips, tokenizer, transforms, webdataset
from clip_jax.models import clip

_ARRAY_RECORD = flags.DEFINE_string("array_record", None, "Glob of ArrayRecord shards.")
_TAR = flags.DEFINE_string("tar", None, "Glob of webdataset tar shards.")
_SIZE = flags.DEFINE_integer("size", 224, "Output image side.")
_NUM = flags.DEFINE_integer("num_images", 2000, "Images timed per reader.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of the Grain pipelines.")
_THREADS = flags.DEFINE_integer("num_threads", 0, "Grain decode threads (0: the cores available).")
_STORED = flags.DEFINE_integer("stored_size", 0, "Re-encode images at this short side first (0: as stored).")
_WORKERS = flags.DEFINE_integer(
    "num_workers", 0, "Also time the reduced decode in this many worker processes (0: not)."
)
_CANVAS = flags.DEFINE_integer(
    "canvas_size", 0, "Also time crops sent unresized in this canvas (config.data.canvas_size; 0: not)."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each reader (interleaved); the best is shown.")

CORES = len(os.sched_getaffinity(0))  # the cores this process may use

# Stated assumptions for the TPU table. Hosts: Google Cloud's TPU VM machine types
# (cloud.google.com/tpu/docs/v4, /v5p, /v5e): 4 chips per host each.
HOSTS = {
    "v4": ("ct4p-hightpu-4t", 4, 240),
    "v5e": ("ct5lp-hightpu-4t", 4, 112),  # a multi-host v5e pod's host
    "v5p": ("ct5p-hightpu-4t", 4, 208),
}
MODELS = ("ViT-B/16", "ViT-L/14")
# Model FLOPs utilisation assumed for training: images/s per chip = bf16 peak (clip_jax/chips.py)
# x MFU / (3 x the forward FLOPs of one pair, clip_jax/models/clip.py:forward_flops_per_pair).
MFU = 0.5


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    rate: float  # images/s, wall clock
    cpu_rate: float  # images per CPU-second of this process
    cores: int  # cores the reader may use

    @property
    def per_core(self) -> float:
        return self.rate / self.cores

    @property
    def utilisation(self) -> float:
        """CPU-seconds per second: the cores kept busy."""
        return self.rate / self.cpu_rate


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


@contextlib.contextmanager
def list_encode() -> Iterator[None]:
    """The tokenizer as it was before: sentencepiece's list encode (a thread pool) per caption."""
    saved = tokenizer.BATCH_ENCODE_MIN
    tokenizer.BATCH_ENCODE_MIN = 0
    try:
        yield
    finally:
        tokenizer.BATCH_ENCODE_MIN = saved


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()  # worker processes' CPU is not counted


def plain_loop(recs: list[dict], tok: tokenizer.Tokenizer, size: int, n: int) -> Row:
    """The baseline: decode, random-resized crop and tokenise one record at a time."""
    rng = np.random.default_rng(0)
    wall, cpu = clocks()
    for record in itertools.islice(itertools.cycle(recs), n):
        img = transforms.decode_image(record["image"])
        transforms.random_resized_crop(img, size, rng, (0.9, 1.0))
        tok([record["caption"]])
    return _row("plain PIL loop (1 core)", n, wall, cpu, 1)


def timed(name: str, it, batch_size: int, n: int, cores: int) -> Row:
    """The rates of an iterator of batches, after one warm-up batch; closes it."""
    next(it)
    batches = max(1, n // batch_size)
    wall, cpu = clocks()
    for _ in range(batches):
        next(it)
    row = _row(name, batches * batch_size, wall, cpu, cores)
    if callable(getattr(it, "close", None)):
        it.close()
    return row


def _row(name: str, images: int, wall: float, cpu: float, cores: int) -> Row:
    end_wall, end_cpu = clocks()
    return Row(name, images / (end_wall - wall), images / max(end_cpu - cpu, 1e-9), cores)


def grain_reader(
    files: list[str],
    tok,
    size: int,
    b: int,
    n: int,
    threads: int,
    reduced: bool,
    before=False,
    workers=0,
    canvas_size=0,
):
    """A reader of the Grain ArrayRecord pipeline (``before``: with the tokenizer's old list encode;
    ``workers``: in that many worker processes, each with ``threads`` threads; ``canvas_size``:
    crops left for the step to resize, `clip_jax.data.canvas`)."""
    name = "before" if before else "reduced decode" if reduced else "exact decode"
    name += f" + canvas {canvas_size}" if canvas_size else ""
    where = f"{workers} procs x {threads} thr" if workers else f"{threads} thr"
    cores = min(workers * threads if workers else threads, CORES)

    def read() -> Row:
        with list_encode() if before else contextlib.nullcontext():
            it = pipeline.train_iterator(
                files,
                tok,
                size,
                b,
                seed=0,
                num_workers=workers,
                num_threads=threads,
                stall_timeout_s=None,
                reduced_decode=reduced,
                canvas_size=canvas_size,
            )
            row = timed(f"Grain ArrayRecord, {name} ({where})", it, b, n, cores)
            # This process's CPU clock misses the workers': no CPU-time rate then.
            return dataclasses.replace(row, cpu_rate=math.nan) if workers else row

    return read


def best_of(readers: list, repeats: int) -> list[Row]:
    """Each reader ``repeats`` times, interleaved (so a change of load hits all alike); the
    best wall and the best CPU rate of each."""
    runs = [[read() for read in readers] for _ in range(repeats)]
    return [
        dataclasses.replace(
            tries[0], rate=max(t.rate for t in tries), cpu_rate=max(t.cpu_rate for t in tries)
        )
        for tries in zip(*runs, strict=True)
    ]


def print_table(rows: list[Row]) -> None:
    base = rows[0]
    head = ("reader", "images/s", "cores", "per core", "ratio", "img/CPU-s", "ratio", "CPU/wall")
    print("{:<64}{:>9}{:>6}{:>9}{:>7}{:>10}{:>7}{:>9}".format(*head))
    for r in rows:
        cpu = (
            f"{'-':>10}{'-':>7}{'-':>9}"
            if math.isnan(r.cpu_rate)
            else f"{r.cpu_rate:>10.0f}{r.cpu_rate / base.cpu_rate:>7.2f}{r.utilisation:>9.2f}"
        )
        ratio = r.per_core / base.per_core
        print(f"{r.name:<64}{r.rate:>9.0f}{r.cores:>6}{r.per_core:>9.0f}{ratio:>7.2f}{cpu}")


def step_resize_cost(files: list[str], tok, size: int, b: int, canvas_size: int) -> dict[str, float]:
    """What the step pays for `canvas.resize` of one batch of ``b`` canvases on this machine's
    first JAX device: {"ms_per_batch", "us_per_image", "on_device" (share resized there)}."""
    it = pipeline.train_iterator(files, tok, size, b, seed=0, stall_timeout_s=None, canvas_size=canvas_size)
    batch = jax.device_put({k: next(it)[k] for k in ("image", "box", "extent")})
    it.close()
    resize = jax.jit(lambda x: canvas.resize(x["image"], x["box"], x["extent"], size))
    resize(batch).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        resize(batch).block_until_ready()
        times.append(time.perf_counter() - start)
    identity = np.all(np.asarray(batch["box"]) == [0, 0, size, size], axis=1)
    ms = 1e3 * float(np.median(times))
    return {"ms_per_batch": ms, "us_per_image": 1e3 * ms / b, "on_device": 1 - float(np.mean(identity))}


def print_step_resize(cost: dict[str, float], b: int, canvas_size: int) -> None:
    print(
        f"\nCanvas {canvas_size}: {cost['on_device']:.0%} of crops left for the step to resize; the "
        f"step's resize of a batch of {b} on {jax.devices()[0].platform}: {cost['ms_per_batch']:.1f} ms "
        f"({cost['us_per_image']:.0f} us per image)"
    )


def stage_costs(files: list[str], tok: tokenizer.Tokenizer, size: int, n: int) -> dict[str, float]:
    """Microseconds per record of each stage of the Grain ArrayRecord path (exact decode), each
    timed alone over the same ``n`` records in this thread, and of the whole element
    (`pipeline.DecodeOrReplace`); "plain loop" sums the stages `plain_loop` also has.
    """
    source = pipeline.open_records(files)
    count = len(source)
    order = grain.MapDataset.range(count).shuffle(seed=0)
    raw = [source[i] for i in range(count)]
    recs = [records.decode(r) for r in raw]
    opened = lambda i: transforms.open_image(recs[i]["image"])
    images = [transforms.load_rgb(opened(i)) for i in range(count)]
    rng = np.random.default_rng(0)
    boxes = [transforms.crop_box(*im.size, rng, pipeline.DEFAULT_CROP.scale) for im in images]
    resized = [im.resize((size, size), Image.BICUBIC, box=b) for im, b in zip(images, boxes, strict=True)]
    decode = pipeline.DecodeExample(tok, size, pipeline.DEFAULT_CROP, reduced_decode=False)
    whole, _ = pipeline.source_stream(mixture.Source("bench", tuple(files)), decode, seed=0)
    stages = {
        "shuffle index (Grain)": lambda i: order[i],
        "ArrayRecord read": lambda i: source[i],
        "msgpack decode": lambda i: records.decode(raw[i]),
        "example RNG (seeded per index)": lambda i: np.random.default_rng([0, i, 0]),
        "JPEG header + checks": opened,
        "decode to RGB (header incl.)": lambda i: transforms.load_rgb(opened(i)),
        "crop box": lambda i: transforms.crop_box(*images[i].size, rng, pipeline.DEFAULT_CROP.scale),
        "bicubic resize (Pillow)": lambda i: images[i].resize((size, size), Image.BICUBIC, box=boxes[i]),
        "to numpy": lambda i: np.asarray(resized[i], dtype=np.uint8),
        "tokenise": lambda i: tok([recs[i]["caption"]]),
        "whole element (DecodeOrReplace)": lambda i: whole[i],
    }
    costs = {}
    for name, stage in stages.items():
        start = time.perf_counter()
        for i in range(n):
            stage(i % count)
        costs[name] = (time.perf_counter() - start) / n * 1e6
    return costs


def print_stages(costs: dict[str, float]) -> None:
    """The stage table: microseconds per record, share of the whole element."""
    whole = costs["whole element (DecodeOrReplace)"]
    plain = ("decode to RGB (header incl.)", "crop box", "bicubic resize (Pillow)", "to numpy", "tokenise")
    print("\nPer record, one thread, each stage alone (exact decode; us):")
    for name, us in costs.items():
        print(f"  {name:<34}{us:>9.1f}{100 * us / whole:>7.1f}%")
    print(f"  {'plain loop has (sum)':<34}{sum(costs[k] for k in plain):>9.1f}")


def chip_rate(chip: str, model: str) -> float:
    """Training images/s of one chip: bf16 peak x `MFU` / (3 x forward FLOPs per pair)."""
    return chips.CHIPS[chip].bf16_flops * MFU / (3 * clip.forward_flops_per_pair(clip.VARIANTS[model]))


def print_tpu_needs(row: Row) -> None:
    """The cores per TPU host that training needs at ``row``'s per-core rates."""
    print(
        f"\nAssumed: {MFU:.0%} MFU of the bf16 peak (clip_jax/chips.py); training FLOPs per image = "
        "3 x forward (clip_jax/models/clip.py:forward_flops_per_pair); hosts: 4 chips each "
        f"({', '.join(f'{k} {v[0]}: {v[2]} vCPUs' for k, v in HOSTS.items())})."
    )
    print(f"Cores per host at {row.name}: {row.per_core:.0f}/core (wall), {row.cpu_rate:.0f}/CPU-s")
    head = ("host", "model", "img/s/chip", "img/s/host", "cores (wall)", "(CPU-s)", "vCPUs")
    print("{:<6}{:<10}{:>11}{:>11}{:>13}{:>9}{:>7}".format(*head))
    for chip, (_, per_host, vcpus) in HOSTS.items():
        for model in MODELS:
            need = chip_rate(chip, model) * per_host
            print(
                f"{chip:<6}{model:<10}{need / per_host:>11.0f}{need:>11.0f}"
                f"{need / row.per_core:>13.1f}{need / row.cpu_rate:>9.1f}{vcpus:>7}"
            )


def main(argv):
    del argv
    if not (_ARRAY_RECORD.value or _TAR.value):
        raise cli.UserError("give the records to time: --array_record=GLOB or --tar=GLOB")
    cores = CORES
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
    readers = [lambda: plain_loop(recs, tok, size, n)]
    if files:
        readers.append(grain_reader(files, tok, size, b, n, threads, reduced=False, before=True))
        readers.append(grain_reader(files, tok, size, b, n, threads, reduced=False))
        if threads > 1:
            readers.append(grain_reader(files, tok, size, b, n, 1, reduced=True))
        readers.append(grain_reader(files, tok, size, b, n, threads, reduced=True))
        if _WORKERS.value:
            readers.append(grain_reader(files, tok, size, b, n, 1, reduced=True, workers=_WORKERS.value))
        if _CANVAS.value:
            with_canvas = functools.partial(grain_reader, files, tok, size, b, n, canvas_size=_CANVAS.value)
            readers += [with_canvas(t, True) for t in sorted({1, threads})]
            if _WORKERS.value:
                readers.append(with_canvas(1, True, workers=_WORKERS.value))
    if tars:
        tar_it = lambda: webdataset.train_iterator(tars, tok, size, b, seed=0, stall_timeout_s=None)
        readers.append(lambda: timed("Grain tar stream, tar as is (1 thr)", tar_it(), b, n, 1))
    rows = best_of(readers, _REPEATS.value)
    stored = f"stored at {_STORED.value} px" if _STORED.value else "as stored"
    print(f"\n{len(recs)} records, {stored}; output {size} px; {cores} cores; ratios against the plain loop")
    print(f"(reduced decode: crops >= {2 * size} px; best of {_REPEATS.value} interleaved runs each)")
    print_table(rows)
    threaded = [r for r in rows if r.name.startswith("Grain ArrayRecord, reduced") and "procs" not in r.name]
    hosted = [r for r in threaded if "canvas" not in r.name]
    print_tpu_needs(hosted[-1] if hosted else rows[0])
    if _CANVAS.value and files:
        print_tpu_needs(threaded[-1])
        print_step_resize(step_resize_cost(files, tok, size, b, _CANVAS.value), b, _CANVAS.value)
    if files:
        print_stages(stage_costs(files, tok, size, n))
    tmp.cleanup()


if __name__ == "__main__":
    cli.run(main)
