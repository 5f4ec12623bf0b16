"""R9: the shared dirty shard keeps and skips exactly what expected.json says, by reason."""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import convert, convert_readers, pipeline, skips, tokenizer, transforms, webdataset

DIRTY = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dirty"
pytestmark = pytest.mark.skipif(not (DIRTY / "expected.json").exists(), reason="shared/data/dirty missing")

# Why each key of expected.json's "skip" list is skipped (expected.json says only "skip").
REASONS = {
    "corrupt_bytes": "decode_error",
    "truncated_jpeg": "decode_error",  # Pillow cannot tell a cut JPEG from a corrupt one
    "html_error_page": "decode_error",
    "zero_byte_image": "missing_image",
    "no_image": "missing_image",
    "bomb": "bomb",
    "empty_caption": "empty_caption",
    "whitespace_caption": "empty_caption",
    "no_caption": "missing_caption",
    "cut_by_truncation": "truncated",
}


@pytest.fixture(scope="module")
def expected():
    return json.loads((DIRTY / "expected.json").read_text())


@pytest.fixture(scope="module")
def samples():
    return {s["key"]: s for s in webdataset.iter_tar_file(str(DIRTY / "dirty-00000.tar"))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("dirty")
    tasks = convert_readers.webdataset_tasks([str(DIRTY / "dirty-00000.tar")], str(out), "dirty")
    stats = convert.run(tasks, convert.Options(size=64), 1, str(out / "dirty-stats.json"))
    return tasks, stats, pipeline.read_all([t.out_path for t in tasks]), out


@pytest.fixture(scope="module")
def tok(scenes_dataset):
    return tokenizer.Tokenizer(scenes_dataset.tokenizer, 16)


def by_reason(keys):
    counts = {}
    for k in keys:
        counts[REASONS[k]] = counts.get(REASONS[k], 0) + 1
    return counts


def test_expected_json_is_what_this_test_assumes(expected, samples):
    assert sorted(REASONS) == sorted(expected["skip"])
    assert set(samples) == set(expected["keep"]) | set(expected["skip"])  # the truncated tail is read


def test_converter_keeps_and_skips_exactly_as_expected(expected, converted):
    tasks, stats, recs, out = converted
    assert sorted(r["key"] for r in recs) == sorted(expected["keep"])
    assert stats["kept"] == len(expected["keep"]) and stats["skipped"] == by_reason(expected["skip"])
    assert json.loads((out / "dirty-stats.json").read_text())["skipped"] == stats["skipped"]
    for r in recs:
        img = np.asarray(Image.open(io.BytesIO(r["image"])))
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, r["key"]
        assert r["caption"].strip(), r["key"]
    kept = {r["key"]: r for r in recs}
    assert Image.open(io.BytesIO(kept["exif_rotated"]["image"])).size == (30, 60)
    assert "\ufffd" in kept["latin1_caption"]["caption"] and len(kept["long_caption"]["caption"]) > 10_000
    # A rerun finds the shard finished and does no work.
    again = convert.run(tasks, convert.Options(size=64), 1, str(out / "dirty-stats.json"))
    assert again["shards_resumed"] == 1 and again["kept"] == stats["kept"]


def test_pipeline_decoder_keeps_and_skips_exactly_as_expected(expected, samples, tok):
    decode = pipeline.DecodeExample(tok, 32, pipeline.Crop())
    kept, skipped = [], {}
    for key, sample in samples.items():
        try:
            example = decode(sample, np.random.default_rng(0))
        except skips.BadRecord as e:
            skipped[key] = e.reason
            continue
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8, key
        assert example["tokens"].shape == (16,) and example["tokens"][0] == tokenizer.BOS_ID
        kept.append(key)
    assert sorted(kept) == sorted(expected["keep"])
    assert skipped == {k: REASONS[k] for k in expected["skip"]}


def test_unusual_images_decode_faithfully(samples, monkeypatch):
    png16 = np.asarray(transforms.decode_image(samples["png16"]["image"]))
    assert png16.shape == (40, 48, 3) and png16.dtype == np.uint8
    assert png16.mean() < 200 and png16.max() - png16.min() > 150  # a ramp, not washed out
    assert transforms.decode_image(samples["exif_rotated"]["image"]).size == (30, 60)  # 30 wide, 60 high
    for key in ("cmyk", "palette_transparent", "la_png", "rgba_png", "animated_gif", "webp", "tiny_1x1"):
        img = transforms.decode_image(samples[key]["image"])
        assert img.mode == "RGB" and np.asarray(img).dtype == np.uint8, key
    # The bomb is rejected from its header: nothing is decoded.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(skips.BadRecord, match="bomb"):
        transforms.decode_image(samples["bomb"]["image"])


def test_tar_stream_counts_skips_and_runs_past_the_truncated_tail(expected, tok):
    counter = skips.SkipCounter(max_fraction=0.5, min_records=1)
    it = webdataset.train_iterator(
        [str(DIRTY / "dirty-00000.tar")], tok, 24, 6, seed=0, counter=counter, shuffle_buffer=8
    )
    batches = [next(it) for _ in range(len(expected["keep"]) // 6)]  # one epoch of good examples
    assert all(b["image"].shape == (6, 24, 24, 3) for b in batches)
    counts = counter.as_dict()
    assert counts["skipped"] <= len(expected["skip"])
    assert counts["drawn"] - counts["skipped"] == len(expected["keep"]) - len(expected["keep"]) % 6
    for _ in range(12):  # the stream goes on into the next epochs: the cut tail stops nothing
        assert next(it)["image"].shape == (6, 24, 24, 3)
    reasons = {k.split("/")[1]: n for k, n in counter.as_dict().items() if k.startswith("skipped/")}
    assert set(reasons) == set(REASONS.values())  # every reason seen by now, each counted


def test_converted_dirty_shard_trains_through_the_grain_pipeline(converted, tok):
    files = [t.out_path for t in converted[0]]
    it = pipeline.train_iterator(files, tok, 24, 9, seed=0, counter=skips.SkipCounter(0.0, min_records=1))
    for _ in range(12):  # two epochs; the ceiling of 0 skipped would raise on any bad record
        batch = next(it)
        assert batch["image"].shape == (9, 24, 24, 3) and batch["image"].dtype == np.uint8
