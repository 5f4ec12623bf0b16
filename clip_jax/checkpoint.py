"""Checkpoints: the train state and the Grain iterator position, saved together.

One orbax ``CheckpointManager`` under ``WORKDIR/checkpoints`` holds, per step,
the sharded train state (params, optimizer state, step), each process's
data-iterator state and a fingerprint of the data config, so a restarted run
continues with exactly the batches the interrupted one would have seen. Saves
are asynchronous (arrays are copied to host before ``save`` returns; the
writing happens in the background) and committed atomically by orbax.

What orbax does not do, done here:

- Integrity. Once a step is committed, process 0 writes ``checksums.json``
  (size and sha256 of every file; on an object store such as ``gs://``, the
  crc32c/md5 the store computed, read from one listing) into its directory,
  last: it is also the mark that the step was confirmed complete. A restore
  verifies the latest step; a damaged one (flipped bytes, truncated or missing
  file, no manifest) is logged with the reason, moved to
  ``checkpoints_damaged/`` and the run falls back to the previous intact step.
  So is, on an object store, a step directory orbax never committed (a save
  cut off before its ``commit_success.txt``; orbax itself ignores it). When
  steps exist but none verifies, the run stops with each step's reason instead
  of restarting from step 0; ``accept_unverified`` restores the latest one as
  it is. Steps are moved aside only once the restore succeeded.
- A non-finite state is never saved: the loss, gradient and parameter norms
  are checked before each save; a non-finite one stops the run with an error.
- Preemption: ``reached_preemption(step)`` is orbax's sync point (all
  processes agree on the step to save at after a SIGTERM); it needs
  ``jax.distributed`` initialised, which ``main.py`` does even on one host.
- A changed data config (files, sources and weights, seed, batch size, image
  size, tokenizer: `clip_jax.data_fingerprint`) refuses to resume unless
  ``allow_data_change`` says so. The
  process count may change (`clip_jax.data.elastic`: the data position is a
  global one), except for the streaming "webdataset" reader.
"""

from __future__ import annotations

import os

import grain
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from clip_jax import cli, data_fingerprint, storage
from clip_jax.data import elastic

MANIFEST = "checksums.json"


class NonFiniteError(FloatingPointError):
    """The training state went non-finite; it was not saved."""


class StateMismatchError(ValueError, cli.UserError):
    """The checkpoint's train state does not fit the run's model or optimizer."""


class UnverifiedCheckpointsError(cli.UserError):
    """Checkpoint steps exist but none verifies (and ``accept_unverified`` is not set)."""


_REFUSED = -2  # the step broadcast when process 0 refuses to choose one


def write_manifest(step_dir: str) -> None:
    """``step_dir/checksums.json``: {relative path: {"size", "sha256" | the store's checksums}}.

    Written last and atomically: it also marks the step as confirmed complete.
    """
    manifest = {n: f for n, f in storage.file_fingerprints(step_dir).items() if n != MANIFEST}
    storage.write_json(os.path.join(step_dir, MANIFEST), dict(sorted(manifest.items())), indent=1)


