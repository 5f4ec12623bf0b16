"""Reduced-scale JPEG decoding (clip_jax/data/sized_decode.py) against the full decode: the
stated pixel tolerance on a real photo, the same crop geometry under every EXIF orientation,
never fewer decoded pixels than the crop needs, and bit-identical results where it is off."""

import io

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image, ImageOps

from clip_jax import config_defaults
from clip_jax.data import formats, pipeline, records, sized_decode, skips, tokenizer, transforms

# The stated tolerance of the reduced decode against the full one (uint8 pixels, over all
# channels of the output). Measured on the photo below: mean abs diff 0.9-2.3, PSNR 36-46 dB.
MAX_MEAN_ABS_DIFF = 2.5
MIN_PSNR_DB = 35.0


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A real photograph shipped with matplotlib: a 512 x 600 JPEG."""
    with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
        return f.read()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


def old_random_resized_crop(data: bytes, size: int, seed: int, scale=(0.9, 1.0)) -> np.ndarray:
    """The pipeline's crop before reduced decoding: full decode, orientation, one box resize."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    box = transforms.crop_box(*img.size, np.random.default_rng(seed), scale)
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=box))


def old_centre_crop(data: bytes, size: int) -> np.ndarray:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = img.size
    new_w, new_h = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("size", [224, 112, 32])  # DCT scales 2, 4 and 8 for a ~480 px crop
def test_reduced_decode_within_the_stated_tolerance_of_the_full_decode(photo, size):
    scale = sized_decode.reduction(0.9 * 512, 0.9 * 512, size)
    assert scale > 1  # the reduced path is taken
    train = [
        (
            sized_decode.random_resized_crop(photo, size, np.random.default_rng(s), (0.9, 1.0)),
            old_random_resized_crop(photo, size, s),
        )
        for s in range(4)
    ]
    centre = [(sized_decode.resize_center_crop(photo, size), old_centre_crop(photo, size))]
    for fast, full in train + centre:
        assert fast.shape == full.shape == (size, size, 3) and fast.dtype == np.uint8
        assert 0 < np.mean(np.abs(fast.astype(float) - full)) < MAX_MEAN_ABS_DIFF
        assert psnr(fast, full) > MIN_PSNR_DB


