"""Train on a Cloud TPU VM slice with gcloud: create, set up, train, watch, relaunch, tear down.

    python launch/tpu.py run --name=clip-b16 --zone=us-west4-a --accelerator=v5e-256 --spot \\
        --queued -- --config=configs/b16.py --workdir=gs://BUCKET/runs/b16 \\
        --config.data.train_files='gs://BUCKET/laion400m/train-*.array_record' \\
        --config.data.tokenizer=gs://BUCKET/laion400m/tokenizer.model

Everything after ``--`` goes to ``clip_jax.main``. Subcommands: create, setup,
train, stop, logs, watch, run (= create + setup + train + watch), delete.
``--dry_run`` prints the gcloud commands instead of running them.

- Every worker gets the code (``git archive`` of HEAD copied with scp, or
  ``--source=git:URL@REF`` cloned), a Python 3.11 venv (uv) and
  ``pip install -e '.[tpu]'``; the same ``python -m clip_jax.main --multihost ...``
  then starts on all workers, detached, logging to ~/clip_train.log.
- The workdir stays ``gs://BUCKET/...``: orbax writes checkpoints to GCS itself
  and clip_jax writes the rest through gcsfs (the ``tpu`` extra installs it).
  Other ``gs://`` paths in the training flags (ArrayRecord data, which reads
  local files only) are mounted with gcsfuse at /gcs/BUCKET on every worker and
  passed as /gcs/BUCKET/.... ``--nogcsfuse`` passes every path as is.
- ``watch`` polls the slice's state (``describe --format=value(state)``). PREEMPTED
  (TPU VM) or SUSPENDED/FAILED (queued resource) -> delete, recreate, set up and
  start again: the run resumes from its latest checkpoint in the workdir. A
  training process that exits non-zero on a healthy slice is restarted as is,
  after what is left of it on the other workers is stopped (SIGTERM, then SIGKILL).
  Both count against ``--max_restarts``.
- Only gcloud's own NOT_FOUND answer means the slice is gone: any other failed query
  (network, auth, quota) is retried with exponential backoff (``--backoff_s``, doubling)
  and never deletes anything. A relaunch whose create fails (no spot capacity) is tried
  again after a backoff, each try counting against ``--max_restarts``.
- The flags are checked before anything is created: a multi-host slice (more than 8
  chips or cores in the name) needs a shared gs:// workdir.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from absl import flags

# The sibling module, both when this runs as a script and when it is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gcloud_slice import (  # noqa: E402
    HEALTHY_STATES,
    NOT_FOUND,
    PREEMPTED_STATES,
    RUNTIME_VERSIONS,
    UNKNOWN,
    GcloudError,
    Runner,
    Slice,
    create_command,
    delete_command,
    describe_command,
    dry_runner,
    scp_command,
    ssh_command,
    subprocess_runner,
)
from gcloud_slice import call as _call  # noqa: E402

from clip_jax import cli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Remote paths on each worker.
CODE_DIR, VENV, LOG, RC, PID = (
    "~/clip_jax",
    "~/clip_venv",
    "~/clip_train.log",
    "~/clip_train.rc",
    "~/clip_train.pid",
)

# Flags whose gs:// paths clip_jax opens itself (orbax/tensorstore and gcsfs): not mounted.
NATIVE_FLAGS = ("--workdir",)


def _native(args: Sequence[str]) -> list[bool]:
    """Per argument: is it (the value of) a flag in NATIVE_FLAGS (``--f=V`` or ``--f V``)?"""
    out = []
    for i, a in enumerate(args):
        flag = a.split("=", 1)[0]
        out.append(flag in NATIVE_FLAGS or (i > 0 and "=" not in args[i - 1] and args[i - 1] in NATIVE_FLAGS))
    return out


def buckets(args: Sequence[str]) -> list[str]:
    """The buckets gcsfuse mounts: those of the gs:// paths in the flags not in NATIVE_FLAGS."""
    mounted = [a for a, native in zip(args, _native(args), strict=True) if not native]
    return sorted({m.group(1) for a in mounted for m in re.finditer(r"gs://([a-z0-9][-_.a-z0-9]*)", a)})


def to_mounted(args: Sequence[str]) -> list[str]:
    """gs://BUCKET/x -> /gcs/BUCKET/x (where gcsfuse mounts the buckets), except NATIVE_FLAGS'."""
    native = _native(args)
    return [a if n else re.sub(r"gs://", "/gcs/", a) for a, n in zip(args, native, strict=True)]


