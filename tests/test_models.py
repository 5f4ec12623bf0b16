"""Model shapes, parameter counts, logical axis names and the encoders' behaviour."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import clip, layers, text

# Total parameters of OpenAI's checkpoints (vocab 49,408, 77 tokens, logit scale included).
OPENAI_COUNTS = {"ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513}


def abstract_params(config):
    model = clip.CLIP(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *clip.dummy_inputs(config)))["params"]


@pytest.mark.parametrize("name", sorted(OPENAI_COUNTS))
def test_parameter_count_equals_openai(name):
    params = nn.meta.unbox(abstract_params(clip.get_variant(name)))
    assert sum(x.size for x in jax.tree.leaves(params)) == OPENAI_COUNTS[name]


def test_openai_shapes_of_vit_b16():
    params = nn.meta.unbox(abstract_params(clip.get_variant("ViT-B/16")))
    assert params["visual"]["patch_embed"]["kernel"].shape == (16, 16, 3, 768)
    assert "bias" not in params["visual"]["patch_embed"]
    assert params["visual"]["pos_embedding"].shape == (197, 768)
    assert params["visual"]["proj"].shape == (768, 512)
    assert params["text"]["token_embedding"]["embedding"].shape == (49408, 512)
    assert params["text"]["pos_embedding"].shape == (77, 512)
    assert params["logit_scale"].shape == ()


def test_every_parameter_has_logical_axis_names():
    boxed = abstract_params(clip.get_variant("tiny"))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim, leaf


@pytest.fixture(scope="module")
def tiny():
    config = clip.get_variant("tiny")
    model = clip.CLIP(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), *clip.dummy_inputs(config))["params"])
    return model, params


def test_embeddings_are_unit_norm(tiny):
    model, params = tiny
    images = jax.random.normal(jax.random.key(1), (3, 40, 40, 3))
    tokens = jnp.array([[2, 5, 6, 3] + [0] * 12] * 3)
    image_emb, text_emb, scale, bias = model.apply({"params": params}, images, tokens)
    assert image_emb.shape == text_emb.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    assert float(bias) == 0.0  # no SigLIP bias on a softmax-loss model


def test_end_of_text_index_is_last_non_pad_token():
    tokens = jnp.array([[2, 5, 6, 7, 3, 0, 0], [2, 3, 0, 0, 0, 0, 0], [2, 5, 0, 9, 3, 0, 0], [0] * 7])
    np.testing.assert_array_equal(text.end_of_text_index(tokens, 0), [4, 1, 4, 0])


def test_text_feature_is_taken_at_end_of_text(tiny):
    model, params = tiny
    encode = lambda t: model.apply({"params": params}, jnp.array(t), method=clip.CLIP.encode_text)
    pad = [0] * 11
    base = encode([[2, 5, 6, 7, 3] + pad])
    # A token before EOS matters; the pooled feature moves with the EOS.
    assert float(jnp.max(jnp.abs(base - encode([[2, 5, 9, 7, 3] + pad])))) > 1e-4
    assert float(jnp.max(jnp.abs(base - encode([[2, 5, 6, 7, 8, 3] + pad[1:]])))) > 1e-4


def test_text_attention_is_causal(tiny):
    model, params = tiny

    # Every row of the blocks but the last (which computes only the pooled row): [B, L, D].
    block = f"block_{model.config.text.layers - 2}"

    def hidden(tokens):
        _, state = model.apply(
            {"params": params},
            jnp.array(tokens),
            method=clip.CLIP.encode_text,
            capture_intermediates=lambda mdl, _: mdl.name == block,
            mutable=["intermediates"],
        )
        return state["intermediates"]["text"]["transformer"][block]["__call__"][0][0]

    tokens = [2, 5, 6, 7, 8, 9, 10, 3] + [0] * 8
    altered = list(tokens)
    altered[5] = 11
    diff = jnp.max(jnp.abs(hidden([tokens]) - hidden([altered])), axis=-1)  # [L]
    assert float(jnp.max(diff[:5])) == 0.0  # positions before the change do not see it
    assert float(jnp.min(diff[5:8])) > 1e-5  # positions from it on do


def test_quick_gelu_matches_formula():
    x = jnp.linspace(-4, 4, 9)
    np.testing.assert_allclose(layers.quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6)


def test_logit_scale_clamp():
    params = {"logit_scale": jnp.float32(6.0), "visual": {}}
    assert float(clip.clamp_logit_scale(params)["logit_scale"]) == pytest.approx(math.log(100), rel=1e-6)
    params = {"logit_scale": jnp.float32(2.0)}
    assert float(clip.clamp_logit_scale(params)["logit_scale"]) == 2.0


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="config.model.variant='ViT-X/99'"):
        clip.get_variant("ViT-X/99")
