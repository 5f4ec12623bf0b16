"""open_clip's configuration: ``open_clip_config.json`` beside the weights, or a model name.

open_clip's hub repositories ship ``open_clip_config.json``, whose ``model_cfg`` is the
model's JSON config (``src/open_clip/model_configs/*.json``). What this reads (open_clip's
defaults when a field is absent, from its ``CLIPVisionCfg``/``CLIPTextCfg``/``CLIP``):

- ``vision_cfg``: ``width``, ``layers``, ``patch_size``, ``image_size`` and ``head_width``
  (default 64): heads = width // head_width (a ResNet's attention pool: width * 32 // head_width);
- ``text_cfg``: ``width``, ``layers``, ``heads`` (default 8), ``context_length``, ``vocab_size``;
- ``embed_dim``, and ``quick_gelu`` (default **False**: GELU; only OpenAI-trained weights
  and the ``-quickgelu`` model names use QuickGELU).

Fields that change the computation in ways clip_jax does not implement (layer scale, other
poolings, timm or HF towers, ...) are refused, as are fields this module does not know,
unless they are off (null/false). The shapes it states are checked against the tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from clip_jax import storage
from clip_jax.interop.overrides import Overrides, OverridesError
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.vit import VisionConfig

CONFIG_FILE = "open_clip_config.json"
MAX_CONFIG_BYTES = 1 << 20
HEAD_WIDTH = 64  # open_clip's CLIPVisionCfg.head_width default
TEXT_HEADS = 8  # open_clip's CLIPTextCfg.heads default

# Harmless whatever their value (shapes are checked separately; the rest is training or tokenizer).
_FREE = {
    "model": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "cast_dtype", "output_dict"},
    "vision": {"width", "layers", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
               "output_tokens", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
               "timm_drop", "timm_drop_path"},
    "text": {"width", "layers", "heads", "mlp_ratio", "context_length", "vocab_size", "hf_tokenizer_name",
             "tokenizer_kwargs", "tokenizer_mode", "pad_id", "eos_id", "output_tokens"},
}  # fmt: skip
# Fields with the one value clip_jax computes (open_clip's default); anything else is refused.
_FIXED = {
    "model": {"custom_text": False},
    "vision": {"pool_type": "tok", "pos_embed_type": "learnable", "ls_init_value": None,
               "attentional_pool": False, "no_ln_pre": False, "final_ln_after_pool": False},
    "text": {"pool_type": "argmax", "proj_type": "linear", "proj_bias": False, "ls_init_value": None,
             "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False},
}  # fmt: skip

# open_clip model names -> (vision width, vision head width, text width, text heads); a
# "-quickgelu" suffix means QuickGELU (open_clip's model_configs).
MODELS: dict[str, tuple[int, int, int, int]] = {
    "ViT-B-32": (768, 64, 512, 8),
    "ViT-B-16": (768, 64, 512, 8),
    "ViT-B-16-plus-240": (896, 64, 640, 10),
    "ViT-L-14": (1024, 64, 768, 12),
    "ViT-L-14-336": (1024, 64, 768, 12),
    "ViT-H-14": (1280, 80, 1024, 16),
    "ViT-H-14-378": (1280, 80, 1024, 16),
    "ViT-g-14": (1408, 88, 1024, 16),
    "ViT-bigG-14": (1664, 104, 1280, 20),
    "RN50": (64, 64, 512, 8),
    "RN101": (64, 64, 512, 8),
    "RN50x4": (80, 64, 640, 10),
    "RN50x16": (96, 64, 768, 12),
    "RN50x64": (128, 64, 1024, 16),
}
QUICK_GELU_SUFFIX = "-quickgelu"


def read_config(folder: str) -> tuple[str, dict[str, Any]] | None:
    """(path, ``model_cfg``) of ``FOLDER/open_clip_config.json``, or None when there is none."""
    path = os.path.join(folder, CONFIG_FILE)
    if not storage.exists(path):
        return None
    if storage.size(path) > MAX_CONFIG_BYTES:
        raise OverridesError(f"{path}: over {MAX_CONFIG_BYTES} bytes; not an open_clip config")
    config = storage.read_json(path)
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise OverridesError(f"{path}: no model_cfg.vision_cfg; not an open_clip config")
    return path, model_cfg


def _check_fields(section: str, cfg: Mapping[str, Any], source: str) -> None:
    for name, value in cfg.items():
        if name in _FREE[section] or (name in _FIXED[section] and value == _FIXED[section][name]):
            continue
        if name not in _FIXED[section] and value in (None, False):
            continue  # a switch we do not know, off
        raise OverridesError(
            f"{source}: {section} {name}={value!r} changes the model in a way clip_jax does not implement"
        )


def facts(model_cfg: Mapping[str, Any], resnet: bool, source: str) -> Overrides:
    """Heads and activation of an open_clip ``model_cfg`` (unsupported fields refused);
    ``resnet``: the weights' image tower is a ResNet (heads of its attention pool)."""
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    _check_fields("model", model_cfg, source)
    _check_fields("vision", vision, source)
    _check_fields("text", text, source)
    if "timm_model_name" in vision or "hf_model_name" in text:
        raise OverridesError(f"{source}: a timm or HF tower, not open_clip's CLIP; clip_jax cannot run it")
    head_width = _positive_int(vision.get("head_width", HEAD_WIDTH), "vision_cfg.head_width", source)
    width = _positive_int(vision.get("width", 768), "vision_cfg.width", source) * (32 if resnet else 1)
    if width % head_width:
        raise OverridesError(f"{source}: vision width {width} is not a multiple of head_width {head_width}")
    return Overrides(
        vision_heads=width // head_width,
        text_heads=_positive_int(text.get("heads", TEXT_HEADS), "text_cfg.heads", source),
        activation="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
    )


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OverridesError(f"{source}: {name}={value!r} must be a positive integer")
    return value


