"""Start N clip_jax processes on this machine, as a multi-host slice would run them.

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \
        --config=configs/demo.py --workdir=/tmp/clip_mp

Each process gets its own CPU devices and the coordinator flags of
`clip_jax.main`; collectives go through gloo. If any process fails, the
others are stopped and the exit code is non-zero.
"""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import flags

from clip_jax import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def define_flags() -> None:
    """The launcher's flags (defined only when run as a program)."""
    flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
    flags.DEFINE_integer("devices_per_process", 2, "CPU devices of each process.", lower_bound=1)


def main(argv: Sequence[str]) -> int:
    """``argv``: what absl left, [program, *clip_jax.main's flags (after --)]."""
    main_args = list(argv[1:])
    if not any(a.startswith("--config") for a in main_args):
        raise cli.UserError("give clip_jax.main's flags after '--', at least --config and --workdir")
    num_processes, devices = flags.FLAGS.num_processes, flags.FLAGS.devices_per_process
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clip_jax.main",
                *main_args,
                f"--coordinator_address={address}",
                f"--num_processes={num_processes}",
                f"--process_id={i}",
            ],
            env=env,
        )  # fmt: skip
        for i in range(num_processes)
    ]
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):  # one failed: stop the rest, never hang
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            return next(c for c in codes if c not in (None, 0))
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.5)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
