"""Two JAX processes x two CPU devices read one ArrayRecord epoch: every record once.

Each process (a fresh subprocess, jax.distributed over gloo) runs the training
iterator for the whole global batches of one epoch (its block of each,
`clip_jax.data.elastic`), makes every batch a global array over the 4 devices
and gathers the global batch's keys with a jitted collective (a host that ran
more or fewer steps than the other would hang, caught by the hard timeout). A
record's key is written into its image (a solid colour, PNG, centre crop only),
so the keys come back out of the decoded training batches.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_RECORDS, NUM_SHARDS, LOCAL_BATCH, IMAGE_SIZE = 49, 3, 8, 8  # 3 global batches of 16, then 1 left
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2


def key_image(i: int) -> bytes:
    """A solid 8 x 8 PNG whose colour encodes ``i``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (i % 256, i // 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def image_key(image: np.ndarray) -> int:
    """uint8 [..., S, S, 3] -> the key ``key_image`` wrote."""
    return int(image[..., 0, 0, 0]) + 256 * int(image[..., 0, 0, 1])


def worker(address: str, process_id: int, data_dir: str, out_path: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, NUM_PROCESSES, process_id)
    from clip_jax import sharding
    from clip_jax.data import pipeline, records, tokenizer

    files = records.expand(os.path.join(data_dir, "mp-*.array_record"), "files")
    tok = tokenizer.Tokenizer(os.path.join(data_dir, "tok.model"), 8)
    steps = NUM_RECORDS // (LOCAL_BATCH * jax.process_count())  # the whole global batches of an epoch
    it = pipeline.train_iterator(
        files, tok, IMAGE_SIZE, LOCAL_BATCH, seed=3, num_threads=1, crop=None, stall_timeout_s=60
    )
    mesh = sharding.make_mesh({"data": -1})
    corner = lambda image: image[:, 0, 0, :2].astype("int32")  # [B, 2]: the key's two bytes
    gather = jax.jit(corner, out_shardings=sharding.replicated(mesh))
    local_keys, global_keys = [], []
    for _ in range(steps):
        batch = next(it)
        local_keys += [image_key(img) for img in batch["image"]]
        rgb = np.asarray(gather(sharding.to_global(batch, mesh)["image"]))  # [B, 2] on every host
        global_keys.append([int(r) + 256 * int(g) for r, g in rgb])
    result = {"local": local_keys, "global": global_keys, "steps": steps}
    result["devices"] = [jax.local_device_count(), jax.device_count()]
    with open(out_path, "w") as f:
        json.dump(result, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_every_record_of_an_epoch_exactly_once(tmp_path):
    from clip_jax.data import pipeline, records, tokenizer

    captions = [f"shape number {i % 7} in colour {i % 5}" for i in range(NUM_RECORDS)]
    recs = [{"key": str(i), "image": key_image(i), "caption": captions[i]} for i in range(NUM_RECORDS)]
    files = records.write_shards(recs, str(tmp_path / "mp"), NUM_SHARDS)
    tokenizer.train_sentencepiece(captions, str(tmp_path / "tok.model"), 32)
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    outs = [tmp_path / f"keys-{i}.json" for i in range(NUM_PROCESSES)]
    code = "import sys, test_data_multiprocess as t; a = sys.argv; t.worker(a[1], int(a[2]), a[3], a[4])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, address, str(i), str(tmp_path), str(outs[i])],
            env=env,
            cwd=ROOT / "tests",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(NUM_PROCESSES)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    hosts = [json.loads(o.read_text()) for o in outs]
    assert [h["devices"] for h in hosts] == [[2, 4], [2, 4]]

    # Each host's batches are its block of every global batch (host 0 first).
    steps = NUM_RECORDS // (NUM_PROCESSES * LOCAL_BATCH)
    assert hosts[0]["steps"] == hosts[1]["steps"] == steps
    for h, host in enumerate(hosts):
        blocks = [batch[h * LOCAL_BATCH : (h + 1) * LOCAL_BATCH] for batch in hosts[0]["global"]]
        assert host["local"] == [k for block in blocks for k in block]
    # The global batches, identical on both hosts, hold distinct records of the one epoch, shuffled.
    assert hosts[0]["global"] == hosts[1]["global"]
    seen = [k for step in hosts[0]["global"] for k in step]
    assert len(set(seen)) == len(seen) == steps * NUM_PROCESSES * LOCAL_BATCH
    assert set(seen) <= set(range(NUM_RECORDS)) and seen != sorted(seen)
    # The same global stream as one process reading all of it (the stream is global).
    tok = tokenizer.Tokenizer(str(tmp_path / "tok.model"), 8)
    alone = pipeline.train_iterator(files, tok, IMAGE_SIZE, 16, seed=3, num_threads=1, crop=None)
    assert [[image_key(img) for img in next(alone)["image"]] for _ in range(steps)] == hosts[0]["global"]


def elastic_worker(
    address: str, process_id: int, count: int, data_dir: str, out_dir: str, steps: int
) -> None:
    """Reads ``steps`` global batches of 16 as process ``process_id`` of ``count`` (resuming from
    ``data_dir/saved`` when it exists); saves its position as the checkpoint does."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if count > 1:
        jax.distributed.initialize(address, count, process_id)
    import grain
    from etils import epath

    from clip_jax.data import elastic, pipeline, records, tokenizer

    files = records.expand(os.path.join(data_dir, "el-*.array_record"), "files")
    tok = tokenizer.Tokenizer(os.path.join(data_dir, "tok.model"), 8)
    it = pipeline.train_iterator(files, tok, IMAGE_SIZE, 16 // count, seed=3, num_threads=1, crop=None)
    saved = os.path.join(data_dir, "saved")
    if os.path.isdir(saved):
        it.set_state(elastic.saved_state(saved, jax.process_index(), jax.process_count()))
    local = [[image_key(img) for img in next(it)["image"]] for _ in range(steps)]
    os.makedirs(out_dir, exist_ok=True)
    grain.checkpoint.CheckpointHandler().save(epath.Path(out_dir), args=grain.checkpoint.CheckpointSave(it))
    with open(os.path.join(out_dir, f"keys-{process_id}.json"), "w") as f:
        json.dump({"local": local, "processes": [jax.process_index(), jax.process_count()]}, f)


def launch(tmp_path, count: int, out_dir: str, steps: int) -> list[dict]:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = (
        "import sys, test_data_multiprocess as t; a = sys.argv; "
        "t.elastic_worker(a[1], int(a[2]), int(a[3]), a[4], a[5], int(a[6]))"
    )
    args = [str(count), str(tmp_path), out_dir, str(steps)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, address, str(i), *args],
            env=env,
            cwd=ROOT / "tests",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(count)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    return [json.loads(pathlib.Path(out_dir, f"keys-{i}.json").read_text()) for i in range(count)]


@pytest.mark.slow
def test_two_processes_interrupted_resume_on_one_and_see_the_rest_of_the_epoch_once(tmp_path):
    """Two real JAX processes read 8 global batches and save their position (Grain's handler:
    process_0-of-2.json, process_1-of-2.json); one process resumes from it."""
    from clip_jax.data import pipeline, records, tokenizer

    recs = [{"key": str(i), "image": key_image(i), "caption": f"shape {i % 7}"} for i in range(200)]
    files = records.write_shards(recs, str(tmp_path / "el"), NUM_SHARDS)
    tokenizer.train_sentencepiece([r["caption"] for r in recs], str(tmp_path / "tok.model"), 32)
    hosts = launch(tmp_path, 2, str(tmp_path / "saved"), 8)
    assert [h["processes"] for h in hosts] == [[0, 2], [1, 2]]
    first = [hosts[0]["local"][s] + hosts[1]["local"][s] for s in range(8)]
    (resumed,) = launch(tmp_path, 1, str(tmp_path / "after"), 5)
    # The uninterrupted stream, read here by one process from the start.
    tok = tokenizer.Tokenizer(str(tmp_path / "tok.model"), 8)
    alone = pipeline.train_iterator(files, tok, IMAGE_SIZE, 16, seed=3, num_threads=1, crop=None)
    whole = [[image_key(img) for img in next(alone)["image"]] for _ in range(13)]
    assert first == whole[:8] and resumed["local"] == whole[8:]
    epoch = [k for batch in first + resumed["local"] for k in batch][:200]
    assert sorted(epoch) == list(range(200))  # every record once, none twice