def setup_script(source: str, bucket_names: Sequence[str], archive: str = "") -> str:
    """The shell run on every worker: code, Python 3.11 venv, the package with its TPU extra, mounts."""
    if source.startswith("git:"):
        url, _, ref = source[4:].partition("@")
        code = f"rm -rf {CODE_DIR} && git clone {shlex.quote(url)} {CODE_DIR}"
        code += f" && git -C {CODE_DIR} checkout {shlex.quote(ref)}" if ref else ""
    else:
        code = f"rm -rf {CODE_DIR} && mkdir -p {CODE_DIR} && tar xzf {archive} -C {CODE_DIR}"
        code += f" && rm -f {archive}"
    steps = [
        "set -e",
        code,
        # TPU VM images ship Python 3.10; clip_jax needs >= 3.11.
        "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
        f"~/.local/bin/uv venv --seed --python 3.11 --allow-existing {VENV}",
        f"cd {CODE_DIR} && {VENV}/bin/pip install -q -e '.[tpu]'",
    ]
    if bucket_names:
        steps.append(
            "command -v gcsfuse >/dev/null || { "
            'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
            'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main"'
            " | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
            " && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg"
            " | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
            " && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
        )
        for b in bucket_names:  # --rename-dir-limit: orbax commits a checkpoint by renaming its directory
            steps.append(
                f"sudo mkdir -p /gcs/{b} && sudo chown $USER /gcs/{b} && (mountpoint -q /gcs/{b} || "
                f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 {b} /gcs/{b})"
            )
    return "; ".join(steps)


def stop_script(grace_s: int = 90) -> str:
    """Stops what is left of a run on a worker (say, hung in a collective after another worker
    died): SIGTERM to its process group (a save, where the processes can still agree on a
    step), SIGKILL after ``grace_s`` seconds. A no-op where nothing runs."""
    alive = f"kill -0 $(cat {PID}) 2>/dev/null"
    return (
        f"if [ -f {PID} ] && {alive}; then kill -TERM -- -$(cat {PID}); "
        f"for i in $(seq {grace_s}); do {alive} || break; sleep 1; done; "
        f"kill -KILL -- -$(cat {PID}) 2>/dev/null; fi; true"
    )


def train_script(main_args: Sequence[str]) -> str:
    """Starts clip_jax.main detached on a worker; its exit code lands in ~/clip_train.rc."""
    train = shlex.join([f"{VENV}/bin/python", "-m", "clip_jax.main", "--multihost", *main_args])
    train = train.replace(f"'{VENV}/bin/python'", f"{VENV}/bin/python")  # keep ~ expandable
    body = f"cd {CODE_DIR} && {train}; echo $? > {RC}"
    return (
        f"if [ -f {PID} ] && kill -0 $(cat {PID}) 2>/dev/null; then echo 'already training'; exit 1; fi; "
        f"rm -f {RC}; setsid nohup bash -c {shlex.quote(body)} > {LOG} 2>&1 < /dev/null & echo $! > {PID}"
    )


