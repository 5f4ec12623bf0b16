"""Records, tokenizer, transforms, the synthetic scenes and the Grain pipeline."""

import io
import os

import jax
import numpy as np
import pytest
from PIL import Image

from clip_jax.data import pipeline, records, scenes, tokenizer, transforms


@pytest.fixture(scope="module")
def tok(scenes_dataset):
    return tokenizer.Tokenizer(scenes_dataset.tokenizer, 16)


def test_records_round_trip_and_atomic_shards(tmp_path):
    items = [{"key": str(i), "image": bytes([i]), "caption": f"c{i}", "label": i} for i in range(10)]
    paths = records.write_shards(items, str(tmp_path / "x"), 3)
    assert [os.path.basename(p) for p in paths] == [f"x-0000{i}-of-00003.array_record" for i in range(3)]
    assert not list(tmp_path.glob("*.tmp*"))
    back = sorted(pipeline.read_all(paths), key=lambda r: int(r["key"]))
    assert back == items
    assert records.expand(str(tmp_path / "x-*"), "f") == paths
    with pytest.raises(FileNotFoundError, match="config.data.train_files='nope' matches no files"):
        records.expand("nope", "config.data.train_files")


def test_tokenizer_fixed_length_bos_eos_and_padding(tok):
    ids = tok(["a small red circle", "", "a large blue bar above a small green cross"])
    assert ids.shape == (3, 16) and ids.dtype == np.int32
    assert list(ids[1, :3]) == [tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.PAD_ID]
    row = list(ids[0])
    eos = row.index(tokenizer.EOS_ID)
    assert row[0] == tokenizer.BOS_ID and all(t == 0 for t in row[eos + 1 :])
    assert tokenizer.UNK_ID not in row  # every word of the demo captions is in the vocabulary


def test_tokenizer_truncates_long_captions_and_keeps_eos(tok):
    long = "a small red circle " * 50_000  # ~1 MB
    ids = tok([long])[0]
    assert ids[-1] == tokenizer.EOS_ID and tokenizer.PAD_ID not in ids
    # The cheap cut before encoding does not change the result of a long caption.
    np.testing.assert_array_equal(ids, tok([long[: 16 * tokenizer.CHARS_PER_TOKEN]])[0])


def test_tokenizer_short_lists_give_the_ids_of_a_batch_encode(tok):
    # Short lists are encoded one text at a time (no thread pool per call); long ones in one
    # sentencepiece batch: the ids are the same.
    texts = ["a small red circle", "", "a large blue bar above a small green cross", "zebra"]
    batch = tok(texts * tokenizer.BATCH_ENCODE_MIN)
    np.testing.assert_array_equal(tok(texts), batch[: len(texts)])
    expected = [[tokenizer.BOS_ID, *tok._sp.encode(t), tokenizer.EOS_ID] for t in texts]
    assert [list(row[: len(ids)]) for row, ids in zip(tok(texts), expected, strict=True)] == expected


def test_tokenizer_is_picklable(tok):
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone(["a red bar"]), tok(["a red bar"]))


def test_decode_composites_alpha_on_white_and_applies_exif():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert np.asarray(transforms.decode_image(buf.getvalue())).min() == 255
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert transforms.decode_image(buf.getvalue()).size == (2, 4)


