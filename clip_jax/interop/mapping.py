"""Tensor maps: how one external tensor is made from clip_jax parameters, and back.

A layout (HF, OpenAI) is a list of `TensorMap`, built from a `CLIPConfig`. Each
map names one external tensor and the clip_jax parameters (paths joined with
'/', as in `clip_jax.optim.param_path`) it is made of: usually one, three for
OpenAI's fused q/k/v projection. Conversions are plain numpy, float32 in,
float32 out, so ``from_ext(to_ext(x)) == x`` exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class TensorMap:
    key: str  # the external name, e.g. "vision_model.embeddings.class_embedding"
    paths: tuple[str, ...]  # clip_jax parameter paths, e.g. ("visual/class_token",)
    to_ext: Callable[..., Array]  # clip_jax arrays (one per path) -> the external tensor
    from_ext: Callable[[Array], tuple[Array, ...]]  # the external tensor -> clip_jax arrays


def same(key: str, path: str) -> TensorMap:
    return TensorMap(key, (path,), lambda x: x, lambda x: (x,))


def transposed(key: str, path: str) -> TensorMap:
    """A [in, out] kernel <-> a PyTorch Linear weight [out, in]."""
    return TensorMap(key, (path,), lambda x: x.T, lambda x: (x.T,))


def conv(key: str, path: str) -> TensorMap:
    """A flax conv kernel [kh, kw, in, out] (HWIO) <-> PyTorch's [out, in, kh, kw] (OIHW)."""
    return TensorMap(key, (path,), lambda x: x.transpose(3, 2, 0, 1), lambda x: (x.transpose(2, 3, 1, 0),))


def heads_in(key: str, path: str, heads: int) -> TensorMap:
    """q/k/v kernel [D, H, Dh] <-> Linear weight [H * Dh, D]."""
    return TensorMap(
        key,
        (path,),
        lambda x: x.reshape(x.shape[0], -1).T,
        lambda x: (x.T.reshape(x.shape[1], heads, -1),),
    )


def heads_bias(key: str, path: str, heads: int) -> TensorMap:
    """q/k/v bias [H, Dh] <-> [H * Dh]."""
    return TensorMap(key, (path,), lambda x: x.reshape(-1), lambda x: (x.reshape(heads, -1),))


def heads_out(key: str, path: str, heads: int) -> TensorMap:
    """Output kernel [H, Dh, D] <-> Linear weight [D, H * Dh]."""
    return TensorMap(
        key,
        (path,),
        lambda x: x.reshape(-1, x.shape[-1]).T,
        lambda x: (x.T.reshape(heads, -1, x.shape[0]),),
    )


def fused_qkv_weight(key: str, paths: tuple[str, str, str], heads: int) -> TensorMap:
    """Three kernels [D, H, Dh] <-> PyTorch MultiheadAttention's in_proj_weight [3 * H * Dh, D]."""
    single = heads_in(key, paths[0], heads)
    return TensorMap(
        key,
        paths,
        lambda *xs: np.concatenate([single.to_ext(x) for x in xs], axis=0),
        lambda x: tuple(single.from_ext(part)[0] for part in np.split(x, 3, axis=0)),
    )


def fused_qkv_bias(key: str, paths: tuple[str, str, str], heads: int) -> TensorMap:
    """Three biases [H, Dh] <-> in_proj_bias [3 * H * Dh]."""
    return TensorMap(
        key,
        paths,
        lambda *xs: np.concatenate([x.reshape(-1) for x in xs]),
        lambda x: tuple(part.reshape(heads, -1) for part in np.split(x, 3)),
    )


def layer_norm(key: str, path: str) -> list[TensorMap]:
    """A LayerNorm: flax's scale/bias <-> PyTorch's weight/bias."""
    return [same(f"{key}.weight", f"{path}/scale"), same(f"{key}.bias", f"{path}/bias")]


def contiguous(x) -> Array:
    """A C-contiguous float32 copy-if-needed (keeps 0-d arrays 0-d, unlike np.ascontiguousarray)."""
    return np.array(x, np.float32, order="C", copy=None)


def flatten(params: Mapping) -> dict[str, Array]:
    """Nested params -> {'visual/transformer/block_0/attn/query/kernel': float32 array}."""
    flat = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}/{k}": v for k, v in flatten(value).items()})
        else:
            flat[name] = np.asarray(value, np.float32)
    return flat


def unflatten(flat: Mapping[str, Array]) -> dict:
    """The inverse of `flatten`."""
    params: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return params


def to_external(params: Mapping, maps: Iterable[TensorMap]) -> dict[str, Array]:
    """clip_jax params (nested) -> {external key: contiguous float32 array}; every param must be used."""
    flat = flatten(stack_free(params))
    tensors, used = {}, set()
    for m in maps:  # one pass: ``maps`` may be a progress bar
        tensors[m.key] = contiguous(m.to_ext(*(flat[p] for p in m.paths)))
        used.update(m.paths)
    if unused := sorted(set(flat) - used):
        raise ValueError(f"parameters with no external name: {unused[:5]}")
    return tensors


def stack_free(params: Mapping) -> dict:
    """Params with any scanned ``transformer/blocks`` subtree (leading layer axis) split
    into ``block_0 ... block_{L-1}``, the layout the external formats follow."""
    out = {}
    for name, value in params.items():
        if name == "blocks" and isinstance(value, Mapping):
            leaves = flatten(value)
            layers = next(iter(leaves.values())).shape[0]
            for i in range(layers):
                out[f"block_{i}"] = unflatten({k: v[i] for k, v in leaves.items()})
        elif isinstance(value, Mapping):
            out[name] = stack_free(value)
        else:
            out[name] = value
    return out


def from_external(tensors: Mapping[str, Array], maps: Iterable[TensorMap]) -> dict:
    """{external key: array} -> clip_jax params (nested, float32 numpy); every key must be used."""
    maps = list(maps)
    missing = [m.key for m in maps if m.key not in tensors]
    if missing:
        raise ValueError(f"tensors missing from the weights: {missing[:5]}")
    flat = {}
    for m in maps:
        arrays = m.from_ext(np.asarray(tensors[m.key], np.float32))
        flat.update({p: contiguous(a) for p, a in zip(m.paths, arrays, strict=True)})
    return unflatten(flat)
