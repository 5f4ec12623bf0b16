"""SigLIP towers against transformers' SiglipModel on the same random weights, both ways
(HF -> clip_jax through an HF directory; clip_jax -> HF through `files.save`), float32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clip_jax.inference import CLIPModel
from clip_jax.interop import files, hf_siglip
from clip_jax.models import clip

# Three small shapes: (vision: image, patch, width, layers, heads, mlp), (text: width, layers, heads, mlp).
SHAPES = {
    "head_width_16": ((32, 8, 64, 2, 4, 96), (64, 2, 4, 128)),
    "head_width_24_narrow_text": ((28, 14, 48, 1, 2, 128), (32, 2, 2, 80)),
    "head_width_12": ((24, 4, 96, 3, 8, 200), (96, 1, 6, 96)),
}
VOCAB, CONTEXT = 100, 12


def hf_config(name):
    (size, patch, width, layers, heads, mlp), (t_width, t_layers, t_heads, t_mlp) = SHAPES[name]
    return transformers.SiglipConfig(
        vision_config=dict(
            image_size=size, patch_size=patch, hidden_size=width, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=mlp,
        ),
        text_config=dict(
            vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=t_width,
            num_hidden_layers=t_layers, num_attention_heads=t_heads, intermediate_size=t_mlp,
            projection_size=width, bos_token_id=None, eos_token_id=1, pad_token_id=1,
        ),
    )  # fmt: skip


def randomised(model):
    """Every weight (LayerNorms, biases, probe, temperature) drawn at random, so none is trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def inputs(size):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, size, size, 3)).astype(np.float32)  # NHWC
    tokens = rng.integers(0, VOCAB, (4, CONTEXT)).astype(np.int32)
    return images, tokens


def hf_outputs(model, images, tokens):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        )
    norm = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()
    return norm(out.image_embeds), norm(out.text_embeds), out.logits_per_image.numpy()


def our_outputs(config, params, images, tokens):
    image_emb, text_emb, scale, bias = clip.CLIP(config).apply(
        {"params": jax.tree.map(jnp.asarray, params)}, images, tokens
    )
    return np.asarray(image_emb), np.asarray(text_emb), np.asarray(scale * image_emb @ text_emb.T + bias)


def max_diffs(ours, theirs):
    return [float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs, strict=True)]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_outputs_equal_hf_siglip_both_ways(name, tmp_path):
    # HF -> clip_jax: transformers' directory read by files.load.
    model = randomised(transformers.SiglipModel(hf_config(name)))
    model.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
    config, params = files.load(str(tmp_path / "hf"))
    assert hf_siglip.is_siglip(config)
    images, tokens = inputs(config.vision.image_size)
    diffs = max_diffs(our_outputs(config, params, images, tokens), hf_outputs(model, images, tokens))
    print(name, "HF -> clip_jax max |diff| image, text, logits:", diffs)
    assert max(diffs[:2]) < 2e-6 and diffs[2] < 2e-5
    # clip_jax -> HF: our (perturbed) init written by files.save, read by transformers.
    params = nn.meta.unbox(clip.CLIP(config).init(jax.random.key(3), images, tokens)["params"])
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(4), x.shape), params)
    files.save(str(tmp_path / "ours"), params, config, "hf", eos_id=1, bos_id=0)
    hf_model = transformers.SiglipModel.from_pretrained(tmp_path / "ours").eval()
    diffs = max_diffs(our_outputs(config, params, images, tokens), hf_outputs(hf_model, images, tokens))
    print(name, "clip_jax -> HF max |diff| image, text, logits:", diffs)
    assert max(diffs[:2]) < 2e-6 and diffs[2] < 2e-5


def test_named_siglip_variant_exports_as_siglip_config():
    config = clip.get_variant("SigLIP-So400m/14-384")
    hf_json = hf_siglip.hf_config(config, 0.0, eos_id=1, bos_id=0)
    round_trip = hf_siglip.clip_config(hf_json)
    assert round_trip.vision == config.vision and round_trip.text.width == config.text.width
    assert hf_json["vision_config"]["intermediate_size"] == 4304
    assert hf_json["text_config"]["hidden_act"] == "gelu_pytorch_tanh"


def test_a_clip_layout_is_refused_as_siglip():
    with pytest.raises(ValueError, match="SigLIP towers"):
        hf_siglip.tensor_maps(clip.get_variant("tiny"))


def test_probabilities_are_siglips_per_pair_sigmoid(tmp_path):
    """A SigLIP model's `CLIPModel.probabilities` equal transformers' sigmoid(logits_per_image):
    per pair, not normalised over the texts; a CLIP model's stay a softmax over the texts."""
    name = "head_width_16"
    model = randomised(transformers.SiglipModel(hf_config(name)))
    with torch.no_grad():  # a bias that matters (rows summing to neither 1 nor 0)
        model.logit_bias.fill_(-2.5)
        model.logit_scale.fill_(np.log(20.0))
    model.save_pretrained(tmp_path / "hf")
    config, params = files.load(str(tmp_path / "hf"))
    images, tokens = inputs(config.vision.image_size)
    image_emb, text_emb, _ = our_outputs(config, params, images, tokens)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        )
    expected = torch.sigmoid(out.logits_per_image).numpy()  # [images, texts]
    ours = CLIPModel(clip.CLIP(config), params, None, "hf").probabilities(image_emb, text_emb)
    print("SigLIP probabilities: clip_jax vs transformers max |diff|", np.max(np.abs(ours - expected)))
    np.testing.assert_allclose(ours, expected, atol=2e-6)
    assert np.all(np.abs(expected.sum(axis=1) - 1) > 0.05)  # not a softmax over the texts
    # The same embeddings through a model without a bias: softmax over the texts.
    no_bias = {k: v for k, v in params.items() if k != "logit_bias"}
    softmax = CLIPModel(clip.CLIP(config), no_bias, None, "x").probabilities(image_emb, text_emb)
    logits = np.exp(float(params["logit_scale"])) * image_emb @ text_emb.T
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, expected, rtol=1e-5)
