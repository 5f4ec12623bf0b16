"""Streamed zero-shot on a TFDS split prepared as array_record equals the in-memory path
(`clip_jax.eval.sources.tfds`), the bad record skipped by both. The tiny dataset is
test_data_tfds.py's builder, prepared here (no TensorFlow, no downloads)."""

import eval_stream_setup as setup
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from test_data_tfds import NAMES, NUM_TRAIN, ClipJaxTiny  # noqa: E402

from clip_jax import sharding  # noqa: E402
from clip_jax.eval import classify, sources, zeroshot  # noqa: E402
from clip_jax.eval.encode import Encoder  # noqa: E402


def test_tfds_split_streamed_equals_in_memory(tmp_path):
    data_dir = str(tmp_path)
    ClipJaxTiny(data_dir=data_dir, file_format="array_record").download_and_prepare()
    model, variables = setup.tiny_model()
    mesh = sharding.make_mesh({"data": -1})
    ev = classify.ZeroShotEvaluator("zs", "tfds:clip_jax_tiny:train", 16, tfds_data_dir=data_dir)
    got = ev(setup.context(model, variables, mesh, batch_size=8))
    data = sources.tfds("clip_jax_tiny", "train", 16, setup.ByteTokenizer(), data_dir)
    assert data["class_names"] == [n.replace("_", " ") for n in NAMES]
    encoder = Encoder(model, variables, 8)
    prompts = zeroshot.prompt_sets(data["class_names"], classify.DEFAULT_TEMPLATES)
    weights = zeroshot.classifier_weights(encoder, setup.ByteTokenizer(), prompts)
    want = zeroshot.classification_metrics(encoder.images(data["image"]) @ weights.T, data["label"])
    assert got["n_images"] == NUM_TRAIN - 1 and got["n_skipped"] == 1
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, atol=1e-6, err_msg=key)
