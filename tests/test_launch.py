"""launch/tpu.py offline: the gcloud commands it prints, and its relaunch logic on a scripted slice."""

import importlib.util
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest
from absl import flags

from clip_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_tpu", ROOT / "launch" / "tpu.py")
tpu = importlib.util.module_from_spec(_spec)
sys.modules["launch_tpu"] = tpu  # dataclasses look their module up
_spec.loader.exec_module(tpu)

MAIN_ARGS = [
    "--config=configs/b16.py",
    "--workdir=gs://my-bucket/runs/b16",
    "--config.data.train_files=gs://my-bucket/laion/train-*.array_record",
    "--config.data.tokenizer=gs://my-bucket/laion/tokenizer.model",
]
SLICE = ["--name=clip-b16", "--zone=us-west4-a", "--accelerator=v5e-256", "--spot"]


def launch_cli(args, runner=None):
    """tpu.py's command line on flags of its own (absl parses them as when run as a program)."""
    fv = flags.FlagValues()
    tpu.define_flags(fv)
    return tpu.main(fv(["tpu.py", *args]), runner=runner, fv=fv)


def test_dry_run_of_a_v5e_256_spot_launch_prints_the_gcloud_commands(capsys):
    assert launch_cli(["run", "--dry_run", *SLICE, "--", *MAIN_ARGS]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    commands = [shlex.split(line) for line in lines]
    create = commands[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "clip-b16"]
    assert {"--accelerator-type=v5litepod-256", "--version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)
    assert "--zone=us-west4-a" in create
    ssh = [c for c in commands if c[3:5] == ["tpu-vm", "ssh"]]
    setup, train = ssh[0], ssh[1]
    assert all("--worker=all" in c for c in (setup, train))
    assert "pip install -q -e '.[tpu]'" in setup[-1] and "uv venv --seed --python 3.11" in setup[-1]
    assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket /gcs/my-bucket" in setup[-1]
    # The training command, as each worker's shell runs it (one more level of quoting inside bash -c).
    body = shlex.split(train[-1].removeprefix("--command="))
    inner = shlex.split(body[body.index("-c") + 1])
    assert inner[inner.index("-m") : inner.index("-m") + 3] == ["-m", "clip_jax.main", "--multihost"]
    assert "--workdir=gs://my-bucket/runs/b16" in inner  # written natively (orbax + gcsfs)
    assert "--config.data.train_files=/gcs/my-bucket/laion/train-*.array_record" in inner
    assert "--config=configs/b16.py" in inner
    describe = next(c for c in commands if "describe" in c)
    assert describe[-1] == "--format=value(state)"


def test_queued_resource_and_other_generations():
    s = tpu.Slice("q", "us-central2-b", "v4-128", project="p", spot=True, queued=True)
    create = tpu.create_command(s)
    assert create[3:6] == ["queued-resources", "create", "q"]
    assert {
        "--node-id=q",
        "--accelerator-type=v4-128",
        "--runtime-version=tpu-ubuntu2204-base",
        "--spot",
    } <= set(create)
    assert "--project=p" in create
    assert tpu.describe_command(s)[-1] == "--format=value(state.state)"
    assert "--force" in tpu.delete_command(s)
    assert tpu.Slice("a", "z", "v5p-128").version == "v2-alpha-tpuv5"
    assert tpu.Slice("a", "z", "v6e-64").accelerator_type == "v6e-64"
    assert tpu.Slice("a", "z", "v6e-64").version == "v2-alpha-tpuv6e"
    assert tpu.Slice("a", "z", "v5e-16", runtime_version="custom").version == "custom"
    with pytest.raises(ValueError, match="--accelerator"):
        _ = tpu.Slice("a", "z", "v3-8").generation


class FakeGcloud:
    """Answers describe with a scripted state sequence and worker 0's exit-code file with another."""

    def __init__(self, states, exit_codes):
        self.states, self.exit_codes, self.calls = list(states), list(exit_codes), []

    def __call__(self, cmd):
        self.calls.append(list(cmd))
        if "describe" in cmd:
            return 0, self.states.pop(0) + "\n"
        if any(a.startswith("--command=cat ") for a in cmd):
            return 0, self.exit_codes.pop(0) + "\n"
        return 0, ""

    def count(self, *words):
        return sum(all(w in c for w in words) for c in self.calls)


def launcher(fake, **kw):
    s = tpu.Slice("clip", "z", "v5e-256", spot=True, queued=True)
    return tpu.Launcher(s, MAIN_ARGS, runner=fake, sleep=lambda _: None, **kw)


def test_watch_relaunches_after_preemption_and_ends_when_training_ends():
    # ACTIVE/running, then the spot slice is reclaimed (SUSPENDED); the relaunch's create waits
    # through PROVISIONING to ACTIVE; training then runs and finishes with 0.
    fake = FakeGcloud(
        states=["ACTIVE", "SUSPENDED", "PROVISIONING", "ACTIVE", "ACTIVE", "ACTIVE"],
        exit_codes=["running", "running", "0"],
    )
    assert launcher(fake).watch() == 0
    assert fake.count("queued-resources", "delete", "--force") == 1
    assert fake.count("queued-resources", "create") == 1
    trains = [c for c in fake.calls if any("clip_jax.main --multihost" in a for a in c)]
    assert len(trains) == 1 and "--worker=all" in trains[0]
    assert fake.states == [] and fake.exit_codes == []


def test_a_failed_training_process_on_a_healthy_slice_restarts_then_gives_up():
    fake = FakeGcloud(states=["READY"] * 3, exit_codes=["1", "1", "1"])
    assert launcher(fake, max_restarts=2).watch() == 1
    assert fake.count("create") == 0 and fake.count("delete") == 0
    starts = [i for i, c in enumerate(fake.calls) if any("clip_jax.main" in a for a in c)]
    stops = [i for i, c in enumerate(fake.calls) if any("kill -TERM --" in a for a in c)]
    assert len(starts) == len(stops) == 2
    # Before each restart, on every worker, what is left of the run is stopped.
    assert all(stop == start - 1 for stop, start in zip(stops, starts, strict=True))
    assert all("--worker=all" in fake.calls[i] for i in stops)


def test_the_stop_script_terms_then_kills_the_process_group(tmp_path):
    """stop_script run by bash against a real process group started like train_script does."""
    pid_file = tmp_path / "pid"
    script = tpu.stop_script(grace_s=2).replace(tpu.PID, str(pid_file))
    # A group that ignores SIGTERM: only the SIGKILL after the grace period ends it.
    proc = subprocess.Popen(["setsid", "bash", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"])
    pid_file.write_text(str(proc.pid))
    time.sleep(0.3)
    started = time.monotonic()
    subprocess.run(["bash", "-c", script], check=True, timeout=30)
    assert proc.wait(timeout=10) == -signal.SIGKILL and time.monotonic() - started >= 1.5
    # Nothing running: a no-op that succeeds.
    subprocess.run(["bash", "-c", script], check=True, timeout=10)


def test_preempted_too_often_gives_up():
    fake = FakeGcloud(states=["PREEMPTED"], exit_codes=[])
    s = tpu.Slice("clip", "z", "v4-8", spot=True)
    assert tpu.Launcher(s, MAIN_ARGS, runner=fake, sleep=lambda _: None, max_restarts=0).watch() == 1
    assert fake.count("delete") == 0


def test_the_workdir_stays_on_gcs_and_only_data_buckets_are_mounted():
    args = [
        "--workdir",
        "gs://runs-bucket/b16",
        "--config.data.train_files=gs://data-bucket/x-*.array_record",
    ]
    assert tpu.to_mounted(args) == [
        "--workdir",
        "gs://runs-bucket/b16",
        "--config.data.train_files=/gcs/data-bucket/x-*.array_record",
    ]
    assert tpu.buckets(args) == ["data-bucket"]
    assert tpu.buckets(["--workdir=gs://runs-bucket/b16"]) == []


class FlakyGcloud(FakeGcloud):
    """FakeGcloud whose listed calls fail first: ``fail={"describe": [stderr, ...], "create": [...]}``
    pops one scripted failure per matching call, then answers as FakeGcloud."""

    def __init__(self, states, exit_codes, fail):
        super().__init__(states, exit_codes)
        self.fail = {k: list(v) for k, v in fail.items()}

    def __call__(self, cmd):
        for word, errors in self.fail.items():
            if word in cmd and errors:
                self.calls.append(list(cmd))
                return 1, "", errors.pop(0)
        return super().__call__(cmd)


def test_a_failed_state_query_on_a_training_slice_deletes_nothing():
    # describe fails (a network error, an expired token) while the slice is READY and training.
    fake = FlakyGcloud(
        states=["READY", "READY"],
        exit_codes=["running", "0"],
        fail={"describe": ["ERROR: (gcloud.compute.tpus.tpu-vm.describe) There was a problem refreshing "
                           "your current auth tokens: Connection reset by peer"]},
    )  # fmt: skip
    sleeps = []
    s = tpu.Slice("clip", "z", "v5e-256", spot=True)
    assert tpu.Launcher(s, MAIN_ARGS, runner=fake, sleep=sleeps.append, backoff_s=7).watch() == 0
    assert fake.count("delete") == 0 and fake.count("create") == 0
    assert fake.count("describe") == 3  # the failed query was retried after a backoff
    assert 7 in sleeps


def test_gcloud_not_found_is_the_only_answer_that_means_the_slice_is_gone():
    gone = "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'nodes/clip' was not found"
    fake = FlakyGcloud(states=["READY"], exit_codes=["0"], fail={"describe": [gone]})
    s = tpu.Slice("clip", "z", "v5e-256", spot=True)
    assert tpu.Launcher(s, MAIN_ARGS, runner=fake, sleep=lambda _: None).watch() == 0
    assert fake.count("tpu-vm", "delete") == 1 and fake.count("tpu-vm", "create") == 1


def test_a_relaunch_keeps_trying_through_capacity_errors_with_backoff():
    no_capacity = "ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: There is no more capacity"
    fake = FlakyGcloud(
        states=["PREEMPTED", "READY", "READY"],
        exit_codes=["running", "0"],
        fail={"create": [no_capacity, no_capacity]},
    )
    sleeps = []
    s = tpu.Slice("clip", "z", "v5e-256", spot=True)
    launcher = tpu.Launcher(s, MAIN_ARGS, runner=fake, sleep=sleeps.append, poll_s=1, backoff_s=5,
                            max_restarts=3)  # fmt: skip
    assert launcher.watch() == 0
    assert fake.count("tpu-vm", "create") == 3 and launcher.restarts == 3
    trains = [c for c in fake.calls if any("clip_jax.main --multihost" in a for a in c)]
    assert len(trains) == 1
    assert [t for t in sleeps if t != 1] == [5, 10]  # exponential backoff between the tries


def test_capacity_errors_beyond_max_restarts_give_up():
    no_capacity = "ERROR: RESOURCE_EXHAUSTED: no capacity"
    fake = FlakyGcloud(states=["PREEMPTED"], exit_codes=[], fail={"create": [no_capacity] * 3})
    s = tpu.Slice("clip", "z", "v5e-256", spot=True)
    assert tpu.Launcher(s, MAIN_ARGS, runner=fake, sleep=lambda _: None, max_restarts=2).watch() == 1
    assert fake.count("tpu-vm", "create") == 2


@pytest.mark.parametrize(
    "args, names",
    [
        (["run", *SLICE, "--", "--config=configs/b16.py", "--workdir=/tmp/run"], "--workdir=/tmp/run"),
        (["run", *SLICE, "--", "--workdir=gs://b/r"], "--config"),
        (["run", "--name=x", "--zone=z", "--accelerator=v3-8"], "--accelerator"),
        (["watch", *SLICE, "--max_restarts=-1"], "--max_restarts"),
        (["fly", *SLICE], "action"),
        (["run", "--name=Bad_Name", "--zone=z"], "--name"),
    ],
)
def test_flag_mistakes_are_refused_before_anything_is_created(args, names):
    fake = FakeGcloud(states=[], exit_codes=[])
    with pytest.raises(cli.UserError, match=names):
        launch_cli(args, runner=fake)
    assert fake.calls == []


def test_a_single_host_slice_may_use_a_local_workdir():
    fake = FakeGcloud(states=[], exit_codes=[])
    args = ["train", "--name=x", "--zone=z", "--accelerator=v5e-8", "--", "--config=c.py", "--workdir=/tmp/r"]
    assert launch_cli(args, runner=fake) == 0
    assert fake.count("ssh") == 1
