"""Commands never damage what they were pointed at: exports and the tokenizer refuse their own
inputs and existing outputs unless --overwrite, and a failed export leaves the old output; a
converter rerun keeps a shard only when it was made from the same input with the same options."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_data_convert import make_folder, write_csv

from clip_jax import cli, export
from clip_jax.data import convert, convert_readers, pipeline, provenance, records
from clip_jax.interop import files, mapping
from clip_jax.models.clip import CLIP, CLIPConfig, dummy_inputs
from clip_jax.models.text import TextConfig
from clip_jax.models.vit import VisionConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = CLIPConfig(16, VisionConfig(16, 8, 16, 1, 2), TextConfig(64, 8, 16, 1, 2))


def params_export(path) -> str:
    """A tiny ``params`` export (zeros) at ``path``."""
    shapes = jax.eval_shape(lambda: CLIP(CONFIG).init(jax.random.key(0), *dummy_inputs(CONFIG))["params"])
    flat = mapping.flatten(jax.tree.map(lambda x: np.zeros(x.shape, np.float32), nn.meta.unbox(shapes)))
    files.save(str(path), mapping.unflatten(flat), CONFIG, "params", eos_id=3, bos_id=2)
    return str(path)


def snapshot(root) -> dict[str, bytes]:
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_export_refuses_to_write_into_its_input(tmp_path, where):
    source = params_export(tmp_path / "p")
    before = snapshot(tmp_path / "p")
    out = source if where == "equal" else os.path.join(source, "hf")
    with pytest.raises(cli.UserError, match="would overwrite the command's input"):
        export.export(export.from_weights(source), "hf", out)
    assert snapshot(tmp_path / "p") == before


def test_export_refuses_a_non_empty_out_unless_overwrite_and_replaces_it_whole(tmp_path):
    source = export.from_weights(params_export(tmp_path / "p"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(cli.UserError, match="--overwrite"):
        export.export(source, "hf", str(out))
    assert snapshot(out) == {"notes.txt": b"mine"}
    export.export(source, "hf", str(out), overwrite=True)
    assert sorted(snapshot(out)) == [files.HF_CONFIG, files.HF_WEIGHTS]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_a_failed_export_leaves_the_previous_output(tmp_path, monkeypatch):
    source = export.from_weights(params_export(tmp_path / "p"))
    out = tmp_path / "out"
    export.export(source, "hf", str(out))
    before = snapshot(out)

    def dies(directory, *args, **kwargs):
        (pathlib.Path(directory) / files.HF_CONFIG).write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        export.export(source, "hf", str(out), overwrite=True)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_cli_refuses_out_inside_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    cmd = [sys.executable, "-m", "clip_jax.export", f"--workdir={workdir}", f"--out={workdir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "would overwrite the command's input" in out.stderr
    assert snapshot(workdir) == {"config.json": b"{}"}


def train_tokenizer(*flags):
    cmd = [sys.executable, "data_pipelines/train_tokenizer.py", "--vocab_size=40", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_train_tokenizer_refuses_its_input_and_an_existing_model(tmp_path):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("".join(f"a red square number {i}\n" for i in range(200)))
    before = corpus.read_bytes()
    refused = train_tokenizer(f"--input={tmp_path}/*.txt", f"--out={corpus}")
    assert refused.returncode != 0 and "would overwrite the command's input" in refused.stderr
    assert corpus.read_bytes() == before

    model = tmp_path / "tok.model"
    model.write_bytes(b"an earlier model")
    refused = train_tokenizer(f"--input={corpus}", f"--out={model}")
    assert refused.returncode != 0 and "--overwrite" in refused.stderr
    assert model.read_bytes() == b"an earlier model"
    done = train_tokenizer(f"--input={corpus}", f"--out={model}", "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    assert model.read_bytes() != b"an earlier model"


def folder_tasks(tmp_path, rows_per_shard=3):
    return convert_readers.folder_tasks(
        str(tmp_path / "c.csv"), str(tmp_path / "images"), str(tmp_path / "out"), "f", rows_per_shard
    )


def captions(out) -> list[str]:
    return sorted(r["caption"] for r in pipeline.read_all(records.expand(str(out / "f-*.array_record"), "x")))


def test_a_converter_rerun_over_another_input_stops_naming_the_shard(tmp_path):
    _, rows = make_folder(tmp_path)
    write_csv(tmp_path / "c.csv", rows)
    convert.run(folder_tasks(tmp_path), convert.Options(size=32), 1, str(tmp_path / "out" / "s.json"))
    sidecar = json.loads((tmp_path / "out" / ".stats" / "f-00000-of-00003.array_record.json").read_text())
    assert sidecar["source"]["options"]["size"] == 32 and sidecar["source"]["input"]["rows"] == 3

    rows[0]["caption"] = "blue 0"  # the table changed; the shard names did not
    write_csv(tmp_path / "c.csv", rows)
    with pytest.raises(provenance.ShardMismatchError, match=r"f-00000-of-00003.array_record.*--overwrite"):
        convert.run(folder_tasks(tmp_path), convert.Options(size=32), 1, str(tmp_path / "out" / "s.json"))
    with pytest.raises(provenance.ShardMismatchError, match="another options"):
        convert.run_task(folder_tasks(tmp_path)[1], convert.Options(size=48))
    convert.run(
        folder_tasks(tmp_path), convert.Options(size=32), 1, str(tmp_path / "out" / "s.json"), overwrite=True
    )
    assert "blue 0" in captions(tmp_path / "out") and "red 0" not in captions(tmp_path / "out")


def test_shards_of_an_earlier_shard_count_are_named_then_removed_with_overwrite(tmp_path):
    _, rows = make_folder(tmp_path)
    write_csv(tmp_path / "c.csv", rows)
    summary = str(tmp_path / "out" / "s.json")
    convert.run(folder_tasks(tmp_path, 3), convert.Options(size=32), 1, summary)
    with pytest.raises(provenance.ShardMismatchError, match="f-00000-of-00003.array_record"):
        convert.run(folder_tasks(tmp_path, 2), convert.Options(size=32), 1, summary)
    convert.run(folder_tasks(tmp_path, 2), convert.Options(size=32), 1, summary, overwrite=True)
    shards = sorted(p.name for p in (tmp_path / "out").glob("f-*.array_record"))
    assert shards == [f"f-0000{i}-of-00005.array_record" for i in range(5)]
    assert len(captions(tmp_path / "out")) == 7  # each kept record once
