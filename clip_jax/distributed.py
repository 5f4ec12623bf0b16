"""Multi-process start-up shared by the commands (`main`, `evaluate`): the flags that name the
coordinator (--coordinator_address, --num_processes, --process_id, --multihost,
--heartbeat_timeout_s) and `initialize`, which calls ``jax.distributed.initialize`` as they say."""

import os
import socket

import jax
from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the multi-process flags (once per program, beside the command's own flags)."""
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0, for multi-process runs off TPU pods."
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index.")
    flags.DEFINE_bool(
        "multihost", False, "A multi-host TPU slice: JAX finds the hosts (Cloud TPU VM metadata)."
    )
    flags.DEFINE_integer(
        "heartbeat_timeout_s", 100, "A process silent this long is dead: the others stop with an error."
    )


def initialize(local_coordinator: bool = True) -> None:
    """Multi-process runs as the flags say. One process gets a coordinator on loopback only when
    ``local_coordinator`` (the trainer: it turns SIGTERM into orbax's preemption sync point)."""
    timeout = FLAGS.heartbeat_timeout_s
    if FLAGS.coordinator_address:
        # Collectives between CPU processes (tests, laptops) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            heartbeat_timeout_seconds=timeout,
        )
    elif FLAGS.multihost or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host slice
        jax.distributed.initialize(heartbeat_timeout_seconds=timeout)
    elif local_coordinator:
        # One process: a local coordinator all the same. It turns SIGTERM into orbax's
        # preemption sync point (save at an agreed step, exit 0) instead of a kill. Bound to
        # loopback: jax's default, every interface ([::]), would serve the unauthenticated
        # coordination service to the network.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = f"127.0.0.1:{port}"
        jax.distributed.initialize(address, num_processes=1, process_id=0, coordinator_bind_address=address)
