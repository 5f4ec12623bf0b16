"""Checkpoints: the train state and the Grain iterator position, saved together.

One orbax ``CheckpointManager`` under ``WORKDIR/checkpoints`` holds, per step,
the sharded train state (params, optimizer state, step) and each process's
data-iterator state, so a restarted run continues with exactly the batches the
interrupted one would have seen. Saves are asynchronous (arrays are copied to
host before ``save`` returns; the writing happens in the background) and
committed atomically by orbax; a run resumes from the latest complete step.
"""

from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, shardings, iterator):
        """The latest saved state (placed with ``shardings``), or None; ``iterator`` is repositioned."""
        step = self.manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(iterator)
            ),
        )
        return restored.state

    def save(self, step: int, state, iterator, force: bool = False) -> bool:
        """Saves when ``step`` is on the cadence (or ``force``); returns whether it saved."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
        )
        return self.manager.save(step, args=args, force=force)

    def close(self) -> None:
        """Waits for background writes; a failed write raises here."""
        self.manager.wait_until_finished()
        self.manager.close()