def named_config(name: str) -> dict[str, Any]:
    """The part of open_clip's ``model_cfg`` for model ``name`` that fixes heads and activation."""
    base = name.removesuffix(QUICK_GELU_SUFFIX)
    if base not in MODELS:
        known = ", ".join(sorted(MODELS))
        raise OverridesError(f"open_clip_model={name!r} is not one clip_jax knows ({known}; -quickgelu too)")
    vision_width, head_width, text_width, text_heads = MODELS[base]
    return {
        "vision_cfg": {"width": vision_width, "head_width": head_width},
        "text_cfg": {"width": text_width, "heads": text_heads},
        "quick_gelu": name.endswith(QUICK_GELU_SUFFIX),
    }


def _image_size(vision: Mapping[str, Any], source: str) -> int | None:
    size = vision.get("image_size")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise OverridesError(f"{source}: image_size={size}; clip_jax's towers take square images")
        size = size[0]
    return size


def check_shapes(model_cfg: Mapping[str, Any], found: Mapping[str, Any], source: str) -> None:
    """Every size ``model_cfg`` states must be the one the tensors have (``found``: the
    `CLIPConfig` fields read from the shapes, e.g. {"vision.width": 768, "embed_dim": 512})."""
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    stated = {
        "embed_dim": model_cfg.get("embed_dim"),
        "vision.width": vision.get("width"),
        "vision.layers": tuple(layers) if isinstance(layers := vision.get("layers"), list) else layers,
        "vision.patch_size": vision.get("patch_size"),
        "vision.image_size": _image_size(vision, source),
        "text.width": text.get("width"),
        "text.layers": text.get("layers"),
        "text.context_length": text.get("context_length"),
        "text.vocab_size": text.get("vocab_size"),
    }  # fmt: skip
    for name, value in stated.items():
        if value is not None and name in found and found[name] != value:
            raise OverridesError(f"{source} says {name}={value}, the weights have {found[name]}")


def model_cfg(config: CLIPConfig) -> dict[str, Any] | None:
    """open_clip's ``model_cfg`` for ``config``, written beside an open_clip export so that it
    re-imports without overrides; None when the two transformers' activations differ (open_clip
    has one switch for both)."""
    v, t = config.vision, config.text
    activations = {t.activation} | ({v.activation} if isinstance(v, VisionConfig) else set())
    if len(activations) > 1:
        return None
    if isinstance(v, VisionConfig):
        vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                  "patch_size": v.patch_size, "head_width": v.width // v.heads,
                  "mlp_ratio": v.mlp_ratio}  # fmt: skip
    else:
        vision = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width,
                  "head_width": v.width * 32 // v.heads}  # fmt: skip
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
            "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}  # fmt: skip
    return {"embed_dim": config.embed_dim, "quick_gelu": t.activation == "quick_gelu",
            "vision_cfg": vision, "text_cfg": text}  # fmt: skip
