"""The emoji demo's data follows the scenes' rule (recipe.resolve_data): made in WORKDIR/data under
the run's lock; the same spec writes nothing; another spec is remade (a new tokenizer for a new
vocab_size) unless the run has checkpoints, when it is refused and the data left byte-identical."""

import io
import os
import tarfile

import pytest
from conftest import load_config
from PIL import Image
from test_workdir_safety import tree_hashes

from clip_jax import data_fingerprint, recipe
from clip_jax.data import emoji_data

WORDS = ["red", "green", "blue", "cat", "dog", "fox", "sun", "moon", "star", "tree", "leaf", "rock"]


def write_tar(path):
    with tarfile.open(path, "w") as tar:
        for i, word in enumerate(WORDS):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (20 * i, 9, 9)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", f"a {word} emoji number {i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def mtimes(root):
    return {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in tree_hashes(root)}


def test_same_spec_writes_nothing_and_a_new_vocab_remakes_the_tokenizer(tmp_path, monkeypatch):
    source, directory = write_tar(tmp_path / "e.tar"), str(tmp_path / "data")
    trained = []
    original = emoji_data.tokenizer.train_sentencepiece
    monkeypatch.setattr(
        emoji_data.tokenizer, "train_sentencepiece", lambda t, p, v: trained.append(v) or original(t, p, v)
    )
    emoji_data.ensure_dataset(directory, source, 0.25, 40, 16)
    before = mtimes(directory)
    emoji_data.ensure_dataset(directory, source, 0.25, 40, 16)
    assert mtimes(directory) == before and trained == [40]
    emoji_data.ensure_dataset(directory, source, 0.25, 60, 16)  # no checkpoints: remade
    assert trained == [40, 60] and emoji_data.recorded_spec(directory)["vocab_size"] == 60


def test_a_changed_spec_under_a_run_with_checkpoints_is_refused(tmp_path):
    config = load_config("emoji")
    config.data.emoji.source = write_tar(tmp_path / "e.tar")
    config.data.emoji.heldout_fraction = 0.25
    config.data.emoji.vocab_size = 40
    workdir = tmp_path / "run"
    spec = recipe.resolve_data(config, str(workdir))
    assert os.path.exists(spec.tokenizer) and spec.train_files[0].startswith(str(workdir / "data"))
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    before = tree_hashes(workdir)
    config.data.emoji.vocab_size = 60
    with pytest.raises(data_fingerprint.DataChangedError, match="vocab_size: 40 -> 60"):
        recipe.resolve_data(config, str(workdir))
    assert tree_hashes(workdir) == before