class Launcher:
    """The steps of a run on one slice; every gcloud call goes through ``runner``.

    Failures are retried with exponential backoff (``backoff_s``, doubling up to
    ``max_backoff_s``): a failed state query is never read as a lost slice, and a relaunch
    whose create fails (no capacity) is tried again, each try counting against ``max_restarts``.
    """

    def __init__(self, slice_: Slice, main_args: Sequence[str], *, runner: Runner = subprocess_runner,
                 source: str = "copy", gcsfuse: bool = True, poll_s: float = 60.0, max_restarts: int = 100,
                 sleep: Callable[[float], None] = time.sleep, query_tries: int = 5, backoff_s: float = 10.0,
                 max_backoff_s: float = 1800.0):  # fmt: skip
        self.slice, self.runner, self.source, self.poll_s = slice_, runner, source, poll_s
        self.buckets = buckets(main_args) if gcsfuse else []
        self.main_args = to_mounted(main_args) if gcsfuse else list(main_args)
        self.max_restarts, self.sleep, self.query_tries = max_restarts, sleep, query_tries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.restarts = 0

    def _run(self, cmd: Sequence[str]) -> str:
        code, out, err = _call(self.runner, cmd)
        if code:
            raise GcloudError(cmd, code, err)
        return out

    def _backoff(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt + 1`` (attempt 0, 1, 2, ...: 1x, 2x, 4x, ...)."""
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)

    def create(self) -> None:
        self._run(create_command(self.slice))
        if self.slice.queued:  # a queued resource waits for capacity: until ACTIVE
            while (state := self.state()) != "ACTIVE":
                if state in ("FAILED", "SUSPENDED", "NOT_FOUND"):
                    raise GcloudError(describe_command(self.slice), 1, f"queued resource is {state}")
                self.sleep(self.poll_s)

    def setup(self) -> None:
        if self.source.startswith("git:"):
            self._run(ssh_command(self.slice, setup_script(self.source, self.buckets)))
            return
        # A name of its own: two launches from this machine never share (or clobber) an archive.
        fd, archive = tempfile.mkstemp(prefix="clip_jax_src_", suffix=".tar.gz")
        os.close(fd)
        try:
            self._run(["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"])
            self._run(scp_command(self.slice, archive, archive))
            self._run(ssh_command(self.slice, setup_script(self.source, self.buckets, archive)))
        finally:
            os.remove(archive)

    def train(self) -> None:
        self._run(ssh_command(self.slice, train_script(self.main_args)))

    def stop(self) -> None:
        """Stops training on every worker (a worker still running refuses a new start)."""
        self._run(ssh_command(self.slice, stop_script()))

    def delete(self) -> None:
        _call(self.runner, delete_command(self.slice))  # may already be gone

    def state(self) -> str:
        """The slice's state; "NOT_FOUND" only when gcloud says so, `UNKNOWN` when every query failed."""
        for attempt in range(self.query_tries):
            code, out, err = _call(self.runner, describe_command(self.slice))
            if code == 0:
                return out.strip() or UNKNOWN
            if NOT_FOUND.search(err):
                return "NOT_FOUND"
            if attempt + 1 < self.query_tries:
                wait = self._backoff(attempt)
                print(f"state query failed (exit code {code}); again in {wait:.0f}s", flush=True)
                self.sleep(wait)
        return UNKNOWN

    def exit_code(self) -> int | None:
        """Worker 0's training exit code; None while it runs or when the query fails."""
        code, out, _ = _call(self.runner, ssh_command(self.slice, f"cat {RC} 2>/dev/null || echo running",
                                                      worker="0"))  # fmt: skip
        last = out.strip().splitlines()[-1].strip() if out.strip() else ""
        return int(last) if code == 0 and re.fullmatch(r"-?\d+", last) else None

    def relaunch(self, why: str, fresh_slice: bool) -> bool:
        """Starts training again (on a new slice when ``fresh_slice``), retrying failed tries with
        backoff; each try counts against ``max_restarts``. False when none is left."""
        for attempt in range(self.max_restarts + 1):
            if self.restarts >= self.max_restarts:
                print(f"{why}; {self.restarts} restarts used (--max_restarts), giving up", flush=True)
                return False
            self.restarts += 1
            print(f"{why}: restart {self.restarts} (resumes from the workdir)", flush=True)
            try:
                if fresh_slice:
                    self.delete()
                    self.create()
                    self.setup()
                else:
                    self.stop()  # the other workers' processes may still be alive
                self.train()
                return True
            except GcloudError as e:  # no capacity, a network error, ...: try again later
                wait = self._backoff(attempt)
                print(f"restart {self.restarts} failed: {e}; next try in {wait:.0f}s", flush=True)
                self.sleep(wait)
        return False

    def watch(self) -> int:
        """Polls until training ends; recreates the slice on preemption. The final exit code."""
        while True:
            self.sleep(self.poll_s)
            state = self.state()
            if state in PREEMPTED_STATES or state == "NOT_FOUND":
                if not self.relaunch(f"{self.slice.name} is {state}", fresh_slice=True):
                    return 1
            elif state in HEALTHY_STATES:
                code = self.exit_code()
                if code == 0:
                    print("training finished", flush=True)
                    return 0
                if code is not None and not self.relaunch(f"training exited {code} on a {state} slice",
                                                          fresh_slice=False):  # fmt: skip
                    return code
            # UNKNOWN (the query failed), CREATING, REPAIRING, PROVISIONING, ...: wait.

    def run(self) -> int:
        try:
            self.create()
            self.setup()
            self.train()
        except GcloudError as e:  # no capacity now: keep trying, as after a preemption
            if not self.relaunch(f"the first launch failed ({e})", fresh_slice=True):
                return 1
        return self.watch()


ACTIONS = ("create", "setup", "train", "stop", "logs", "watch", "run", "delete")


def define_flags(fv: flags.FlagValues) -> None:
    """The launcher's flags, on ``fv`` (absl's global FLAGS when run as a program)."""
    flags.DEFINE_string("name", None, "TPU VM (and queued resource) name.", required=True, flag_values=fv)
    flags.DEFINE_string("zone", None, "e.g. us-west4-a.", required=True, flag_values=fv)
    flags.DEFINE_string("accelerator", "v5e-256", "v4-128, v5e-256 (= v5litepod-256), v5p-128, v6e-64",
                        flag_values=fv)  # fmt: skip
    flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).", flag_values=fv)
    flags.DEFINE_string("runtime_version", None, f"Default: {RUNTIME_VERSIONS}", flag_values=fv)
    flags.DEFINE_bool("spot", False, "Spot (preemptible) capacity.", flag_values=fv)
    flags.DEFINE_bool("queued", False, "A queued resource: waits for capacity.", flag_values=fv)
    flags.DEFINE_string("source", "copy", "copy (git archive of HEAD) or git:URL[@REF].", flag_values=fv)
    flags.DEFINE_bool("gcsfuse", True, "Mount the data buckets (--nogcsfuse: pass gs:// paths as is).",
                      flag_values=fv)  # fmt: skip
    flags.DEFINE_float("poll_s", 60.0, "Seconds between state polls.", flag_values=fv)
    flags.DEFINE_integer("max_restarts", 100, "Relaunches and restarts (failed tries included) at most.",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_float("backoff_s", 30.0, "First wait after a failed query or relaunch (doubles).",
                       flag_values=fv)  # fmt: skip
    flags.DEFINE_bool("dry_run", False, "Print the gcloud commands, run nothing.", flag_values=fv)


def _multi_host(accelerator: str) -> bool:
    """More than one TPU VM: every generation's ``-8`` (or smaller) is one host."""
    return int(accelerator.rsplit("-", 1)[1]) > 8


def _flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` in clip_jax.main's flags."""
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def validate(fv: flags.FlagValues, action: str, main_args: Sequence[str]) -> Slice:
    """The slice the flags describe; a mistake raises `cli.UserError` before anything is created."""
    if action not in ACTIONS:
        raise cli.UserError(f"the first argument is the action, one of {', '.join(ACTIONS)} (got {action!r})")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", fv.name):
        raise cli.UserError(f"--name={fv.name!r}: lowercase letters, digits and '-', starting with a letter")
    slice_ = Slice(fv.name, fv.zone, fv.accelerator, fv.project, fv.runtime_version, fv.spot, fv.queued)
    try:
        _ = slice_.generation
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    if fv.max_restarts < 0 or fv.poll_s <= 0 or fv.backoff_s < 0:
        raise cli.UserError("--max_restarts must be >= 0, --poll_s > 0 and --backoff_s >= 0")
    if fv.source != "copy" and not fv.source.startswith("git:"):
        raise cli.UserError(f"--source={fv.source!r}: use copy or git:URL[@REF]")
    if action in ("train", "run"):
        for name in ("config", "workdir"):
            if not _flag_value(main_args, name):
                raise cli.UserError(f"give clip_jax.main's --{name} after '--' (see --help)")
        workdir = _flag_value(main_args, "workdir")
        if _multi_host(fv.accelerator) and not workdir.startswith("gs://"):
            raise cli.UserError(
                f"--workdir={workdir}: a {fv.accelerator} slice has several hosts, each with its own "
                "disk; give a shared gs://BUCKET/PATH"
            )
    return slice_


def main(argv: Sequence[str], runner: Runner | None = None, fv: flags.FlagValues = flags.FLAGS) -> int:
    """``argv``: what absl left after the flags, [program, action, *clip_jax.main's flags]."""
    if len(argv) < 2:
        raise cli.UserError(f"give the action first, one of {', '.join(ACTIONS)} (see --help)")
    action, main_args = argv[1], list(argv[2:])
    slice_ = validate(fv, action, main_args)
    runner = runner or (dry_runner if fv.dry_run else subprocess_runner)
    launcher = Launcher(slice_, main_args, runner=runner, source=fv.source, gcsfuse=fv.gcsfuse,
                        poll_s=fv.poll_s, max_restarts=fv.max_restarts, backoff_s=fv.backoff_s)  # fmt: skip
    if fv.dry_run and action in ("run", "watch"):
        # Nothing to poll: the commands of one launch and of one watch cycle.
        runner(create_command(slice_))
        if action == "run":
            launcher.setup()
            launcher.train()
        runner(describe_command(slice_))
        launcher.exit_code()
        return 0
    if action == "logs":
        return _call(runner, ssh_command(slice_, f"tail -n 200 -F {LOG}", worker="0"))[0]
    if action == "delete":
        return _call(runner, delete_command(slice_))[0]
    return getattr(launcher, action)() or 0


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    cli.run(main)
