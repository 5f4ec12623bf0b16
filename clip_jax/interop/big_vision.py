"""big_vision's two-towers checkpoints (SigLIP, SigLIP 2): one flat ``.npz`` of float arrays.

Names are big_vision's Flax module paths joined with '/' (big_vision at 0127fb6:
``models/proj/image_text/two_towers.py`` with ``models/vit.py`` as the image tower
``img`` and ``models/proj/image_text/text_transformer.py`` as the text tower ``txt``),
optionally under ``params/`` (the released SigLIP files have it):

- ``img/embedding/kernel|bias`` (patch conv, HWIO), ``img/pos_embedding`` [1, N, D],
  ``img/Transformer/encoderblock_{i}/...``, ``img/Transformer/encoder_norm``,
  ``img/MAPHead_0/probe`` [1, 1, D] + its attention, LayerNorm and MLP;
  ``img/head/kernel|bias`` only when the image tower has a projection (SigLIP has none);
- ``txt/Embed_0/embedding``, ``txt/pos_embedding`` [1, L, D],
  ``txt/Encoder_0/encoderblock_{i}/...`` (the text tower's encoder is unnamed, hence
  ``Encoder_0``), ``txt/Encoder_0/encoder_norm``, ``txt/head/kernel|bias``;
- ``t`` (log temperature, [1]) and ``b`` (logit bias, [1]).

A block is ``LayerNorm_0``, ``MultiHeadDotProductAttention_0/{query,key,value,out}``
(kernels [D, H, Dh] / [H, Dh, D], as ours), ``LayerNorm_1``, ``MlpBlock_0/Dense_0|1``.
Scanned checkpoints (``scan=True`` in big_vision) hold one ``encoderblock`` per tower
whose arrays have a leading layer axis. big_vision's LayerNorm has eps 1e-6 and its
GELU is tanh-approximated, so only towers with those are written.
"""

from __future__ import annotations

import io
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from clip_jax import storage
from clip_jax.interop import mapping
from clip_jax.interop.mapping import TensorMap
from clip_jax.models import shapes
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.text import TextConfig
from clip_jax.models.vit import VisionConfig

SUFFIX = ".npz"
WEIGHTS = "big_vision.npz"  # the file's name in an export directory
PREFIX = "params/"
EOS_ID = 1  # SigLIP's sentencepiece models (c4_en, Gemma): EOS 1, also the padding
EPS, ACTIVATION = 1e-6, "gelu_tanh"  # fixed in big_vision's ViT and text encoder
# Reads are bounded: a zip member may claim any size; the largest SigLIP 2 (g-opt) is ~8 GB.
MAX_BYTES = 64 * 2**30
MAX_ARRAYS = 100_000
MAX_RATIO = 50  # float weights barely compress; a member inflating more is refused
# One block: big_vision's names -> ours (both under the tower's block).
BLOCK = {
    "LayerNorm_0": "ln_1",
    "LayerNorm_1": "ln_2",
    **{f"MultiHeadDotProductAttention_0/{p}": f"attn/{p}" for p in ("query", "key", "value", "out")},
    "MlpBlock_0/Dense_0": "mlp/fc",
    "MlpBlock_0/Dense_1": "mlp/proj",
}
MAP_HEAD = {**BLOCK, "LayerNorm_0": "ln"}
MAP_HEAD.pop("LayerNorm_1")
TOWERS = (("img/Transformer", "visual"), ("txt/Encoder_0", "text"))


def _leaves(names: Mapping[str, str]) -> list[tuple[str, str]]:
    """Module-name pairs -> parameter-name pairs (kernel/bias, scale/bias)."""
    out = []
    for theirs, ours in names.items():
        kinds = ("scale", "bias") if "LayerNorm" in theirs else ("kernel", "bias")
        out += [(f"{theirs}/{k}", f"{ours}/{k}") for k in kinds]
    return out


def _unbatched(key: str, path: str) -> TensorMap:
    """Ours without big_vision's leading axis of 1: pos_embedding [N, D] <-> [1, N, D]."""
    return TensorMap(key, (path,), lambda x: x[None], lambda x: (x.reshape(x.shape[1:]),))


def _probe(key: str, path: str) -> TensorMap:
    """MAP probe [D] <-> [1, 1, D]."""
    return TensorMap(key, (path,), lambda x: x.reshape(1, 1, -1), lambda x: (x.reshape(x.shape[2:]),))


def _scalar(key: str, path: str) -> TensorMap:
    return TensorMap(key, (path,), lambda x: x.reshape(1), lambda x: (x.reshape(()),))


def _blocks(tower: str, ours: str, layers: int, scan: bool) -> list[TensorMap]:
    """A tower's blocks: one map per tensor per block, or (``scan``) one stacked map per tensor."""
    if not scan:
        return [
            mapping.same(f"{tower}/encoderblock_{i}/{theirs}", f"{ours}/transformer/block_{i}/{mine}")
            for i in range(layers)
            for theirs, mine in _leaves(BLOCK)
        ]
    return [
        TensorMap(
            f"{tower}/encoderblock/{theirs}",
            tuple(f"{ours}/transformer/block_{i}/{mine}" for i in range(layers)),
            lambda *xs: np.stack(xs),
            lambda x: tuple(x),
        )
        for theirs, mine in _leaves(BLOCK)
    ]


