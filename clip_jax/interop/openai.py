"""OpenAI's CLIP state-dict layout, which open_clip keeps (ResNet image towers: `openai_resnet`).

Differences from ours: PyTorch ``nn.MultiheadAttention`` with q/k/v fused in
``in_proj_weight`` [3D, D], Linear weights [out, in], conv weights OIHW, and the
two projections stored as [width, embed_dim] matrices (used as ``x @ proj``).

The state dict does not record the number of heads or the activation. `clip_config`
takes them from ``open_clip_config.json`` beside the weights, an open_clip model name
or the user's `overrides.Overrides`; without any, only OpenAI's own shapes (`OPENAI_MODELS`,
where heads = width // 64 and QuickGELU are right) load, and anything else is refused:
ViT-H/14's 1280 wide tower has 16 heads of 80, not 20 of 64, and LAION/DataComp models
use GELU.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping

import numpy as np

from clip_jax.interop import mapping, open_clip, openai_resnet, overrides
from clip_jax.interop.mapping import TensorMap
from clip_jax.interop.overrides import Overrides, OverridesError
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


def _num_blocks(tensors: Mapping[str, object], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _text_shapes(embed: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        "token_embedding.weight": (49408, width),
        "positional_embedding": (77, width),
        "transformer.resblocks.11.mlp.c_fc.weight": (4 * width, width),
        "ln_final.weight": (width,),
        "text_projection": (width, embed),
    }


def _vit_shapes(embed: int, image: int, patch: int, width: int, layers: int, text: int) -> dict:
    return {
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.positional_embedding": ((image // patch) ** 2 + 1, width),
        f"visual.transformer.resblocks.{layers - 1}.mlp.c_fc.weight": (4 * width, width),
        "visual.proj": (width, embed),
        "__blocks__": (layers, 12),  # vision, text: no block more
        **_text_shapes(embed, text),
    }


def _resnet_shapes(embed: int, image: int, depths: tuple[int, ...], width: int, text: int) -> dict:
    stages = {
        f"visual.layer{s + 1}.{n - 1}.conv1.weight": (width * 2**s, width * 2**s * (4 if n > 1 else 1), 1, 1)
        for s, n in enumerate(depths)
    }
    stages["visual.layer1.0.conv1.weight"] = (width, width, 1, 1)
    return {
        **stages,
        "visual.attnpool.positional_embedding": ((image // 32) ** 2 + 1, width * 32),
        "visual.attnpool.c_proj.weight": (embed, width * 32),
        "__blocks__": (depths, 12),
        **_text_shapes(embed, text),
    }


# OpenAI's released models (clip/clip.py _MODELS; shapes from clip/model.py build_model).
OPENAI_MODELS: dict[str, dict] = {
    "ViT-B/32": _vit_shapes(512, 224, 32, 768, 12, 512),
    "ViT-B/16": _vit_shapes(512, 224, 16, 768, 12, 512),
    "ViT-L/14": _vit_shapes(768, 224, 14, 1024, 24, 768),
    "ViT-L/14@336px": _vit_shapes(768, 336, 14, 1024, 24, 768),
    "RN50": _resnet_shapes(1024, 224, (3, 4, 6, 3), 64, 512),
    "RN101": _resnet_shapes(512, 224, (3, 4, 23, 3), 64, 512),
    "RN50x4": _resnet_shapes(640, 288, (4, 6, 10, 6), 80, 640),
    "RN50x16": _resnet_shapes(768, 384, (6, 8, 18, 8), 96, 768),
    "RN50x64": _resnet_shapes(1024, 448, (3, 15, 36, 10), 128, 1024),
}
# Entries only OpenAI's TorchScript archives have: the weights are OpenAI's own.
OPENAI_ARCHIVE_KEYS = ("input_resolution", "context_length", "vocab_size")


def openai_model(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The OpenAI model whose exact shapes ``shapes`` ({state-dict key: shape}) has, else None."""
    blocks = _num_blocks(shapes, "visual."), _num_blocks(shapes, "")
    if openai_resnet.is_resnet(shapes):
        blocks = tuple(openai_resnet.stage_depth(shapes, s) for s in (1, 2, 3, 4)), blocks[1]
    for name, expected in OPENAI_MODELS.items():
        if expected["__blocks__"] == blocks and all(
            tuple(shapes.get(key, ())) == shape for key, shape in expected.items() if key != "__blocks__"
        ):
            return name
    return None


def _vit_config(tensors: Mapping[str, np.ndarray], heads: int, activation: str) -> VisionConfig:
    conv = tensors["visual.conv1.weight"]  # [width, 3, patch, patch]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((tensors["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=_num_blocks(tensors, "visual."),
        heads=heads,
        mlp_ratio=tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        activation=activation,
    )


