"""Entry point: ``python -m clip_jax.main --config=configs/b16.py --workdir=DIR``.

Run the same command on every host of a multi-host slice. On a Cloud TPU VM
pod pass --multihost (launch/tpu.py does) and JAX finds the other hosts from the
VM's metadata; elsewhere pass --coordinator_address, --num_processes and
--process_id. If a process dies, the others stop with an error after
--heartbeat_timeout_s instead of hanging. On SIGTERM (preemption) every process saves a
checkpoint at the same step and exits 0; rerunning the command resumes. Libraries'
INFO lines go to WORKDIR/logs/process_N.log (`clip_jax.logs`), not the terminal.
"""

import os
import socket

import jax
from absl import app, flags
from ml_collections import config_flags

from clip_jax import cli, logs, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/b16.py.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where metrics, evaluations and checkpoints go: a local directory or gs://BUCKET/PATH."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs off TPU pods."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "A multi-host TPU slice: JAX finds the hosts (Cloud TPU VM metadata)."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "A process silent this long is dead: the others stop with an error."
)
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
    """Multi-process runs as the flags say; one process gets a coordinator on loopback only."""
    if _COORDINATOR.value:
        # Collectives between CPU processes (tests, laptops) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
        )
    elif _MULTIHOST.value or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host slice
        jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    else:
        # One process: a local coordinator all the same. It turns SIGTERM into orbax's
        # preemption sync point (save at an agreed step, exit 0) instead of a kill. Bound to
        # loopback: jax's default, every interface ([::]), would serve the unauthenticated
        # coordination service to the network.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = f"127.0.0.1:{port}"
        jax.distributed.initialize(address, num_processes=1, process_id=0, coordinator_bind_address=address)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet()  # libraries' INFO lines: WORKDIR/logs/process_N.log once the run starts
    _initialize_distributed()
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
