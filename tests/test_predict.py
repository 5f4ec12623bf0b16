"""The predict CLI (in-process): classify skips and counts bad inputs, index + search
find an indexed image first, the contact sheet inlines thumbnails."""

import jax
import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from test_inference import tiny_export  # noqa: F401 (the fixture)

from clip_jax import cli, inference, predict
from clip_jax.data import bounded, pipeline, records, skips


def test_classify_skips_missing_and_unreadable_images(tiny_export, tmp_path, capsys):  # noqa: F811
    (tmp_path / "broken.png").write_bytes(b"not an image")
    images = str(tiny_export / "images")
    result = predict.run(["classify", f"--model={tiny_export / 'model'}", images,
                           str(tmp_path / "broken.png"), str(tmp_path / "gone.png"),
                           "--labels=red circle,blue square,green star", "--top_k=2"])  # fmt: skip
    assert result["images"] == 5 and result["skipped"] == {"missing": 1, "decode_error": 1}
    out = capsys.readouterr().out
    assert out.count("%)") == 10 and "skipped 2" in out


def test_index_then_search_by_image_and_text(tiny_export, tmp_path, capsys):  # noqa: F811
    model, index = f"--model={tiny_export / 'model'}", str(tmp_path / "index.npz")
    predict.run(["index", model, str(tiny_export / "images"), f"--out={index}"])
    data = np.load(index)
    assert data["embeddings"].shape[0] == 5 and len(data["refs"]) == 5
    query = str(tiny_export / "images" / "3.png")
    html = tmp_path / "hits.html"
    hits = predict.run(
        ["search", model, f"--index={index}", f"--image={query}", "--top_k=3", f"--html={html}"]
    )
    assert hits["hits"][0][1] == query and abs(hits["hits"][0][0] - 1.0) < 1e-4
    assert html.read_text().count("data:image/png;base64,") == 3
    text_hits = predict.run(["search", model, f"--index={index}", "--text=a red circle", "--top_k=5"])
    assert sorted(h[1] for h in text_hits["hits"]) == sorted(data["refs"].tolist())


def corrupt_shard(path, scenes_dataset):
    """An ArrayRecord shard: two good scene records, a corrupt one between them, then a list."""
    good = pipeline.read_all([scenes_dataset.heldout_things])[:2]
    writer = ArrayRecordWriter(str(path), records.WRITER_OPTIONS)
    for data in (
        records.encode(good[0]),
        b"\xc1\xc1 not msgpack",
        records.encode(good[1]),
        msgpack.packb([1]),
    ):
        writer.write(data)
    writer.close()
    return [g["caption"] for g in good]


def test_corrupt_records_are_skipped_and_counted(tiny_export, tmp_path, scenes_dataset, capsys):  # noqa: F811
    shard = tmp_path / "mixed.array_record"
    captions = corrupt_shard(shard, scenes_dataset)
    result = predict.run(
        ["classify", f"--model={tiny_export / 'model'}", str(shard), "--labels_from_captions"]
    )
    assert result["images"] == 2 and result["skipped"] == {"decode_error": 2}
    assert result["labels"] == len(set(captions))
    err = capsys.readouterr().err
    assert f"{shard}#1" in err and f"{shard}#3" in err


def test_non_finite_embeddings_are_an_error_not_a_ranking(tiny_export, monkeypatch):  # noqa: F811
    real_load = inference.load

    def nan_load(path, **kw):
        model = real_load(path, **kw)
        params = jax.tree.map(lambda x: np.full_like(x, np.nan), model.params)
        return inference.CLIPModel(model.model, params, model.tokenizer, path, model.batch_size)

    monkeypatch.setattr(inference, "load", nan_load)
    args = [
        f"--model={tiny_export / 'model'}",
        str(tiny_export / "images"),
        "--labels=red circle,blue square",
    ]
    with pytest.raises(cli.UserError, match="5 of 5 embeddings are not finite"):
        predict.run(["classify", *args])


def test_index_refuses_to_overwrite_an_input_and_leaves_no_partial_file(tiny_export, tmp_path):  # noqa: F811
    model, images = f"--model={tiny_export / 'model'}", str(tiny_export / "images")
    precious = tmp_path / "old.npz"
    precious.write_bytes(b"an input")
    with pytest.raises(cli.UserError, match="is one of the inputs"):
        predict.run(["index", model, images, str(precious), f"--out={precious}"])
    assert precious.read_bytes() == b"an input"
    out = tmp_path / "index.npz"
    predict.run(["index", model, images, f"--out={out}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.npz", "old.npz"]  # no temporary left


def test_the_contact_sheet_escapes_captions_refs_and_the_query(tmp_path):
    page = tmp_path / "hits.html"
    predict.contact_sheet(
        str(page), 'text: <img src=x onerror="alert(1)">', [(0.5, "a<b>.png", "<script>x</script>")]
    )
    text = page.read_text()
    assert "<script>" not in text and "<b>" not in text and 'onerror="' not in text
    assert "&lt;script&gt;" in text and "a&lt;b&gt;.png" in text


def test_image_reads_are_bounded(tmp_path):
    """A file over the size cap (e.g. a thumbnail's source) is refused, not read into memory."""
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(bounded.MAX_MEMBER_BYTES + 1)  # sparse: no disk used
    with pytest.raises(skips.BadRecord, match="big.png"):
        predict.read_bytes(str(big))
    assert predict._thumbnail(str(big)) == ""
