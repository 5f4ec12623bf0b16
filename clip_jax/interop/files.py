"""Weights on disk: the three export formats, and loading any of them (plus torch ``.pt``).

Formats (all float32 safetensors):

- ``hf``: a transformers ``CLIPModel`` directory, ``config.json`` + ``model.safetensors``
  (a ``SiglipModel`` for SigLIP towers; on load, by ``config.json``'s ``model_type``).
- ``open_clip``: ``open_clip_model.safetensors``, OpenAI's state-dict names, and open_clip's
  ``open_clip_config.json`` (heads and activation, which the tensors do not record).
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
import pickle
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from clip_jax import cli, storage
from clip_jax.interop import big_vision, hf, hf_siglip, mapping, open_clip, openai, torchscript
from clip_jax.interop import overrides as overrides_lib
from clip_jax.models import shapes
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.resnet import ResNetConfig
from clip_jax.models.text import TextConfig
from clip_jax.models.vit import VisionConfig

FORMATS = ("hf", "open_clip", "params", "big_vision")
HF_WEIGHTS, HF_CONFIG = "model.safetensors", "config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_FILES = (OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.bin")  # open_clip's hub repositories
PARAMS_WEIGHTS, PARAMS_CONFIG = "params.safetensors", "clip_config.json"

READ = (
    f"an {'/'.join(FORMATS)} export directory, an open_clip directory ({', '.join(OPEN_CLIP_FILES)}), "
    "or a .safetensors/.pt/.bin state dict"
)
_PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))  # torch's legacy (non-zip) files


class NotWeights(cli.UserError, ValueError):
    """A path that is none of the weights `load` reads (a text file, an empty or foreign archive)."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path}: {what}, not weights clip_jax reads ({READ})")


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
        if (model_cfg := open_clip.model_cfg(config)) is not None:  # heads, activation: see openai.py
            storage.write_json(os.path.join(out, open_clip.CONFIG_FILE), {"model_cfg": model_cfg})
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
    else:  # streamed to disk (no second copy of the weights in memory), then renamed into place
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            safetensors.numpy.save_file(tensors, tmp, metadata={"format": fmt})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        if storage.is_remote(path):
            return safetensors.numpy.load(storage.read_bytes(path))
        return safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:  # empty, truncated, or another kind of file
        raise NotWeights(path, f"an unreadable safetensors file ({str(e)[:80]})") from None


