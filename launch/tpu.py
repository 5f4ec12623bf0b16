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
  passed as /gcs/BUCKET/.... ``--no_gcsfuse`` passes every path as is.
- ``watch`` polls the slice's state (``describe --format=value(state)``). PREEMPTED
  (TPU VM) or SUSPENDED/FAILED (queued resource) -> delete, recreate, set up and
  start again: the run resumes from its latest checkpoint in the workdir. A
  training process that exits non-zero on a healthy slice is restarted as is,
  after what is left of it on the other workers is stopped (SIGTERM, then SIGKILL).
  Both count against ``--max_restarts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Default TPU VM software per generation (override with --runtime_version); see
# https://cloud.google.com/tpu/docs/runtimes.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# gcloud's --accelerator-type prefix per generation.
_ACCELERATOR_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
_GENERATION_OF = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}

# Remote paths on each worker.
CODE_DIR, VENV, LOG, RC, PID = (
    "~/clip_jax",
    "~/clip_venv",
    "~/clip_train.log",
    "~/clip_train.rc",
    "~/clip_train.pid",
)
ARCHIVE = "/tmp/clip_jax_src.tar.gz"

PREEMPTED_STATES = {"PREEMPTED", "SUSPENDED", "SUSPENDING", "FAILED", "TERMINATED"}
HEALTHY_STATES = {"READY", "ACTIVE"}

Runner = Callable[[Sequence[str]], tuple[int, str]]  # command -> (exit code, stdout)


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    zone: str
    accelerator: str  # "v5e-256", "v5litepod-256", "v4-128", "v5p-128", "v6e-64"
    project: str | None = None
    runtime_version: str | None = None  # None: RUNTIME_VERSIONS[generation]
    spot: bool = False
    queued: bool = False  # a queued resource (waits for capacity) instead of a direct create

    @property
    def generation(self) -> str:
        match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", self.accelerator)
        if not match:
            raise ValueError(f"--accelerator={self.accelerator!r}: use e.g. v4-128, v5e-256, v5p-128, v6e-64")
        return _GENERATION_OF[match.group(1)]

    @property
    def accelerator_type(self) -> str:
        """As gcloud names it: v5e-256 -> v5litepod-256."""
        return f"{_ACCELERATOR_PREFIX[self.generation]}-{self.accelerator.split('-')[1]}"

    @property
    def version(self) -> str:
        return self.runtime_version or RUNTIME_VERSIONS[self.generation]

    def common(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def create_command(s: Slice) -> list[str]:
    spot = ["--spot"] if s.spot else []
    if s.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "create", s.name, f"--node-id={s.name}",
                *s.common(), f"--accelerator-type={s.accelerator_type}", f"--runtime-version={s.version}",
                *spot]  # fmt: skip
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", s.name, *s.common(),
            f"--accelerator-type={s.accelerator_type}", f"--version={s.version}", *spot]  # fmt: skip


def describe_command(s: Slice) -> list[str]:
    kind, field = ("queued-resources", "state.state") if s.queued else ("tpu-vm", "state")
    return ["gcloud", "compute", "tpus", kind, "describe", s.name, *s.common(), f"--format=value({field})"]


def delete_command(s: Slice) -> list[str]:
    if s.queued:  # --force: the TPU VM goes with its queued resource
        return [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            s.name,
            *s.common(),
            "--force",
            "--quiet",
        ]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name, *s.common(), "--quiet"]


def ssh_command(s: Slice, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", s.name, *s.common(), f"--worker={worker}",
            f"--command={command}"]  # fmt: skip


def scp_command(s: Slice, local: str, remote: str) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        local,
        f"{s.name}:{remote}",
        *s.common(),
        "--worker=all",
    ]


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


def setup_script(source: str, bucket_names: Sequence[str]) -> str:
    """The shell run on every worker: code, Python 3.11 venv, the package with its TPU extra, mounts."""
    if source.startswith("git:"):
        url, _, ref = source[4:].partition("@")
        code = f"rm -rf {CODE_DIR} && git clone {shlex.quote(url)} {CODE_DIR}"
        code += f" && git -C {CODE_DIR} checkout {shlex.quote(ref)}" if ref else ""
    else:
        code = f"rm -rf {CODE_DIR} && mkdir -p {CODE_DIR} && tar xzf {ARCHIVE} -C {CODE_DIR}"
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


def subprocess_runner(cmd: Sequence[str]) -> tuple[int, str]:
    print("+", shlex.join(cmd), flush=True)
    proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, text=True)
    return proc.returncode, proc.stdout


def dry_runner(cmd: Sequence[str]) -> tuple[int, str]:
    print(shlex.join(cmd), flush=True)
    return 0, ""


