"""Crops resized in the train step (clip_jax/data/canvas.py): against an independent NumPy
implementation of Pillow's bicubic algorithm (tight), against Pillow itself (the stated
tolerance), the identity box and the host fallback exactly, and through the pipeline and
the train step."""

import io

import flax.linen as nn
import jax
import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image

from clip_jax import config_defaults, losses, optim, recipe, sharding, step, validation
from clip_jax.data import canvas, formats, records, skips, tokenizer, transforms

# The stated tolerance against Pillow's uint8 output (grey levels, all channels).
MAX_MEAN_ABS_DIFF = 0.3
P99_ABS_DIFF = 1.5


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photograph shipped with matplotlib (512 x 600)."""
    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def _keys(x: np.ndarray) -> np.ndarray:
    """The Keys cubic (a = -0.5), written out."""
    x = np.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1
    far = ((-0.5 * x + 2.5) * x - 4) * x + 2
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _weights(lo: float, hi: float, n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: Pillow's taps for output pixel i of the span [lo, hi), renormalised over
    the pixels that exist."""
    scale = (hi - lo) / n_out
    widen = max(scale, 1.0)
    centres = lo + (np.arange(n_out) + 0.5) * scale
    w = _keys((np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / widen)
    return w / w.sum(axis=1, keepdims=True)


def pillow_in_numpy(image: np.ndarray, box, size: int) -> np.ndarray:
    """Pillow's BICUBIC resize of ``box`` in float64: the horizontal pass, rounded and clipped
    to uint8, then the vertical pass (clipped, not rounded)."""
    wx = _weights(box[0], box[2], image.shape[1], size)
    wy = _weights(box[1], box[3], image.shape[0], size)
    rows = np.clip(np.round(np.einsum("xj,ijc->ixc", wx, image.astype(np.float64))), 0, 255)
    return np.clip(np.einsum("yi,ixc->yxc", wy, rows), 0, 255)


def _boxes(width: int, height: int, count: int, seed: int):
    """Random crops, half with fractional edges, plus the whole image (every edge renormalised)."""
    rng = np.random.default_rng(seed)
    boxes = [(0.0, 0.0, float(width), float(height))]
    for i in range(count - 1):
        box = transforms.crop_box(width, height, rng, (0.08, 1.0))
        if i % 2:
            box = tuple(v + s * rng.uniform(0, 0.9) for v, s in zip(box, (1, 1, -1, -1), strict=True))
        boxes.append(box)
    return boxes


def _resize_all(image: Image.Image, boxes, size: int, canvas_size: int):
    examples = [canvas.place(image, b, size, canvas_size) for b in boxes]
    batch = {k: np.stack([e[k] for e in examples]) for k in ("image", "box", "extent")}
    return np.asarray(canvas.resize(batch["image"], batch["box"], batch["extent"], size)), examples


def _on_device(examples, size: int) -> int:
    """How many examples `place` left for the step (not the identity box)."""
    return sum(not np.array_equal(e["box"], [0, 0, size, size]) for e in examples)


@pytest.mark.parametrize(
    "stored, size, canvas_size",
    [(48, 64, 64), (80, 64, 96), (150, 64, 160)],  # upsampled; shrunk a little; shrunk 2x
)
def test_resize_equals_pillows_algorithm_in_numpy(photo, stored, size, canvas_size):
    image = photo.resize((stored, round(stored * 600 / 512)), Image.BICUBIC)
    boxes = _boxes(*image.size, 12, seed=stored)
    got, examples = _resize_all(image, boxes, size, canvas_size)
    assert _on_device(examples, size) >= 10  # the device path is what is tested
    device = [i for i, e in enumerate(examples) if _on_device([e], size)]  # Pillow itself did the rest
    want = np.stack([pillow_in_numpy(np.asarray(image), boxes[i], size) for i in device])
    diff = np.abs(got[device] - want)
    # Float32 here, float64 there: a value that rounds the other way between the passes moves
    # a few output pixels by under a grey level; everything else agrees to rounding error.
    assert np.mean(diff < 1e-2) > 0.999 and diff.max() < 1.0


@pytest.mark.parametrize("stored, size, canvas_size", [(96, 224, 224), (256, 224, 256), (300, 224, 320)])
def test_resize_within_the_stated_tolerance_of_pillow(photo, stored, size, canvas_size):
    image = photo.resize((stored, round(stored * 600 / 512)), Image.BICUBIC)
    boxes = _boxes(*image.size, 16, seed=stored)
    got, examples = _resize_all(image, boxes, size, canvas_size)
    assert _on_device(examples, size) >= 8
    want = np.stack([np.asarray(image.resize((size, size), Image.BICUBIC, box=b)) for b in boxes])
    diff = np.abs(got - want)
    assert diff.mean() < MAX_MEAN_ABS_DIFF and np.percentile(diff, 99) <= P99_ABS_DIFF


def test_a_crop_too_large_for_the_canvas_is_resized_on_the_host(photo):
    box = (10.0, 20.0, 400.0, 500.0)
    example = canvas.place(photo, box, 64, 96)
    np.testing.assert_array_equal(example["box"], [0, 0, 64, 64])
    np.testing.assert_array_equal(example["extent"], [64, 64])
    host = np.asarray(photo.resize((64, 64), Image.BICUBIC, box=box))
    np.testing.assert_array_equal(example["image"][:64, :64], host)
    assert not example["image"][64:].any() and not example["image"][:, 64:].any()
    got = canvas.resize(*(example[k][None] for k in ("image", "box", "extent")), 64)[0]
    np.testing.assert_allclose(np.asarray(got), host, atol=1e-3)  # the identity box reproduces it


def test_place_copies_only_the_pixels_the_filter_reads(photo):
    example = canvas.place(photo, (100.0, 200.0, 140.0, 230.0), 64, 64)  # upsampled: 2 px of support
    width, height = example["extent"]
    assert 44 <= width <= 48 and 34 <= height <= 38
    left, top = example["box"][:2]
    expected = np.asarray(photo)[
        200 - int(top) : 200 - int(top) + height, 100 - int(left) : 100 - int(left) + width
    ]
    np.testing.assert_array_equal(example["image"][:height, :width], expected)
    with pytest.raises(ValueError, match="canvas_size 32 is under the image size 64"):
        canvas.place(photo, (0.0, 0.0, 10.0, 10.0), 64, 32)


def test_step_images_leaves_batches_without_boxes_alone():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    assert canvas.step_images({"image": images, "tokens": None}, 8) is images


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_config_data_canvas_size_reaches_the_batches_within_tolerance(photo, scenes_dataset, tmp_path):
    """The same records and seed, host resize vs canvas + step resize: the same crops, within
    the stated tolerance; small stored images go to the device, a large one stays on the host."""
    tok = tokenizer.Tokenizer(scenes_dataset.tokenizer, 16)
    stored = [40, 56, 72, 90, 512]
    recs = [
        {"key": str(i), "image": _jpeg(photo.resize((s, round(s * 600 / 512)))), "caption": "a photo"}
        for i, s in enumerate(stored)
    ]
    files = records.write_shards(recs, str(tmp_path / "p"), 1)
    data = config_defaults.base_config().data
    data.crop_scale = (0.3, 1.0)
    batches = {}
    for canvas_size in (0, 96):
        data.canvas_size = canvas_size
        it = formats.from_config(data, files, tok, 64, 10, skips.SkipCounter())
        batches[canvas_size] = next(it)
        it.close()
    host, placed = batches[0], batches[96]
    assert set(placed) == {"image", "box", "extent", "tokens"} and placed["image"].shape == (10, 96, 96, 3)
    np.testing.assert_array_equal(placed["tokens"], host["tokens"])
    assert 0 < _on_device([{"box": b} for b in placed["box"]], 64) < 10  # both paths taken
    got = np.asarray(canvas.step_images(jax.tree.map(np.asarray, placed), 64))
    diff = np.abs(got - host["image"])
    assert diff.mean() < MAX_MEAN_ABS_DIFF and np.percentile(diff, 99) <= P99_ABS_DIFF


def test_train_step_resizes_canvases_as_given_images():
    """One step on a sharded canvas batch (8 devices) = the same step on the images `resize`
    makes of it."""
    config = config_defaults.base_config()
    config.model.update(variant="tiny", dtype="float32")
    model = recipe.build_model(config)
    size, length = model.config.vision.image_size, model.config.text.context_length
    tx, schedule = optim.make_optimizer(config.optim, 10)
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (30, 36, 3), np.uint8))
    examples = [canvas.place(source, (1.5, 2.0, 29.0, 21.5 + i), size, size + 8) for i in range(8)]
    batch = {k: np.stack([e[k] for e in examples]) for k in ("image", "box", "extent")}
    batch["tokens"] = rng.integers(4, 256, (8, length)).astype(np.int32)
    resized = {"image": np.asarray(canvas.resize(batch["image"], batch["box"], batch["extent"], size))}
    resized["tokens"] = batch["tokens"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        _, shardings = step.state_shardings(model, tx, mesh)
        init = jax.jit(lambda r: step.init_state(model, tx, r), out_shardings=shardings)
        loss_fn = losses.make_loss("softmax", mesh)
        step_fn = step.compile_train_step(step.make_train_step(model, tx, schedule, loss_fn), shardings, mesh)
        # The step donates its state: each call gets a fresh one.
        _, with_canvas = step_fn(init(jax.random.key(0)), sharding.to_global(batch, mesh))
        _, with_images = step_fn(init(jax.random.key(0)), sharding.to_global(resized, mesh))
    np.testing.assert_allclose(with_canvas["loss"], with_images["loss"], rtol=1e-5)
    np.testing.assert_allclose(with_canvas["grad_norm"], with_images["grad_norm"], rtol=1e-4)


def test_canvas_smaller_than_the_image_size_is_refused():
    config = config_defaults.base_config()
    config.data.canvas_size = 100  # the default model's images are 224
    with pytest.raises(validation.ConfigError, match="canvas_size=100 must be 0"):
        validation.check_config(config)
