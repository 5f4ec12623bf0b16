"""A `jax.profiler` trace of training steps a..b (``config.logging.profile_steps=(a, b)``).

Process 0 traces into ``WORKDIR/profile/`` (TensorBoard's layout:
``plugins/profile/RUN/HOST.xplane.pb``, plus ``perfetto_trace.json.gz`` for
ui.perfetto.dev). The trace starts before step a is dispatched and stops after
the state of step b is ready (one block, at that step only), so it holds the
device work of exactly those steps; each step is annotated with its number
(`jax.profiler.StepTraceAnnotation`), which the profile plugin's step view reads.
A ``gs://`` workdir is traced to a local cache directory and uploaded at the stop.
A run that resumes inside the window traces from its first step; past it, nothing.
"""

from __future__ import annotations

import contextlib
import os

import jax

from clip_jax import goodput, storage, validation


def window(steps, total_steps: int) -> tuple[int, int] | None:
    """``config.logging.profile_steps`` checked: None (empty) or (a, b) with 1 <= a <= b <= total."""
    if steps is None or len(steps) == 0:
        return None
    ok = (
        len(steps) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
        and 1 <= steps[0] <= steps[1] <= total_steps
    )
    if not ok:
        raise validation.ConfigError(
            f"config.logging.profile_steps={tuple(steps)!r}: give (first, last) steps to trace, "
            f"1 <= first <= last <= train.total_steps ({total_steps}), e.g. (10, 12)"
        )
    return steps[0], steps[1]


class Profiler:
    """Starts and stops the trace around the window's steps (process 0 only)."""

    def __init__(
        self, workdir: str, steps: tuple[int, int] | None, primary: bool, recorder: goodput.Recorder
    ):
        self.steps = steps if primary else None  # (first, last) from `window`, or None
        self.recorder = recorder  # starting and stopping the trace count as goodput's "other"
        self.workdir = workdir
        self.directory = storage.local_dir(workdir, "profile")
        self.active = False

    def step(self, step: int):
        """A context for dispatching ``step``: starts the trace at the window's first step (or the
        run's first, inside the window), and annotates the steps inside it."""
        if self.steps is None:
            return contextlib.nullcontext()
        first, last = self.steps
        if not self.active and first <= step <= last:
            with self.recorder.phase("other"):
                os.makedirs(self.directory, exist_ok=True)
                options = jax.profiler.ProfileOptions()
                options.python_tracer_level = 0  # else every Python call of the loop and data threads
                jax.profiler.start_trace(self.directory, create_perfetto_trace=True, profiler_options=options)
            self.active = True
            print(f"profiling steps {step}..{last} into {os.path.join(self.workdir, 'profile')}", flush=True)
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def stepped(self, step: int, state) -> None:
        """After ``step``'s dispatch: at the window's last step, waits for ``state`` and stops."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(state)  # step b's device work, inside the trace
            with self.recorder.phase("other"):
                self.close()

    def close(self) -> None:
        """Stops a trace still running (the run ended or failed inside the window)."""
        if not self.active:
            return
        self.active = False
        jax.profiler.stop_trace()
        if storage.is_remote(self.workdir):
            target = os.path.join(self.workdir, "profile")
            for root, _, files in os.walk(self.directory):
                for name in files:
                    local = os.path.join(root, name)
                    storage.copy_file(local, os.path.join(target, os.path.relpath(local, self.directory)))
        print(f"profile written under {os.path.join(self.workdir, 'profile')}", flush=True)
