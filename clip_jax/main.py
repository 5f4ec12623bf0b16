"""Entry point: ``python -m clip_jax.main --config=configs/b16.py --workdir=DIR``.

Run the same command on every host of a multi-host slice. On a Cloud TPU VM
pod pass --multihost (launch/tpu.py does) and JAX finds the other hosts from the
VM's metadata; elsewhere pass --coordinator_address, --num_processes and
--process_id. If a process dies, the others stop with an error after
--heartbeat_timeout_s instead of hanging. On SIGTERM (preemption) every process saves a
checkpoint at the same step and exits 0; rerunning the command resumes. Libraries'
INFO lines go to WORKDIR/logs/process_N.log (`clip_jax.logs`), not the terminal.
"""

from absl import app, flags
from ml_collections import config_flags

from clip_jax import cli, distributed, logs, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/b16.py.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where metrics, evaluations and checkpoints go: a local directory or gs://BUCKET/PATH."
)
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet()  # libraries' INFO lines: WORKDIR/logs/process_N.log once the run starts
    distributed.initialize()
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
