"""Start N clip_jax processes on this machine, as a multi-host slice would run them.

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \
        --config=configs/demo.py --workdir=/tmp/clip_mp

Each process gets its own CPU devices and the coordinator flags of
`clip_jax.main`; collectives go through gloo. If any process fails, the
others are stopped and the exit code is non-zero.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=2)
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="-- then clip_jax.main's flags")
    args = parser.parse_args()
    main_args = [a for a in args.main_args if a != "--"]
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clip_jax.main",
                *main_args,
                f"--coordinator_address={address}",
                f"--num_processes={args.num_processes}",
                f"--process_id={i}",
            ],
            env=env,
        )  # fmt: skip
        for i in range(args.num_processes)
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
    sys.exit(main())
