"""Training metrics: printed with throughput and ETA, appended to ``WORKDIR/metrics.jsonl``.

Metrics stay on device between log steps; `MetricsLogger.write` is the only
place they are fetched to the host, so the loop does not sync every step.
"""

from __future__ import annotations

import json
import os
import time

import jax


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """One JSON object per log step; only the primary process writes and prints."""

    def __init__(self, workdir: str, total_steps: int, global_batch: int, primary: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.primary = primary
        self.start = time.perf_counter()
        self._last_time, self._last_step = self.start, 0

    def write(self, step: int, step_metrics: dict) -> dict:
        """Fetches ``step_metrics`` (device scalars) and records them; returns the host dict."""
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        now = time.perf_counter()
        steps = step - self._last_step
        seconds = max(now - self._last_time, 1e-9)
        # The first interval includes compilation: no ETA is extrapolated from it.
        first = self._last_step == 0
        record = {
            "step": step,
            **values,
            "steps_per_sec": steps / seconds,
            "pairs_per_sec": steps * self.global_batch / seconds,
            "elapsed_s": now - self.start,
            "eta_s": None if first else (self.total_steps - step) * seconds / steps,
        }
        self._last_time, self._last_step = now, step
        if self.primary:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"step {step}/{self.total_steps} loss {values['loss']:.4f} "
                f"i2t {values['i2t_acc']:.3f} t2i {values['t2i_acc']:.3f} "
                f"scale {values['logit_scale']:.1f} lr {values['lr']:.2e} "
                f"|g| {values['grad_norm']:.2f} "
                + (
                    f"(compiled and ran in {_duration(seconds)})"
                    if first
                    else f"{record['pairs_per_sec']:.0f} pairs/s ETA {_duration(record['eta_s'])}"
                ),
                flush=True,
            )
        return record
