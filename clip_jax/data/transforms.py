"""Image decoding, augmentation and CLIP's normalisation.

Decoding turns whatever a web crawl holds into RGB uint8 or raises
`skips.BadRecord` with a reason:

- the pixel count is read from the header and checked BEFORE any pixel is
  decoded (a 2.5 KB PNG can claim 1.6 gigapixels): reason ``bomb``;
- EXIF orientation is applied (``ImageOps.exif_transpose``);
- CMYK, grayscale and palette images are converted; alpha (RGBA, LA, PA, a
  palette transparency index) is composited over white; 16-bit and 32-bit
  integer modes are scaled by their range (a bare ``convert("RGB")`` clips
  them almost white; values that all fit in 8 bits are taken as 8-bit);
  animated images keep their first frame;
- bytes Pillow cannot identify, corrupt or cut short, raise ``decode_error``.

Geometry: training takes a random-resized crop (torchvision's and open_clip's
``RandomResizedCrop``: area scale (0.08, 1) of the image — open_clip trains
CLIP with (0.9, 1.0) — and aspect ratio (3/4, 4/3), log-uniform), drawn from a
``np.random.Generator`` that the pipeline seeds per example, so a batch is
reproducible and a resumed run draws the same crops. Evaluation resizes the
short side (bicubic) and centre-crops. `clip_jax.data.sized_decode` does both
from encoded bytes, decoding a large JPEG at the reduced scale the crop needs.

Normalisation happens on device, in the step: ``(x / 255 - mean) / std`` with
OpenAI CLIP's per-channel mean and std (open_clip's OPENAI_DATASET_MEAN/STD).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_jax.data.skips import BadRecord

# CLIP's normalisation (OpenAI's preprocessing; open_clip's OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# 64 MP: far above any photo a CLIP crawl keeps (LAION's median is < 1 MP), far
# below what costs seconds and gigabytes to decode.
MAX_PIXELS = 64_000_000
# torchvision's RandomResizedCrop defaults.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

# Modes holding more than 8 bits per channel, with the largest value they use.
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB PIL image (first frame, EXIF orientation applied, alpha over white).

    Raises `BadRecord` with reason ``missing_image`` (no bytes), ``bomb`` (more
    than ``max_pixels`` pixels, checked from the header before decoding) or
    ``decode_error`` (not an image, corrupt or cut short).
    """
    return load_rgb(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image's header, read and checked (pixel count), no pixel decoded; `BadRecord` as
    `decode_image`. `load_rgb` decodes it."""
    if not data:
        raise BadRecord("missing_image", "no image bytes")
    with pillow_errors(data):
        img = Image.open(io.BytesIO(data))
        check_pixels(img.size, max_pixels)
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decodes an `open_image` image -> RGB (EXIF orientation applied, alpha over white)."""
    with pillow_errors():
        img.load()  # decodes; the only step that costs time
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the pixels
        return to_rgb(img)


@contextlib.contextmanager
def pillow_errors(data: bytes = b"") -> Iterator[None]:
    """Pillow's errors inside -> `BadRecord` (``data``: the bytes, described when they are no image)."""
    try:
        yield
    except Image.DecompressionBombError as e:  # Pillow's own header check, at 2x its limit
        raise BadRecord("bomb", f"rejected from the header: {e}") from None
    except UnidentifiedImageError:
        raise BadRecord("decode_error", f"not an image ({len(data)} bytes, starting {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # A cut-off JPEG and a corrupt one fail alike inside Pillow; both are "decode_error".
        raise BadRecord("decode_error", f"{type(e).__name__}: {e}") from None


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Rejects a header that claims more than ``max_pixels`` pixels (or none)."""
    w, h = size
    if w * h > max_pixels:
        raise BadRecord("bomb", f"{w}x{h} = {w * h:,} pixels > limit {max_pixels:,} (decompression bomb?)")
    if w < 1 or h < 1:
        raise BadRecord("decode_error", f"empty image {w}x{h}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB with 8 bits per channel; alpha composited over white."""
    if img.mode in _WIDE_MODES:
        img = _wide_to_l(img)
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        img = white
    return img if img.mode == "RGB" else img.convert("RGB")


def _wide_to_l(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer grayscale image -> 8-bit "L", scaled by the mode's full range."""
    pixels = np.asarray(img).astype(np.float32)
    peak = float(pixels.max(initial=0))
    # Values that all fit in 8 bits are 8-bit data in a 16-bit container (what encoders
    # write from uint8 arrays): scaling them by 65535 would turn them black.
    top = 255.0 if peak <= 255 else max(float(_WIDE_MODES[img.mode]), peak)
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic), centre crop -> uint8 [size, size, 3].

    Kept as resize-then-crop: one ``resize(box=...)`` of the centre region is ~8% cheaper
    but not bit-identical (off by 1 in a few pixels of 40% of images); the reduced decode
    (`clip_jax.data.sized_decode`), which is not exact anyway, uses the box. Likewise
    ``reducing_gap`` changes pixels wherever it applies (a downscale over the gap).
    """
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, right, bottom).

    Ten tries at an area share in ``scale`` and a log-uniform aspect ratio in
    ``ratio`` that fits; else the largest centred box with the ratio clamped.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    w, h = max(1, w), max(1, h)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> np.ndarray:
    """A random box (see `crop_box`) resized to uint8 [size, size, 3] (bicubic)."""
    box = crop_box(*img.size, rng, scale, ratio)
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=box), dtype=np.uint8)


def normalize(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 [..., 3] -> float32 ``(x / 255 - CLIP_MEAN) / CLIP_STD`` (on device, in the step)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
