"""A model's shape from a named variant plus per-field overrides, and the checks on it.

``config.model.vision`` / ``config.model.text`` (dicts; None values are ignored) replace
fields of the variant's `VisionConfig` / `TextConfig`; ``head_width`` may be given
instead of ``heads``. Errors are ValueError naming the field as ``config.model.<tower>.<field>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from clip_jax.models import layers, text, vit
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.clip import get_variant as clip_variant
from clip_jax.models.resnet import ResNetConfig

# Overrides that are not dataclass fields: the head width (heads = width // head_width).
EXTRA_FIELDS = ("head_width",)


def _replace(tower: Any, overrides: Mapping[str, Any], section: str) -> Any:
    known = {f.name for f in dataclasses.fields(tower)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for name in overrides:
        if name not in known and name not in EXTRA_FIELDS:
            fields = sorted(known | set(EXTRA_FIELDS))
            raise ValueError(f"config.{section}.{name} is not a field; known: {fields}")
    head_width = overrides.pop("head_width", None)
    tower = dataclasses.replace(tower, **overrides)
    if head_width is not None:
        if head_width <= 0 or tower.width % head_width:
            raise ValueError(f"config.{section}.head_width={head_width} must divide width={tower.width}")
        if "heads" in overrides and overrides["heads"] * head_width != tower.width:
            raise ValueError(f"config.{section}.head_width={head_width} contradicts heads={tower.heads}")
        tower = dataclasses.replace(tower, heads=tower.width // head_width)
    return tower


def with_overrides(
    config: CLIPConfig,
    vision: Mapping[str, Any] | None = None,
    text_tower: Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
) -> CLIPConfig:
    """``config`` with fields of its towers (and ``embed_dim``) replaced, then `check`-ed."""
    if vision and any(v is not None for v in vision.values()) and isinstance(config.vision, ResNetConfig):
        raise ValueError("config.model.vision shapes a ViT; this variant's image tower is a ResNet")
    if not isinstance(config.vision, ResNetConfig):
        config = dataclasses.replace(config, vision=_replace(config.vision, vision or {}, "model.vision"))
    config = dataclasses.replace(config, text=_replace(config.text, text_tower or {}, "model.text"))
    if embed_dim is not None:
        config = dataclasses.replace(config, embed_dim=embed_dim)
    check(config)
    return config


def _positive(section: str, tower: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(tower, name)
        if value is not None and not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"config.{section}.{name}={value!r} must be > 0")


def _check_transformer(section: str, tower: Any) -> None:
    _positive(section, tower, ("width", "layers", "heads", "mlp_ratio", "mlp_dim", "norm_eps"))
    if tower.width % tower.heads:
        raise ValueError(f"config.{section}.heads={tower.heads} must divide width={tower.width}")
    if tower.activation not in layers.ACTIVATIONS:
        known = sorted(layers.ACTIVATIONS)
        raise ValueError(f"config.{section}.activation={tower.activation!r}: one of {known}")


def check(config: CLIPConfig) -> None:
    """Raises ValueError naming the first field of ``config`` that cannot build a model."""
    _positive("model", config, ("embed_dim",))
    t = config.text
    _check_transformer("model.text", t)
    _positive("model.text", t, ("vocab_size", "context_length"))
    if t.pooling not in text.POOLINGS:
        raise ValueError(f"config.model.text.pooling={t.pooling!r}: one of {text.POOLINGS}")
    v = config.vision
    if isinstance(v, ResNetConfig):
        return
    _check_transformer("model.vision", v)
    _positive("model.vision", v, ("image_size", "patch_size"))
    if v.image_size < v.patch_size:  # a remainder is cropped, as by OpenAI's and big_vision's conv
        raise ValueError(f"config.model.vision.patch_size={v.patch_size} exceeds image_size={v.image_size}")
    if v.pooling not in vit.POOLINGS:
        raise ValueError(f"config.model.vision.pooling={v.pooling!r}: one of {vit.POOLINGS}")
    if v.pooling == "class_token" and not v.class_token:
        raise ValueError("config.model.vision.pooling='class_token' needs class_token=True")
    if not v.projection and v.width != config.embed_dim:
        raise ValueError(
            f"config.model.vision.projection=False needs width={v.width} == config.model.embed_dim="
            f"{config.embed_dim}"
        )


# OpenAI's CLIP layout (what the open_clip and HF CLIPModel formats hold), field by field.
OPENAI_VISION = dict(pooling="class_token", class_token=True, patch_bias=False, ln_pre=True, projection=True)
OPENAI_TEXT = dict(causal=True, pooling="eot", proj_bias=False)


def openai_layout_differences(config: CLIPConfig) -> list[str]:
    """The tower fields of ``config`` that OpenAI's CLIP layout cannot hold (empty: it can)."""
    out = [
        f"text.{k}={getattr(config.text, k)!r}"
        for k, x in OPENAI_TEXT.items()
        if getattr(config.text, k) != x
    ]
    if isinstance(config.vision, ResNetConfig):
        return out
    vision = config.vision
    out += [f"vision.{k}={getattr(vision, k)!r}" for k, x in OPENAI_VISION.items() if getattr(vision, k) != x]
    out += ["vision.proj_bias=True"] if vision.proj_bias else []
    return out


def from_sections(
    variant: str,
    vision: Mapping[str, Any] | None = None,
    text_tower: Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
    **text_fields: Any,
) -> CLIPConfig:
    """The named variant with ``text_fields`` (vocab_size, context_length; None: the
    variant's) and then the per-field overrides of `with_overrides`."""
    config = clip_variant(variant, **text_fields)
    as_dict = lambda m: dict(m.to_dict() if hasattr(m, "to_dict") else m) if m is not None else {}
    return with_overrides(config, as_dict(vision), as_dict(text_tower), embed_dim)
