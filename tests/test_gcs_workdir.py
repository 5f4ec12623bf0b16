"""gs:// workdirs, against a local GCS server (gcp-storage-emulator; gcsfs and tensorstore are
pointed at it by STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL, as at a real bucket).

- A run trained into gs://, then resumed there, ends bitwise equal to a local run; the
  bucket holds everything a local workdir does, and metrics.jsonl keeps one line per
  step of both runs (an object store cannot append).
- Every damage of test_checkpoint, done to objects, is detected from the store's own
  checksums, and the run falls back to the previous step.
- Export, clip_jax.load, the report and a webdataset tar stream read from gs:// too.
"""

import contextlib
import json
import os
import pathlib
import socket
import uuid

import jax
import numpy as np
import pytest
from conftest import load_config
from test_checkpoint import Crash, assert_trees_bitwise_equal, crashing_compile, restore, save_steps

from clip_jax import checkpoint, export, sharding, step, storage, train, validation
from clip_jax.data import webdataset
from clip_jax.interop import files, mapping
from clip_jax.workdir import TOKENIZER_FILE

emulator = pytest.importorskip("gcp_storage_emulator.server")
pytest.importorskip("gcsfs")

BUCKET = "clip-test"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _send_generations() -> None:
    """The emulator sends object bytes without GCS's ``x-goog-generation`` header, from which
    tensorstore (orbax's OCDBT manifests) reads an object's generation: add it."""
    objects = emulator.objects
    original = objects.download
    if getattr(original, "sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # (a missing object: 404 already set)
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    download.sends_generation = True
    objects.download = download  # objects.get(alt=media) calls it
    for _, methods in emulator.HANDLERS:
        for method, handler in methods.items():
            if handler is original:
                methods[method] = download


@pytest.fixture(scope="module")
def gcs():
    """A GCS server on 127.0.0.1 with one empty bucket; returns "gs://BUCKET"."""
    _send_generations()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = pytest.MonkeyPatch()
    env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs, google-cloud-storage
    env.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's array writes
    env.setenv("GOOGLE_CLOUD_PROJECT", "test")
    yield f"gs://{BUCKET}"
    # tensorboardX's GCS writers upload their (already flushed) events once more when collected,
    # which is at interpreter exit, after this server stopped: 120 s of retries each. Not here.
    from tensorboardX import record_writer

    record_writer.GCSRecordWriter.__del__ = lambda self: None
    env.undo()
    server.stop()


@pytest.fixture
def mesh8():
    return sharding.make_mesh({"data": 1, "fsdp": -1, "model": 1})


def small_demo(scenes_dataset, total_steps):
    config = load_config("demo")
    config.data.scenes.dir = str(pathlib.Path(scenes_dataset.tokenizer).parent)
    config.data.scenes.update(num_train=512, num_heldout_things=64, num_heldout_scenes=64)
    config.train.update(batch_size=32, total_steps=total_steps, log_every=1)
    config.optim.warmup_steps = 2
    config.checkpoint.every = 2
    config.eval.batch_size = 64
    config.eval.evaluators.scenes.diagnostics = False
    return config


def test_a_gs_workdir_trains_resumes_bitwise_and_exports(gcs, scenes_dataset, tmp_path):
    reference = train.run(small_demo(scenes_dataset, 6), str(tmp_path / "local"))["state"]

    # Interrupted after step 5 (the checkpoints are steps 2 and 4), then run again.
    workdir = f"{gcs}/runs/demo"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "compile_train_step", crashing_compile(5))
        with pytest.raises(Crash):
            train.run(small_demo(scenes_dataset, 6), workdir)
    objects = storage.files_under(workdir)
    for name in ("config.json", "tokenizer.model", "metrics.jsonl"):
        assert name in objects, objects
    for saved in (2, 4):
        assert f"checkpoints/{saved}/{checkpoint.MANIFEST}" in objects
        assert f"checkpoints/{saved}/commit_success.txt" in objects
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in objects)
    manifest = json.loads(storage.read_text(f"{workdir}/checkpoints/4/{checkpoint.MANIFEST}"))
    assert manifest and all({"size", "crc32c"} <= set(entry) for entry in manifest.values())
    assert checkpoint.damage(f"{workdir}/checkpoints/4") is None

    resumed = train.run(small_demo(scenes_dataset, 6), workdir)["state"]
    assert int(resumed.step) == int(reference.step) == 6
    assert_trees_bitwise_equal(resumed.params, reference.params)
    assert_trees_bitwise_equal(resumed.opt_state, reference.opt_state)
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the first run's lines to its checkpoint kept, the second's added
    assert "eval/6.json" in storage.files_under(workdir)
    carried = storage.read_bytes(f"{workdir}/{TOKENIZER_FILE}")
    assert carried == pathlib.Path(scenes_dataset.tokenizer).read_bytes()

    # Export from the bucket into the bucket; read back, equal to the trained params.
    run = export.from_workdir(workdir)
    assert run["step"] == 6 and run["tokenizer"] == f"{workdir}/tokenizer.model"
    summary = export.export(run, "params", f"{gcs}/exports/demo")
    assert summary["bytes"] == storage.size(f"{gcs}/exports/demo/{files.PARAMS_WEIGHTS}") > 0
    config, params = files.load(f"{gcs}/exports/demo")
    trained = mapping.flatten(jax.device_get(resumed.params))
    for path, value in mapping.flatten(params).items():
        np.testing.assert_array_equal(value, np.asarray(trained[path], np.float32), err_msg=path)

    # clip_jax.load on the gs:// workdir: the same embeddings as on the local export of it.
    import clip_jax

    local_export = tmp_path / "export"
    export.export(run, "params", str(local_export))
    texts = ["a red circle", "two blue squares"]
    from_bucket = clip_jax.load(workdir).encode_text(texts)
    from_disk = clip_jax.load(str(local_export)).encode_text(texts)
    np.testing.assert_array_equal(from_bucket, from_disk)

    # The report reads the bucket and writes a local directory (for a browser).
    from clip_jax import report

    monkey = pytest.MonkeyPatch()
    monkey.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        index = report.build(workdir)
    finally:
        monkey.undo()
    assert index.startswith(str(tmp_path / "cache")) and os.path.exists(index)
    assert os.path.exists(os.path.join(os.path.dirname(index), "training.png"))


