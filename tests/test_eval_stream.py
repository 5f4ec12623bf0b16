"""Streamed, mesh-sharded evaluators against independent computations (8 CPU devices).

Zero-shot over a folder equals the in-memory path (`sources.image_folder` + `Encoder`
+ `classification_metrics`); CLIP_benchmark's webdataset layout equals the folder of the
same images; retrieval equals a brute-force numpy loop; validation loss equals the dense
loss of plainly applied batches; the majority-class baseline on an imbalanced set.
"""

import os

import eval_stream_setup as setup
import numpy as np
import pytest

from clip_jax import cli, losses, sharding
from clip_jax.data import records, transforms
from clip_jax.eval import classify, retrieve, sources, stream, stream_sources, val_loss, zeroshot
from clip_jax.eval.encode import Encoder
from clip_jax.models import clip

COUNTS = (5, 3, 4, 2, 3, 1, 2)  # imbalanced: the largest class holds 5 of 20
TEMPLATES = ("a photo of a {}.", "art of the {}.")


@pytest.fixture(scope="module")
def model_and_mesh():
    model, variables = setup.tiny_model()
    mesh = sharding.make_mesh({"data": -1})
    return model, variables, mesh


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    samples = setup.write_folder(str(root / "tree"), COUNTS)
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root, samples


def test_zero_shot_streamed_equals_in_memory_path(model_and_mesh, folder):
    model, variables, mesh = model_and_mesh
    root, _ = folder
    (root / "tree" / "cat" / "zz_broken.png").write_bytes(b"not a png")  # skipped by both paths
    try:
        ev = classify.ZeroShotEvaluator(
            "zs", f"folder:{root / 'tree'}", 16, templates=str(root / "templates.txt")
        )
        got = ev(setup.context(model, variables, mesh, batch_size=8))
        data = sources.image_folder(str(root / "tree"), 16)
    finally:
        (root / "tree" / "cat" / "zz_broken.png").unlink()
    encoder = Encoder(model, variables, 8)
    weights = zeroshot.classifier_weights(
        encoder, setup.ByteTokenizer(), zeroshot.prompt_sets(data["class_names"], TEMPLATES)
    )
    want = zeroshot.classification_metrics(encoder.images(data["image"]) @ weights.T, data["label"])
    assert got["n_images"] == 20 and got["n_skipped"] == 1
    assert set(want) - {"confusion"} <= set(got)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, atol=1e-6, err_msg=key)
    assert 0 < got["top1"] < 1  # an untrained model: the numbers are not all trivial


def test_majority_baseline_on_an_imbalanced_set(model_and_mesh, folder):
    model, variables, mesh = model_and_mesh
    root, samples = folder
    ev = classify.ZeroShotEvaluator("zs", f"folder:{root / 'tree'}", 16, templates="imagenet_simple")
    got = ev(setup.context(model, variables, mesh, batch_size=16))
    labels = np.array([label for _, label in samples])
    assert got["top1_majority"] == pytest.approx(np.bincount(labels).max() / len(labels)) == 0.25
    assert got["top1_chance"] == got["mean_per_class_recall_chance"] == pytest.approx(1 / 7)
    assert got["n_images"] == 20 and np.sum(got["confusion"]) == 20


def test_wds_layout_gives_the_folder_numbers(model_and_mesh, folder, tmp_path):
    model, variables, mesh = model_and_mesh
    root, samples = folder
    names = [c.replace("_", " ") for c in setup.CLASSES]
    setup.write_wds(str(tmp_path / "wds"), samples, names, setup.TEMPLATES_C, per_shard=6)
    ctx = setup.context(model, variables, mesh, batch_size=8)
    wds = classify.ZeroShotEvaluator("zs", f"wds:{tmp_path / 'wds'}", 16)(ctx)
    tree = classify.ZeroShotEvaluator(
        "zs", f"folder:{root / 'tree'}", 16, templates=str(root / "templates.txt")
    )(ctx)
    assert wds == tree


def test_wds_index_reads_members_by_offset_and_orders_shards_naturally(tmp_path):
    rng = np.random.default_rng(3)
    samples = [(setup.image_bytes(rng), i % 3) for i in range(23)]
    setup.write_wds(str(tmp_path / "wds"), samples, per_shard=2)  # 12 shards: 10.tar after 9.tar
    os.remove(tmp_path / "wds" / "test" / "nshards.txt")
    source = stream_sources.WdsSource(str(tmp_path / "wds"))
    assert len(source) == 23
    for i in (0, 5, 19, 22):
        assert source[i]["image"] == samples[i][0] and source[i]["label"] == samples[i][1]


def _brute_force_recalls(image_emb, text_emb, owner, ks):
    sim = image_emb @ text_emb.T
    out = {}
    for k in ks:
        hits = [np.sum(sim[i] > sim[i, owner == i].max()) < k for i in range(len(image_emb))]
        out[f"i2t_R@{k}"] = np.mean(hits)
        out[f"t2i_R@{k}"] = np.mean([np.sum(sim[:, c] > sim[owner[c], c]) < k for c in range(len(owner))])
    return out