def test_never_decodes_fewer_pixels_than_the_crop_needs(photo, monkeypatch):
    decoded = []
    load = transforms.load_rgb
    monkeypatch.setattr(transforms, "load_rgb", lambda img: decoded.append(load(img)) or decoded[-1])
    reductions = set()
    for size in (16, 32, 64, 100, 128, 200, 224, 256, 300):
        for seed in range(6):
            rng = np.random.default_rng(seed)
            sized_decode.random_resized_crop(photo, size, rng, (0.08, 1.0))
            left, top, right, bottom = transforms.crop_box(512, 600, np.random.default_rng(seed), (0.08, 1.0))
            w, h = decoded[-1].size
            scale = 512 / w
            reductions.add(round(scale))
            # The box in decoded pixels is at least the output size each way ...
            assert (right - left) / scale >= size and (bottom - top) / scale >= size or scale == 1
            # ... and the next reduction would leave it smaller (the largest that fits is taken).
            assert min(right - left, bottom - top) / (2 * scale) < size or scale == 8
            assert (w, h) == (-(-512 // round(scale)), -(-600 // round(scale)))
    assert reductions == {1, 2, 4, 8}


def _disc_jpeg(width: int, height: int, orientation: int) -> bytes:
    """A JPEG whose DISPLAYED image (after EXIF ``orientation``) is a bright disc at (560, 380)."""
    yy, xx = np.mgrid[:height, :width]
    shown = np.where((xx - 560) ** 2 + (yy - 380) ** 2 < 40**2, 220, 20).astype(np.uint8)
    stored = {  # the inverse of what exif_transpose does for each orientation
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    img = Image.fromarray(np.stack([shown] * 3, -1))
    img = img.transpose(stored[orientation]) if orientation in stored else img
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=98, exif=exif.tobytes())
    return buf.getvalue()


def _centroid(image: np.ndarray) -> np.ndarray:
    weight = np.clip(image[..., 0].astype(float) - 20, 0, None)
    assert weight.sum() > 1000  # the disc is in the crop
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    return np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_crop_geometry_equals_the_full_decodes_under_every_exif_orientation(orientation):
    data = _disc_jpeg(1003, 805, orientation)  # sizes that are no multiple of 8: partial DCT blocks
    for seed in range(3):
        left, top, right, bottom = transforms.crop_box(1003, 805, np.random.default_rng(seed), (0.7, 1.0))
        assert sized_decode.reduction(right - left, bottom - top, 100) > 1  # the reduced path is taken
        fast = sized_decode.random_resized_crop(data, 100, np.random.default_rng(seed), (0.7, 1.0))
        full = sized_decode.random_resized_crop(
            data, 100, np.random.default_rng(seed), (0.7, 1.0), reduced=False
        )
        np.testing.assert_array_equal(full, old_random_resized_crop(data, 100, seed, (0.7, 1.0)))
        np.testing.assert_allclose(_centroid(fast), _centroid(full), atol=0.03)
    fast, full = sized_decode.resize_center_crop(data, 100), old_centre_crop(data, 100)
    np.testing.assert_allclose(_centroid(fast), _centroid(full), atol=0.03)


def test_off_small_and_non_jpeg_are_bit_identical_to_the_full_decode(photo):
    for seed in range(3):  # reduced=False: today's pixels
        off = sized_decode.random_resized_crop(
            photo, 224, np.random.default_rng(seed), (0.9, 1.0), reduced=False
        )
        np.testing.assert_array_equal(off, old_random_resized_crop(photo, 224, seed))
    np.testing.assert_array_equal(
        sized_decode.resize_center_crop(photo, 224, reduced=False), old_centre_crop(photo, 224)
    )
    # A crop under twice the output size: no reduction fits, the same pixels with it on.
    np.testing.assert_array_equal(
        sized_decode.random_resized_crop(photo, 300, np.random.default_rng(0), (0.9, 1.0)),
        old_random_resized_crop(photo, 300, 0),
    )
    np.testing.assert_array_equal(sized_decode.resize_center_crop(photo, 300), old_centre_crop(photo, 300))
    png = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(png, format="PNG")  # draft is JPEG-only: full decode
    np.testing.assert_array_equal(
        sized_decode.random_resized_crop(png.getvalue(), 32, np.random.default_rng(0), (0.9, 1.0)),
        old_random_resized_crop(png.getvalue(), 32, 0),
    )


def test_pixel_count_is_checked_before_any_decode(photo, monkeypatch):
    monkeypatch.setattr(transforms, "load_rgb", lambda img: pytest.fail("decoded a bomb"))
    with pytest.raises(skips.BadRecord, match="bomb"):
        sized_decode.random_resized_crop(photo, 32, np.random.default_rng(0), max_pixels=512 * 599)
    with pytest.raises(skips.BadRecord, match="bomb"):
        sized_decode.resize_center_crop(photo, 32, max_pixels=1000)
    monkeypatch.undo()
    with pytest.raises(skips.BadRecord, match="decode_error"):  # cut short: fails in the reduced decode
        sized_decode.random_resized_crop(photo[: len(photo) // 2], 32, np.random.default_rng(0))


def test_pipeline_flag_selects_the_path(photo, scenes_dataset):
    tok = tokenizer.Tokenizer(scenes_dataset.tokenizer, 16)
    record = {"image": photo, "caption": "a small red circle"}
    exact = pipeline.DecodeExample(tok, 112, pipeline.DEFAULT_CROP)(record, np.random.default_rng(3))
    fast = pipeline.DecodeExample(tok, 112, pipeline.DEFAULT_CROP, reduced_decode=True)
    np.testing.assert_array_equal(exact["image"], old_random_resized_crop(photo, 112, 3))
    got = fast(record, np.random.default_rng(3))
    assert (
        not np.array_equal(got["image"], exact["image"]) and psnr(got["image"], exact["image"]) > MIN_PSNR_DB
    )
    np.testing.assert_array_equal(got["tokens"], exact["tokens"])


def test_config_data_reduced_decode_reaches_the_training_batches(photo, scenes_dataset, tmp_path):
    tok = tokenizer.Tokenizer(scenes_dataset.tokenizer, 16)
    files = records.write_shards(
        [{"key": "0", "image": photo, "caption": "a red circle"}], str(tmp_path / "p"), 1
    )
    data = config_defaults.base_config().data
    assert data.reduced_decode  # on by default
    # One record: element g of the stream is that record, cropped with default_rng([seed, g, 0]).
    expected = np.stack([old_random_resized_crop(photo, 112, [0, g, 0]) for g in range(2)])
    batches = {}
    for reduced in (True, False):
        data.reduced_decode = reduced
        it = formats.from_config(data, files, tok, 112, 2, skips.SkipCounter())
        batches[reduced] = next(it)["image"]
        it.close()
    np.testing.assert_array_equal(batches[False], expected)  # off: the pixels of before
    assert not np.array_equal(batches[True], expected) and psnr(batches[True], expected) > MIN_PSNR_DB
