"""Converters: folder + table, TFDS, restartability, the pool and the stats."""

import io
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import convert, pipeline, records


def make_folder(tmp_path, n=7):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (300 + i, 200), (i * 30, 0, 0)).save(images / f"im{i}.png")
        rows.append({"file": f"im{i}.png", "caption": f"red {i}", "label": i % 2})
    rows.append({"file": "missing.png", "caption": "gone", "label": 0})
    rows.append({"file": "im0.png", "caption": "  ", "label": 0})
    return images, rows


def write_csv(path, rows, sep=","):
    lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_folder_with_a_caption_table(tmp_path, kind):
    images, rows = make_folder(tmp_path)
    table = tmp_path / f"captions.{kind}"
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    else:
        write_csv(table, rows, "\t" if kind == "tsv" else ",")
    out = tmp_path / "out"
    tasks = convert.folder_tasks(str(table), str(images), str(out), "f", 4, label_column="label")
    stats = convert.run(tasks, convert.Options(size=64), 1, str(out / "f-stats.json"))
    assert stats["kept"] == 7 and stats["skipped"] == {"missing_image": 1, "empty_caption": 1}
    recs = pipeline.read_all(records.expand(str(out / "f-*.array_record"), "x"))
    recs = sorted(recs, key=lambda r: r["key"])
    assert [r["key"] for r in recs] == [f"im{i}" for i in range(7)]
    img = Image.open(io.BytesIO(recs[3]["image"]))
    assert img.format == "JPEG" and img.size == (97, 64)  # 303x200, short side to 64
    assert recs[3]["caption"] == "red 3" and recs[3]["label"] == 1


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="reading parquet needs pyarrow"):
        convert.read_table(str(tmp_path / "x.parquet"))


def test_tfds_image_and_label(tmp_path, monkeypatch):
    class FakeSource:
        dataset_info = types.SimpleNamespace(
            features={"label": types.SimpleNamespace(names=["golden_retriever", "tabby_cat"])}
        )

        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"image": np.full((40, 30, 3), i * 40, np.uint8), "label": np.int64(i % 2)}

    fake = types.SimpleNamespace(data_source=lambda name, split, data_dir=None: FakeSource())
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    tasks = convert.tfds_tasks("pets", "train", str(tmp_path), "pets", per_shard=2)
    assert len(tasks) == 3
    stats = convert.run(tasks, convert.Options(size=16), 1, str(tmp_path / "pets-stats.json"))
    assert stats["kept"] == 5
    recs = pipeline.read_all([t.out_path for t in tasks])
    assert recs[1] == {**recs[1], "key": "pets-train-1", "caption": "a photo of a tabby cat.", "label": 1}
    assert Image.open(io.BytesIO(recs[1]["image"])).size == (16, 21)


def test_interrupted_conversion_resumes_and_never_looks_finished(tmp_path):
    images, rows = make_folder(tmp_path)
    write_csv(tmp_path / "c.csv", rows)
    out = tmp_path / "out"
    tasks = convert.folder_tasks(str(tmp_path / "c.csv"), str(images), str(out), "f", rows_per_shard=3)

    class Boom(Exception):
        pass

    def dies():
        yield from tasks[1].read()
        raise Boom  # killed after writing the items, before the rename

    with pytest.raises(Boom):
        convert.run_task(convert.Task(tasks[1].out_path, dies), convert.Options(size=32))
    assert not (out / "f-00001-of-00003.array_record").exists()  # only a private temp file
    convert.run_task(tasks[0], convert.Options(size=32))
    stats = convert.run(tasks, convert.Options(size=32), 2, str(out / "f-stats.json"))  # a pool of 2
    assert stats["shards_resumed"] == 1 and stats["kept"] == 7 and stats["shards"] == 3
    assert json.loads((out / "f-stats.json").read_text())["kept"] == 7
    assert len(pipeline.read_all(records.expand(str(out / "f-*.array_record"), "x"))) == 7
