"""Model shapes from the config: named variants' parameter counts (``jax.eval_shape``
only) against the reference implementations, per-field overrides, and their checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import recipe, validation
from clip_jax.config_defaults import base_config
from clip_jax.interop import files
from clip_jax.models import clip, layers, shapes

# Parameters of transformers 5's CLIPModel / SiglipModel built on the meta device
# (``with torch.device("meta"): SiglipModel(cfg)``; sum of numel, logit scale/bias included).
# open_clip (CLIPModel, vocab 49,408, 77 tokens, hidden_act "gelu", its model configs):
#   H/14: vision 1280 wide, 32 layers, 16 heads, MLP 5120; text 1024/24/16, MLP 4096; projection 1024
#   g/14: vision 1408/40/16, MLP 6144; text 1024/24/16; projection 1024
#   bigG/14: vision 1664/48/16, MLP 8192; text 1280/32/20, MLP 5120; projection 1280
# (open_clip's own counts are the same: its towers have no projection bias in these configs.)
# SigLIP (SiglipModel, HF defaults: gelu_pytorch_tanh, eps 1e-6, MAP head; text vocab 32,000,
# 64 tokens, projection_size = width; vision and text towers of the same shape):
#   B/16: 768 wide, 12 layers, 12 heads, MLP 3072, at 224/256/384 px
#   L/16: 1024/24/16, MLP 4096, 256 px; So400m/14: 1152/27/16, MLP 4304, 384 px (27 x 27 patches)
REFERENCE_COUNTS = {
    "ViT-H/14": 986_109_441,
    "ViT-g/14": 1_366_678_273,
    "ViT-bigG/14": 2_539_567_105,
    "SigLIP-B/16": 203_155_970,
    "SigLIP-B/16-256": 203_202_050,
    "SigLIP-B/16-384": 203_447_810,
    "SigLIP-L/16-256": 652_150_786,
    "SigLIP-So400m/14-384": 877_960_498,
}


def abstract_params(config):
    model = clip.CLIP(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *clip.dummy_inputs(config)))["params"]
    return nn.meta.unbox(boxed)


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_parameter_count_equals_the_reference(name):
    params = abstract_params(clip.get_variant(name))
    assert sum(x.size for x in jax.tree.leaves(params)) == REFERENCE_COUNTS[name]


def test_so400m_shapes():
    params = abstract_params(clip.get_variant("SigLIP-So400m/14-384"))
    visual = params["visual"]
    assert visual["pos_embedding"].shape == (729, 1152)  # no class token
    assert "class_token" not in visual and "ln_pre" not in visual and "proj" not in visual
    assert visual["patch_embed"]["bias"].shape == (1152,)
    assert visual["map_head"]["attn"]["query"]["kernel"].shape == (1152, 16, 72)
    assert visual["transformer"]["block_0"]["mlp"]["fc"]["kernel"].shape == (1152, 4304)
    assert params["text"]["proj_bias"].shape == (1152,)


def config_with(variant="tiny", **sections):
    c = base_config()
    c.model.variant = variant
    for name, fields in sections.items():
        c.model[name] = fields
    return c


def test_overrides_replace_fields_of_the_variant():
    c = config_with(vision=dict(head_width=16, mlp_dim=200, pooling="map", class_token=False))
    c.model.text.causal, c.model.embed_dim = False, 64
    shape = recipe.model_shape(c)
    assert (shape.vision.heads, shape.vision.mlp_hidden, shape.embed_dim) == (8, 200, 64)
    assert shape.vision.layers == clip.get_variant("tiny").vision.layers  # untouched fields stay
    params = abstract_params(shape)
    assert params["visual"]["pos_embedding"].shape == (25, 128)
    assert params["visual"]["map_head"]["attn"]["key"]["kernel"].shape == (128, 8, 16)


def test_no_override_is_the_variant_itself():
    assert recipe.model_shape(config_with()) == clip.get_variant("tiny")


@pytest.mark.parametrize(
    "sections, field",
    [
        (dict(vision=dict(head_width=48)), "config.model.vision.head_width"),
        (dict(vision=dict(widht=3)), "config.model.vision.widht"),
        (dict(text=dict(activation="relu")), "config.model.text.activation"),
        (dict(text=dict(pooling="first")), "config.model.text.pooling"),
        (dict(vision=dict(class_token=False)), "config.model.vision.pooling"),
        (dict(vision=dict(projection=False, width=64)), "config.model.vision.projection"),
        (dict(vision=dict(norm_eps=0.0)), "config.model.vision.norm_eps"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_field(sections, field):
    with pytest.raises(validation.ConfigError) as error:
        validation.check_config(config_with(**sections))
    assert str(error.value).startswith(field) and "\n" not in str(error.value)


def test_resnet_shapes_refuse_vit_fields():
    with pytest.raises(validation.ConfigError, match="ResNet"):
        validation.check_config(config_with("tiny-rn", vision=dict(width=64)))


def test_tanh_gelu_matches_formula():
    x = jnp.linspace(-4, 4, 101)
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(layers.ACTIVATIONS["gelu_tanh"](x), want, atol=1e-6)


def test_mean_pooling_is_the_mean_of_the_patch_tokens():
    config = shapes.with_overrides(clip.get_variant("tiny"), dict(pooling="mean", projection=False), {}, 128)
    images = jax.random.normal(jax.random.key(1), (2, 40, 40, 3))
    model = clip.CLIP(config)
    variables = model.init(jax.random.key(0), images, jnp.zeros((2, 16), jnp.int32))
    pooled, state = model.apply(
        variables, images, method=lambda m, x: m.visual(x), capture_intermediates=True
    )
    tokens = state["intermediates"]["visual"]["ln_post"]["__call__"][0]  # [B, 1 + N, D]
    np.testing.assert_allclose(pooled, tokens[:, 1:].mean(axis=1), atol=1e-6)


def test_layouts_that_cannot_hold_the_towers_are_refused():
    config = clip.get_variant("SigLIP-B/16")
    with pytest.raises(ValueError, match="open_clip format"):
        files.external_tensors({}, config, "open_clip")
    config = shapes.with_overrides(clip.get_variant("tiny"), {}, dict(causal=False))
    with pytest.raises(ValueError, match="text.causal=False"):
        files.external_tensors({}, config, "hf")
