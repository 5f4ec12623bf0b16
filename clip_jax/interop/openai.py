"""OpenAI's CLIP state-dict layout, which open_clip keeps (ResNet image towers: `openai_resnet`).

Differences from ours: PyTorch ``nn.MultiheadAttention`` with q/k/v fused in
``in_proj_weight`` [3D, D], Linear weights [out, in], conv weights OIHW, and the
two projections stored as [width, embed_dim] matrices (used as ``x @ proj``).

The state dict does not record the number of heads or the activation:
`clip_config` follows OpenAI's rule (heads = width // 64) and QuickGELU
unless told otherwise (open_clip's non-OpenAI ViTs use GELU).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from clip_jax.interop import mapping, openai_resnet
from clip_jax.interop.mapping import TensorMap
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.resnet import ResNetConfig
from clip_jax.models.text import TextConfig
from clip_jax.models.vit import VisionConfig

# Entries of OpenAI's JIT archives' state dicts that are not weights.
IGNORED = re.compile(
    r"^(input_resolution|context_length|vocab_size)$|(^|\.)attn_mask$|" + openai_resnet.IGNORED.pattern
)
HEAD_WIDTH = 64  # OpenAI's head dimension, for heads = width // 64


def _blocks(prefix: str, path: str, layers: int, heads: int) -> list[TensorMap]:
    maps = []
    for i in range(layers):
        key, block = f"{prefix}transformer.resblocks.{i}", f"{path}/transformer/block_{i}"
        qkv = tuple(f"{block}/attn/{name}" for name in ("query", "key", "value"))
        maps += [
            mapping.fused_qkv_weight(f"{key}.attn.in_proj_weight", tuple(f"{p}/kernel" for p in qkv), heads),
            mapping.fused_qkv_bias(f"{key}.attn.in_proj_bias", tuple(f"{p}/bias" for p in qkv), heads),
            mapping.heads_out(f"{key}.attn.out_proj.weight", f"{block}/attn/out/kernel", heads),
            mapping.same(f"{key}.attn.out_proj.bias", f"{block}/attn/out/bias"),
            *mapping.layer_norm(f"{key}.ln_1", f"{block}/ln_1"),
            *mapping.layer_norm(f"{key}.ln_2", f"{block}/ln_2"),
        ]
        for name, ours in (("c_fc", "fc"), ("c_proj", "proj")):
            maps.append(mapping.transposed(f"{key}.mlp.{name}.weight", f"{block}/mlp/{ours}/kernel"))
            maps.append(mapping.same(f"{key}.mlp.{name}.bias", f"{block}/mlp/{ours}/bias"))
    return maps


def tensor_maps(config: CLIPConfig, logit_bias: bool = False) -> list[TensorMap]:
    """Every tensor of OpenAI's ``CLIP.state_dict()``, from the clip_jax params of ``config``.

    ``logit_bias``: also SigLIP's bias (open_clip's name, ``logit_bias``). A ResNet image
    tower's BatchNorm statistics are read at ``batch_stats/...`` (`openai_resnet`).
    """
    v, t = config.vision, config.text
    visual = openai_resnet.visual_maps(v) if isinstance(v, ResNetConfig) else _vit_maps(v)
    maps = [
        *visual,
        mapping.same("token_embedding.weight", "text/token_embedding/embedding"),
        mapping.same("positional_embedding", "text/pos_embedding"),
        *_blocks("", "text", t.layers, t.heads),
        *mapping.layer_norm("ln_final", "text/ln_final"),
        mapping.same("text_projection", "text/proj"),
        mapping.same("logit_scale", "logit_scale"),
    ]
    return maps + [mapping.same("logit_bias", "logit_bias")] if logit_bias else maps


def _vit_maps(v: VisionConfig) -> list[TensorMap]:
    return [
        mapping.conv("visual.conv1.weight", "visual/patch_embed/kernel"),
        mapping.same("visual.class_embedding", "visual/class_token"),
        mapping.same("visual.positional_embedding", "visual/pos_embedding"),
        *mapping.layer_norm("visual.ln_pre", "visual/ln_pre"),
        *_blocks("visual.", "visual", v.layers, v.heads),
        *mapping.layer_norm("visual.ln_post", "visual/ln_post"),
        mapping.same("visual.proj", "visual/proj"),
    ]


def _num_blocks(tensors: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _vit_config(tensors: dict[str, np.ndarray], heads: int | None, activation: str) -> VisionConfig:
    conv = tensors["visual.conv1.weight"]  # [width, 3, patch, patch]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((tensors["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=_num_blocks(tensors, "visual."),
        heads=heads or width // HEAD_WIDTH,
        mlp_ratio=tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        activation=activation,
    )


def clip_config(
    tensors: dict[str, np.ndarray],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    activation: str = "quick_gelu",
) -> CLIPConfig:
    """The `CLIPConfig` of an OpenAI-layout state dict, from its tensor shapes.

    Heads default to width // 64 (every OpenAI and open_clip ViT; a ResNet's attention
    pool: width * 32 // 64); ``activation`` applies to both transformers.
    """
    text_width = tensors["ln_final.weight"].shape[0]
    if openai_resnet.is_resnet(tensors):
        vision = openai_resnet.vision_config(tensors, vision_heads)
    else:
        vision = _vit_config(tensors, vision_heads, activation)
    text = TextConfig(
        vocab_size=tensors["token_embedding.weight"].shape[0],
        context_length=tensors["positional_embedding"].shape[0],
        width=text_width,
        layers=_num_blocks(tensors, ""),
        heads=text_heads or text_width // HEAD_WIDTH,
        mlp_ratio=tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        activation=activation,
    )
    config = CLIPConfig(embed_dim=tensors["text_projection"].shape[1], vision=vision, text=text)
    if "logit_bias" in tensors:  # SigLIP-trained: the model needs its bias parameter
        config = dataclasses.replace(config, logit_bias_init=float(tensors["logit_bias"]))
    return config
