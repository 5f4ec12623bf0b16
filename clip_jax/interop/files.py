"""Weights on disk: the three export formats, and loading any of them (plus torch ``.pt``).

Formats (all float32 safetensors):

- ``hf``: a transformers ``CLIPModel`` directory, ``config.json`` + ``model.safetensors``
  (a ``SiglipModel`` for SigLIP towers; on load, by ``config.json``'s ``model_type``).
- ``open_clip``: ``open_clip_model.safetensors``, OpenAI's state-dict names.
- ``params``: ``params.safetensors`` with clip_jax's own '/'-joined parameter paths,
  and ``clip_config.json`` (the `CLIPConfig`), for inference with clip_jax.
- ``big_vision``: ``big_vision.npz``, big_vision's two-towers names (SigLIP towers only;
  ``scan``: its stacked-block layout); any ``.npz`` path loads as one (`big_vision`).

`load` takes any of these (or a torch state dict) and returns (CLIPConfig, params).
For a ResNet image tower, ``params`` carries the BatchNorm running statistics under
a top-level ``batch_stats`` key, in and out (`openai_resnet.merge_variables`); HF
transformers has no CLIP ResNet, so those export as ``open_clip`` or ``params``.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from clip_jax import storage
from clip_jax.interop import big_vision, hf, hf_siglip, mapping, openai
from clip_jax.models import shapes
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.resnet import ResNetConfig
from clip_jax.models.text import TextConfig
from clip_jax.models.vit import VisionConfig

FORMATS = ("hf", "open_clip", "params", "big_vision")
HF_WEIGHTS, HF_CONFIG = "model.safetensors", "config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
PARAMS_WEIGHTS, PARAMS_CONFIG = "params.safetensors", "clip_config.json"

Progress = Callable[[Iterable], Iterable]  # e.g. tqdm.tqdm; wraps the per-tensor loop


def _no_progress(items: Iterable) -> Iterable:
    return items


def config_to_dict(config: CLIPConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(d: Mapping[str, Any]) -> CLIPConfig:
    fields = {f.name for f in dataclasses.fields(CLIPConfig)}
    rest = {k: v for k, v in d.items() if k in fields and k not in ("vision", "text")}
    vision = VisionConfig if "patch_size" in d["vision"] else ResNetConfig
    return CLIPConfig(vision=vision(**d["vision"]), text=TextConfig(**d["text"]), **rest)


def _has_bias(params: Mapping) -> bool:
    return "logit_bias" in params


def external_tensors(
    params: Mapping, config: CLIPConfig, fmt: str, progress: Progress = _no_progress, scan: bool = False
) -> dict[str, np.ndarray]:
    """clip_jax params -> the named float32 tensors of ``fmt`` (one of `FORMATS`; ``scan``: big_vision's)."""
    if fmt == "big_vision":
        return big_vision.to_tensors(params, config, scan, progress=progress)
    if fmt == "params":
        flat = mapping.flatten(mapping.stack_free(params))
        return {k: mapping.contiguous(flat[k]) for k in progress(sorted(flat))}
    if fmt == "hf" and hf_siglip.is_siglip(config):  # transformers' SiglipModel
        return mapping.to_external(params, progress(hf_siglip.tensor_maps(config)))
    if fmt == "hf":
        if _has_bias(params):  # HF's CLIPModel has no logit bias; the embeddings do not need it
            params = {k: v for k, v in params.items() if k != "logit_bias"}
        return mapping.to_external(params, progress(hf.tensor_maps(config)))
    if fmt == "open_clip":
        if differences := shapes.openai_layout_differences(config):
            raise ValueError(f"the open_clip format (OpenAI's layout) cannot hold {differences}")
        return mapping.to_external(params, progress(openai.tensor_maps(config, _has_bias(params))))
    raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


def save(
    out: str,
    params: Mapping,
    config: CLIPConfig,
    fmt: str,
    *,
    eos_id: int,
    bos_id: int,
    progress: Progress = _no_progress,
    scan: bool = False,
) -> tuple[str, dict[str, np.ndarray]]:
    """Writes ``params`` in ``fmt`` under the directory ``out``; returns (weights file, tensors)."""
    tensors = external_tensors(params, config, fmt, progress, scan)
    storage.makedirs(out)
    if fmt == "big_vision":
        path = os.path.join(out, big_vision.WEIGHTS)
        big_vision.save(path, tensors)
    elif fmt == "hf":
        path = os.path.join(out, HF_WEIGHTS)
        logit_scale = float(np.asarray(params["logit_scale"]))
        layout = hf_siglip if hf_siglip.is_siglip(config) else hf
        storage.write_json(
            os.path.join(out, HF_CONFIG), layout.hf_config(config, logit_scale, eos_id, bos_id)
        )
        _write_safetensors(tensors, path, "pt")  # transformers insists on "pt"
    elif fmt == "open_clip":
        path = os.path.join(out, OPEN_CLIP_WEIGHTS)
        _write_safetensors(tensors, path, "pt")
    else:
        path = os.path.join(out, PARAMS_WEIGHTS)
        meta = {"format": "clip_jax.params", "eos_id": eos_id, "bos_id": bos_id}
        storage.write_json(os.path.join(out, PARAMS_CONFIG), {**meta, "config": config_to_dict(config)})
        _write_safetensors(tensors, path, "clip_jax")
    return path, tensors


def _write_safetensors(tensors: dict[str, np.ndarray], path: str, fmt: str) -> None:
    if storage.is_remote(path):  # one upload of the serialised file
        storage.write_bytes(path, safetensors.numpy.save(tensors, metadata={"format": fmt}))
    else:  # streamed to disk: no second copy of the weights in memory
        safetensors.numpy.save_file(tensors, path, metadata={"format": fmt})


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    if storage.is_remote(path):
        return safetensors.numpy.load(storage.read_bytes(path))
    return safetensors.numpy.load_file(path)


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """A safetensors file, or a torch state dict (``.pt``/``.bin``/JIT archive; needs torch)."""
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    import torch  # optional: only for PyTorch pickles

    source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except RuntimeError:  # OpenAI's original downloads are TorchScript archives
        if isinstance(source, io.BytesIO):
            source.seek(0)
        state = torch.jit.load(source, map_location="cpu").state_dict()
    if isinstance(state, dict) and "state_dict" in state:  # open_clip's training checkpoints
        state = state["state_dict"]
    tensors = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().float().numpy()
    return tensors


def _unexpected(tensors: Mapping, maps: Iterable[mapping.TensorMap], ignored) -> list[str]:
    used = {m.key for m in maps}
    return sorted(k for k in tensors if k not in used and not ignored.search(k))


def special_ids(path: str) -> tuple[int, int] | None:
    """(eos_id, bos_id) recorded with exported weights (HF or params directory), else None.
    A big_vision file records none; SigLIP's sentencepiece models have EOS 1 and no BOS."""
    if _big_vision_file(path):
        return big_vision.EOS_ID, None
    for name, read in (
        (PARAMS_CONFIG, lambda c: (c["eos_id"], c["bos_id"])),
        (HF_CONFIG, lambda c: (c["text_config"]["eos_token_id"], c["text_config"]["bos_token_id"])),
    ):
        if storage.isdir(path) and storage.exists(os.path.join(path, name)):
            return read(storage.read_json(os.path.join(path, name)))
    return None


def _big_vision_file(path: str) -> str | None:
    """The ``.npz`` at ``path``, or a big_vision export directory's, else None."""
    if path.endswith(big_vision.SUFFIX):
        return path
    npz = os.path.join(path, big_vision.WEIGHTS)
    return npz if storage.isdir(path) and storage.exists(npz) else None


def load(path: str, **openai_options: Any) -> tuple[CLIPConfig, dict]:
    """(CLIPConfig, params as nested float32 numpy) from an export directory or a weights file.

    ``path``: an HF directory (``config.json`` + ``model.safetensors``), a ``params``
    directory, a big_vision ``.npz`` (or a directory holding ``big_vision.npz``), or an
    OpenAI/open_clip state dict (directory holding ``open_clip_model.safetensors``, or the
    file: ``.safetensors``/``.pt``/``.bin``).
    ``openai_options`` (vision_heads, text_heads, activation) go to `openai.clip_config`.
    """
    if npz := _big_vision_file(path):
        return big_vision.load(npz)
    if storage.isdir(path):
        if storage.exists(os.path.join(path, PARAMS_CONFIG)):
            config = config_from_dict(storage.read_json(os.path.join(path, PARAMS_CONFIG))["config"])
            flat = _read_safetensors(os.path.join(path, PARAMS_WEIGHTS))
            return config, mapping.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
        if storage.exists(os.path.join(path, HF_CONFIG)):
            hf_json = storage.read_json(os.path.join(path, HF_CONFIG))
            layout = hf_siglip if hf_json.get("model_type") == "siglip" else hf
            config = layout.clip_config(hf_json)
            tensors = read_tensors(os.path.join(path, HF_WEIGHTS))
            maps = layout.tensor_maps(config)
            if extra := _unexpected(tensors, maps, layout.IGNORED):
                raise ValueError(f"{path}: tensors clip_jax has no place for: {extra[:5]}")
            return config, mapping.from_external(tensors, maps)
        path = os.path.join(path, OPEN_CLIP_WEIGHTS)
    tensors = read_tensors(path)
    if "visual.conv1.weight" not in tensors:
        raise ValueError(f"{path}: not an OpenAI/open_clip state dict (no visual.conv1.weight)")
    config = openai.clip_config(tensors, **openai_options)
    maps = openai.tensor_maps(config, "logit_bias" in tensors)
    if extra := _unexpected(tensors, maps, openai.IGNORED):
        raise ValueError(f"{path}: tensors clip_jax has no place for: {extra[:5]}")
    return config, mapping.from_external(tensors, maps)
