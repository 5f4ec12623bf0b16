"""The predict CLI (in-process): classify skips and counts bad inputs, index + search
find an indexed image first, the contact sheet inlines thumbnails."""

import numpy as np
from test_inference import tiny_export  # noqa: F401 (the fixture)

from clip_jax import predict


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
