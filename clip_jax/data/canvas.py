"""Crops resized in the train step instead of on the host (``config.data.canvas_size``).

Pillow's bicubic resize is most of a training record's host time (60-66% measured by
``python -m clip_jax.data.benchmark``), and for small stored images, whose crops are
upsampled, no cheaper decode can save it. With a canvas of ``C`` pixels (``C`` >= the
model's image size ``S``) the host instead sends each crop that fits, unresized:

- `place` (host, per example): the pixels the crop's bicubic filter reads (the crop box,
  widened by the filter's support and clipped to the image) copied to the top-left of a
  zeroed uint8 [C, C, 3] canvas, with the box in canvas coordinates and the extent of
  the copied pixels. A crop whose pixels do not fit is resized on the host as before
  and placed with the identity box (0, 0, S, S).
- `resize` (device, in the step, batched): each canvas resized to [S, S, 3] by
  ``jax.image.scale_and_translate`` (Keys cubic, a = -0.5, antialiased when shrinking:
  Pillow's BICUBIC filter and coordinates). Pillow weighs only pixels inside the image,
  renormalising the filter at its edges; ``scale_and_translate`` would read the canvas'
  zeros there, so the canvas is resized together with a mask of the copied pixels and
  divided by it (the same renormalisation). As in Pillow, the horizontal pass is rounded
  and clipped to uint8 before the vertical one.

The result is Pillow's algorithm, in float32: tests/test_canvas.py checks it against an
independent NumPy version (within 0.01 grey levels for 99.9% of values; a value that rounds
the other way between the passes moves a few by under a level). Against Pillow's uint8
output the stated tolerance is a mean absolute difference under 0.3 grey levels with 99% of
values within 1.5 (measured: 0.21-0.23 mean). Pillow 13 runs its vertical pass first for
some shapes; where its first pass clipped, single pixels then differ by up to ~10 levels.
On a CPU the resize costs the step 0.5-1 ms per image (2-3x Pillow's); on a TPU the B/16
step's roofline grows 0.2-0.5% (``python -m clip_jax.aot``, v5p-256).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from clip_jax.data import sized_decode

Box = sized_decode.Box  # left, top, right, bottom (pixels, continuous)

# Pillow's bicubic filter reaches 2 input pixels each side of a sample (times the shrink factor).
_SUPPORT = 2.0


def _span(lo: float, hi: float, scale: float, limit: int) -> tuple[int, int]:
    """The input pixels [start, stop) that a resize of [lo, hi) by ``scale`` reads, in [0, limit)."""
    reach = _SUPPORT * max(1.0, scale) + 1.0  # +1: Pillow rounds each tap window outwards
    return max(0, math.floor(lo - reach)), min(limit, math.ceil(hi + reach))


def place(rgb: Image.Image, box: Box, size: int, canvas_size: int) -> dict[str, np.ndarray]:
    """An RGB image and the ``box`` to show at ``size`` x ``size`` -> one example's
    {"image": uint8 [C, C, 3], "box": float32 [4], "extent": int32 [2] (width, height)}.

    The pixels the box's resize reads are copied unresized when they fit the canvas;
    else the box is resized here (Pillow, bicubic) and placed with the identity box.
    """
    if canvas_size < size:
        raise ValueError(f"canvas_size {canvas_size} is under the image size {size}")
    left, top, right, bottom = box
    x0, x1 = _span(left, right, (right - left) / size, rgb.width)
    y0, y1 = _span(top, bottom, (bottom - top) / size, rgb.height)
    if x1 - x0 > canvas_size or y1 - y0 > canvas_size:
        return identity(sized_decode.resize_region(rgb, box, size), canvas_size)
    canvas = np.zeros((canvas_size, canvas_size, 3), np.uint8)
    canvas[: y1 - y0, : x1 - x0] = np.asarray(rgb)[y0:y1, x0:x1]
    return {
        "image": canvas,
        "box": np.array((left - x0, top - y0, right - x0, bottom - y0), np.float32),
        "extent": np.array((x1 - x0, y1 - y0), np.int32),
    }


def identity(image: np.ndarray, canvas_size: int) -> dict[str, np.ndarray]:
    """An image already at the output size S (uint8 [S, S, 3]) as a `place` example: at the
    canvas' top-left with the identity box (0, 0, S, S), which `resize` reproduces."""
    size = image.shape[0]
    canvas = np.zeros((canvas_size, canvas_size, 3), np.uint8)
    canvas[:size, :size] = image
    box = np.array((0.0, 0.0, size, size), np.float32)
    return {"image": canvas, "box": box, "extent": np.array((size, size), np.int32)}


def resize(images: jax.Array, box: jax.Array, extent: jax.Array, size: int) -> jax.Array:
    """Canvases uint8 [B, C, C, 3] with their boxes float32 [B, 4] and extents int [B, 2]
    (`place`) -> float32 [B, size, size, 3] on the uint8 scale (0-255, clipped)."""

    def one(image, box, extent):
        scale = size / (box[2:] - box[:2])  # (x, y)
        # Pillow's order: the horizontal pass, rounded and clipped to uint8, then the vertical.
        rows = _pass(image.astype(jnp.float32), 1, extent[0], scale[0], box[0], size)
        return _pass(jnp.clip(jnp.round(rows), 0.0, 255.0), 0, extent[1], scale[1], box[1], size)

    return jax.vmap(one)(images, box.astype(jnp.float32), extent)


def _pass(image: jax.Array, axis: int, extent: jax.Array, scale: jax.Array, start: jax.Array, size: int):
    """One axis of the resize: [..., 3] resized along ``axis`` (0: rows, 1: columns) to ``size``,
    reading only the first ``extent`` lines (the filter renormalised over them, as Pillow's)."""
    valid = (jnp.arange(image.shape[axis]) < extent).astype(jnp.float32)
    valid = valid[:, None, None] if axis == 0 else valid[None, :, None]

    def along(x):
        shape = list(x.shape)
        shape[axis] = size
        return jax.image.scale_and_translate(
            x,
            tuple(shape),
            (axis,),
            scale[None],
            (-start * scale)[None],
            "cubic",
            antialias=True,
            precision=jax.lax.Precision.HIGHEST,  # uint8 levels survive no bf16 pass
        )

    # The filter's weight on the copied lines, per output line: the same resize of the mask.
    return jnp.clip(along(image * valid) / along(valid), 0.0, 255.0)


def step_images(batch: dict, size: int) -> jax.Array:
    """A training batch's images at the model's ``size``: the canvases resized when the
    batch carries boxes (``config.data.canvas_size`` > 0), else its uint8 images as they are."""
    if "box" not in batch:
        return batch["image"]
    return resize(batch["image"], batch["box"], batch["extent"], size)
