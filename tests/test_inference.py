"""clip_jax.load on a params export: every image input form gives the same embedding,
batching changes nothing, text goes through the export's tokenizer."""

import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.interop import files
from clip_jax.models import clip


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, scenes_dataset):
    """A params export of a random tiny CLIP (the scenes tokenizer beside it) and 5 images."""
    config = clip.get_variant("tiny", vocab_size=Tokenizer(scenes_dataset.tokenizer, 16).vocab_size)
    # Random numpy weights of the model's shapes: no init to compile (seconds on a busy CPU).
    shapes = jax.eval_shape(lambda: clip.CLIP(config).init(jax.random.key(3), *clip.dummy_inputs(config)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                          nn.meta.unbox(shapes["params"]))  # fmt: skip
    params["logit_scale"] = np.float32(np.log(1 / 0.07))
    out = tmp_path_factory.mktemp("tiny_export")
    files.save(str(out / "model"), params, config, "params", eos_id=3, bos_id=2)
    shutil.copy(scenes_dataset.tokenizer, out / "model" / "tokenizer.model")
    os.makedirs(out / "images")
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (30 + 7 * i, 50, 3), np.uint8)).save(out / "images" / f"{i}.png")
    return out


def test_image_inputs_agree_and_batching_changes_nothing(tiny_export):
    model = clip_jax.load(str(tiny_export / "model"), batch_size=2)
    paths = sorted(str(p) for p in (tiny_export / "images").iterdir())
    from_paths = model.encode_image(paths)
    assert from_paths.shape == (5, model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1.0, rtol=1e-5)
    pil = [Image.open(p) for p in paths]
    np.testing.assert_allclose(model.encode_image(pil), from_paths, atol=1e-6)
    pixels = np.stack([model.preprocess(p) for p in paths])  # [5, S, S, 3] uint8
    assert pixels.shape == (5, model.image_size, model.image_size, 3) and pixels.dtype == np.uint8
    whole = clip_jax.load(str(tiny_export / "model"), batch_size=64).encode_image(pixels)
    np.testing.assert_allclose(whole, from_paths, atol=1e-5)  # padding/batching independent


def test_text_through_the_exports_tokenizer(tiny_export):
    model = clip_jax.load(str(tiny_export / "model"))
    texts = ["a red circle", "a blue square", "a red circle"]
    emb = model.encode_text(texts)
    assert emb.shape == (3, model.config.embed_dim)
    np.testing.assert_array_equal(emb[0], emb[2])
    assert not np.allclose(emb[0], emb[1])
    probs = model.probabilities(model.encode_image(np.zeros((2, 40, 40, 3), np.uint8)), emb)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_missing_tokenizer_is_a_clear_error(tiny_export, tmp_path):
    shutil.copytree(tiny_export / "model", tmp_path / "m")
    os.remove(tmp_path / "m" / "tokenizer.model")
    with pytest.raises(ValueError, match="no tokenizer found"):
        clip_jax.load(str(tmp_path / "m")).encode_text(["x"])
