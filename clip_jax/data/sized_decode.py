"""Decoding a JPEG at the scale its crop needs (libjpeg's DCT scaling), then cropping.

A 1024 px photo cropped to 224 px holds 4x more pixels each way than the crop needs.
libjpeg decodes at 1/2, 1/4 or 1/8 scale, skipping most of the inverse DCT and the
colour conversion (Pillow's ``Image.draft``). The functions here pick the largest such
reduction that still leaves the crop box at least the output size each way, so a crop
is never upsampled from less data than it needs; then one bicubic resize of the box.

Geometry is the full decode's: the box is drawn from the full (EXIF-oriented) size
with the same random draws as `transforms.random_resized_crop` (or is the region
`transforms.resize_center_crop` shows), then mapped onto the reduced image (libjpeg's
output pixel ``i`` covers input pixels ``[i * s, (i + 1) * s)``; an EXIF flip moves the
partial last block to the front, which the mapping accounts for). The pixel count
(bomb) is checked from the header before any decode; EXIF orientation is applied as
before.

Pixels then differ from a full decode + resize by how the DCT reduction filters: on a
real photo a mean absolute difference of 0.9-2.3 grey levels (uint8) and a PSNR of
36-46 dB over scales 2-8; the stated tolerance, which tests/test_sized_decode.py checks,
is a mean abs diff under 2.5 and a PSNR above 35 dB. With ``reduced=False``, for formats
other than JPEG, and for a JPEG that no reduction fits (the box is under twice the
output size), the result is bit-identical to `transforms`' full-decode path.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin

from clip_jax.data import transforms

# libjpeg's DCT reductions beyond 1, largest first.
DCT_SCALES = (8, 4, 2)
# EXIF orientation -> (axes swapped, displayed x flipped, displayed y flipped), as
# ImageOps.exif_transpose turns the stored image (2: mirror, 3: 180, 6: 90 clockwise, ...).
_ORIENTATIONS = {
    1: (False, False, False),
    2: (False, True, False),
    3: (False, True, True),
    4: (False, False, True),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}

Box = tuple[float, float, float, float]


def reduction(box_w: float, box_h: float, size: int) -> int:
    """The largest DCT scale (8, 4, 2; else 1) that leaves a ``box_w`` x ``box_h`` box at
    least ``size`` pixels each way."""
    return next((s for s in DCT_SCALES if min(box_w, box_h) >= s * size), 1)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an image not yet decoded (a JPEG's EXIF is in its header);
    1 when absent or not one of the eight."""
    value = img.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in _ORIENTATIONS else 1


def oriented_size(img: Image.Image, turn: int) -> tuple[int, int]:
    """(width, height) after EXIF orientation ``turn`` (`orientation`)."""
    w, h = img.size
    return (h, w) if _ORIENTATIONS[turn][0] else (w, h)


def reduced_box(box: Box, stored_size: tuple[int, int], turn: int, scale: int) -> Box:
    """``box`` (in the oriented full image) in the oriented image decoded at 1/``scale``."""
    if scale == 1:
        return box
    swap, flip_x, flip_y = _ORIENTATIONS[turn]
    pad_w, pad_h = (-n % scale for n in stored_size)  # the last block's missing pixels
    pad_x, pad_y = (pad_h, pad_w) if swap else (pad_w, pad_h)
    dx, dy = pad_x if flip_x else 0, pad_y if flip_y else 0
    left, top, right, bottom = box
    return ((left + dx) / scale, (top + dy) / scale, (right + dx) / scale, (bottom + dy) / scale)


def crop_resize(img: Image.Image, box: Box, size: int, turn: int, reduced: bool = True) -> np.ndarray:
    """The region ``box`` of an `transforms.open_image` image with EXIF orientation ``turn``
    (coordinates of the full, oriented image) resized to uint8 [size, size, 3] (bicubic);
    decoded at the smallest DCT scale that keeps the box at least ``size`` pixels each way
    when ``reduced``. Raises `skips.BadRecord`."""
    return resize_region(*decode_region(img, box, size, turn, reduced), size)


def decode_region(
    img: Image.Image, box: Box, size: int, turn: int, reduced: bool = True
) -> tuple[Image.Image, Box]:
    """`crop_resize` without the resize: (the decoded RGB image, ``box`` in its coordinates)."""
    scale = reduction(box[2] - box[0], box[3] - box[1], size) if reduced else 1
    with transforms.pillow_errors():
        stored = img.size
        if scale > 1 and isinstance(img, JpegImagePlugin.JpegImageFile):
            drafted = img.draft(None, (stored[0] // scale, stored[1] // scale))
            scale = round(stored[0] / drafted[1][2]) if drafted else 1
        else:
            scale = 1
    rgb = transforms.load_rgb(img)
    return rgb, reduced_box(box, stored, turn, scale)


def resize_region(rgb: Image.Image, region: Box, size: int) -> np.ndarray:
    """The ``region`` of ``rgb`` resized to uint8 [size, size, 3] (Pillow, bicubic)."""
    return np.asarray(rgb.resize((size, size), Image.BICUBIC, box=region), dtype=np.uint8)


def random_resized_crop(data: bytes, size: int, rng: np.random.Generator, *args, **kwargs) -> np.ndarray:
    """Encoded bytes -> `transforms.random_resized_crop` of the decoded image (the same box,
    the same draws from ``rng``), a JPEG decoded at reduced scale when ``reduced`` and the box
    allows; the further arguments are `random_region`'s (scale, ratio, max_pixels, reduced).
    Raises `skips.BadRecord` (as `transforms.decode_image`)."""
    return resize_region(*random_region(data, size, rng, *args, **kwargs), size)


def random_region(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = transforms.CROP_SCALE,
    ratio: tuple[float, float] = transforms.CROP_RATIO,
    max_pixels: int = transforms.MAX_PIXELS,
    reduced: bool = True,
) -> tuple[Image.Image, Box]:
    """`random_resized_crop` without the resize: (the decoded RGB image, the box in its
    coordinates), for a resize elsewhere (`clip_jax.data.canvas`)."""
    img = transforms.open_image(data, max_pixels)
    if not reduced or not isinstance(img, JpegImagePlugin.JpegImageFile):
        rgb = transforms.load_rgb(img)
        return rgb, transforms.crop_box(*rgb.size, rng, scale, ratio)
    with transforms.pillow_errors():
        turn = orientation(img)
    box = transforms.crop_box(*oriented_size(img, turn), rng, scale, ratio)
    return decode_region(img, box, size, turn)


def centre_box(width: int, height: int, size: int) -> Box:
    """The region of a ``width`` x ``height`` image that `transforms.resize_center_crop` shows."""
    ratio = size / min(width, height)
    new_w, new_h = max(size, round(width * ratio)), max(size, round(height * ratio))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def resize_center_crop(
    data: bytes, size: int, max_pixels: int = transforms.MAX_PIXELS, reduced: bool = True
) -> np.ndarray:
    """Encoded bytes -> `transforms.resize_center_crop` of the decoded image, a JPEG decoded at
    reduced scale when ``reduced`` and its short side is at least twice ``size`` (then the
    region is resized in one call; otherwise bit-identical). Raises `skips.BadRecord`."""
    img = transforms.open_image(data, max_pixels)
    if reduced and isinstance(img, JpegImagePlugin.JpegImageFile):
        with transforms.pillow_errors():
            turn = orientation(img)
        width, height = oriented_size(img, turn)
        if reduction(width, height, size) > 1:
            return crop_resize(img, centre_box(width, height, size), size, turn)
    return transforms.resize_center_crop(transforms.load_rgb(img), size)
