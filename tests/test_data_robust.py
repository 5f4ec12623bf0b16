"""Robust decoding, augmentation, bad-record skipping and the stall watchdog."""

import io
import time

import grain
import numpy as np
import pytest
from PIL import Image

from clip_jax.data import formats, pipeline, records, skips, tokenizer, transforms, watchdog


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok(scenes_dataset):
    return tokenizer.Tokenizer(scenes_dataset.tokenizer, 16)


def test_unusual_modes_become_rgb_uint8():
    ramp = (np.arange(48 * 40).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246
    cases = {
        "cmyk": encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG"),  # red
        "gray": encode(Image.new("L", (8, 6), 100), "PNG"),
        "png16": encode(Image.fromarray(ramp), "PNG"),
        "la": encode(Image.new("LA", (8, 6), (0, 0)), "PNG"),  # transparent -> white
        "palette": encode(Image.new("P", (8, 6), 0), "PNG", transparency=0),
    }
    out = {k: np.asarray(transforms.decode_image(v)) for k, v in cases.items()}
    for k, a in out.items():
        assert a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8, k
    assert out["cmyk"][0, 0, 0] > 200 and out["cmyk"][0, 0, 1] < 60
    assert out["la"].min() == 255 and out["palette"].min() == 255
    # 16-bit: scaled by the full range, not clipped (a bare convert("RGB") is ~all 255).
    png16 = out["png16"][..., 0].astype(int)
    assert png16[0, 0] == 0 and png16[-1, -1] > 240 and 100 < png16.mean() < 155
    assert np.asarray(Image.open(io.BytesIO(cases["png16"])).convert("RGB")).mean() > 240


def test_animated_gif_keeps_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = np.asarray(transforms.decode_image(data))[0, 0]
    assert r > 200 and b < 50


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_is_rejected_from_the_header_before_decoding(monkeypatch):
    # 12,000 x 12,000 = 144 MP in 140 KB: Pillow itself only warns at this size.
    data = encode(Image.new("1", (12_000, 12_000)), "PNG")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(skips.BadRecord) as e:
        transforms.decode_image(data)
    assert e.value.reason == "bomb" and "144,000,000 pixels" in str(e.value) and not decoded


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "missing_image"),
        (b"<html>403</html>", "decode_error"),
        (b"\xff\xd8\xff\xe0 junk", "decode_error"),
    ],
)
def test_undecodable_bytes_raise_bad_record(data, reason):
    with pytest.raises(skips.BadRecord) as e:
        transforms.decode_image(data)
    assert e.value.reason == reason


def test_truncated_jpeg_is_a_decode_error():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(skips.BadRecord, match="decode_error"):
        transforms.decode_image(data[: len(data) // 2])


def test_random_resized_crop_is_seeded_and_within_bounds():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    a = transforms.random_resized_crop(img, 24, np.random.default_rng(5))
    b = transforms.random_resized_crop(img, 24, np.random.default_rng(5))
    c = transforms.random_resized_crop(img, 24, np.random.default_rng(6))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = transforms.crop_box(80, 50, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 80 and 0 <= top < bottom <= 50
        assert 0.08 * 4000 * 0.9 <= w * h <= 4000 and 0.7 < w / h < 1.4
    assert transforms.crop_box(1000, 10, rng) == (493, 0, 506, 10)  # fallback: 4/3 at most, centred


def test_captions_bad_and_odd():
    assert skips.caption_text("caf\xe9 cr\xe8me".encode("latin-1")) == "caf\ufffd cr\ufffdme"
    assert skips.caption_text(b"a\x00b") == "a b"
    for raw, reason in ((None, "missing_caption"), ("", "empty_caption"), (" \n\t", "empty_caption")):
        with pytest.raises(skips.BadRecord) as e:
            skips.caption_text(raw)
        assert e.value.reason == reason


def _mixed_records(path, num_good=60, bad_every=5):
    good = encode(Image.new("RGB", (12, 10), (0, 128, 255)), "PNG")
    items = []
    for i in range(num_good):
        items.append({"key": f"g{i}", "image": good, "caption": f"a blue square {i}"})
        if i % bad_every == 0:
            items.append({"key": f"b{i}", "image": b"nope", "caption": "x"})
            items.append({"key": f"e{i}", "image": good, "caption": "  "})
    return records.write_shards(items, str(path / "mixed"), 2), len(items)


def test_bad_records_are_replaced_counted_and_batches_stay_full(tmp_path, tok):
    files, total = _mixed_records(tmp_path)
    counter = skips.SkipCounter(max_fraction=0.5, min_records=1)
    it = pipeline.train_iterator(files, tok, 16, 8, seed=0, counter=counter)
    epoch = [next(it) for _ in range(total // 8)]
    assert all(b["image"].shape == (8, 16, 16, 3) and set(b) == {"image", "tokens"} for b in epoch)
    assert counter.drawn == total // 8 * 8
    # 12 undecodable + 12 blank captions among 84 records: each bad record counted once.
    counts = counter.as_dict()
    assert counts["skipped/decode_error"] + counts["skipped/empty_caption"] == counts["skipped"]
    assert 18 <= counts["skipped"] <= 24 and counts["skipped/decode_error"] >= 9
    # Deterministic, and the state restores to the same continuation.
    it2 = pipeline.train_iterator(files, tok, 16, 8, seed=0)
    first = next(it2)
    np.testing.assert_array_equal(first["tokens"], epoch[0]["tokens"])
    state = it2.get_state()
    after = next(it2)
    it3 = pipeline.train_iterator(files, tok, 16, 8, seed=0)
    it3.set_state(state)
    np.testing.assert_array_equal(next(it3)["image"], after["image"])


def test_mostly_broken_data_stops_with_the_counts(tmp_path, tok):
    files, _ = _mixed_records(tmp_path, num_good=20, bad_every=1)  # 2/3 bad
    it = pipeline.train_iterator(files, tok, 16, 8, seed=0, counter=skips.SkipCounter(0.1, min_records=16))
    with pytest.raises(skips.TooManyBadRecords, match=r"max_skip_fraction=0.1\).*skipped/decode_error"):
        for _ in range(10):
            next(it)


class _Stuck(grain.transforms.Map):
    def map(self, x):
        if x == 3:
            time.sleep(3)
        return x


def test_watchdog_turns_a_hang_into_a_clear_error():
    ds = grain.MapDataset.range(10).map(_Stuck()).to_iter_dataset()
    it = iter(watchdog.Watchdog(ds, timeout_s=0.5))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    state = it.get_state()
    t = time.monotonic()
    with pytest.raises(watchdog.DataStallError, match="no batch from the input pipeline for 0 s"):
        next(it)
    assert time.monotonic() - t < 5
    assert state == {"next_index": 3}  # the state passes through


def test_config_selects_the_reader(tmp_path, tok):
    from clip_jax.config_defaults import base_config

    files, _ = _mixed_records(tmp_path, num_good=16, bad_every=100)
    data = base_config().data
    counter = skips.SkipCounter()
    it = formats.from_config(data, files, tok, 16, 4, counter)
    assert next(it)["image"].shape == (4, 16, 16, 3) and counter.drawn == 4
    data.format = "tfrecord"
    with pytest.raises(ValueError, match="config.data.format='tfrecord'"):
        formats.from_config(data, files, tok, 16, 4, counter)
