"""Evaluation metrics against hand-computed values, and the prompt-ensemble classifier."""

import numpy as np
import pytest

from clip_jax import evaluate


def test_topk_and_ties_resolved_for_the_target():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.7], [0.3, 0.6, 0.6]])
    labels = np.array([0, 1, 2])
    np.testing.assert_array_equal(evaluate.ranks(scores, labels), [0, 1, 0])
    assert evaluate.topk_accuracy(scores, labels, 1) == pytest.approx(2 / 3)
    assert evaluate.topk_accuracy(scores, labels, 2) == 1.0


def test_mean_per_class_recall_weights_classes_equally():
    scores = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0, 0, 1])
    assert evaluate.mean_per_class_recall(scores, labels) == 1.0
    labels = np.array([0, 0, 1, 1])  # class 0: 2/2, class 1: 1/2
    assert evaluate.mean_per_class_recall(scores, labels) == pytest.approx(0.75)


def test_recall_at_k():
    similarity = np.array([[0.1, 0.9, 0.3], [0.8, 0.7, 0.1], [0.2, 0.1, 0.0]])
    out = evaluate.recall_at_k(similarity, np.array([1, 1, 2]), (1, 2))
    assert out == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}


class FakeEncoder:
    """Maps token rows to fixed embeddings, to check the ensembling arithmetic alone."""

    def __init__(self, table):
        self.table = table

    def texts(self, tokens):
        return self.table[tokens[:, 0]]


def test_classifier_weights_are_renormalised_means_of_prompt_embeddings():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(6, 4))
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    tokenizer = lambda texts: np.array([[int(t)] for t in texts])
    weights = evaluate.classifier_weights(FakeEncoder(table), tokenizer, [["0", "1", "2"], ["3", "4"]])
    for row, ids in zip(weights, ([0, 1, 2], [3, 4]), strict=True):
        mean = table[ids].mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-6)


# ---------------------------------------------------------------- multi-caption retrieval


def test_retrieval_any_caption_counts_for_image_to_text():
    from clip_jax.eval import retrieval

    # 3 images, 5 captions: image 0 owns captions 0, 1; image 1 owns 2, 3; image 2 owns 4.
    owner = np.array([0, 0, 1, 1, 2])
    similarity = np.array(  # [images, captions]
        [
            [0.1, 0.8, 0.9, 0.0, 0.2],  # best own caption (0.8) ranked 2nd -> R@1 miss, R@2 hit
            [0.5, 0.1, 0.3, 0.5, 0.2],  # own 0.5 ties with caption 0 -> rank 0 (tie for the target)
            [0.9, 0.8, 0.7, 0.6, 0.1],  # own caption last -> rank 4
        ]
    )
    np.testing.assert_array_equal(retrieval.image_to_text_ranks(similarity, owner), [1, 0, 4])
    # text->image, per caption, over the columns: caption c's target image owner[c].
    # c0: [0.1, 0.5, 0.9] target 0 -> 2; c1: [0.8, 0.1, 0.8] target 0 -> 0 (tie);
    # c2: [0.9, 0.3, 0.7] target 1 -> 2; c3: [0.0, 0.5, 0.6] target 1 -> 1; c4: [0.2, 0.2, 0.1] target 2 -> 2.
    image_emb, text_emb = np.eye(3), similarity.T  # image_emb @ text_emb.T == similarity
    out = retrieval.retrieval_metrics(image_emb, text_emb, owner, ks=(1, 2))
    assert out["i2t_R@1"] == pytest.approx(1 / 3) and out["i2t_R@2"] == pytest.approx(2 / 3)
    assert out["t2i_R@1"] == pytest.approx(1 / 5) and out["t2i_R@2"] == pytest.approx(2 / 5)
    assert out["t2i_R@1_chance"] == pytest.approx(1 / 3)
    # i2t chance at k=1: images with 2, 2, 1 of 5 captions -> mean(2/5, 2/5, 1/5).
    assert out["i2t_R@1_chance"] == pytest.approx((0.4 + 0.4 + 0.2) / 3)
    # k=2: 1 - C(3,2)/C(5,2) = 0.7 for two captions, 1 - C(4,2)/C(5,2) = 0.4 for one.
    assert out["i2t_R@2_chance"] == pytest.approx((0.7 + 0.7 + 0.4) / 3)


def test_retrieval_one_caption_each_matches_recall_at_k():
    from clip_jax.eval import retrieval

    rng = np.random.default_rng(1)
    image_emb, text_emb = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
    out = retrieval.retrieval_metrics(image_emb, text_emb, np.arange(12), ks=(1, 5))
    t2i = evaluate.recall_at_k(text_emb @ image_emb.T, np.arange(12), (1, 5))
    i2t = evaluate.recall_at_k(image_emb @ text_emb.T, np.arange(12), (1, 5))
    assert out["t2i_R@1"] == t2i["R@1"] and out["i2t_R@5"] == i2t["R@5"]


