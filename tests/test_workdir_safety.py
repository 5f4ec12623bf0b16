"""A run never damages its workdir: a refused resume changes no byte of it; one run per workdir
(a lock naming its holder; a stale lock is recovered); no silent restart from step 0 over
checkpoints that do not verify; one metrics row per step after a rollback."""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from conftest import load_config
from test_checkpoint import mesh8, remove_manifest, restore, save_steps  # noqa: F401 (fixture)

from clip_jax import checkpoint, data_fingerprint, lock, metrics, train


def tree_hashes(root) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    out = {}
    for parent, _, names in os.walk(root):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def tiny_demo():
    """The demo with its scenes generated into the workdir (as a user's first run does), tiny."""
    config = load_config("demo")
    config.data.scenes.update(num_train=64, num_heldout_things=16, num_heldout_scenes=16)
    config.train.update(batch_size=16, total_steps=2, log_every=1)
    config.optim.warmup_steps = 1
    config.checkpoint.every = 2
    config.eval.batch_size = 16
    return config


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A finished tiny demo run (checkpoint at step 2, its scenes and tokenizer inside)."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    train.run(tiny_demo(), str(workdir))
    return workdir


def _change_seed(c):
    c.data.shuffle_seed = 7


def _change_scenes_vocab(c):
    c.data.scenes.vocab_size = 96


def _change_model(c):
    c.model.context_length = 12


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (_change_seed, data_fingerprint.DataChangedError),
        (_change_scenes_vocab, data_fingerprint.DataChangedError),  # would regenerate scenes + tokenizer
        (_change_model, checkpoint.StateMismatchError),  # the checkpoint's arrays do not fit the model
    ],
)
def test_a_refused_resume_leaves_the_workdir_byte_identical(trained_workdir, change, error):
    before = tree_hashes(trained_workdir)
    config = tiny_demo()
    config.train.total_steps = 4
    change(config)
    with pytest.raises(error):
        train.run(config, str(trained_workdir))
    assert tree_hashes(trained_workdir) == before


def _live_holder(workdir, pid):
    record = {"host": socket.gethostname(), "pid": pid, "since": time.time() - 60, "token": "x"}
    (workdir / lock.LOCK_FILE).write_text(json.dumps(record))


def test_a_second_run_on_a_locked_workdir_stops_at_once_naming_the_holder(trained_workdir):
    _live_holder(trained_workdir, os.getppid())  # a live process of this host
    before = tree_hashes(trained_workdir)
    with pytest.raises(lock.WorkdirBusyError) as e:
        train.run(tiny_demo(), str(trained_workdir))
    message = str(e.value)
    assert f"pid {os.getppid()}" in message and socket.gethostname() in message and "since" in message
    assert "\n" not in message
    assert tree_hashes(trained_workdir) == before
    (trained_workdir / lock.LOCK_FILE).unlink()


@pytest.mark.parametrize("reaped", [True, False])
def test_a_stale_lock_of_a_dead_process_is_recovered(tmp_path, capsys, reaped):
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.kill()
    if reaped:
        dead.wait()  # its pid is gone
    else:  # a zombie until its parent reaps it (a killed run the launcher has not waited for)
        while pathlib.Path(f"/proc/{dead.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
    _live_holder(tmp_path, dead.pid)
    record = lock.acquire(str(tmp_path))
    assert "taking over a stale lock" in capsys.readouterr().out
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release(str(tmp_path), record)
    assert not (tmp_path / lock.LOCK_FILE).exists()
    dead.wait()


def test_the_lock_is_held_during_the_run_and_released_after(tmp_path):
    with lock.hold(str(tmp_path)):
        holder = json.loads((tmp_path / lock.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
            lock.acquire(str(tmp_path))  # a second run in this workdir
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_only_process_0_takes_the_lock(tmp_path, monkeypatch):
    _live_holder(tmp_path, os.getppid())
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # another process of the same run
    with lock.hold(str(tmp_path)):
        pass  # not refused: process 0 holds the run's lock
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getppid()


def test_no_restart_from_step_0_when_no_step_verifies(tmp_path, mesh8, capsys):  # noqa: F811
    save_steps(tmp_path / "ckpt", [2, 4], mesh8)
    for step in ("2", "4"):
        remove_manifest(tmp_path / "ckpt" / step)
    before = tree_hashes(tmp_path)
    with pytest.raises(checkpoint.UnverifiedCheckpointsError) as e:
        restore(tmp_path / "ckpt", mesh8)
    message = str(e.value)
    assert "step 4 is damaged: no checksums.json" in message and "step 2 is damaged" in message
    assert "checkpoint.accept_unverified=True" in message
    assert tree_hashes(tmp_path) == before  # nothing moved aside
    state, _ = restore(tmp_path / "ckpt", mesh8, accept_unverified=True)
    assert int(state.step) == 4 and "as accepted, restoring step 4" in capsys.readouterr().out


def test_metrics_after_a_rollback_hold_one_row_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo'
    )
    logger = metrics.MetricsLogger(str(tmp_path), 6, 8, True, tensorboard=False, resumed_step=3)
    values = {k: jnp.float32(0.5) for k in ("loss", "i2t_acc", "t2i_acc", "logit_scale", "lr", "grad_norm")}
    for step in (4, 5):
        logger.write(step, values)
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [1.0, 1.0, 1.0, 0.5, 0.5]  # 4, 5 are the new run's


class _FakeGCS:
    """A bucket that honours GCS's create-only precondition (gcp-storage-emulator ignores
    ``ifGenerationMatch``, so the lock's gs:// path is tested here, against this)."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def pipe_file(self, path, data, mode="overwrite"):
        if mode == "create" and path in self.objects:
            raise FileExistsError(path)  # gcsfs's answer to HTTP 412
        self.objects[path] = data

    def read_bytes(self, path):
        if path not in self.objects:
            raise FileNotFoundError(path)
        return self.objects[path]


def test_two_starts_on_a_gs_workdir_cannot_both_hold_the_lock(monkeypatch):
    """Both starts look before either writes (the race an exists-then-write lock loses): the
    create-only upload lets exactly one hold the lock."""
    bucket = _FakeGCS()
    monkeypatch.setattr(lock.storage, "_fs", lambda path: bucket)
    monkeypatch.setattr(lock.storage, "exists", lambda path: False)  # neither saw the other's lock
    monkeypatch.setattr(lock.storage, "read_bytes", bucket.read_bytes)
    monkeypatch.setattr(lock.storage, "write_bytes", bucket.pipe_file)
    monkeypatch.setattr(lock.storage, "remove", bucket.objects.pop)
    first = lock.acquire("gs://b/run")
    with pytest.raises(lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
        lock.acquire("gs://b/run")
    assert json.loads(bucket.objects["gs://b/run/.lock"])["token"] == first["token"]
    lock.release("gs://b/run", first)
    assert not bucket.objects