def check(config: CLIPConfig) -> None:
    """Raises ValueError unless big_vision's two towers can hold ``config`` exactly."""
    v, t = config.vision, config.text
    if not isinstance(v, VisionConfig):
        raise ValueError("big_vision's two_towers has a ViT image tower, not a ResNet")
    wanted = {
        "image pooling": (v.pooling, "map"), "class token": (v.class_token, False),
        "patch bias": (v.patch_bias, True), "ln_pre": (v.ln_pre, False),
        "image head bias": (v.proj_bias or not v.projection, True),
        "text causal": (t.causal, False), "text pooling": (t.pooling, "last"),
        "text head bias": (t.proj_bias, True), "activations": ({v.activation, t.activation}, {ACTIVATION}),
        "LayerNorm eps": ({v.norm_eps, t.norm_eps}, {EPS}),
    }  # fmt: skip
    wrong = [f"{name} {have!r} (needs {want!r})" for name, (have, want) in wanted.items() if have != want]
    if wrong:
        raise ValueError(f"big_vision's SigLIP towers cannot hold this model: {', '.join(wrong)}")


def tensor_maps(config: CLIPConfig, scan: bool = False) -> list[TensorMap]:
    """Every tensor of big_vision's checkpoint of ``config`` (names without ``params/``)."""
    check(config)
    v, t = config.vision, config.text
    maps = [
        mapping.same("img/embedding/kernel", "visual/patch_embed/kernel"),
        mapping.same("img/embedding/bias", "visual/patch_embed/bias"),
        _unbatched("img/pos_embedding", "visual/pos_embedding"),
        *_blocks("img/Transformer", "visual", v.layers, scan),
        mapping.same("img/Transformer/encoder_norm/scale", "visual/ln_post/scale"),
        mapping.same("img/Transformer/encoder_norm/bias", "visual/ln_post/bias"),
        _probe("img/MAPHead_0/probe", "visual/map_head/probe"),
        *(mapping.same(f"img/MAPHead_0/{a}", f"visual/map_head/{b}") for a, b in _leaves(MAP_HEAD)),
        mapping.same("txt/Embed_0/embedding", "text/token_embedding/embedding"),
        _unbatched("txt/pos_embedding", "text/pos_embedding"),
        *_blocks("txt/Encoder_0", "text", t.layers, scan),
        mapping.same("txt/Encoder_0/encoder_norm/scale", "text/ln_final/scale"),
        mapping.same("txt/Encoder_0/encoder_norm/bias", "text/ln_final/bias"),
        mapping.same("txt/head/kernel", "text/proj"),
        mapping.same("txt/head/bias", "text/proj_bias"),
        _scalar("t", "logit_scale"),
    ]
    if v.projection:
        maps += [
            mapping.same("img/head/kernel", "visual/proj"),
            mapping.same("img/head/bias", "visual/proj_bias"),
        ]
    if config.logit_bias_init is not None:
        maps.append(_scalar("b", "logit_bias"))
    return maps


def _blocks_of(tensors: Mapping[str, np.ndarray], tower: str) -> tuple[int, bool]:
    """(layers, scanned) of a tower, from its block names (or the stacked block's leading axis)."""
    stacked = tensors.get(f"{tower}/encoderblock/LayerNorm_0/scale")
    if stacked is not None:
        return stacked.shape[0], True
    found = {int(m.group(1)) for k in tensors if (m := re.match(rf"{tower}/encoderblock_(\d+)/", k))}
    if not found or found != set(range(len(found))):
        raise ValueError(f"{tower}: blocks {sorted(found)[:5]}..., expected encoderblock_0 ... without gaps")
    return len(found), False


def _tower_shape(tensors: Mapping[str, np.ndarray], tower: str) -> tuple[dict, bool]:
    """A tower's transformer fields (width, layers, heads, MLP size) from its tensors' shapes."""
    layers, scan = _blocks_of(tensors, tower)
    block = f"{tower}/encoderblock" if scan else f"{tower}/encoderblock_0"
    query = tensors[f"{block}/MultiHeadDotProductAttention_0/query/kernel"].shape[int(scan) :]  # [D, H, Dh]
    mlp = tensors[f"{block}/MlpBlock_0/Dense_0/kernel"].shape[-1]
    shape = dict(
        width=query[0], layers=layers, heads=query[1], mlp_dim=mlp, activation=ACTIVATION, norm_eps=EPS
    )
    return shape, scan


