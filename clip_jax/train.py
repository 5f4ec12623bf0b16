"""Training: the loop (`run`) around the jitted step of `clip_jax.step`.

This is the only module that reads the whole config: it builds the mesh, the model,
the optimizer, the data and the evaluators from it, restores or initialises the
state, and steps, logs, saves and evaluates to ``train.total_steps``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from clip_jax import (
    checkpoint,
    data_fingerprint,
    goodput,
    inference,
    lock,
    logs,
    losses,
    metrics,
    nonfinite,
    optim,
    profiling,
    recipe,
    sharding,
    step,
    storage,
    telemetry,
    validation,
)
from clip_jax.data import elastic, formats, skips
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.eval import in_training
from clip_jax.models import clip
from clip_jax.workdir import TOKENIZER_FILE


@dataclasses.dataclass
class Run:
    """What the loop needs, built once by `run` from the config."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    model: clip.CLIP
    tokenizer: Tokenizer
    data: recipe.DataSpec
    primary: bool
    evaluations: in_training.Scheduled  # the evaluators, run when due


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) to ``config.train.total_steps``.

    Returns {"train": last logged metrics, "state": final TrainState, "eval": ...,
    "preempted": whether a SIGTERM stopped it early}. The workdir is locked for the run
    (`clip_jax.lock`), and nothing is written there before the resume is decided: a
    refused resume (changed data, a state that does not fit, no step verifies) leaves it
    as it was.
    """
    recorder = goodput.Recorder(workdir, jax.process_index() == 0)  # the attempt's wall time starts
    validation.check_config(config)
    profiling.window(config.logging.profile_steps, config.train.total_steps)
    mesh = sharding.make_mesh(config.sharding.mesh)
    validation.check_batch(config, mesh)
    with lock.hold(workdir):
        built = recipe.build(config, workdir)
        primary = jax.process_index() == 0
        evaluations = in_training.Scheduled(
            tuple(recipe.evaluators(config, built)),
            built.model,
            built.tokenizer,
            mesh,
            config.eval.batch_size,
            config.train.batch_size,
            losses.make_loss(config.train.loss, mesh),
            config.train.total_steps,
            workdir,
            primary,
        )
        r = Run(config, workdir, mesh, built.model, built.tokenizer, built.data, primary, evaluations)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            try:
                result = _run(r, recorder)
            except BaseException as e:
                recorder.finish(f"failed: {type(e).__name__}")
                raise
            recorder.finish("preempted" if result["preempted"] else "completed")
            return result


def _run(r: Run, recorder: goodput.Recorder) -> dict[str, Any]:
    """`run` once the workdir is locked and the data, tokenizer and model are known."""
    config, batch_size = r.config, r.config.train.batch_size
    tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps)
    abstract, shardings = step.state_shardings(r.model, tx, r.mesh)
    if r.primary:
        log_model_summary(abstract, r.mesh)
    skipped = skips.SkipCounter(config.data.max_skip_fraction)
    image_size = r.model.config.vision.image_size
    batches = formats.from_config(
        config.data,
        r.data.train_files,
        r.tokenizer,
        image_size,
        batch_size // jax.process_count(),
        skipped,
        r.data.sources,
    )
    fingerprint = data_fingerprint.data_fingerprint(
        config.data, r.data.train_files, r.data.tokenizer, batch_size, image_size, r.data.sources
    )
    checkpoints = checkpoint.Checkpoints(
        os.path.join(r.workdir, "checkpoints"), config.checkpoint, fingerprint
    )
    try:
        state = initial_state(r, tx, checkpoints, abstract, shardings, batches, recorder)  # the decision
        recorder.begin(int(state.step))  # goodput.json is written from here on
        if r.primary:
            write_run_files(r)
        logs.to_file(r.workdir, jax.process_index())  # the run has started: its workdir is ours
        logger = metrics.MetricsLogger(
            r.workdir,
            config.train.total_steps,
            batch_size,
            r.primary,
            tensorboard=config.logging.tensorboard,
            wandb_project=config.logging.wandb_project,
            wandb_config=config.to_dict(),
            resumed_step=int(state.step),
            meter=telemetry.meter(config, r.model.config, recorder.totals, r.primary),
        )
    except BaseException:
        checkpoints.close()
        raise
    with contextlib.closing(logger):
        try:
            train_step = step.make_train_step(
                r.model,
                tx,
                schedule,
                losses.make_loss(config.train.loss, r.mesh),
                config.train.accum_steps,
                config.train.seed,
            )
            step_fn = step.compile_train_step(train_step, shardings, r.mesh)
            window = profiling.window(config.logging.profile_steps, config.train.total_steps)
            profiler = profiling.Profiler(r.workdir, window, r.primary, recorder)
            with contextlib.closing(profiler):
                loop_args = (checkpoints, logger, skipped, recorder, profiler)
                result = train_loop(r, state, step_fn, batches, *loop_args)
        finally:
            checkpoints.close()
        resumed_at_end = not result["preempted"] and "eval" not in result  # the loop ran no step
        if resumed_at_end and (
            evals := r.evaluations.run_due(
                config.train.total_steps, step.variables(result["state"]), logger, recorder
            )
        ):
            result["eval"] = evals
    return result


def write_run_files(r: Run) -> None:
    """``config.json`` and the run's tokenizer (export and inference need nothing else)."""
    storage.write_text(os.path.join(r.workdir, "config.json"), r.config.to_json_best_effort(indent=2))
    storage.copy_file(r.data.tokenizer, os.path.join(r.workdir, TOKENIZER_FILE))


