"""The Hugging Face transformers `SiglipModel` layout: tensor names and ``config.json``.

HF's SigLIP is big_vision's two-towers ViT: the image tower has a patch
embedding with bias, no class token, no ``ln_pre`` and an attention-pooling head
(a probe and PyTorch's MultiheadAttention, fused ``in_proj``) and no projection;
the text tower is bidirectional, pooled at the last position, with a biased
``head``. ``logit_scale`` and ``logit_bias`` are [1] tensors there, scalars here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from clip_jax import storage
from clip_jax.interop import hf, mapping
from clip_jax.interop.mapping import TensorMap
from clip_jax.models import shapes
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.text import TextConfig
from clip_jax.models.vit import VisionConfig

IGNORED = hf.IGNORED
# Our activation names <-> HF's ``hidden_act`` values.
ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
# The tower fields that make a SigLIP model, checked before export.
SIGLIP_VISION = dict(pooling="map", class_token=False, patch_bias=True, ln_pre=False, projection=False)
SIGLIP_TEXT = dict(causal=False, pooling="last", proj_bias=True)


def is_siglip(config: CLIPConfig) -> bool:
    """Whether ``config`` has SigLIP's towers (what transformers' SiglipModel can hold)."""
    v, t = config.vision, config.text
    return (
        isinstance(v, VisionConfig)
        and all(getattr(v, k) == x for k, x in SIGLIP_VISION.items())
        and all(getattr(t, k) == x for k, x in SIGLIP_TEXT.items())
        and v.norm_eps == t.norm_eps
    )


def is_siglip_dir(path: str) -> bool:
    """Whether ``path`` is an HF directory whose ``config.json`` says ``model_type`` "siglip"."""
    config_file = os.path.join(path, "config.json")
    return storage.exists(config_file) and storage.read_json(config_file).get("model_type") == "siglip"


def _scalar(key: str, path: str) -> TensorMap:
    """Our 0-d parameter <-> HF's [1] tensor."""
    return TensorMap(key, (path,), lambda x: x.reshape(1), lambda x: (x.reshape(()),))


def _probe(key: str, path: str) -> TensorMap:
    """MAP probe [D] <-> HF's [1, 1, D]."""
    return TensorMap(key, (path,), lambda x: x.reshape(1, 1, -1), lambda x: (x.reshape(-1),))


def _map_head(heads: int) -> list[TensorMap]:
    key, path = "vision_model.head", "visual/map_head"
    qkv = tuple(f"{path}/attn/{name}" for name in ("query", "key", "value"))
    return [
        _probe(f"{key}.probe", f"{path}/probe"),
        mapping.fused_qkv_weight(f"{key}.attention.in_proj_weight", tuple(f"{p}/kernel" for p in qkv), heads),
        mapping.fused_qkv_bias(f"{key}.attention.in_proj_bias", tuple(f"{p}/bias" for p in qkv), heads),
        mapping.heads_out(f"{key}.attention.out_proj.weight", f"{path}/attn/out/kernel", heads),
        mapping.same(f"{key}.attention.out_proj.bias", f"{path}/attn/out/bias"),
        *mapping.layer_norm(f"{key}.layernorm", f"{path}/ln"),
        mapping.transposed(f"{key}.mlp.fc1.weight", f"{path}/mlp/fc/kernel"),
        mapping.same(f"{key}.mlp.fc1.bias", f"{path}/mlp/fc/bias"),
        mapping.transposed(f"{key}.mlp.fc2.weight", f"{path}/mlp/proj/kernel"),
        mapping.same(f"{key}.mlp.fc2.bias", f"{path}/mlp/proj/bias"),
    ]