# --- Integrity on an object store: the damages of test_checkpoint, done to objects ---


def _array_object(step_dir: str) -> str:
    """The largest object of array bytes (OCDBT data) of the train state."""
    names = [n for n in storage.files_under(step_dir) if n.startswith("state/") and n.split("/")[-2] == "d"]
    return max((f"{step_dir}/{n}" for n in names), key=storage.size)


def flip_bytes(step_dir):
    path = _array_object(step_dir)
    data = bytearray(storage.read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(path, bytes(data))


def truncate(step_dir):
    path = _array_object(step_dir)
    data = storage.read_bytes(path)
    storage.write_bytes(path, data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (flip_bytes, "crc32c differs"),
        (truncate, "truncated"),
        # orbax's commit marker on object stores: without it orbax does not list the step at all.
        (lambda d: storage.remove(f"{d}/commit_success.txt"), "was never committed"),
        (lambda d: storage.remove(f"{d}/{checkpoint.MANIFEST}"), "never confirmed complete"),
        (lambda d: storage.remove(_array_object(d)), "is missing"),
    ],
    ids=["flipped", "truncated", "no-commit-marker", "no-manifest", "missing-file"],
)
def test_damaged_latest_step_on_gcs_is_detected_and_the_run_falls_back(gcs, mesh8, capsys, damage, reason):
    directory = f"{gcs}/integrity/{uuid.uuid4().hex}"
    save_steps(f"{directory}/ckpt", [2, 4], mesh8)
    assert checkpoint.damage(f"{directory}/ckpt/4") is None
    damage(f"{directory}/ckpt/4")
    state, next_batch = restore(f"{directory}/ckpt", mesh8)
    out = capsys.readouterr().out
    assert "checkpoint step 4 " in out and reason in out, out
    assert int(state.step) == 2 and float(state.params["b"]) == 2.0
    np.testing.assert_array_equal(next_batch, [4, 5, 6, 7])  # step 2's data position
    assert not storage.files_under(f"{directory}/ckpt/4")
    assert storage.files_under(f"{directory}/checkpoints_damaged/4")
    # Training goes on past the moved-aside step: step 4 can be saved again.
    save_steps(f"{directory}/ckpt", [4], mesh8)
    assert int(restore(f"{directory}/ckpt", mesh8)[0].step) == 4


# --- Data streamed from gs:// ---


@pytest.mark.skipif(not (SHARED / "emoji").is_dir(), reason="needs ../shared/data/emoji")
def test_webdataset_shards_stream_from_gcs_as_from_disk(gcs):
    local = sorted((SHARED / "emoji").glob("*.tar"))[:2]
    for path in local:
        storage.write_bytes(f"{gcs}/emoji/{path.name}", path.read_bytes())
    remote = storage.glob(f"{gcs}/emoji/*.tar")
    assert remote == [f"{gcs}/emoji/{p.name}" for p in local]
    for path, url in zip(local, remote, strict=True):
        from_disk = list(webdataset.iter_tar_file(str(path)))
        from_bucket = list(webdataset.iter_tar_file(url))
        assert len(from_bucket) == len(from_disk) > 0
        assert [s["key"] for s in from_bucket] == [s["key"] for s in from_disk]
        assert from_bucket == from_disk  # image bytes, captions, metadata


def test_array_record_files_in_a_bucket_are_refused_with_the_way_out(gcs):
    storage.write_bytes(f"{gcs}/laion/train-00000-of-00001.array_record", b"not read")
    config = load_config("b16")
    config.data.train_files = f"{gcs}/laion/train-*.array_record"
    with pytest.raises(validation.ConfigError, match="gcsfuse.*webdataset"):
        validation.data_files(config)
    config.data.format = "webdataset"  # tar shards stream from gs://
    assert validation.data_files(config) == [f"{gcs}/laion/train-00000-of-00001.array_record"]
