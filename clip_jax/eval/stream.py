"""Eval sets streamed in global batches, each batch one array sharded over the mesh.

Every process walks the same rows in the same order (``0 .. n-1``, in batches of the
global eval batch ``B``) and reads only the rows its own devices hold: the contiguous
slice of the batch that `sharding.batch_sharding` gives them (``[p*B/P, (p+1)*B/P)``
on the usual meshes). The last batch is padded; padding and rows that cannot be read
(`skips.BadRecord`) carry ``valid = False``, and every batch carries the global row
``index`` (-1: none) so results come back with their rows whatever the process count.
A jitted function maps the sharded batch to replicated per-example outputs
(embeddings, or only ranks), which is all a host keeps: host memory grows with the
per-example outputs, never with the images.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from clip_jax import sharding
from clip_jax.data import skips, transforms
from clip_jax.eval.encode import progress as progress_bar
from clip_jax.models import clip


def eval_batch_size(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the ways the batch is split (results do not change)."""
    ways = sharding.batch_devices(mesh)
    return max(1, math.ceil(batch_size / ways)) * ways


def local_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """[lo, hi): the rows of a global batch that this process's devices hold (one contiguous slice)."""
    index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    spans = sorted(
        {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in index_map.values()}
    )
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(
            f"this process's devices hold non-contiguous batch rows {spans}; use a standard mesh"
        )
    return lo, hi


def to_global(local: Mapping[str, np.ndarray], mesh: Mesh, batch_size: int) -> dict[str, jax.Array]:
    """This process's rows -> global arrays of ``batch_size`` rows sharded over the batch axes."""
    batch = sharding.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(batch, np.asarray(v), (batch_size, *np.shape(v)[1:]))
        for k, v in local.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host arrays that are identical on every process -> replicated global arrays."""
    full = sharding.replicated(mesh)
    put = lambda x: jax.make_array_from_callback(np.shape(x), full, lambda idx: np.asarray(x)[idx])
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) and x.sharding == full else put(x), tree)


def shard_full(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds whole -> a global array sharded over the batch axes."""
    return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh), lambda idx: x[idx])


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """The mesh and the logical-axis rules the model's partitioning annotations need."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        yield


@dataclasses.dataclass
class LocalBatch:
    """One global batch as this process sees it: its rows' examples (None: padding or unreadable)."""

    start: int  # global row of the batch's first row
    size: int  # global batch size
    rows: range  # the global rows this process read
    examples: list[dict | None]
    index: np.ndarray  # int32 [len(rows)]: global row, -1 for padding and unreadable rows


READ_THREADS = 16  # rows of a batch read and decoded at once (file reads and Pillow release the GIL)
_POOL: list[concurrent.futures.ThreadPoolExecutor] = []


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="eval-read"))
    return _POOL[0]


def _read(source: Sequence[dict], row: int, n: int) -> tuple[dict | None, str | None]:
    """(example, None), (None, skip reason), or (None, None) for a padding row."""
    if row >= n:
        return None, None
    try:
        return source[row], None
    except skips.BadRecord as e:
        return None, e.reason


def stream(
    source: Sequence[dict],
    batch_size: int,
    mesh: Mesh,
    limit: int | None = None,
    drop_remainder: bool = False,
    skipped: collections.Counter | None = None,
    show_progress: bool = False,
    desc: str = "",
) -> Iterator[LocalBatch]:
    """The first ``limit`` rows of ``source`` in global batches; bad rows counted in ``skipped``."""
    n = len(source) if limit is None else min(limit, len(source))
    lo, hi = local_rows(mesh, batch_size)
    count = n // batch_size if drop_remainder else math.ceil(n / batch_size)
    for b in progress_bar(range(count), count, desc, show_progress and count > 1):
        start = b * batch_size
        rows = range(start + lo, start + hi)
        examples = []
        for example, reason in _pool().map(lambda row: _read(source, row, n), rows):
            examples.append(example)
            if reason and skipped is not None:
                skipped[reason] += 1
        index = np.array([r if e is not None else -1 for r, e in zip(rows, examples, strict=True)], np.int32)
        yield LocalBatch(start, batch_size, rows, examples, index)


def one_ahead(outputs: Iterator) -> Iterator:
    """``outputs`` one item late: the next batch is read, decoded and dispatched before the host
    waits for the current one's results (jax dispatch is asynchronous)."""
    previous, empty = None, True
    for item in outputs:
        if not empty:
            yield previous
        previous, empty = item, False
    if not empty:
        yield previous


def decode_images(
    batch: LocalBatch, image_size: int, skipped: collections.Counter | None = None
) -> np.ndarray:
    """uint8 [rows, S, S, 3] of the batch's examples (resize short side, centre crop); an image that
    does not decode becomes zeros and its row is marked invalid (``batch.index`` -1)."""

    def decode(example: dict | None) -> np.ndarray | str | None:
        if example is None:
            return None
        try:
            if not example.get("image"):
                raise skips.BadRecord("missing_image", example.get("key", ""))
            return transforms.resize_center_crop(transforms.decode_image(example["image"]), image_size)
        except skips.BadRecord as e:
            return e.reason

    out = np.zeros((len(batch.examples), image_size, image_size, 3), np.uint8)
    for i, image in enumerate(_pool().map(decode, batch.examples)):
        if isinstance(image, np.ndarray):
            out[i] = image
        elif isinstance(image, str):
            batch.examples[i], batch.index[i] = None, -1
            if skipped is not None:
                skipped[image] += 1
    return out


def text_encoder_fn(model: clip.CLIP, mesh: Mesh):
    """jitted ``(variables, tokens) -> replicated unit text embeddings`` (build once, reuse per call)."""
    encode = lambda v, t: model.apply(v, t, method=clip.CLIP.encode_text)
    return jax.jit(encode, out_shardings=sharding.replicated(mesh))


class TextEncoder:
    """``texts(tokens)`` over the mesh: tokens every process holds whole -> replicated unit embeddings
    (the encoder `clip_jax.eval.zeroshot.classifier_weights` takes). ``encode``: `text_encoder_fn`'s."""

    def __init__(self, encode, variables, mesh: Mesh, batch_size: int):
        self.variables, self.mesh, self._encode = variables, mesh, encode
        self.batch_size = eval_batch_size(batch_size, mesh)

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        n, size = len(tokens), self.batch_size
        padded = np.concatenate([tokens, np.zeros((-n % size, *tokens.shape[1:]), tokens.dtype)])
        with mesh_context(self.mesh):
            out = [
                np.asarray(self._encode(self.variables, shard_full(padded[i : i + size], self.mesh)))
                for i in range(0, len(padded), size)
            ]
        return np.concatenate(out)[:n]