def tensor_maps(config: CLIPConfig) -> list[TensorMap]:
    """Every tensor of HF's ``SiglipModel`` state dict, from the clip_jax params of ``config``."""
    if not is_siglip(config):
        raise ValueError(
            f"transformers' SiglipModel needs SigLIP towers (vision {SIGLIP_VISION}, text {SIGLIP_TEXT})"
        )
    v, t = config.vision, config.text
    return [
        mapping.conv("vision_model.embeddings.patch_embedding.weight", "visual/patch_embed/kernel"),
        mapping.same("vision_model.embeddings.patch_embedding.bias", "visual/patch_embed/bias"),
        mapping.same("vision_model.embeddings.position_embedding.weight", "visual/pos_embedding"),
        *hf.encoder_blocks("vision_model", "visual", v.layers, v.heads),
        *mapping.layer_norm("vision_model.post_layernorm", "visual/ln_post"),
        *_map_head(v.heads),
        mapping.same("text_model.embeddings.token_embedding.weight", "text/token_embedding/embedding"),
        mapping.same("text_model.embeddings.position_embedding.weight", "text/pos_embedding"),
        *hf.encoder_blocks("text_model", "text", t.layers, t.heads),
        *mapping.layer_norm("text_model.final_layer_norm", "text/ln_final"),
        mapping.transposed("text_model.head.weight", "text/proj"),
        mapping.same("text_model.head.bias", "text/proj_bias"),
        _scalar("logit_scale", "logit_scale"),
        _scalar("logit_bias", "logit_bias"),
    ]


def _tower(tower: VisionConfig | TextConfig) -> dict[str, Any]:
    return {
        "hidden_size": tower.width,
        "intermediate_size": tower.mlp_hidden,
        "num_hidden_layers": tower.layers,
        "num_attention_heads": tower.heads,
        "hidden_act": ACTIVATIONS[tower.activation],
        "layer_norm_eps": tower.norm_eps,
        "attention_dropout": 0.0,
    }


def hf_config(config: CLIPConfig, logit_scale: float, eos_id: int, bos_id: int) -> dict[str, Any]:
    """HF's ``config.json`` for a ``SiglipModel`` of ``config`` (transformers fills the rest)."""
    del logit_scale  # SiglipModel keeps its temperature in the weights only
    v, t = config.vision, config.text
    text = _tower(t)
    text.update(
        model_type="siglip_text_model",
        vocab_size=t.vocab_size,
        max_position_embeddings=t.context_length,
        projection_size=config.embed_dim,
        pad_token_id=t.pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    vision = _tower(v)
    vision.update(
        model_type="siglip_vision_model",
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=3,
        vision_use_head=True,
    )
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": "float32",
    }


def _shape(name: str, tower: dict[str, Any]) -> dict[str, Any]:
    """The transformer fields of an HF tower config, or a clear error where we differ."""
    activation = tower.get("hidden_act", "gelu_pytorch_tanh")
    ours = {hf_name: name for name, hf_name in ACTIVATIONS.items()}
    if activation not in ours:
        raise ValueError(f"{name}.hidden_act={activation!r}: clip_jax has {sorted(ours)}")
    return dict(
        width=tower.get("hidden_size", 768),
        layers=tower.get("num_hidden_layers", 12),
        heads=tower.get("num_attention_heads", 12),
        mlp_dim=tower.get("intermediate_size", 3072),
        activation=ours[activation],
        norm_eps=float(tower.get("layer_norm_eps", 1e-6)),
    )


def clip_config(hf_json: dict[str, Any]) -> CLIPConfig:
    """A `CLIPConfig` from a SigLIP ``config.json`` (missing fields take transformers' defaults)."""
    t, v = hf_json.get("text_config") or {}, hf_json.get("vision_config") or {}
    if not v.get("vision_use_head", True):
        raise ValueError("vision_config.vision_use_head=false: clip_jax's SigLIP tower has the MAP head")
    text_shape = _shape("text_config", t)
    text = TextConfig(
        vocab_size=t.get("vocab_size", 32000),
        context_length=t.get("max_position_embeddings", 64),
        pad_id=t.get("pad_token_id") or 0,
        **text_shape,
        **SIGLIP_TEXT,
    )
    vision = VisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 16),
        **_shape("vision_config", v),
        **SIGLIP_VISION,
    )
    embed_dim = t.get("projection_size") or text.width
    config = CLIPConfig(embed_dim, vision, text, logit_scale_init=float(np.log(10.0)), logit_bias_init=-10.0)
    shapes.check(config)  # e.g. a text projection_size other than the image width
    return config
