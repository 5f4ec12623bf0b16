"""Step telemetry for the log line: step time, data wait, pairs/s per device, MFU.

Nothing here syncs with the device: the loop already fetches its metrics at a
log step, and `Meter.fields` is called after that fetch, so the wall time since
the previous log step covers every step in between. The time the loop spent
blocked on ``next(batches)`` and in evaluation, checkpoint saves and compilation
comes from the run's `goodput.Recorder` (its parts' totals), read at each log.

MFU = model FLOPs per step / (step time x devices x peak FLOP/s per device). The
model FLOPs are the benchmark's formula (`clip.forward_flops_per_pair`, x3 for a
training step, FLIP's kept patches; not the extra forward of gradient
accumulation nor remat's recomputation: those are hardware FLOPs, not model
FLOPs). The peak is ``config.logging.peak_flops`` when set, else the table in
`clip_jax.chips` for ``jax.devices()[0].device_kind`` and the model's dtype; for a
device the table does not know, MFU is left out of the log (and one line says
how to set it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import ml_collections

from clip_jax import chips
from clip_jax.models import clip

# Goodput parts that are not training steps: an interval's time in them is not step time
# ("other" inside the loop: starting and stopping a profile).
NOT_STEPS = ("startup", "compile", "restore", "checkpoint", "eval", "other")


def train_flops_per_pair(model_config: clip.CLIPConfig, patch_dropout: float = 0.0) -> float:
    """Model FLOPs of one pair in a training step: 3 x forward (benchmark.py's and aot.py's formula),
    the image tower on the patches FLIP keeps."""
    patches = getattr(model_config.vision, "num_patches", None)  # None: a ResNet tower
    kept = None if patches is None else patches - int(patches * patch_dropout)
    return 3 * clip.forward_flops_per_pair(model_config, kept)


def resolve_peak(device_kind: str, dtype: str, override: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s per device or None, one line saying where it came from or how to set it)."""
    if override:
        peak = float(override)
        return peak, f"MFU against config.logging.peak_flops = {peak:.3g} FLOP/s per device"
    peak = chips.peak_flops(device_kind, dtype)
    if peak is None:
        return None, (
            f"MFU not logged: no peak FLOP/s known for device {device_kind!r}; "
            "set --config.logging.peak_flops=<FLOP/s per device>"
        )
    return peak, f"MFU against {device_kind}'s {dtype} peak of {peak:.3g} FLOP/s per device"


def interval_fields(
    steps: int,
    seconds: float,
    data_wait_s: float,
    not_steps_s: float,
    global_batch: int,
    devices: int,
    flops_per_pair: float,
    peak_flops: float | None,
) -> dict[str, float]:
    """The telemetry of ``steps`` steps that took ``seconds`` of wall time, of which ``not_steps_s``
    went to evaluation, checkpoint saves, compilation, and ``data_wait_s`` to waiting for batches.

    step_time_s: wall time per step, less the not-step parts (`NOT_STEPS`; the data wait stays
    in: a starved step is slow); data_wait_share: data wait / that time. MFU only when the peak is known.
    """
    step_wall = max(seconds - not_steps_s, 1e-9)
    step_time = step_wall / steps
    fields = {
        "step_time_s": step_time,
        "data_wait_s": data_wait_s / steps,
        "data_wait_share": min(data_wait_s / step_wall, 1.0),
        "pairs_per_sec_per_device": global_batch / step_time / devices,
    }
    if peak_flops:
        fields["mfu"] = flops_per_pair * global_batch / (step_time * devices * peak_flops)
    return fields


@dataclasses.dataclass
class Meter:
    """The run's constants and the goodput totals at the previous log step."""

    global_batch: int
    devices: int
    flops_per_pair: float
    peak_flops: float | None
    totals: Callable[[], dict[str, float]]  # the goodput recorder's seconds per part so far
    _last: dict[str, float] | None = None

    def fields(self, steps: int, seconds: float) -> dict[str, float]:
        """The telemetry of the ``steps`` steps and ``seconds`` since the previous call."""
        now = dict(self.totals())
        last = self._last or {}
        delta = lambda part: now.get(part, 0.0) - last.get(part, 0.0)
        self._last = now
        return interval_fields(
            steps,
            seconds,
            delta("data"),
            sum(delta(p) for p in NOT_STEPS),
            self.global_batch,
            self.devices,
            self.flops_per_pair,
            self.peak_flops,
        )

    def start(self) -> None:
        """Marks the interval start (the step the logger counts from)."""
        self._last = dict(self.totals())


def meter(
    config: ml_collections.ConfigDict,
    model_config: clip.CLIPConfig,
    totals: Callable[[], dict[str, float]],
    primary: bool,
) -> Meter:
    """The run's `Meter`: its batch, devices, model FLOPs and peak (process 0 says where the peak
    comes from, or how to set it)."""
    dtype = jax.numpy.dtype(config.model.dtype).name
    peak, line = resolve_peak(jax.devices()[0].device_kind, dtype, config.logging.peak_flops)
    if primary:
        print(line, flush=True)
    flops = train_flops_per_pair(model_config, config.model.patch_dropout)
    return Meter(config.train.batch_size, jax.device_count(), flops, peak, totals)