def damage(step_dir: str) -> str | None:
    """Why ``step_dir`` cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = storage.read_json(os.path.join(step_dir, MANIFEST))
    except FileNotFoundError:
        return f"no {MANIFEST}: the save was never confirmed complete"
    except ValueError as e:
        return f"{MANIFEST} is unreadable ({e})"
    found = storage.file_fingerprints(step_dir, list(manifest))
    for name, expected in manifest.items():
        actual = found.get(name)
        if actual is None:
            return f"{name} is missing"
        if actual["size"] != expected["size"]:
            return f"{name} is {actual['size']} bytes, {expected['size']} when saved (truncated?)"
        for kind in ("sha256", "crc32c", "md5"):
            if kind in expected and actual.get(kind) != expected[kind]:
                return f"{name}: {kind} differs from the one recorded at save (corrupted bytes)"
    return None


def has_steps(directory: str) -> bool:
    """Whether ``directory`` (a run's ``checkpoints``) holds any step directory, verified or not."""
    return storage.isdir(directory) and any(n.isdigit() for n in storage.listdir(directory))


_global_norm = jax.jit(optax.global_norm)


def check_finite(step: int, state, step_metrics: dict | None, latest: int | None) -> None:
    """Raises NonFiniteError (after saying so) when the loss, grads or params are not finite.

    The metrics and the norm are replicated: every process takes the same decision.
    """
    keys = ("loss", "grad_norm", "nonfinite")
    values = {k: step_metrics[k] for k in keys if step_metrics and k in step_metrics}
    values["param_norm"] = _global_norm(state.params)
    values = {k: float(v) for k, v in jax.device_get(values).items()}
    if values.pop("nonfinite", 0.0):  # a skipped step (clip_jax.nonfinite): its loss is not the state's
        values = {"param_norm": values["param_norm"]}
    if all(np.isfinite(v) for v in values.values()):
        return
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    print(f"checkpoint: NOT saving step {step}: non-finite state ({shown})", flush=True)
    raise NonFiniteError(
        f"training diverged: non-finite {shown} at step {step}; nothing saved for it, "
        f"the last good checkpoint is step {latest}"
    )


class _Manager(ocp.CheckpointManager):
    """orbax's manager, except that only the training loop asks jax's preemption sync point.

    orbax 0.12.8 also asks it from its save-finalize thread, with the step being finalized:
    that moves jax's step counter backwards, and a SIGTERM at that moment sets the agreed
    step in the past, never reached (seen: SIGTERM caught, run went on to the end).
    """

    preempted_at: int | None = None

    def reached_preemption(self, step: int) -> bool:
        return step == self.preempted_at

    def _finalize(self, step: int, steps_to_remove: list[int]) -> None:
        """orbax's commit of ``step`` (in the background), then process 0 writes its manifest."""
        super()._finalize(step, steps_to_remove)
        step_dir = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and storage.isdir(step_dir):  # (absent when the save failed)
            write_manifest(step_dir)


def _reached_sync_point(step: int) -> bool:
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is disabled
        return False


class Checkpoints:
    """``config``: the ``checkpoint`` section (every, keep, keep_period, allow_data_change)."""

    def __init__(self, directory: str, config: ml_collections.ConfigDict, fingerprint: dict):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=config.every,
            max_to_keep=config.keep,
            keep_period=config.get("keep_period"),
            enable_async_checkpointing=True,
        )
        self.directory = storage.absolute(directory)
        self.manager = _Manager(self.directory, options=options, item_names=("state", "data", "meta"))
        self.fingerprint = fingerprint
        self.allow_data_change = config.get("allow_data_change", False)
        self.accept_unverified = config.get("accept_unverified", False)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def reached_preemption(self, step: int) -> bool:
        """True at the step every process agreed to save at after a preemption notice (SIGTERM).

        Call it once per step, from the training loop only, with increasing steps.
        """
        if _reached_sync_point(step):
            self.manager.preempted_at = step
        return self.manager.reached_preemption(step)

    def restore(self, abstract_state, shardings, iterator):
        """The latest intact state (placed with ``shardings``), or None; ``iterator`` is repositioned.

        Decides before it changes anything: a refusal (changed data, no step verifies, a
        state that does not fit) leaves the directory as it was. Only once the state is
        restored are the damaged and uncommitted steps newer than it moved aside.
        """
        step, aside = self._choose_step()
        if step is not None:
            restore_data = self._check_data(step)
            target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
            )
            items = {"state": ocp.args.StandardRestore(target)}
            # Saved by another number of processes: the global position, read here (Grain reads
            # only this process's own file).
            moved = self._elastic_position(step) if restore_data else None
            if restore_data and moved is None:
                items["data"] = grain.checkpoint.CheckpointRestore(iterator)
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
            except ValueError as e:  # orbax: shapes or structure that differ from the model's
                why = (str(e).splitlines() or [type(e).__name__])[0][:300]
                raise StateMismatchError(
                    f"checkpoint step {step} in {self.directory} does not fit this run's model or "
                    f"optimizer ({why}); use a new --workdir or the run's config"
                ) from e
            if moved is not None:
                iterator.set_state(moved)
        self._set_aside(aside, step)
        return None if step is None else state

    def _elastic_position(self, step: int) -> dict | None:
        data_dir = os.path.join(self.step_dir(step), "data")
        try:
            return elastic.saved_state(data_dir, jax.process_index(), jax.process_count())
        except elastic.PositionError as e:
            raise data_fingerprint.DataChangedError(f"checkpoint step {step}: {e}") from None

    def save(self, step: int, state, iterator, step_metrics=None, force: bool = False) -> bool:
        """Saves when ``step`` is on the cadence (or ``force``); returns whether it saved.

        Raises NonFiniteError instead of saving a non-finite state.
        """
        if not (force or self.manager.should_save(step)):
            return False
        check_finite(step, state, step_metrics, self.latest_step())
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(self.fingerprint),
        )
        return self.manager.save(step, args=args, force=True)

    def close(self) -> None:
        """Waits for background writes (a failed write raises here)."""
        self.manager.wait_until_finished()
        self.manager.close()

    def _choose_step(self) -> tuple[int | None, dict[int, str]]:
        """(step to restore or None, {step to move aside: why}); process 0 verifies steps newest
        first, all processes agree on the step. Nothing is moved yet.

        Raises UnverifiedCheckpointsError when steps exist but none verifies, unless
        ``accept_unverified`` (then the latest committed step is taken as it is).
        """
        chosen, aside, refusal = -1, {}, None
        if jax.process_index() == 0:
            aside = {s: "was never committed (save interrupted)" for s in self._uncommitted_steps()}
            for step in sorted(self.manager.all_steps(), reverse=True):
                reason = damage(self.step_dir(step))
                if reason is None:
                    chosen = step
                    break
                aside[step] = f"is damaged: {reason}"
            if chosen < 0 and aside:
                chosen, refusal = self._unverified(aside)
        if jax.process_count() > 1:
            chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        if chosen == _REFUSED:
            raise UnverifiedCheckpointsError(refusal or f"{self.directory}: no step verifies (see process 0)")
        return (None if chosen < 0 else chosen), aside

    def _unverified(self, aside: dict[int, str]) -> tuple[int, str | None]:
        """When no step verifies: (_REFUSED, why), or with ``accept_unverified`` (latest committed
        step or -1, None) after saying so."""
        reasons = "; ".join(f"step {s} {why}" for s, why in sorted(aside.items(), reverse=True))
        if not self.accept_unverified:
            return _REFUSED, (
                f"{self.directory}: no checkpoint step verifies ({reasons}). Not restarting from step 0 "
                "over them: check the files, or pass --config.checkpoint.accept_unverified=True to "
                "restore the latest committed step as it is"
            )
        committed = [s for s in self.manager.all_steps() if s in aside]
        chosen = max(committed, default=-1)
        aside.pop(chosen, None)
        print(f"checkpoint: no step verifies ({reasons}); as accepted, restoring step {chosen}", flush=True)
        return chosen, None

    def _set_aside(self, aside: dict[int, str], restored: int | None) -> None:
        """Process 0 moves the steps in ``aside`` away (all are newer than ``restored``, or never
        committed); all processes reload."""
        if jax.process_index() == 0:
            for step, why in sorted(aside.items()):
                print(f"checkpoint step {step} {why}; moved to {self._move_aside(step)}", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("clip_jax checkpoint verified")
        self.manager.reload()
        if restored is not None and restored != self.manager.latest_step():
            raise RuntimeError(
                f"checkpoint step {restored} verified but orbax sees {self.manager.all_steps()}"
            )

    def _uncommitted_steps(self) -> list[int]:
        """Step directories orbax does not list: on object stores, a save cut off before orbax
        wrote its commit marker (locally orbax writes a temporary name and renames it)."""
        if not storage.isdir(self.directory):
            return []
        names = storage.listdir(self.directory)
        return sorted(set(int(n) for n in names if n.isdigit()) - set(self.manager.all_steps()))

    def _move_aside(self, step: int) -> str:
        target = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged", str(step))
        suffix = 0
        while storage.exists(target + (f".{suffix}" if suffix else "")):
            suffix += 1
        target += f".{suffix}" if suffix else ""
        storage.move_tree(self.step_dir(step), target)
        return target

    def _check_data(self, step: int) -> bool:
        """Raises DataChangedError on a changed data config; returns whether to restore the iterator."""
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except (FileNotFoundError, KeyError, ValueError):
            print(f"checkpoint step {step} has no data fingerprint; not checked", flush=True)
            return True
        changes = data_fingerprint.data_changes(saved, self.fingerprint)
        if not changes:
            return True
        what = "; ".join(changes)
        if not self.allow_data_change:
            raise data_fingerprint.DataChangedError(
                f"checkpoint step {step} in {self.directory} was saved with another data config ({what}). "
                "Resuming would train on other batches than the interrupted run. Use a new --workdir, or "
                "pass --config.checkpoint.allow_data_change=True to resume anyway."
            )
        print(f"checkpoint: resuming with a changed data config, as allowed: {what}", flush=True)
        # A Grain position saved by another number of processes cannot be restored.
        return saved.get("process_count") == self.fingerprint.get("process_count")
