"""Non-finite steps: an update from a NaN/Inf loss or gradient is not applied, and is counted.

On device (inside the step): `finite` says whether the loss and the gradient are all
finite; `keep_if_finite` selects the old parameters and optimizer state when they are
not. The step counter still advances, and so do the optimizer's own step counts (its
``count`` fields: the learning-rate schedule inside optax and Adam's bias correction),
so the schedule, the per-step RNG and the data position stay those of the step number
and a resumed run repeats the uninterrupted one bit for bit. The optimizer state keeps
its layout (optax.apply_if_finite would wrap it: existing checkpoints would no longer
restore, and it checks the updates only, not the loss).

A select, not a `jax.lax.cond`: with no NaN the step computes what it did before, bit
for bit (the demo's losses are unchanged); a cond changed XLA's fusions (demo loss
2.5126 -> 2.5127 at step 50) though it saved XLA:CPU's temporaries a copy of the
parameters (B/32, 8 devices, batch 256: 3.151 GB before, 3.241 GB with the select,
3.151 GB with a cond).

On the host (the loop): `Watch` reads each step's flag one step late, after the next
step is dispatched, so the device always has a step queued; it counts the skipped steps
and stops the run after ``train.max_nonfinite_steps`` consecutive ones. The flag is a
replicated scalar: every process takes the same decision at the same step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clip_jax import checkpoint, cli


def finite(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """Whether the loss and every gradient entry are finite (a NaN or Inf anywhere makes the
    global norm non-finite)."""
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def _is_count(path) -> bool:
    last = path[-1] if path else None
    return isinstance(last, jax.tree_util.GetAttrKey) and last.name == "count"


def keep_if_finite(ok: jax.Array, new_params, old_params, new_opt_state, old_opt_state):
    """(params, opt_state): the new ones when ``ok``, else the old ones, except that the
    optimizer's step counts (``count`` fields) advance either way."""
    select = lambda new, old: jnp.where(ok, new, old)
    params = jax.tree.map(select, new_params, old_params)
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, new, old: new if _is_count(path) else select(new, old), new_opt_state, old_opt_state
    )
    return params, opt_state


class NonFiniteStepsError(checkpoint.NonFiniteError, cli.UserError):
    """Too many consecutive steps had a non-finite loss or gradient; the run stopped (one
    ``error:`` line from the entry point, exit code 2)."""


class Watch:
    """The host's count of skipped steps, read one step late (no wait for the step just queued).

    ``observe(step, flag)`` takes a step's on-device ``nonfinite`` flag; call it for a step
    only once a later one is dispatched, or at a log step (where the metrics are fetched
    anyway), and once more for the last step after the loop.
    """

    def __init__(self, max_consecutive: int, latest_checkpoint):
        """``latest_checkpoint``: a function giving the latest saved step (for the message)."""
        self.max_consecutive = max_consecutive
        self.latest_checkpoint = latest_checkpoint
        self.total = 0
        self.consecutive = 0
        self._pending: tuple[int, jax.Array] | None = None

    def push(self, step: int, flag: jax.Array) -> None:
        """Observes the step before ``step`` (whose result is ready or nearly), then holds this one."""
        self.flush()
        self._pending = (step, flag)

    def flush(self) -> None:
        """Observes the held step, if any (waits for it)."""
        if self._pending is not None:
            step, flag = self._pending
            self._pending = None
            self.observe(step, bool(jax.device_get(flag)))

    def observe(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if jax.process_index() == 0:
            print(
                f"step {step}: non-finite loss or gradient, update not applied "
                f"({self.consecutive} in a row, {self.total} in this run)",
                flush=True,
            )
        if self.consecutive >= self.max_consecutive:
            latest = self.latest_checkpoint()
            first = step - self.consecutive + 1
            raise NonFiniteStepsError(
                f"training stopped at step {step}: {self.consecutive} consecutive steps "
                f"({first}-{step}) had a non-finite loss or gradient (train.max_nonfinite_steps="
                f"{self.max_consecutive}); none was applied, the last good checkpoint is "
                + (f"step {latest}" if latest is not None else "none (no step saved yet)")
            )
