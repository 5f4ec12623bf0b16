"""A Cloud TPU slice as gcloud sees it: the `Slice`, the gcloud commands that create, describe,
delete and reach it (ssh, scp), and running them (`subprocess_runner`, `dry_runner`, `call`).

Used by ``launch/tpu.py`` (imported as a sibling module, when that runs as a script or is loaded
by path); gcloud answers are read there (`Launcher.state`).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

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

PREEMPTED_STATES = {"PREEMPTED", "SUSPENDED", "SUSPENDING", "FAILED", "TERMINATED"}
HEALTHY_STATES = {"READY", "ACTIVE"}

Runner = Callable[[Sequence[str]], tuple]  # command -> (exit code, stdout) or (exit code, stdout, stderr)
# gcloud's own answer for a slice that does not exist (any other failure is a failed query).
NOT_FOUND = re.compile(r"\bNOT_FOUND\b|was not found|\b404\b")
UNKNOWN = "UNKNOWN"  # the state query failed: nothing is decided on it


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
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", s.name, *s.common(), "--force",
                "--quiet"]  # fmt: skip
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name, *s.common(), "--quiet"]


def ssh_command(s: Slice, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", s.name, *s.common(), f"--worker={worker}",
            f"--command={command}"]  # fmt: skip


def scp_command(s: Slice, local: str, remote: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{s.name}:{remote}", *s.common(),
            "--worker=all"]  # fmt: skip


class GcloudError(RuntimeError):
    """A gcloud (or git) command that failed; ``stderr`` holds its own explanation."""

    def __init__(self, cmd: Sequence[str], code: int, stderr: str = ""):
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"exit code {code}: {shlex.join(cmd)}" + (f" ({detail})" if detail else ""))
        self.stderr = stderr


def subprocess_runner(cmd: Sequence[str]) -> tuple[int, str, str]:
    print("+", shlex.join(cmd), flush=True)
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    sys.stderr.write(proc.stderr)  # gcloud's progress and errors, as the user would see them
    return proc.returncode, proc.stdout, proc.stderr


def dry_runner(cmd: Sequence[str]) -> tuple[int, str, str]:
    print(shlex.join(cmd), flush=True)
    return 0, "", ""


def call(runner: Runner, cmd: Sequence[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of any runner (a test's may leave stderr out)."""
    code, out, *err = runner(cmd)
    return code, out, err[0] if err else ""
