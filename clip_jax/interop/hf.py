"""The Hugging Face transformers `CLIPModel` layout: tensor names and ``config.json``.

HF's CLIP is OpenAI's with separate q/k/v projections (as ours) and PyTorch
Linear weights ([out, in]). Text pooling: HF takes the first position of
``eos_token_id``; clip_jax takes the last non-pad token. Our tokenizers write
``[BOS, ..., EOS, PAD=0 ...]``, where the two are the same position, so the
exported config carries the tokenizer's EOS id (3 for our sentencepiece
models, 49407 for OpenAI's BPE). Never 2: HF reads ``eos_token_id == 2`` as its
legacy "argmax of the ids" rule.
"""

from __future__ import annotations

import re
from typing import Any

from clip_jax.interop import mapping
from clip_jax.interop.mapping import TensorMap
from clip_jax.models import shapes
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.layers import LAYER_NORM_EPS
from clip_jax.models.text import TextConfig
from clip_jax.models.vit import VisionConfig

# Our activation names that HF spells otherwise.
ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh"}
# Buffers some older HF checkpoints saved; they hold nothing learned.
IGNORED = re.compile(r"(^|\.)position_ids$")


def encoder_blocks(prefix: str, path: str, layers: int, heads: int) -> list[TensorMap]:
    maps = []
    for i in range(layers):
        key, block = f"{prefix}.encoder.layers.{i}", f"{path}/transformer/block_{i}"
        for hf_name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            maps.append(
                mapping.heads_in(f"{key}.self_attn.{hf_name}.weight", f"{block}/attn/{ours}/kernel", heads)
            )
            maps.append(
                mapping.heads_bias(f"{key}.self_attn.{hf_name}.bias", f"{block}/attn/{ours}/bias", heads)
            )
        maps.append(mapping.heads_out(f"{key}.self_attn.out_proj.weight", f"{block}/attn/out/kernel", heads))
        maps.append(mapping.same(f"{key}.self_attn.out_proj.bias", f"{block}/attn/out/bias"))
        maps += mapping.layer_norm(f"{key}.layer_norm1", f"{block}/ln_1")
        maps += mapping.layer_norm(f"{key}.layer_norm2", f"{block}/ln_2")
        for hf_name, ours in (("fc1", "fc"), ("fc2", "proj")):
            maps.append(mapping.transposed(f"{key}.mlp.{hf_name}.weight", f"{block}/mlp/{ours}/kernel"))
            maps.append(mapping.same(f"{key}.mlp.{hf_name}.bias", f"{block}/mlp/{ours}/bias"))
    return maps


def tensor_maps(config: CLIPConfig) -> list[TensorMap]:
    """Every tensor of HF's ``CLIPModel`` state dict, from the clip_jax params of ``config``."""
    v, t = config.vision, config.text
    if not isinstance(v, VisionConfig):
        raise ValueError(
            "transformers' CLIPModel has no ResNet image tower; export RN models as open_clip or params"
        )
    if differences := shapes.openai_layout_differences(config):
        raise ValueError(f"transformers' CLIPModel cannot hold {differences}; export as params")
    maps = [
        mapping.conv("vision_model.embeddings.patch_embedding.weight", "visual/patch_embed/kernel"),
        mapping.same("vision_model.embeddings.class_embedding", "visual/class_token"),
        mapping.same("vision_model.embeddings.position_embedding.weight", "visual/pos_embedding"),
        *mapping.layer_norm("vision_model.pre_layrnorm", "visual/ln_pre"),  # sic: HF's spelling
        *encoder_blocks("vision_model", "visual", v.layers, v.heads),
        *mapping.layer_norm("vision_model.post_layernorm", "visual/ln_post"),
        mapping.transposed("visual_projection.weight", "visual/proj"),
        mapping.same("text_model.embeddings.token_embedding.weight", "text/token_embedding/embedding"),
        mapping.same("text_model.embeddings.position_embedding.weight", "text/pos_embedding"),
        *encoder_blocks("text_model", "text", t.layers, t.heads),
        *mapping.layer_norm("text_model.final_layer_norm", "text/ln_final"),
        mapping.transposed("text_projection.weight", "text/proj"),
        mapping.same("logit_scale", "logit_scale"),
    ]
    return maps


def _tower(tower: VisionConfig | TextConfig) -> dict[str, Any]:
    return {
        "hidden_size": tower.width,
        "intermediate_size": tower.mlp_hidden,
        "num_hidden_layers": tower.layers,
        "num_attention_heads": tower.heads,
        "hidden_act": ACTIVATIONS.get(tower.activation, tower.activation),
        "layer_norm_eps": tower.norm_eps,
        "attention_dropout": 0.0,
    }


def hf_config(config: CLIPConfig, logit_scale: float, eos_id: int, bos_id: int) -> dict[str, Any]:
    """HF's ``config.json`` for a ``CLIPModel`` of ``config`` (transformers fills the rest)."""
    if eos_id == 2:
        raise ValueError("HF reads eos_token_id == 2 as its legacy argmax pooling; use another EOS id")
    v, t = config.vision, config.text
    text = _tower(t)
    text.update(
        model_type="clip_text_model",
        vocab_size=t.vocab_size,
        max_position_embeddings=t.context_length,
        projection_dim=config.embed_dim,
        pad_token_id=t.pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    vision = _tower(v)
    vision.update(
        model_type="clip_vision_model",
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=3,
        projection_dim=config.embed_dim,
    )
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": logit_scale,
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": "float32",
    }


def _check_tower(name: str, tower: dict[str, Any]) -> tuple[float, str]:
    """(mlp_ratio, activation) of an HF tower config, or a clear error where we differ."""
    eps = tower.get("layer_norm_eps", LAYER_NORM_EPS)
    if abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise ValueError(f"{name}.layer_norm_eps={eps}: clip_jax's LayerNorm uses {LAYER_NORM_EPS}")
    activation = tower.get("hidden_act", "quick_gelu")
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"{name}.hidden_act={activation!r}: clip_jax has quick_gelu and gelu")
    return tower["intermediate_size"] / tower["hidden_size"], activation


def clip_config(hf: dict[str, Any]) -> CLIPConfig:
    """A `CLIPConfig` from an HF ``config.json`` (every field this needs is written by transformers)."""
    t, v = hf["text_config"], hf["vision_config"]
    text_ratio, text_act = _check_tower("text_config", t)
    vision_ratio, vision_act = _check_tower("vision_config", v)
    text = TextConfig(
        vocab_size=t["vocab_size"],
        context_length=t["max_position_embeddings"],
        width=t["hidden_size"],
        layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"],
        mlp_ratio=text_ratio,
        activation=text_act,
    )
    vision = VisionConfig(
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        width=v["hidden_size"],
        layers=v["num_hidden_layers"],
        heads=v["num_attention_heads"],
        mlp_ratio=vision_ratio,
        activation=vision_act,
    )
    return CLIPConfig(embed_dim=hf["projection_dim"], vision=vision, text=text)