class Launcher:
    """The steps of a run on one slice; every gcloud call goes through ``runner``."""

    def __init__(self, slice_: Slice, main_args: Sequence[str], *, runner: Runner = subprocess_runner,
                 source: str = "copy", gcsfuse: bool = True, poll_s: float = 60.0, max_restarts: int = 100,
                 sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        self.slice, self.runner, self.source, self.poll_s = slice_, runner, source, poll_s
        self.buckets = buckets(main_args) if gcsfuse else []
        self.main_args = to_mounted(main_args) if gcsfuse else list(main_args)
        self.max_restarts, self.sleep = max_restarts, sleep

    def _run(self, cmd: Sequence[str]) -> str:
        code, out = self.runner(cmd)
        if code:
            raise RuntimeError(f"exit code {code}: {shlex.join(cmd)}")
        return out

    def create(self) -> None:
        self._run(create_command(self.slice))
        if self.slice.queued:  # a queued resource waits for capacity: until ACTIVE
            while (state := self.state()) != "ACTIVE":
                if state in ("FAILED", "SUSPENDED"):
                    raise RuntimeError(f"queued resource {self.slice.name} is {state}")
                self.sleep(self.poll_s)

    def setup(self) -> None:
        if not self.source.startswith("git:"):
            self._run(["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"])
            self._run(scp_command(self.slice, ARCHIVE, ARCHIVE))
        self._run(ssh_command(self.slice, setup_script(self.source, self.buckets)))

    def train(self) -> None:
        self._run(ssh_command(self.slice, train_script(self.main_args)))

    def stop(self) -> None:
        """Stops training on every worker (a worker still running refuses a new start)."""
        self._run(ssh_command(self.slice, stop_script()))

    def delete(self) -> None:
        self.runner(delete_command(self.slice))  # may already be gone

    def state(self) -> str:
        code, out = self.runner(describe_command(self.slice))
        return out.strip() if code == 0 else "NOT_FOUND"

    def exit_code(self) -> int | None:
        """Worker 0's training exit code, None while it runs."""
        _, out = self.runner(ssh_command(self.slice, f"cat {RC} 2>/dev/null || echo running", worker="0"))
        out = out.strip().splitlines()[-1] if out.strip() else "running"
        return None if out == "running" else int(out)

    def watch(self) -> int:
        """Polls until training ends; recreates the slice on preemption. The final exit code."""
        restarts = 0
        while True:
            self.sleep(self.poll_s)
            state = self.state()
            if state in PREEMPTED_STATES or state == "NOT_FOUND":
                if restarts >= self.max_restarts:
                    print(f"{self.slice.name} is {state}; {restarts} restarts used, giving up", flush=True)
                    return 1
                restarts += 1
                print(
                    f"{self.slice.name} is {state}: relaunch {restarts} (resumes from the workdir)",
                    flush=True,
                )
                self.delete()
                self.create()
                self.setup()
                self.train()
            elif state in HEALTHY_STATES:
                code = self.exit_code()
                if code == 0:
                    print("training finished", flush=True)
                    return 0
                if code is not None:
                    if restarts >= self.max_restarts:
                        return code
                    restarts += 1
                    print(f"training exited {code} on a {state} slice: restart {restarts}", flush=True)
                    self.stop()  # the other workers' processes may still be alive
                    self.train()
            # CREATING, REPAIRING, PROVISIONING, ...: wait.

    def run(self) -> int:
        self.create()
        self.setup()
        self.train()
        return self.watch()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    actions = ["create", "setup", "train", "stop", "logs", "watch", "run", "delete"]
    parser.add_argument("action", choices=actions)
    parser.add_argument("--name", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument(
        "--accelerator", default="v5e-256", help="v4-128, v5e-256 (= v5litepod-256), v5p-128, v6e-64"
    )
    parser.add_argument("--project")
    parser.add_argument("--runtime_version", help=f"default per generation: {RUNTIME_VERSIONS}")
    parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    parser.add_argument("--queued", action="store_true", help="a queued resource: waits for capacity")
    parser.add_argument("--source", default="copy", help="copy (git archive of HEAD) or git:URL[@REF]")
    parser.add_argument("--no_gcsfuse", action="store_true", help="pass gs:// paths through unmounted")
    parser.add_argument("--poll_s", type=float, default=60.0)
    parser.add_argument("--max_restarts", type=int, default=100)
    parser.add_argument("--dry_run", action="store_true", help="print the gcloud commands, run nothing")
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # after "--": clip_jax.main's flags
    args = parser.parse_args(argv[:cut])
    args.main_args = argv[cut + 1 :]
    return args


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    slice_ = Slice(
        args.name, args.zone, args.accelerator, args.project, args.runtime_version, args.spot, args.queued
    )
    runner = runner or (dry_runner if args.dry_run else subprocess_runner)
    launcher = Launcher(
        slice_,
        args.main_args,
        runner=runner,
        source=args.source,
        gcsfuse=not args.no_gcsfuse,
        poll_s=args.poll_s,
        max_restarts=args.max_restarts,
    )
    if args.dry_run and args.action in ("run", "watch"):
        # Nothing to poll: the commands of one launch and of one watch cycle.
        runner(create_command(slice_))
        if args.action == "run":
            launcher.setup()
            launcher.train()
        runner(describe_command(slice_))
        launcher.exit_code()
        return 0
    if args.action == "logs":
        return runner(ssh_command(slice_, f"tail -n 200 -F {LOG}", worker="0"))[0]
    if args.action == "delete":
        return runner(delete_command(slice_))[0]
    return getattr(launcher, args.action)() or 0


if __name__ == "__main__":
    sys.exit(main())
