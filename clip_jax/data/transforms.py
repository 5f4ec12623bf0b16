"""Image decoding, resizing and CLIP's normalisation."""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

# CLIP's normalisation (OpenAI's preprocessing; open_clip's OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image with EXIF orientation applied, alpha over white."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic), centre crop -> uint8 [size, size, 3]."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def normalize(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 [..., 3] -> float32 normalised with CLIP's mean/std (on device, in the step)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
