"""OpenAI's CLIP state-dict layout of the ResNet image tower (``ModifiedResNet``; open_clip's too).

Names: ``visual.conv1.weight``, ``visual.bn1.{weight,bias,running_mean,running_var}``
(stem convs 1-3), ``visual.layer{1-4}.{i}.conv{1-3}.weight`` / ``bn{1-3}.*`` and
``.downsample.{0,1}.*`` (the shortcut's conv and BN), ``visual.attnpool.positional_embedding``
and ``visual.attnpool.{q,k,v,c}_proj.{weight,bias}`` (Linear weights [out, in]).

BatchNorm running statistics are not parameters: the maps read and write them at
``batch_stats/...`` paths, i.e. the weights tree is ``{**params, "batch_stats":
batch_stats}`` (`merge_variables`, `split_variables`). ``num_batches_tracked`` holds
nothing a frozen BN uses: ignored on import, not written (PyTorch fills it in when
a state dict lacks it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from clip_jax.interop import mapping
from clip_jax.interop.mapping import TensorMap
from clip_jax.models import resnet
from clip_jax.models.resnet import ResNetConfig

BATCH_STATS = "batch_stats"
IGNORED = re.compile(r"\.num_batches_tracked$")


def is_resnet(tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether an OpenAI-layout state dict holds a ResNet image tower."""
    return "visual.attnpool.positional_embedding" in tensors


def merge_variables(variables: Mapping) -> dict:
    """``{"params": p, "batch_stats": s}`` -> the weights tree ``{**p, "batch_stats": s}``."""
    stats = variables.get(BATCH_STATS)
    return {**variables["params"], **({BATCH_STATS: stats} if stats is not None else {})}


def split_variables(weights: Mapping) -> dict:
    """The inverse of `merge_variables`: the ``variables`` of ``model.apply``."""
    params = {k: v for k, v in weights.items() if k != BATCH_STATS}
    return {"params": params, **({BATCH_STATS: weights[BATCH_STATS]} if BATCH_STATS in weights else {})}


def _batch_norm(key: str, path: str) -> list[TensorMap]:
    stats = f"{BATCH_STATS}/{path}"
    return [
        mapping.same(f"{key}.weight", f"{path}/scale"),
        mapping.same(f"{key}.bias", f"{path}/bias"),
        mapping.same(f"{key}.running_mean", f"{stats}/mean"),
        mapping.same(f"{key}.running_var", f"{stats}/var"),
    ]


def _conv_bn(key: str, path: str, conv: str, bn: str, conv_key: str, bn_key: str) -> list[TensorMap]:
    return [
        mapping.conv(f"{key}.{conv_key}.weight", f"{path}/{conv}/kernel"),
        *_batch_norm(f"{key}.{bn_key}", f"{path}/{bn}"),
    ]


def visual_maps(config: ResNetConfig) -> list[TensorMap]:
    """Every tensor of OpenAI's ``ModifiedResNet`` state dict (prefixed ``visual.``)."""
    maps = []
    for i in (1, 2, 3):
        maps += _conv_bn("visual", "visual", f"conv{i}", f"bn{i}", f"conv{i}", f"bn{i}")
    in_channels = config.width
    for stage, blocks in enumerate(config.layers):
        planes = config.width * 2**stage
        for b in range(blocks):
            key, path = f"visual.layer{stage + 1}.{b}", f"visual/layer{stage + 1}/block_{b}"
            for i in (1, 2, 3):
                maps += _conv_bn(key, path, f"conv{i}", f"bn{i}", f"conv{i}", f"bn{i}")
            if (stage > 0 and b == 0) or in_channels != planes * resnet.EXPANSION:
                maps += _conv_bn(
                    key, path, "downsample_conv", "downsample_bn", "downsample.0", "downsample.1"
                )
            in_channels = planes * resnet.EXPANSION
    pool, heads = "visual/attnpool", config.heads
    maps.append(mapping.same("visual.attnpool.positional_embedding", f"{pool}/pos_embedding"))
    for theirs, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        maps.append(mapping.heads_in(f"visual.attnpool.{theirs}.weight", f"{pool}/{ours}/kernel", heads))
        maps.append(mapping.heads_bias(f"visual.attnpool.{theirs}.bias", f"{pool}/{ours}/bias", heads))
    maps.append(mapping.heads_out("visual.attnpool.c_proj.weight", f"{pool}/out/kernel", heads))
    maps.append(mapping.same("visual.attnpool.c_proj.bias", f"{pool}/out/bias"))
    return maps


def stage_depth(tensors: Mapping[str, np.ndarray], stage: int) -> int:
    pattern = re.compile(rf"^visual\.layer{stage}\.(\d+)\.")
    found = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def vision_config(tensors: Mapping[str, np.ndarray], heads: int | None = None) -> ResNetConfig:
    """The `ResNetConfig` of a state dict, as OpenAI's ``build_model`` infers it.

    Heads default to OpenAI's rule width * 32 // 64.
    """
    width = tensors["visual.layer1.0.conv1.weight"].shape[0]
    grid = round((tensors["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = tuple(stage_depth(tensors, s) for s in (1, 2, 3, 4))
    return ResNetConfig(layers, width, grid * 32, heads or width * 32 // resnet.HEAD_WIDTH)
