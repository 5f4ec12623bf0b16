"""Converters: folder + table, TFDS, restartability, the pool and the stats."""

import io
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from clip_jax import cli
from clip_jax.data import bounded, convert, convert_readers, pipeline, records, skips

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    tasks = convert_readers.folder_tasks(str(table), str(images), str(out), "f", 4, label_column="label")
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
        convert_readers.read_table(str(tmp_path / "x.parquet"))


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
    tasks = convert_readers.tfds_tasks("pets", "train", str(tmp_path), "pets", per_shard=2)
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
    tasks = convert_readers.folder_tasks(
        str(tmp_path / "c.csv"), str(images), str(out), "f", rows_per_shard=3
    )

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


@pytest.mark.parametrize(
    "name, text",
    [
        ("notes.txt", "just some notes\n"),  # a text file: a header, no rows
        ("nocol.csv", "a,b\n1,2\n"),  # no image / caption column
        ("norows.csv", "file,caption\n"),  # the columns, no rows
        ("t.parquet", "not parquet"),
        ("missing.csv", None),
    ],
)
def test_a_table_that_is_no_caption_table_is_one_user_error(tmp_path, name, text):
    """Not "kept 0" and exit 0: an error naming the table (cli.UserError: one line, exit 2)."""
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    table = tmp_path / name
    if text is not None:
        table.write_text(text)
    with pytest.raises(cli.UserError, match=str(table).replace(".", r"\.")) as e:
        convert_readers.folder_tasks(str(table), str(tmp_path), str(tmp_path / "out"), "f")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "script, args, out",
    [
        ("folder", ["--table=imgs/t.csv", "--image_dir=imgs"], "imgs"),  # beside the table
        ("folder", ["--table=t.csv", "--image_dir=imgs"], "imgs"),  # among the images
        ("folder", ["--table=t.csv", "--image_dir=imgs"], "."),  # holding the images
        ("webdataset", ["--input=imgs/a.tar"], "imgs"),  # among the input shards
    ],
)
def test_a_converter_refuses_an_out_dir_among_its_inputs(tmp_path, script, args, out):
    (tmp_path / "imgs").mkdir()
    for table in (tmp_path / "t.csv", tmp_path / "imgs" / "t.csv"):
        table.write_text("file,caption\na.jpg,hi\n")
    (tmp_path / "imgs" / "a.tar").write_bytes(b"")
    program = ROOT / "data_pipelines" / f"{script}_to_array_record.py"
    done = subprocess.run(
        [sys.executable, str(program), *args, f"--out_dir={out}", "--num_processes=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and done.stderr.startswith(f"error: --out_dir={out} "), done.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.tar", "imgs", "t.csv", "t.csv"]


def test_a_table_row_cannot_leave_a_gs_image_dir():
    assert bounded.resolve("gs://b/images", "a/b.png") == "gs://b/images/a/b.png"
    for name in ("../secret.png", "/etc/passwd", "a/../../x.png", "gs://other/x.png"):
        with pytest.raises(skips.BadRecord, match="outside"):
            bounded.resolve("gs://b/images", name)
    assert bounded.resolve("gs://b/images", "../x.png", allow_outside=True) == "gs://b/images/../x.png"
