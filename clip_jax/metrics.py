"""Training metrics: printed with throughput and ETA, appended to ``WORKDIR/metrics.jsonl``,
and written as TensorBoard event files under ``WORKDIR/tensorboard`` (tensorboardX:
no TensorFlow; ``gs://`` through google-cloud-storage, which the ``gcs`` extra installs)
and to Weights & Biases when ``wandb`` is importable and a project is given.

Every row also carries the step telemetry of `clip_jax.telemetry` (step time, data
wait, pairs/s per device, MFU) when the loop gives the logger a ``meter``.

Metrics stay on device between log steps; `MetricsLogger.write` is the only
place they are fetched to the host, so the loop does not sync every step. Only
the primary process (process 0) writes anything.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from clip_jax import storage, telemetry


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _row_step(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


def drop_rows_after(path: str, step: int) -> None:
    """Rewrites the metrics log ``path`` without its rows past ``step`` (and unreadable lines,
    such as one cut off by a crash), so that a resumed run's log holds one row per step."""
    if not storage.exists(path):
        return
    lines = storage.read_text(path).splitlines()
    kept = [line for line in lines if (s := _row_step(line)) is not None and s <= step]
    if len(kept) != len(lines):
        storage.write_text(path, "".join(line + "\n" for line in kept))
        print(f"{path}: dropped {len(lines) - len(kept)} rows after step {step}, the run's start", flush=True)


class MetricsLogger:
    """One JSON object per log step; only the primary process writes and prints."""

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        global_batch: int,
        primary: bool,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_config: dict | None = None,
        resumed_step: int = 0,
        meter: telemetry.Meter | None = None,
    ):
        """``resumed_step``: the step the run starts from; rows after it (logged by a run that
        went further before it was rolled back) are dropped, as the run logs those steps again.
        ``meter``: adds step time, data wait, pairs/s per device and MFU to every row."""
        path = os.path.join(workdir, "metrics.jsonl")
        if primary:
            drop_rows_after(path, resumed_step)
        self.lines = storage.JsonLines(path) if primary else None
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.primary = primary
        self.start = time.perf_counter()
        self.meter = meter
        if meter is not None:
            meter.start()  # its interval starts with the logger's
        # Rates count from the step the run resumed at, not from 0.
        self._last_time, self._last_step, self._first = self.start, resumed_step, True
        self.summaries = Summaries(workdir, tensorboard, wandb_project, wandb_config) if primary else None

    def write(self, step: int, step_metrics: dict) -> dict:
        """Fetches ``step_metrics`` (device scalars) and records them; returns the host dict."""
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        now = time.perf_counter()
        steps = step - self._last_step
        seconds = max(now - self._last_time, 1e-9)
        # The first interval includes compilation: no ETA is extrapolated from it.
        first, self._first = self._first, False
        record = {
            "step": step,
            **values,
            "steps_per_sec": steps / seconds,
            "pairs_per_sec": steps * self.global_batch / seconds,
            "elapsed_s": now - self.start,
            "eta_s": None if first else (self.total_steps - step) * seconds / steps,
            **(self.meter.fields(steps, seconds) if self.meter is not None else {}),
        }
        self._last_time, self._last_step = now, step
        if self.primary:
            self.lines.append(json.dumps(record))
            self.summaries.scalars(step, record, "train/")
            print(
                f"step {step}/{self.total_steps} loss {values['loss']:.4f} "
                f"i2t {values['i2t_acc']:.3f} t2i {values['t2i_acc']:.3f} "
                f"scale {values['logit_scale']:.1f} lr {values['lr']:.2e} "
                f"|g| {values['grad_norm']:.2f} "
                + (
                    f"(compiled and ran in {_duration(seconds)})"
                    if first
                    else f"{record['pairs_per_sec']:.0f} pairs/s ETA {_duration(record['eta_s'])}"
                )
                + telemetry_text(record),
                flush=True,
            )
        return record

    def write_eval(self, step: int, results: dict) -> None:
        """An evaluation's scalars (``eval/NAME``) to TensorBoard / W&B and into the row of
        ``step`` in metrics.jsonl (the JSON is train.write_eval's): the loop evaluates after
        it logged that step, so the row gets the ``eval/NAME`` keys; a step without a
        training row (not a log step, or a resumed run that only evaluates) gets a row of
        its own with ``step`` and the ``eval/`` keys only. One row per step either way."""
        if not self.primary:
            return
        self.summaries.scalars(step, results, "eval/")
        values = {f"eval/{k}": v for k, v in scalar_items(results).items()}
        row = json.loads(last) if (last := self.lines.last()) and _row_step(last) == step else None
        if row is None:
            self.lines.append(json.dumps({"step": step, **values}))
        else:
            self.lines.replace_last(json.dumps({**row, **values}))

    def close(self) -> None:
        if self.primary:
            self.summaries.close()


_NUMBER = (int, float, np.floating, np.integer)


def telemetry_text(record: dict) -> str:
    """The log line's telemetry: " | step 0.212 s, data 63% (0.134 s), 302 pairs/s/device, MFU 41.0%"."""
    if "step_time_s" not in record:
        return ""
    text = (
        f" | step {record['step_time_s']:.3f} s, data {100 * record['data_wait_share']:.0f}% "
        f"({record['data_wait_s']:.3f} s), {record['pairs_per_sec_per_device']:.0f} pairs/s/device"
    )
    return text + (f", MFU {100 * record['mfu']:.1f}%" if "mfu" in record else "")


def scalar_items(values: dict) -> dict[str, float]:
    """The numbers of ``values`` as floats (not ``step``, booleans, lists, dicts or None)."""
    return {
        k: float(v)
        for k, v in values.items()
        if k != "step" and isinstance(v, int | float | np.floating | np.integer) and not isinstance(v, bool)
    }


class Summaries:
    """TensorBoard event files (tensorboardX) and an optional W&B run; each is skipped when its
    package is missing. Non-scalar values (lists, nested dicts, None) are left out."""

    def __init__(self, workdir: str, tensorboard: bool, wandb_project: str | None, wandb_config=None):
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("tensorboardX not installed: no TensorBoard events", flush=True)
            else:
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print(f"wandb not installed: not logging to project {wandb_project!r}", flush=True)
            else:
                name = os.path.basename(os.path.normpath(workdir))
                # W&B keeps its run files on local disk (a cache directory for a gs:// workdir).
                local = storage.local_dir(workdir, "wandb") if storage.is_remote(workdir) else workdir
                os.makedirs(local, exist_ok=True)
                self.wandb = wandb.init(project=wandb_project, name=name, config=wandb_config, dir=local)

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        scalars = {f"{prefix}{k}": v for k, v in scalar_items(values).items()}
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()  # at log cadence: cheap, and nothing is lost if the run is killed
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
