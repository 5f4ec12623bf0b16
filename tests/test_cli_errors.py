"""Every command, run as a program with a typical mistake: exit code 2, one ``error:`` line on
stderr naming the flag or file, no traceback. The cases fail before anything is compiled; they
run a few at a time (each is a fresh Python process importing JAX)."""

import collections
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys

import msgpack
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from test_inference import tiny_export  # noqa: F401 (the fixture)

from clip_jax.data import records

ROOT = pathlib.Path(__file__).resolve().parents[1]
AOT = ["-m", "clip_jax.aot", "--platform=cpu", "--topology=v5e-8"]
DEMO = f"--config={ROOT / 'configs' / 'demo.py'}"


def cases(model, files):
    """name -> (arguments after ``python``, what the error line must name)."""
    images = str(files / "images")
    classify = ["-m", "clip_jax.predict", "classify", f"--model={model}", images, "--labels=a,b"]
    search = ["-m", "clip_jax.predict", "search", f"--model={model}", "--text=a"]
    tokenizer = [str(ROOT / "data_pipelines" / "train_tokenizer.py"), f"--out={files / 'tok.model'}"]
    tpu = [
        str(ROOT / "launch" / "tpu.py"),
        "run",
        "--name=a",
        "--zone=z",
        "--accelerator=v5e-256",
        "--dry_run",
    ]
    return {
        "aot_without_config": (AOT, "--config"),
        "aot_zero_batch": ([*AOT, DEMO, "--config.train.batch_size=0"], "config.train.batch_size=0"),
        "aot_unknown_field": ([*AOT, DEMO, "--config.train.stepz=1"], "stepz"),
        "aot_bad_topology": ([*AOT, DEMO, "--topology=v9-8"], "--topology='v9-8'"),
        "predict_top_k_zero": ([*classify, "--top_k=0"], "--top_k=0"),
        "predict_text_as_tokenizer": ([*classify, f"--tokenizer={files / 'notes.txt'}"], "notes.txt"),
        "predict_text_as_shard": ([*classify, str(files / "notes.array_record")], "notes.array_record"),
        "predict_text_as_index": ([*search, f"--index={files / 'notes.txt'}"], "--index="),
        "predict_missing_model": ([*classify[:3], f"--model={files / 'nope'}", images], "--model="),
        "predict_corrupt_json": (
            [*classify[:3], f"--model={files / 'badjson'}", images, "--labels=a"],
            "clip_config.json",
        ),  # fmt: skip
        "export_corrupt_json": (
            ["-m", "clip_jax.export", f"--workdir={files / 'run'}", f"--out={files / 'x'}"],
            "config.json",
        ),  # fmt: skip
        "tokenizer_text_as_shard": (
            [*tokenizer, f"--input={files / 'notes.array_record'}"],
            "notes.array_record",
        ),
        "tokenizer_zero_vocab": (
            [*tokenizer, f"--input={files / 'notes.txt'}", "--vocab_size=0"],
            "--vocab_size",
        ),
        "tpu_local_workdir_on_a_pod": ([*tpu, "--", DEMO, "--workdir=/tmp/run"], "--workdir=/tmp/run"),
        "main_missing_config_file": (
            ["-m", "clip_jax.main", f"--config={files / 'nope.py'}", "--workdir=w"],
            "nope.py",
        ),  # fmt: skip
        "evaluate_not_a_workdir": (
            ["-m", "clip_jax.evaluate", f"--workdir={files}", "--dataset=x"],
            "config.json",
        ),
        "report_missing_workdir": (["-m", "clip_jax.report", str(files / "nope")], "nope"),
        "main_profile_steps_backwards": (
            ["-m", "clip_jax.main", DEMO, f"--workdir={files / 'w'}", "--config.logging.profile_steps=(5,3)"],
            "config.logging.profile_steps=(5, 3)",
        ),
        "predict_without_command": (
            ["-m", "clip_jax.predict", f"--model={model}"],
            "classify, index, search",
        ),
        "local_zero_processes": (
            [str(ROOT / "launch" / "local.py"), "--num_processes=0", "--", DEMO],
            "--num_processes",
        ),  # fmt: skip
    }


@pytest.fixture(scope="module")
def results(tiny_export, tmp_path_factory):  # noqa: F811
    """name -> CompletedProcess of every case, run 4 at a time."""
    files = tmp_path_factory.mktemp("mistakes")
    shutil.copytree(tiny_export / "images", files / "images")
    (files / "notes.txt").write_text("just some notes\n")
    (files / "notes.array_record").write_text("just some notes\n")
    shutil.copytree(tiny_export / "model", files / "badjson")
    (files / "badjson" / "clip_config.json").write_text("{not json")
    (files / "run").mkdir()
    (files / "run" / "config.json").write_text("{not json")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")

    def run(args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env,
                              cwd=ROOT)  # fmt: skip

    todo = cases(tiny_export / "model", files)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        done = {name: pool.submit(run, args) for name, (args, _) in todo.items()}
        return {name: (future.result(), todo[name][1]) for name, future in done.items()}


@pytest.mark.slow  # 20 fresh processes importing JAX: ~40 s of CPU, minutes on a busy 2-core box
@pytest.mark.parametrize("name", list(cases(pathlib.Path("m"), pathlib.Path("f"))))
def test_a_mistake_is_one_line_naming_the_flag_or_file(results, name):
    proc, names = results[name]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and names in errors[0], proc.stderr[-2000:]


def test_evaluation_sets_skip_and_count_corrupt_records(tmp_path, capsys):
    """records.read_all (evaluate's retrieval and array_record sets): corrupt records are left out."""
    path = str(tmp_path / "mixed.array_record")
    writer = ArrayRecordWriter(path, records.WRITER_OPTIONS)
    for data in (
        records.encode({"key": "a"}),
        b"\xc1 not msgpack",
        msgpack.packb("text"),
        records.encode({"key": "b"}),
    ):
        writer.write(data)
    writer.close()
    skipped = collections.Counter()
    assert [r["key"] for r in records.read_all([path], skipped)] == ["a", "b"]
    assert skipped == {"decode_error": 2}
    assert f"{path}#1" in capsys.readouterr().err
    with pytest.raises(records.ShardError, match="notes.array_record is not an ArrayRecord shard"):
        (tmp_path / "notes.array_record").write_text("notes")
        records.read_all([str(tmp_path / "notes.array_record")])


@pytest.mark.parametrize(
    "body, line, kind",
    [
        ("x = (\n", 1, "SyntaxError"),
        ("def get_config():\n    raise ValueError('boom')\n", 2, "ValueError: boom"),
        ("def get_config():\n    return {}['missing']\n", 2, "KeyError"),
        ("import no_such_module_xyz\n", 1, "ModuleNotFoundError"),
    ],
)
def test_broken_config_file_is_one_line(tmp_path, body, line, kind):
    """A --config file that does not parse or raises in get_config: one line naming file and line."""
    config = tmp_path / "broken.py"
    config.write_text(body)
    program = (
        "from ml_collections import config_flags\nfrom clip_jax import cli\n"
        "config_flags.DEFINE_config_file('config')\ncli.run(lambda argv: None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", program, f"--config={config}"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == done.stderr.strip().splitlines()[0], done.stderr
    assert done.stderr.startswith(f"error: {config}, line {line}: {kind}"), done.stderr