def initial_state(r: Run, tx, checkpoints, abstract, shardings, batches, recorder) -> step.TrainState:
    """The latest checkpoint (the iterator repositioned), else a fresh state, from
    ``config.train.init_from`` weights when given (fine-tuning: a fresh optimizer)."""
    with recorder.phase("restore"):
        state = checkpoints.restore(abstract, shardings, batches)
    if state is not None:
        if r.primary:
            print(f"resumed from step {int(state.step)}", flush=True)
        return state
    init = jax.jit(lambda rng: step.init_state(r.model, tx, rng), out_shardings=shardings)
    state = init(jax.random.key(r.config.train.seed))
    if r.config.train.init_from:
        overrides = r.config.train.get("init_from_overrides")
        params, model_state = inference.matching_variables(
            r.config.train.init_from, state.params, state.model_state, overrides
        )
        fresh = lambda p, m: step.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), m)
        state = jax.jit(fresh, out_shardings=shardings)(params, model_state)
        if r.primary:
            print(f"initialised from {r.config.train.init_from}", flush=True)
    return state


def train_loop(
    r: Run, state, step_fn, batches, checkpoints, logger, skipped, recorder, profiler
) -> dict[str, Any]:
    """Steps to ``train.total_steps``: log, save on the cadence, run the evaluators that are due,
    and on a SIGTERM save at the step all processes agree on and stop. ``recorder`` (goodput)
    times the data wait, saves and evaluations; ``profiler`` traces its window of steps."""
    config, total_steps = r.config, r.config.train.total_steps
    result, step_metrics, preempted = {"train": None}, None, False
    first_step = int(state.step) + 1
    watch = nonfinite.Watch(config.train.max_nonfinite_steps, checkpoints.latest_step)
    recorder.switch("train")
    for n in range(first_step, total_steps + 1):
        with recorder.phase("data"):
            batch = next(batches)
        with recorder.phase("compile" if n == first_step else "train"), profiler.step(n):
            state, step_metrics = step_fn(state, sharding.to_global(batch, r.mesh))
        profiler.stepped(n, state)
        watch.push(n, step_metrics["nonfinite"])  # reads the previous step's flag
        if n % config.train.log_every == 0 or n in (first_step, total_steps):
            watch.flush()
            drawn = elastic.source_metrics(batches)
            counted = {"nonfinite_steps": watch.total}
            result["train"] = logger.write(n, {**step_metrics, **counted, **drawn})
            recorder.write(n)
            if drawn and r.primary:
                print(f"data: examples per source {drawn}", flush=True)
            if skipped.total_skipped:
                print(f"data (process {jax.process_index()}): {skipped.as_dict()}", flush=True)
        with recorder.phase("checkpoint"):
            preempted = checkpoints.reached_preemption(n)
            checkpoints.save(n, state, batches, step_metrics, force=preempted)
        if preempted:
            print(f"preempted: saved step {n}, exiting", flush=True)
            break
        if evals := r.evaluations.run_due(n, step.variables(state), logger, recorder):
            result["eval"] = evals
    watch.flush()
    if not preempted and checkpoints.latest_step() != total_steps:
        with recorder.phase("checkpoint"):
            checkpoints.save(total_steps, state, batches, step_metrics, force=True)
    recorder.switch("other")
    return {**result, "state": state, "preempted": preempted}


def log_model_summary(abstract: step.TrainState, mesh: Mesh) -> None:
    count = sum(x.size for x in jax.tree.leaves(abstract.params))
    print(f"model: {count:,} parameters; mesh {dict(mesh.shape)}", flush=True)