def _check_torch_file(source: Any, path: str, is_zip: bool) -> None:
    """Refuses what torch.load would fail on obscurely: text, a zip that is no torch archive."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
    if is_zip:
        with zipfile.ZipFile(source) as zf:
            if not any(n.endswith("/data.pkl") for n in zf.namelist()):
                raise NotWeights(path, "a zip archive without a torch data.pkl (an .npz?)")
    else:
        if isinstance(source, io.BytesIO):
            head = source.read(2)
        else:
            with open(source, "rb") as f:
                head = f.read(2)
        if head not in _PICKLE_MAGIC:
            raise NotWeights(path, "neither safetensors, a torch zip nor a torch pickle")
    if isinstance(source, io.BytesIO):
        source.seek(0)


def read_tensors(path: str, allow_code: bool = False) -> dict[str, np.ndarray]:
    """A safetensors file, or a torch state dict (``.pt``/``.bin``/TorchScript archive) as float32.

    No code from the file runs: a pickle is read with ``weights_only=True``, a
    TorchScript archive (OpenAI's original downloads) by `torchscript.read_tensors`.
    ``allow_code=True`` lets ``torch.jit.load`` run an archive that only its own code
    can read (its modules' ``__setstate__``), and unpickles any object in a torch
    pickle: for files whose author you trust.
    """
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    data = storage.read_bytes(path) if storage.is_remote(path) else None
    source = io.BytesIO(data) if data is not None else path
    scripted = False
    is_zip = zipfile.is_zipfile(source)
    _check_torch_file(source, path, is_zip)
    if is_zip:
        with zipfile.ZipFile(source) as zf:
            scripted = torchscript.is_archive(zf)
        if isinstance(source, io.BytesIO):
            source.seek(0)
        if scripted and not allow_code:
            return _float32(torchscript.read_tensors(source, path))
    import torch  # optional: only for PyTorch pickles

    if isinstance(source, io.BytesIO):
        source.seek(0)
    if scripted and allow_code:
        state = torch.jit.load(source, map_location="cpu").state_dict()
    else:
        try:  # allow_code: a pickle of arbitrary objects, as torch.load(weights_only=False)
            state = torch.load(source, map_location="cpu", weights_only=not allow_code)
        except pickle.UnpicklingError as e:
            reason = str(e).splitlines()[0][:160]
            raise torchscript.UntrustedCode(
                f"{path}: not a weights-only torch file ({reason}); to {torchscript.OPT_IN}"
            ) from None
    if isinstance(state, dict) and "state_dict" in state:  # open_clip's training checkpoints
        state = state["state_dict"]
    return _float32({k: v.detach().float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)})


def _float32(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # "module.": saved from DistributedDataParallel
    return {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state.items()}


def _unexpected(tensors: Mapping, maps: Iterable[mapping.TensorMap], ignored) -> list[str]:
    used = {m.key for m in maps}
    return sorted(k for k in tensors if k not in used and not ignored.search(k))


def hf_siglip_load(path: str) -> tuple[CLIPConfig, dict]:
    """(CLIPConfig, params) of a transformers ``SiglipModel`` directory."""
    config = hf_siglip.clip_config(storage.read_json(os.path.join(path, HF_CONFIG)))
    tensors = read_tensors(os.path.join(path, HF_WEIGHTS))
    maps = hf_siglip.tensor_maps(config)
    if extra := _unexpected(tensors, maps, hf_siglip.IGNORED):
        raise ValueError(f"{path}: tensors clip_jax has no place for: {extra[:5]}")
    return config, mapping.from_external(tensors, maps)


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


def load(
    path: str, overrides: Any = None, allow_code: bool = False, **fields: Any
) -> tuple[CLIPConfig, dict]:
    """(CLIPConfig, params as nested float32 numpy) from an export directory or a weights file.

    ``path``: an HF directory (``config.json`` + ``model.safetensors``), a ``params``
    directory, a big_vision ``.npz`` (or a directory holding ``big_vision.npz``), or an
    OpenAI/open_clip state dict (directory holding ``open_clip_model.safetensors`` or
    ``open_clip_pytorch_model.bin``, or the file: ``.safetensors``/``.pt``/``.bin``;
    ``open_clip_config.json`` beside it is read).
    ``overrides`` (`overrides.Overrides`, a dict, or the flag text) and ``fields``
    (vision_heads, text_heads, activation, open_clip_model): what a bare state dict does
    not record (`openai.clip_config`); for configured weights they must agree with it.
    ``allow_code``: see `read_tensors` (off: no code from the file runs).
    """
    given = overrides_lib.coerce(overrides, **fields)
    if npz := _big_vision_file(path):
        try:
            config, params = big_vision.load(npz)
        except ValueError as e:  # a foreign .npz, or one refused by the bounds: one line, the file named
            raise NotWeights(npz, str(e).removeprefix(f"{npz}: ")) from None
        check_recorded(config, given, npz)
        return config, params
    if storage.isdir(path):
        if storage.exists(os.path.join(path, PARAMS_CONFIG)):
            config = config_from_dict(storage.read_json(os.path.join(path, PARAMS_CONFIG))["config"])
            check_recorded(config, given, os.path.join(path, PARAMS_CONFIG))
            flat = _read_safetensors(os.path.join(path, PARAMS_WEIGHTS))
            return config, mapping.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
        if hf_siglip.is_siglip_dir(path):  # transformers' SiglipModel
            config, params = hf_siglip_load(path)
            check_recorded(config, given, os.path.join(path, HF_CONFIG))
            return config, params
        if storage.exists(os.path.join(path, HF_CONFIG)):
            config = hf.clip_config(storage.read_json(os.path.join(path, HF_CONFIG)))
            check_recorded(config, given, os.path.join(path, HF_CONFIG))
            tensors = read_tensors(os.path.join(path, HF_WEIGHTS))
            maps = hf.tensor_maps(config)
            if extra := _unexpected(tensors, maps, hf.IGNORED):
                raise ValueError(f"{path}: tensors clip_jax has no place for: {extra[:5]}")
            return config, mapping.from_external(tensors, maps)
        names = [n for n in OPEN_CLIP_FILES if storage.exists(os.path.join(path, n))]
        if not names:
            raise NotWeights(path, "a directory without weights")
        path = os.path.join(path, names[0])
    tensors = read_tensors(path, allow_code)
    if "visual.conv1.weight" not in tensors:
        raise NotWeights(path, "not an OpenAI/open_clip state dict (no visual.conv1.weight)")
    config = openai.clip_config(tensors, os.path.dirname(path), given)
    maps = openai.tensor_maps(config, "logit_bias" in tensors)
    if extra := _unexpected(tensors, maps, openai.IGNORED):
        raise ValueError(f"{path}: tensors clip_jax has no place for: {extra[:5]}")
    return config, mapping.from_external(tensors, maps)


def check_recorded(config: CLIPConfig, given: overrides_lib.Overrides, source: str) -> None:
    """Overrides for weights that record their config must say what it says."""
    if given.open_clip_model:
        raise overrides_lib.OverridesError(f"{source} records the model; drop open_clip_model")
    recorded = {"vision_heads": [config.vision.heads], "text_heads": [config.text.heads]}
    recorded["activation"] = [config.text.activation] + [getattr(config.vision, "activation", None)]
    for name, value in given.given().items():
        if any(r is not None and r != value for r in recorded[name]):
            raise overrides_lib.OverridesError(
                f"{source} records {name}={recorded[name][0]!r}, the overrides say {value!r}: "
                "drop the override"
            )
