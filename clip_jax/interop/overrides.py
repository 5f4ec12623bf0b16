"""What a bare OpenAI-layout state dict does not record: head counts and the activation.

A state dict has the same tensor shapes for 20 heads of 64 and 16 of 80 (open_clip's
ViT-H/14), and for QuickGELU and GELU (every LAION/DataComp model), so the loader
takes these from the configuration that ships with the weights (`open_clip`), from
the user (`Overrides`), or from OpenAI's own shapes, and refuses to guess.

One format for every command, parsed here (``--weights_overrides``) and for
``config.train.init_from_overrides``: ``vision_heads=16,text_heads=16,activation=gelu``,
``open_clip_model=ViT-H-14``, or the path of a JSON file holding the same fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from clip_jax import cli, storage

ACTIVATIONS = ("quick_gelu", "gelu")
MAX_JSON_BYTES = 1 << 16  # an overrides file is a few fields
FLAG_HELP = (
    "What the weights do not record (an OpenAI/open_clip state dict without its open_clip_config.json): "
    "'vision_heads=16,text_heads=16,activation=gelu' (activation: quick_gelu|gelu), "
    "'open_clip_model=ViT-H-14', or a JSON file of these fields."
)


class OverridesError(cli.UserError, ValueError):
    """Overrides that are malformed, contradict the shipped config, or are needed and missing."""


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Facts about the weights; None: not given. ``activation`` applies to both transformers
    (open_clip's one ``quick_gelu`` switch); ``open_clip_model`` is an open_clip model name
    whose configuration (`clip_jax.interop.open_clip.MODELS`) gives the other three."""

    vision_heads: int | None = None
    text_heads: int | None = None
    activation: str | None = None
    open_clip_model: str | None = None

    def __post_init__(self):
        for name in ("vision_heads", "text_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OverridesError(f"overrides: {name}={value!r} must be a positive integer")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise OverridesError(f"overrides: activation={self.activation!r} must be one of {ACTIVATIONS}")

    def given(self) -> dict[str, Any]:
        """The fields that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


FIELDS = tuple(f.name for f in dataclasses.fields(Overrides))


def _from_mapping(fields: Mapping[str, Any], source: str) -> Overrides:
    if unknown := sorted(set(fields) - set(FIELDS)):
        raise OverridesError(f"{source}: unknown override {unknown[0]!r}; known: {', '.join(FIELDS)}")
    return Overrides(**fields)


def _parse_pairs(text: str) -> Overrides:
    fields: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = pair.partition("=")
        if not sep or not value.strip():
            raise OverridesError(f"overrides {text!r}: {pair!r} is not NAME=VALUE (e.g. vision_heads=16)")
        name, value = name.strip(), value.strip()
        if name in ("vision_heads", "text_heads"):
            if not value.isdigit():
                raise OverridesError(f"overrides {text!r}: {name}={value!r} must be a positive integer")
            fields[name] = int(value)
        else:
            fields[name] = value
    return _from_mapping(fields, f"overrides {text!r}")


def parse(text: str | None) -> Overrides:
    """``"vision_heads=16,text_heads=8,activation=gelu"`` or a JSON file of those fields -> Overrides."""
    if not text or not text.strip():
        return Overrides()
    text = text.strip()
    if "=" not in text:  # no NAME=VALUE pair: the path of a JSON file
        if not storage.exists(text):
            raise OverridesError(f"overrides file {text!r} does not exist (or write NAME=VALUE pairs)")
        if storage.size(text) > MAX_JSON_BYTES:
            raise OverridesError(f"overrides file {text!r} is over {MAX_JSON_BYTES} bytes")
        try:
            fields = storage.read_json(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OverridesError(f"overrides file {text!r} is not JSON: {e}") from None
        if not isinstance(fields, dict):
            raise OverridesError(f"overrides file {text!r} must hold a JSON object of override fields")
        return _from_mapping(fields, f"overrides file {os.path.basename(text)!r}")
    return _parse_pairs(text)


def coerce(overrides: Overrides | Mapping | str | None = None, **fields: Any) -> Overrides:
    """An `Overrides` from any accepted form (object, dict, flag text, None), plus keyword fields."""
    if isinstance(overrides, str):
        overrides = parse(overrides)
    elif isinstance(overrides, Mapping):
        overrides = _from_mapping(overrides, "overrides")
    base = (overrides or Overrides()).given()
    for name, value in fields.items():
        if value is not None and base.get(name, value) != value:
            raise OverridesError(f"overrides: {name} given twice ({base[name]!r} and {value!r})")
    return _from_mapping({**base, **{k: v for k, v in fields.items() if v is not None}}, "overrides")


def merge(recorded: Overrides, given: Overrides, source: str) -> Overrides:
    """``recorded`` (from the shipped config) completed by ``given``; a contradiction is an error."""
    fields = recorded.given()
    for name, value in given.given().items():
        if name in fields and fields[name] != value:
            raise OverridesError(
                f"{source} records {name}={fields[name]!r}, the overrides say {value!r}: "
                "drop the override (the shipped config is what the weights were trained with)"
            )
        fields.setdefault(name, value)
    return Overrides(**fields)