def test_classification_metrics_with_confusion():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.0, 0.1, 0.9]])
    labels = np.array([0, 1, 1, 2])
    out = evaluate.classification_metrics(scores, labels, "x_")
    assert out["x_top1"] == 0.75 and out["x_top1_chance"] == pytest.approx(1 / 3)
    assert out["x_mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["x_confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert "x_top5" not in out  # only with more than 5 classes


def test_prompt_sensitivity_per_template_and_ensemble():
    from clip_jax.eval import zeroshot

    # Texts "class:template" -> embedding: template 0 points at the right class, template 1 at the wrong one.
    basis = np.eye(2)
    prompts = {"a x": basis[0], "a y": basis[1], "the x": basis[1] * 0.2 + basis[0], "the y": basis[1]}

    class Enc:
        def texts(self, tokens):
            out = np.stack([prompts[t] for t in tokens])
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    image_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    labels = np.array([0, 1, 0])
    report = zeroshot.prompt_sensitivity(
        Enc(), lambda texts: texts, image_emb, labels, ["x", "y"], ["a {}", "the {}"]
    )
    assert report["per_template"] == {"a {}": 1.0, "the {}": 1.0}
    assert report["ensemble"] == 1.0 and report["spread"] == 0.0 and report["chance"] == 0.5


# ---------------------------------------------------------------- linear probe


def _numpy_objective_and_grad(w, b, x, y, l2):
    logits = x @ w + b
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y]).mean() + 0.5 * l2 * np.sum(w**2)
    d = p.copy()
    d[np.arange(n), y] -= 1
    return loss, x.T @ d / n + l2 * w, d.mean(axis=0)


def test_linear_probe_reaches_the_numpy_optimum_on_separable_features():
    from clip_jax.eval import linear_probe

    rng = np.random.default_rng(0)
    means = 3 * np.eye(3, 6)
    y = rng.integers(0, 3, 240)
    x = (means[y] + 0.5 * rng.normal(size=(240, 6))).astype(np.float32)
    l2 = 0.05
    params = linear_probe.fit(x[:160], y[:160], 3, l2, pad_to=200)  # padding rows must not count
    loss, grad_w, grad_b = _numpy_objective_and_grad(params["w"], params["b"], x[:160], y[:160], l2)
    assert np.abs(grad_w).max() < 1e-3 and np.abs(grad_b).max() < 1e-3  # a stationary point
    # Plain numpy gradient descent on the same (strongly convex) objective reaches the same loss.
    w, b = np.zeros((6, 3)), np.zeros(3)
    for _ in range(3000):
        _, gw, gb = _numpy_objective_and_grad(w, b, x[:160], y[:160], l2)
        w, b = w - 0.5 * gw, b - 0.5 * gb
    assert loss == pytest.approx(_numpy_objective_and_grad(w, b, x[:160], y[:160], l2)[0], abs=1e-4)
    np.testing.assert_allclose(params["w"], w, atol=2e-2)

    result = linear_probe.linear_probe(
        (x[:160], y[:160]), (x[160:200], y[160:200]), (x[200:], y[200:]), 3, l2_grid=(10.0, 0.1, 1e-3)
    )
    assert result["test_acc"] == 1.0 and result["val_acc"] == 1.0
    assert result["l2"] == 0.1  # 10 underfits (the weights shrink to a near-uniform prediction)
    assert result["sweep"]["10"] < 1.0
    assert result["test_acc_chance"] == pytest.approx(np.bincount(y[200:]).max() / 40)


# ---------------------------------------------------------------- sources


def _png(colour):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_and_array_record_sources(tmp_path):
    from clip_jax.data import records
    from clip_jax.eval import sources

    for name, colour in (("red_thing", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "tree" / name / f"{i}.png").write_bytes(_png(colour))
    (tmp_path / "tree" / "blue" / "notes.txt").write_text("not an image")
    data = sources.image_folder(str(tmp_path / "tree"), 8)
    assert data["class_names"] == ["blue", "red thing"]
    np.testing.assert_array_equal(data["label"], [0, 0, 1, 1])
    assert data["image"].shape == (4, 8, 8, 3) and data["image"][0, 4, 4, 2] == 255

    recs = [
        {"key": str(i), "image": _png((0, 255, 0)), "caption": "c", "labels": {"kind": i % 3}}
        for i in range(5)
    ]
    records.write_shards(recs, str(tmp_path / "shard"), 1)
    data = sources.array_record(str(tmp_path / "shard*"), 8, label_key="kind")
    np.testing.assert_array_equal(data["label"], [0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="no label"):
        sources.array_record(str(tmp_path / "shard*"), 8)


# ---------------------------------------------------------------- the demo's report, end to end


def test_evaluate_scenes_on_an_untrained_tiny_model(scenes_dataset, capsys):
    import jax

    from clip_jax.data.tokenizer import Tokenizer
    from clip_jax.eval import scenes_suite, table
    from clip_jax.models import clip

    tokenizer = Tokenizer(scenes_dataset.tokenizer, 16)
    model = clip.CLIP(clip.get_variant("tiny", vocab_size=tokenizer.vocab_size, context_length=16))
    params = model.init(jax.random.key(0), *clip.dummy_inputs(model.config))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    results = scenes_suite.evaluate_scenes(model, params, tokenizer, scenes_dataset, 64, probes=16)
    assert results["zero_shot_shape_top1_chance"] == 0.25 and len(results["zero_shot_shape_confusion"]) == 4
    assert np.sum(results["zero_shot_colour_confusion"]) == 64
    assert results["t2i_R@1_chance"] == pytest.approx(1 / 64) and "i2t_R@10" in results
    for task in ("counting", "spatial", "binding", "size", "colour", "shape"):
        assert 0 <= results[f"diag_{task}_acc"] <= 1 and results[f"diag_{task}_acc_chance"] == 0.5
    assert {"diag_spatial_left_acc", "diag_spatial_above_acc", "diag_size_small_acc"} <= set(results)
    sens = results["prompt_sensitivity"]["shape"]
    assert len(sens["per_template"]) >= 5 and sens["best_single"] >= sens["worst_single"]
    table.print_table("scenes", results)
    assert "diag_binding_acc" in capsys.readouterr().out
