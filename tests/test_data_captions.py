"""Several captions per image: the weighted draw, its seed, the converters and evaluation."""

import io
import json
import tarfile

import numpy as np
import pytest
from test_data_multiprocess import image_key, key_image

from clip_jax.data import captions, convert, convert_readers, pipeline, records, skips, tokenizer

RECORD = {"key": "k", "captions": ["first caption", "second caption"]}


def draws(record, n=2000, seed=0) -> list[str]:
    return [captions.choose(record, np.random.default_rng([seed, i, 0])) for i in range(n)]


def test_weights_one_zero_always_give_the_first():
    assert set(draws({**RECORD, "caption_weights": [1.0, 0.0]})) == {"first caption"}
    assert set(draws({**RECORD, "caption_weights": [0, 3]})) == {"second caption"}


def test_equal_weights_give_each_half_the_time_fixed_by_the_seed():
    record = {**RECORD, "caption_weights": [0.5, 0.5]}
    first = draws(record)
    assert abs(first.count("first caption") / len(first) - 0.5) <= 0.05
    assert draws(record) == first  # the same seed, the same draws
    assert draws(record, seed=1) != first
    unweighted = draws(RECORD)  # no weights: uniform
    assert abs(unweighted.count("first caption") / len(unweighted) - 0.5) <= 0.05


@pytest.mark.parametrize("bad", [[1.0], [-1, 2], [0, 0], ["x", 1], [float("nan"), 1], "11"])
def test_unusable_weights_fall_back_to_uniform(bad):
    got = draws({**RECORD, "caption_weights": bad}, n=400)
    assert 0.4 < got.count("first caption") / len(got) < 0.6


def test_blank_captions_are_left_out_and_none_usable_is_a_bad_record():
    assert captions.all_texts({"captions": [" ", "a", b"b\xff"]}) == ["a", "b\ufffd"]
    assert set(draws({"captions": ["  ", "only"]}, n=50)) == {"only"}
    for record, reason in [({"captions": []}, "missing_caption"), ({"captions": [" "]}, "empty_caption")]:
        with pytest.raises(skips.BadRecord, match=reason):
            captions.choose(record, np.random.default_rng(0))
    assert captions.choose({"caption": "one", "recap": ["x", "y"]}, None, "recap") == "x"


def test_training_draws_per_example_and_epoch_from_the_seed(tmp_path):
    recs = [
        {"key": str(i), "image": key_image(i), "captions": ["red thing", "blue thing"], "caption_weights": w}
        for i in range(64)
        for w in [[1, 0] if i % 2 == 0 else [1, 1]]
    ]
    files = records.write_shards(recs, str(tmp_path / "c"), 2)
    tokenizer.train_sentencepiece(["red thing", "blue thing"] * 20, str(tmp_path / "tok.model"), 16)
    tok = tokenizer.Tokenizer(str(tmp_path / "tok.model"), 8)
    red, blue = tok(["red thing", "blue thing"])

    def epochs(seed):
        it = pipeline.train_iterator(files, tok, 8, 16, seed=seed, num_threads=1, crop=None)
        out = {}
        for _ in range(2 * 64 // 16):  # two epochs
            batch = next(it)
            for img, tokens in zip(batch["image"], batch["tokens"], strict=True):
                out.setdefault(image_key(img), []).append("red" if np.array_equal(tokens, red) else "blue")
        return out

    chosen = epochs(0)
    assert all(chosen[k] == ["red", "red"] for k in range(0, 64, 2))  # weights (1, 0)
    odd = [c for k in range(1, 64, 2) for c in chosen[k]]
    assert 0.3 < odd.count("red") / len(odd) < 0.7
    assert any(chosen[k][0] != chosen[k][1] for k in range(1, 64, 2))  # drawn again each epoch
    assert epochs(0) == chosen and epochs(1) != chosen
    assert not np.array_equal(red, blue)


def png() -> bytes:
    return key_image(1)


def test_converters_keep_every_caption(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(png())
    table = tmp_path / "t.csv"
    table.write_text("file,c1,c2\na.png,a one,a two\nb.png,b one,\na.png,a three,\n")
    out = tmp_path / "out"
    tasks = convert_readers.folder_tasks(
        str(table), str(tmp_path / "img"), str(out), "f", caption_column=("c1", "c2")
    )
    convert.run(tasks, convert.Options(size=8), 1, str(out / "stats.json"))
    recs = pipeline.read_all(sorted(str(p) for p in out.glob("f-*.array_record")))
    assert [r.get("captions", [r["caption"]]) for r in recs] == [["a one", "a two"], ["b one"], ["a three"]]
    tasks = convert_readers.folder_tasks(
        str(table), str(tmp_path / "img"), str(out), "g", caption_column="c1", merge_rows=True
    )
    convert.run(tasks, convert.Options(size=8), 1, str(out / "stats-g.json"))
    recs = pipeline.read_all(sorted(str(p) for p in out.glob("g-*.array_record")))
    assert [r.get("captions", [r["caption"]]) for r in recs] == [["a one", "a three"], ["b one"]]


def tar_member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_lines_and_json_lists_are_captions(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        tar_member(tar, "x.png", png())
        tar_member(tar, "x.txt", b"line one\n\nline two\n")
        tar_member(tar, "y.png", png())
        tar_member(tar, "y.txt", b"single")
        tar_member(tar, "y.json", json.dumps({"captions": ["j1", "j2"]}).encode())
        tar_member(tar, "z.png", png())
        tar_member(tar, "z.txt", b"just one")
    items = list(convert_readers.TarReader(str(shard))())
    assert [captions.record_fields(i.caption) for i in items] == [
        {"caption": "line one", "captions": ["line one", "line two"]},
        {"caption": "j1", "captions": ["j1", "j2"]},
        {"caption": "just one"},
    ]


def test_evaluation_sets_carry_every_caption(tmp_path, monkeypatch):
    recs = [
        {"key": "0", "image": key_image(0), "captions": ["a", "b", "c"]},
        {"key": "1", "image": key_image(1), "caption": "d"},
    ]
    files = records.write_shards(recs, str(tmp_path / "e"), 1)
    tokenizer.train_sentencepiece(["a b c d"] * 10, str(tmp_path / "tok.model"), 12)
    data = pipeline.load_eval_set(files, tokenizer.Tokenizer(str(tmp_path / "tok.model"), 8), 8)
    assert data["captions"] == [["a", "b", "c"], ["d"]] and data["caption"] == ["a", "d"]