def test_resize_center_crop_and_normalize():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    out = transforms.resize_center_crop(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    white = np.asarray(transforms.normalize(out))
    np.testing.assert_allclose(
        white[0, 0], (1 - np.array(transforms.CLIP_MEAN)) / transforms.CLIP_STD, rtol=1e-5
    )


def test_scenes_never_show_held_out_combinations_in_training():
    rng_records = list(scenes._split(0, 0, 300, 32))
    for r in rng_records:
        words = r["caption"].split()
        for colour, shape in scenes.HELD_OUT:
            assert f"{colour} {shape}" not in r["caption"], r["caption"]
        assert words[0] in ("a", "an")
    held = list(scenes._split(0, 1, 30, 32))
    for r in held:
        label = (list(scenes.COLOURS)[r["labels"]["colour"]], scenes.SHAPES[r["labels"]["shape"]])
        assert label in scenes.HELD_OUT and " ".join(label) in r["caption"]


def test_scenes_are_deterministic_and_drawn_as_described():
    a, b = list(scenes._split(7, 0, 5, 32)), list(scenes._split(7, 0, 5, 32))
    assert a == b
    rng = np.random.default_rng(0)
    image, caption, things = scenes.make_scene(rng, 32, [[("blue", "bar")]], drop=False)
    assert caption.endswith("blue bar")
    # The object's colour dominates the pixels around its centre.
    cx, cy = (int(c * 32) for c in things[0].centre)
    np.testing.assert_allclose(image[cy, cx].astype(int), scenes.COLOURS["blue"], atol=20)


def test_two_thing_scenes_respect_the_stated_relation():
    def holds(relation, a, b):
        (xa, ya), (xb, yb) = a.centre, b.centre
        return {"to the left of": xa < xb, "to the right of": xa > xb, "above": ya < yb, "below": ya > yb}[
            relation
        ]

    rng = np.random.default_rng(1)
    for _ in range(100):
        _, caption, things = scenes.make_scene(rng, 32, [scenes.ALL_COMBOS] * 2, drop=False)
        phrases = [scenes.fix_articles(f"a {t.size} {t.colour} {t.shape}") for t in things]
        readings = [
            (relation, things[i], things[1 - i])
            for i in (0, 1)
            for relation in scenes.RELATIONS
            if caption == f"{phrases[i]} {relation} {phrases[1 - i]}"
        ]
        assert any(holds(*r) for r in readings), caption  # two readings when phrases are equal


def test_train_iterator_batches_and_is_deterministic(scenes_dataset, tok):
    def first_batches(seed):
        it = pipeline.train_iterator(scenes_dataset.train_files, tok, 40, 16, seed=seed)
        return [next(it) for _ in range(3)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert a[0]["image"].shape == (16, 40, 40, 3) and a[0]["image"].dtype == np.uint8
    assert a[0]["tokens"].shape == (16, 16) and a[0]["tokens"].dtype == np.int32
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_process_shares_are_equal_and_disjoint(scenes_dataset, monkeypatch):
    files = scenes_dataset.train_files  # 512 records
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    shares = []
    for index in range(3):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shares.append([records.decode(x)["key"] for x in pipeline.process_share(files)])
    assert [len(s) for s in shares] == [170, 170, 170]  # 512 - 512 % 3, split evenly
    assert len(set().union(*shares)) == 510


def test_one_epoch_sees_every_record_once(scenes_dataset, tok):
    it = pipeline.train_iterator(scenes_dataset.train_files, tok, 40, 64, seed=3)
    epoch = np.concatenate([next(it)["tokens"] for _ in range(512 // 64)])
    all_tokens = tok([r["caption"] for r in pipeline.read_all(scenes_dataset.train_files)])
    as_sorted = lambda x: sorted(map(tuple, x))
    assert as_sorted(epoch) == as_sorted(all_tokens)


def test_plain_things_are_dark_and_named_without_colour():
    rng = np.random.default_rng(2)
    image, caption, things = scenes.make_scene(rng, 40, [[(scenes.PLAIN, "cross")]], drop=False)
    assert caption == f"a {things[0].size} cross"
    cx, cy = (int(c * 40) for c in things[0].centre)
    np.testing.assert_allclose(image[cy, cx].astype(int), scenes.PLAIN_INK, atol=20)
    things = [scenes.make_scene(rng, 8, [scenes.TRAIN_COMBOS], True)[2][0] for _ in range(1000)]
    assert 0.25 < sum(t.colour == scenes.PLAIN for t in things) / 1000 < 0.35