def clip_config(tensors: Mapping[str, np.ndarray]) -> tuple[CLIPConfig, bool]:
    """(CLIPConfig, scanned) of a big_vision two-towers checkpoint (names without ``params/``)."""
    if "img/embedding/kernel" not in tensors or "txt/Embed_0/embedding" not in tensors:
        raise ValueError(
            "not a big_vision two-towers checkpoint (no img/embedding/kernel, txt/Embed_0/embedding)"
        )
    patch = tensors["img/embedding/kernel"].shape  # [P, P, 3, D]
    positions = tensors["img/pos_embedding"].shape[1]
    grid = math.isqrt(positions)
    if grid * grid != positions or patch[0] != patch[1]:
        raise ValueError(
            f"img: {positions} positions / patch {patch[:2]} are not a square grid of square patches"
        )
    image_shape, image_scan = _tower_shape(tensors, "img/Transformer")
    text_shape, text_scan = _tower_shape(tensors, "txt/Encoder_0")
    if image_scan != text_scan:
        raise ValueError("one tower is scanned and the other not; big_vision writes both alike")
    head = tensors.get("img/head/kernel")
    vision = VisionConfig(
        image_size=grid * patch[0], patch_size=patch[0], **image_shape, pooling="map", class_token=False,
        patch_bias=True, ln_pre=False, projection=head is not None, proj_bias=head is not None,
    )  # fmt: skip
    vocab, _ = tensors["txt/Embed_0/embedding"].shape
    text = TextConfig(
        vocab_size=vocab,
        context_length=tensors["txt/pos_embedding"].shape[1],
        **text_shape,
        pad_id=1,
        causal=False,
        pooling="last",
        proj_bias=True,
    )  # fmt: skip  (pad_id: SigLIP pads with EOS = 1; the last position is pooled whatever it holds)
    embed_dim = tensors["txt/head/kernel"].shape[-1]
    bias = float(np.log(10.0)), (-10.0 if "b" in tensors else None)  # two_towers' SigLIP init
    config = CLIPConfig(embed_dim, vision, text, logit_scale_init=bias[0], logit_bias_init=bias[1])
    shapes.check(config)
    return config, image_scan


def _strip_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Names without ``params/``: all of them have it, or none."""
    prefixed = [k.startswith(PREFIX) for k in tensors]
    if any(prefixed) and not all(prefixed):
        outside = [k for k, p in zip(tensors, prefixed, strict=True) if not p]
        raise ValueError(f"arrays outside params/ (optimizer state?): {outside[:5]}")
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _check_members(archive: zipfile.ZipFile, path: str) -> None:
    """Refuses, before reading any array, what would make reading unbounded: too many or too
    large members, a compressed member inflating past `MAX_RATIO`, an array whose header
    promises more bytes than its member holds, and anything but floating point."""
    members = archive.infolist()
    total = sum(m.file_size for m in members)
    if len(members) > MAX_ARRAYS or total > MAX_BYTES:
        raise ValueError(f"{path}: {len(members)} arrays, {total} bytes (at most {MAX_ARRAYS}, {MAX_BYTES})")
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED and m.file_size > MAX_RATIO * max(m.compress_size, 1):
            raise ValueError(f"{path}: {m.filename} inflates {m.file_size} bytes from {m.compress_size}")
        with archive.open(m) as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
            shape, _, dtype = (read_header or np.lib.format.read_array_header_2_0)(f)
        if dtype.kind != "f":
            raise ValueError(f"{path}: {m.filename} is {dtype}, not floating point")
        if math.prod(shape) * dtype.itemsize > m.file_size:
            raise ValueError(f"{path}: {m.filename} claims {shape} but holds {m.file_size} bytes")


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The float arrays of a ``.npz``: no pickles, reads bounded (`_check_members`)."""
    with storage.open_file(path, "rb") as f:
        with zipfile.ZipFile(f) as archive:
            _check_members(archive, path)
        f.seek(0)
        with np.load(f, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}


def load(path: str) -> tuple[CLIPConfig, dict]:
    """(CLIPConfig, params as nested float32 numpy) from a big_vision ``.npz``, scanned or not."""
    tensors = _strip_prefix(read_npz(path))
    config, scan = clip_config(tensors)
    maps = tensor_maps(config, scan)
    if extra := sorted(set(tensors) - {m.key for m in maps}):
        raise ValueError(f"{path}: arrays clip_jax has no place for: {extra[:5]}")
    return config, mapping.from_external(tensors, maps)


def to_tensors(
    params: Mapping,
    config: CLIPConfig,
    scan: bool = False,
    prefix: str = PREFIX,
    progress: Callable[[Iterable], Iterable] = lambda maps: maps,
) -> dict[str, np.ndarray]:
    """clip_jax params -> big_vision's named float32 arrays (``scan``: one stacked block per tower)."""
    tensors = mapping.to_external(params, progress(tensor_maps(config, scan)))
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def save(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``tensors`` (from `to_tensors`) as an uncompressed ``.npz``, atomically."""
    if storage.is_remote(path):
        buffer = io.BytesIO()
        np.savez(buffer, **tensors)
        storage.write_bytes(path, buffer.getvalue())
        return
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez(f, **tensors)
    os.replace(tmp, path)