def _shape_config(tensors: Mapping[str, np.ndarray], known: Overrides) -> CLIPConfig:
    """The `CLIPConfig` of the tensors' shapes with the heads and activation of ``known``."""
    text_width = tensors["ln_final.weight"].shape[0]
    if openai_resnet.is_resnet(tensors):
        vision = openai_resnet.vision_config(tensors, known.vision_heads)
    else:
        vision = _vit_config(tensors, known.vision_heads, known.activation)
    text = TextConfig(
        vocab_size=tensors["token_embedding.weight"].shape[0],
        context_length=tensors["positional_embedding"].shape[0],
        width=text_width,
        layers=_num_blocks(tensors, ""),
        heads=known.text_heads,
        mlp_ratio=tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        activation=known.activation,
    )
    config = CLIPConfig(embed_dim=tensors["text_projection"].shape[1], vision=vision, text=text)
    if "logit_bias" in tensors:  # SigLIP-trained: the model needs its bias parameter
        config = dataclasses.replace(config, logit_bias_init=float(tensors["logit_bias"]))
    return config


def _sizes(config: CLIPConfig) -> dict[str, object]:
    v, t = config.vision, config.text
    found = {"embed_dim": config.embed_dim, "vision.width": v.width, "vision.image_size": v.image_size}
    found["vision.layers"] = tuple(v.layers) if isinstance(v, ResNetConfig) else v.layers
    found.update({f"text.{k}": getattr(t, k) for k in ("width", "layers", "context_length", "vocab_size")})
    if isinstance(v, VisionConfig):
        found["vision.patch_size"] = v.patch_size
    return found


def _shipped(tensors: Mapping, folder: str | None, given: Overrides, sizes: dict) -> Overrides:
    """What open_clip_config.json in ``folder`` and ``given.open_clip_model`` say, then ``given``."""
    known, resnet, source = Overrides(), openai_resnet.is_resnet(tensors), None
    if folder is not None and (shipped := open_clip.read_config(folder)):
        source, model_cfg = shipped
        open_clip.check_shapes(model_cfg, sizes, source)
        known = open_clip.facts(model_cfg, resnet, source)
    if name := given.open_clip_model:
        named = open_clip.named_config(name)
        open_clip.check_shapes(named, sizes, f"open_clip_model={name!r}")
        known = overrides.merge(known, open_clip.facts(named, resnet, f"open_clip_model={name!r}"), source)
        source = source or f"open_clip_model={name!r}"
    return overrides.merge(known, dataclasses.replace(given, open_clip_model=None), source)


def clip_config(
    tensors: Mapping[str, np.ndarray], folder: str | None = None, given: Overrides | None = None
) -> CLIPConfig:
    """The `CLIPConfig` of an OpenAI-layout state dict: sizes from its tensor shapes, heads and
    activation from ``FOLDER/open_clip_config.json``, ``given`` (overrides; a contradiction is
    an error), or, for OpenAI's own shapes, OpenAI's rule (heads = width // 64, QuickGELU).
    Raises `OverridesError` naming the overrides to pass when they stay undetermined."""
    sizes = _sizes(_shape_config(tensors, Overrides(1, 1, "gelu")))
    known = _shipped(tensors, folder, given or Overrides(), sizes)
    missing = [f for f in ("vision_heads", "text_heads", "activation") if getattr(known, f) is None]
    if missing and (name := openai_model({k: tuple(v.shape) for k, v in tensors.items()})):
        known = dataclasses.replace(_openai_facts(tensors), **known.given())  # the user's win
        if "activation" in missing and not any(k in tensors for k in OPENAI_ARCHIVE_KEYS):
            warnings.warn(
                f"OpenAI {name} shapes: assuming OpenAI's QuickGELU; LAION/DataComp weights of "
                "these shapes use GELU (pass overrides activation=gelu, or keep open_clip_config.json)",
                stacklevel=2,
            )
    elif missing:
        raise OverridesError(_undetermined(sizes, missing))
    config = _shape_config(tensors, known)
    for tower, width, heads in (("vision", _attention_width(config), known.vision_heads),
                                ("text", config.text.width, known.text_heads)):  # fmt: skip
        if width % heads:
            raise OverridesError(f"{tower}_heads={heads} does not divide the {tower} width {width}")
    return config


def _attention_width(config: CLIPConfig) -> int:
    v = config.vision
    return v.width * 32 if isinstance(v, ResNetConfig) else v.width


def _openai_facts(tensors: Mapping[str, np.ndarray]) -> Overrides:
    config = _shape_config(tensors, Overrides(1, 1, "quick_gelu"))
    return Overrides(_attention_width(config) // HEAD_WIDTH, config.text.width // HEAD_WIDTH, "quick_gelu")


def _undetermined(sizes: dict, missing: list[str]) -> str:
    python = {"vision_heads": "N", "text_heads": "N", "activation": "'gelu'"}
    flag = {"vision_heads": "N", "text_heads": "N", "activation": "gelu"}
    return (
        f"the weights do not record {', '.join(missing)} (vision width {sizes['vision.width']}, "
        f"text width {sizes['text.width']}; not one of OpenAI's models, so heads = width // 64 and "
        "QuickGELU would be a guess): keep open_clip_config.json beside the weights, or pass "
        f"overrides=dict({', '.join(f'{f}={python[f]}' for f in missing)}) / "
        f"--weights_overrides={','.join(f'{f}={flag[f]}' for f in missing)} "
        "(or open_clip_model=NAME, e.g. ViT-H-14)"
    )