def test_retrieval_with_several_captions_matches_brute_force(model_and_mesh, tmp_path):
    model, variables, mesh = model_and_mesh
    recs = setup.caption_records(13)
    records.write_shards(recs, str(tmp_path / "pairs"), 2)
    setup.write_wds(str(tmp_path / "wds"), [(r["image"], r.get("captions") or [r["caption"]]) for r in recs])
    ctx = setup.context(model, variables, mesh, batch_size=8)
    got = retrieve.RetrievalEvaluator("ret", f"array_record:{tmp_path}/pairs*", 16, ks=(1, 5))(ctx)
    # write_shards puts records round-robin into 2 shards: the stream's order is shard 0, then 1.
    order = [r for shard in range(2) for r in recs[shard::2]]
    images = np.stack([transforms.resize_center_crop(transforms.decode_image(r["image"]), 16) for r in order])
    texts = [r.get("captions") or [r["caption"]] for r in order]
    owner = np.array([i for i, own in enumerate(texts) for _ in own])
    image_emb = np.asarray(
        model.apply(variables, transforms.normalize(images), method=clip.CLIP.encode_image)
    )
    tokens = setup.ByteTokenizer()([t for own in texts for t in own])
    text_emb = np.asarray(model.apply(variables, tokens, method=clip.CLIP.encode_text))
    want = _brute_force_recalls(image_emb, text_emb, owner, (1, 5))
    assert got["n_images"] == 13 and got["n_captions"] == len(owner) == 25
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["t2i_R@1_chance"] == pytest.approx(1 / 13)
    wds = retrieve.RetrievalEvaluator("ret", f"wds:{tmp_path / 'wds'}", 16, ks=(1, 5))(ctx)
    # The wds set holds the records in their written order: other rows, the same sets of pairs.
    assert {k: wds[k] for k in want} == pytest.approx({k: got[k] for k in want}, abs=1e-6)


def test_validation_loss_is_the_dense_loss_of_whole_batches(model_and_mesh, tmp_path):
    model, variables, mesh = model_and_mesh
    recs = setup.caption_records(21, seed=2)
    records.write_shards(recs, str(tmp_path / "pairs"), 1)
    ctx = setup.context(model, variables, mesh, train_batch_size=8)
    got = val_loss.ValLossEvaluator("val", f"array_record:{tmp_path}/pairs*", 16)(ctx)
    assert got["n_batches"] == 2 and got["n_skipped_batches"] == 0  # 21 pairs: the last 5 dropped
    want = []
    for start in (0, 8):
        batch = recs[start : start + 8]
        images = np.stack(
            [transforms.resize_center_crop(transforms.decode_image(r["image"]), 16) for r in batch]
        )
        tokens = setup.ByteTokenizer()([(r.get("captions") or [r["caption"]])[0] for r in batch])
        out = model.apply(variables, transforms.normalize(images), tokens)
        want.append(float(losses.softmax_contrastive(*out)[0]))
    assert got["loss"] == pytest.approx(np.mean(want), rel=1e-5)


def test_dataset_mistakes_are_one_line_user_errors(tmp_path):
    with pytest.raises(cli.UserError, match="expected one of"):
        stream_sources.open_dataset("imagenet")
    with pytest.raises(cli.UserError, match="no test/ folder"):
        stream_sources.open_dataset(f"wds:{tmp_path}")
    with pytest.raises(cli.UserError, match="retrieval reads"):
        retrieve.RetrievalEvaluator.from_config("r", {"dataset": f"folder:{tmp_path}"}, 16)
    with pytest.raises(cli.UserError, match="templates need"):
        classify.normalize_templates(["a photo"], "here")


def test_other_mesh_shapes_give_the_same_numbers(model_and_mesh, folder):
    model, variables, mesh = model_and_mesh
    root, _ = folder
    ev = classify.ZeroShotEvaluator(
        "zs", f"folder:{root / 'tree'}", 16, templates=str(root / "templates.txt")
    )
    want = ev(setup.context(model, variables, mesh, batch_size=8))
    other = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    assert stream.local_rows(other, 12) == (0, 12) and stream.eval_batch_size(6, other) == 8
    assert ev(setup.context(model, variables, other, batch_size=6)) == want


def test_wds_oversized_member_and_bad_labels(model_and_mesh, tmp_path):
    model, variables, mesh = model_and_mesh
    rng = np.random.default_rng(4)
    samples = [(setup.image_bytes(rng), i % 2) for i in range(6)]
    setup.write_wds(str(tmp_path / "wds"), samples, ["a", "b"], setup.TEMPLATES_C)
    shard = str(tmp_path / "wds" / "test" / "0.tar")
    index = stream_sources.index_tar(shard, max_member_bytes=4)  # the images are over 4 bytes
    assert index[0][1]["png"] == "too_large" and index[0][1]["cls"].size == 1
    ctx = setup.context(model, variables, mesh, batch_size=8)
    (tmp_path / "wds" / "classnames.txt").write_text("a\n")  # labels 0 and 1, one class name
    with pytest.raises(cli.UserError, match=r"labels in \[0, 1\] but 1 class names"):
        classify.ZeroShotEvaluator("zs", f"wds:{tmp_path / 'wds'}", 16)(ctx)
    (tmp_path / "wds" / "test" / "0.tar").write_bytes(b"\x1f\x8b" + bytes(600))
    with pytest.raises(cli.UserError, match="gzip-compressed"):
        stream_sources.WdsSource(str(tmp_path / "wds"))
