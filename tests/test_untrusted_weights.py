"""Weights files from others run no code: TorchScript archives are read as data unless the
caller opts in (``allow_code``), torch pickles only with ``weights_only``."""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from typing import Tuple  # noqa: UP035 (TorchScript needs typing.Tuple)

import flax.linen as nn
import jax
import numpy as np
import pytest

import clip_jax
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.interop import files, torchscript
from clip_jax.models import clip

torch = pytest.importorskip("torch")


class _Writes(torch.nn.Module):
    """A module whose ``__setstate__`` (run by ``torch.jit.load``) writes the file at ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 3))
        self.path = path

    def forward(self, x):
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool, str]:  # noqa: UP006
        return (self.weight, self.training, self.path)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool, str]):  # noqa: UP006
        self.weight = state[0]
        self.path = state[2]
        mark = torch.from_file(state[2], shared=True, size=4, dtype=torch.uint8)
        mark.fill_(65)
        self.training = state[1] and bool(mark.sum() > 0)  # uses the write, so it is not dead code


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(3)
        self.proj = torch.nn.Parameter(torch.randn(4, 3).t())  # a strided (transposed) view
        self.register_buffer("steps", torch.arange(5))
        self.attn_mask = torch.zeros(2, 2)  # a plain attribute: not in state_dict()

    def forward(self, x):
        return self.ln(x) @ self.proj + self.attn_mask.sum() + self.steps.sum()


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(_Inner(), _Inner())
        self.scale = torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, x):
        return self.blocks[0](x).sum() * self.scale


@pytest.fixture
def evil_archive(tmp_path):
    mark = tmp_path / "mark"
    path = tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(_Writes(str(mark))), str(path))
    return path, mark


def test_torchscript_code_does_not_run_without_the_opt_in(evil_archive):
    path, mark = evil_archive
    with pytest.raises(torchscript.UntrustedCode, match="allow_code=True") as e:
        files.read_tensors(str(path))
    assert "--trust_weights_code" in str(e.value)
    with pytest.raises(torchscript.UntrustedCode):
        files.load(str(path))
    assert not mark.exists()
    # The payload is real: with the opt-in, torch.jit.load runs it.
    tensors = files.read_tensors(str(path), allow_code=True)
    assert mark.read_bytes() == b"AAAA"
    np.testing.assert_array_equal(tensors["weight"], np.ones((2, 3), np.float32))


def test_export_refuses_a_torchscript_archive_with_code(evil_archive, tmp_path):
    path, mark = evil_archive
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "clip_jax.export", f"--weights={path}", f"--out={tmp_path / 'out'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "trust_weights_code" in result.stderr
    assert not mark.exists()


def test_torchscript_tensors_read_without_code_match_torch(tmp_path):
    module = _Outer().half()
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    expected = {k: v.float().numpy() for k, v in torch.jit.load(str(path)).state_dict().items()}
    got = torchscript.read_tensors(str(path), str(path))
    assert sorted(got) == sorted(expected)  # attn_mask (an attribute, not state) left out
    for key, value in expected.items():
        assert got[key].dtype == (np.int64 if key.endswith("steps") else np.float16), key
        np.testing.assert_array_equal(got[key].astype(np.float32), value, err_msg=key)
    assert files.read_tensors(str(path))["blocks.1.proj"].dtype == np.float32


def _with_data_pkl(src, dst, data_pkl: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, data_pkl if name.endswith("/data.pkl") else zin.read(name))


class _Payload:
    """Pickles as a call of os.system that creates ``mark``."""

    def __init__(self, mark):
        self.mark = str(mark)

    def __reduce__(self):
        return (os.system, ("touch " + self.mark,))


def test_a_crafted_data_pkl_is_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(_Outer()), str(plain))
    crafted = tmp_path / "crafted.pt"
    mark = tmp_path / "mark"
    _with_data_pkl(plain, crafted, pickle.dumps(_Payload(mark), protocol=2))
    with pytest.raises(torchscript.UntrustedCode, match="system"):
        files.read_tensors(str(crafted))
    assert not mark.exists()


def test_a_tensor_outside_its_storage_is_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(_Inner()), str(plain))
    with zipfile.ZipFile(plain) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    # ln.weight: 3 floats; claim 300 (the shape tuple (3,) is pickled as BININT1 3 inside MARK..TUPLE)
    crafted = tmp_path / "crafted.pt"
    _with_data_pkl(plain, crafted, data.replace(b"(K\x03t(K\x01t", b"(M\x2c\x01t(K\x01t", 1))
    with pytest.raises(pickle.UnpicklingError, match="outside its storage"):
        torchscript.read_tensors(str(crafted), str(crafted))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    buffer = io.BytesIO()
    mark = tmp_path / "mark"
    torch.save({"w": torch.ones(2), "x": _Payload(mark)}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(torchscript.UntrustedCode, match="weights-only.*allow_code=True"):
        files.read_tensors(str(path))
    assert not mark.exists()
    files.read_tensors(str(path), allow_code=True)  # the payload is real: the opt-in runs it
    assert mark.exists()


def test_a_tokenizer_bigger_than_the_models_vocabulary_is_refused(tmp_path, scenes_dataset):
    tok = Tokenizer(scenes_dataset.tokenizer, 16)
    small = tok.vocab_size - 8
    config = clip.get_variant("tiny", vocab_size=small)
    shapes = jax.eval_shape(lambda: clip.CLIP(config).init(jax.random.key(0), *clip.dummy_inputs(config)))
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), nn.meta.unbox(shapes["params"]))
    files.save(str(tmp_path / "m"), params, config, "params", eos_id=3, bos_id=2)
    with pytest.raises(ValueError, match=f"{tok.vocab_size} tokens but the model's vocabulary is {small}"):
        clip_jax.load(str(tmp_path / "m"), tokenizer=scenes_dataset.tokenizer)
    shutil.copy(scenes_dataset.tokenizer, tmp_path / "m" / "tokenizer.model")  # found beside the weights
    with pytest.raises(ValueError, match="use the model's own tokenizer"):
        clip_jax.load(str(tmp_path / "m"))


class _Built:
    """Pickles as BUILD on a function the unpickler allows: state set on a non-module object."""

    def __reduce__(self):
        return (collections.OrderedDict, (), {"__class__": "x"})


def test_state_set_on_anything_but_a_module_record_is_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(_Outer()), str(plain))
    crafted = tmp_path / "crafted.pt"
    _with_data_pkl(plain, crafted, pickle.dumps(_Built(), protocol=2))
    with pytest.raises(torchscript.UntrustedCode, match="sets the state of a OrderedDict"):
        torchscript.read_tensors(str(crafted), str(crafted))


@pytest.mark.parametrize("kind", ["text", "json", "empty_safetensors", "npz", "garbage_dir", "other_tensors"])
def test_not_weights_is_one_user_error(tmp_path, kind):
    """What is no weights file clip_jax reads is refused naming the path, not a KeyError or a torch
    traceback deep in a reader."""
    path = tmp_path / "w"
    if kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("hello\n")
    elif kind == "json":
        path = tmp_path / "w.json"
        path.write_text('{"a": 1}')
    elif kind == "empty_safetensors":
        path = tmp_path / "w.safetensors"
        path.write_bytes(b"")
    elif kind == "npz":
        path = tmp_path / "w.npz"
        np.savez(path, a=np.zeros(3))
    elif kind == "garbage_dir":
        path.mkdir()
        (path / "readme.md").write_text("x")
    else:  # a valid torch file holding something else
        path = tmp_path / "w.pt"
        torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(files.NotWeights, match=str(path).replace(".", r"\.")) as e:
        files.load(str(path))
    assert isinstance(e.value, clip_jax.cli.UserError) and "\n" not in str(e.value)
