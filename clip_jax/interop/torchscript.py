"""The tensors of a TorchScript archive (OpenAI's original ``.pt`` downloads), without running it.

A TorchScript archive is a zip: ``NAME/data.pkl`` (the module tree, pickled),
``NAME/data/KEY`` (raw storages), ``NAME/code/`` (the modules' TorchScript source)
and ``NAME/constants.pkl``. ``torch.jit.load`` compiles and runs that code (a
module's ``__setstate__`` runs on load), so an archive from someone else is
code from someone else. `read_tensors` instead unpickles ``data.pkl`` with an
unpickler that knows only tensors, storages and plain containers: every module
becomes an inert record of its attributes, every tensor is rebuilt from its
``data/`` record with bounds checked. Nothing from ``code/`` runs; it is read
as text only for each class's ``__parameters__``/``__buffers__`` lists (so the
result has ``state_dict()``'s names) and to refuse a class with its own
``__setstate__`` (whose state only its code can interpret).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from clip_jax import cli

OPT_IN = "run its code only if you trust its author: allow_code=True (export: --trust_weights_code)"

_STORAGE_DTYPES = {
    "HalfStorage": np.float16,
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t]+.*\n|\n)*)", re.M)
_NAMES = re.compile(r"^\s+__(parameters|buffers)__ = \[([^\]]*)\]", re.M)


class UntrustedCode(cli.UserError, ValueError):
    """The archive needs its own code to be read; loading it that way needs the opt-in."""


def is_archive(zf: zipfile.ZipFile) -> bool:
    """A TorchScript archive (``constants.pkl`` or ``code/``), not a ``torch.save`` zip."""
    return any(n.split("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in zf.namelist())


class _Module:
    """A TorchScript module's pickled state, as data: ``cls`` (its qualified name), ``state``."""

    cls = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Storage:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Unpickler(pickle._Unpickler):  # the Python one: its BUILD can be restricted
    """Resolves only the names a weights-only TorchScript ``data.pkl`` uses; anything else is refused.
    BUILD (set an object's state) is allowed on module records only."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, zf: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self._zf, self._prefix, self._path = zf, prefix, path
        self._storages: dict[str, np.ndarray] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            return self._classes.setdefault(qualname, type(name, (_Module,), {"cls": qualname}))
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise UntrustedCode(f"{self._path}: data.pkl refers to {module}.{name}; to {OPT_IN}")

    def _load_build(self) -> None:
        if not isinstance(self.stack[-2], _Module):
            raise UntrustedCode(f"{self._path}: data.pkl sets the state of a {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = _load_build

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _, numel = pid
        if not isinstance(storage_type, _Storage) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"{self._path}: bad storage record {key!r:.40}")
        if key not in self._storages:
            raw = self._zf.read(f"{self._prefix}data/{key}")
            if len(raw) != numel * storage_type.dtype.itemsize:
                raise pickle.UnpicklingError(f"{self._path}: storage {key!r:.40} is not {numel} elements")
            self._storages[key] = np.frombuffer(raw, storage_type.dtype)
        return self._storages[key]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """torch's ``_rebuild_tensor_v2`` on a numpy storage, refusing views outside it."""
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("a tensor without a storage")
    shape, strides = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(offset)
    if len(shape) != len(strides) or min((*shape, *strides, offset, 0)) < 0:
        raise pickle.UnpicklingError(f"bad tensor layout {shape} {strides} +{offset}")
    if 0 in shape:
        return np.zeros(shape, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor {shape} {strides} +{offset} outside its storage {storage.size}")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape, tuple(s * item for s in strides))
    return np.array(view)  # a copy: the storage may be shared by several tensors


def _state_names(zf: zipfile.ZipFile, prefix: str) -> tuple[dict[str, set[str]], list[str]]:
    """({class qualname: its parameter and buffer names}, classes defining ``__setstate__``),
    read as text from ``code/`` (nothing runs)."""
    names, custom = {}, []
    for entry in zf.namelist():
        if not (entry.startswith(prefix + "code/") and entry.endswith(".py")):
            continue
        module = entry[len(prefix + "code/") : -len(".py")].replace("/", ".")
        for match in _CLASS.finditer(zf.read(entry).decode("utf-8", errors="replace")):
            qualname, body = f"{module}.{match.group(1)}", match.group(2)
            found = _NAMES.findall(body)
            names[qualname] = {n.strip().strip("\"'") for _, part in found for n in part.split(",")} - {""}
            if re.search(r"^\s+def __setstate__\(", body, re.M):
                custom.append(qualname)
    return names, custom


def _flatten(obj: Any, names: dict[str, set[str]], prefix: str, out: dict[str, np.ndarray]) -> None:
    if not isinstance(obj, _Module):
        return
    if not isinstance(obj.state, dict):
        raise UntrustedCode(f"{obj.cls} keeps its state in its own format (its code reads it); to {OPT_IN}")
    keep = names.get(obj.cls)
    for key, value in obj.state.items():
        if isinstance(value, np.ndarray) and (keep is None or key in keep):
            out[prefix + key] = value
        elif isinstance(value, _Module):
            _flatten(value, names, f"{prefix}{key}.", out)


def read_tensors(source: str | BinaryIO, path: str) -> dict[str, np.ndarray]:
    """``state_dict()`` of the TorchScript archive ``source`` as numpy arrays (native dtypes),
    without running any of its code. Raises `UntrustedCode` for an archive whose modules
    keep custom state (only ``torch.jit.load`` with the opt-in reads those). ``path`` names it in errors."""
    with zipfile.ZipFile(source) as zf:
        pickles = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a TorchScript archive (no NAME/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() != b"little":
            raise ValueError(f"{path}: a big-endian TorchScript archive; re-save it little-endian")
        names, custom = _state_names(zf, prefix)
        if custom:
            raise UntrustedCode(f"{path}: {custom[0]} defines __setstate__ (code run on load); to {OPT_IN}")
        root = _Unpickler(io.BytesIO(zf.read(pickles[0])), zf, prefix, path).load()
        tensors: dict[str, np.ndarray] = {}
        _flatten(root, names, "", tensors)
    return tensors
