"""Training: the train state, the step, and the loop (`run`).

This is the only module that reads the whole config. Choices (which loss,
which optimizer) are made when the step is BUILT; the traced step has no
branches on config values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from clip_jax import (
    checkpoint,
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
    storage,
    telemetry,
    validation,
)
from clip_jax.data import elastic, formats, skips, transforms
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.eval import in_training
from clip_jax.models import clip
from clip_jax.workdir import TOKENIZER_FILE


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Any  # plain pytree of arrays (no partitioning boxes)
    opt_state: Any
    # Variables that are not trained: {"batch_stats": ...} of a ResNet tower's frozen
    # BatchNorm; {} for ViTs.
    model_state: Any


def init_state(model: clip.CLIP, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh train state (pure: used under `jax.eval_shape` and `jax.jit`)."""
    variables = dict(nn.meta.unbox(model.init(rng, *clip.dummy_inputs(model.config))))
    params = variables.pop("params")
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), variables)


def state_shardings(model: clip.CLIP, tx: optax.GradientTransformation, mesh: Mesh):
    """(abstract TrainState, matching tree of NamedShardings) from the logical axis names."""
    rng = jax.random.key(0)
    variables = dict(jax.eval_shape(lambda: model.init(rng, *clip.dummy_inputs(model.config))))
    boxed = variables.pop("params")
    # The model is traced once; the optimizer state's shapes follow from the params'.
    params = jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    model_state = nn.meta.unbox(variables)
    abstract = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params), model_state
    )
    param_shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), abstract.params, mesh)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx,
        lambda _, s: s,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
    )
    replicated = sharding.replicated(mesh)
    model_state_shardings = jax.tree.map(lambda _: replicated, model_state)  # small per-channel vectors
    shardings = TrainState(replicated, param_shardings, opt_shardings, model_state_shardings)
    return abstract, shardings


def _micro(x: jax.Array, count: int) -> jax.Array:
    """[B, ...] -> [count, B / count, ...], micro-batch m = rows m, m + count, ...

    With the batch sharded in contiguous blocks over devices, every device keeps
    its own rows: each micro-batch takes an equal share from every device.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)


def _unmicro(x: jax.Array) -> jax.Array:
    """The inverse of `_micro`: [count, B / count, ...] -> [B, ...] in the original row order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def make_gradient_fn(model: clip.CLIP, loss_fn: losses.LossFn, accum_steps: int):
    """``(params, images, tokens, rng, frozen={}) -> ((loss, stats), grads)`` over the whole global batch.

    With ``accum_steps`` > 1 the batch runs as micro-batches and the gradient is still
    the whole batch's, every pair contrasted with all B - 1 negatives (GradCache, as
    open_clip's --accum-freq): (1) embed every micro-batch without keeping
    activations, (2) loss and its gradient w.r.t. the embeddings over the full
    batch, (3) re-run each micro-batch and pull its embedding gradient back to the
    parameters. Activation memory is one micro-batch's; the cost, one extra forward.
    """

    def whole_batch(params, images, tokens, rng, frozen):
        def loss_of(params):
            return loss_fn(*embed(params, frozen, images, tokens, rng), *temperature(params))

        return jax.value_and_grad(loss_of, has_aux=True)(params)

    def accumulated(params, images, tokens, rng, frozen):
        images, tokens = _micro(images, accum_steps), _micro(tokens, accum_steps)
        micro_rng = lambda m: jax.random.fold_in(rng, m)
        embed_micro = lambda p, m: embed(p, frozen, images[m], tokens[m], micro_rng(m))
        image_emb, text_emb = jax.lax.map(lambda m: embed_micro(params, m), jnp.arange(accum_steps))

        def loss_of(image_emb, text_emb, params):
            return loss_fn(_unmicro(image_emb), _unmicro(text_emb), *temperature(params))

        (loss, stats), (d_image, d_text, grads) = jax.value_and_grad(loss_of, (0, 1, 2), has_aux=True)(
            image_emb, text_emb, params
        )

        def pull_back(grads, m):
            _, vjp = jax.vjp(lambda p: embed_micro(p, m), params)
            return jax.tree.map(jnp.add, grads, vjp((d_image[m], d_text[m]))[0]), None

        grads, _ = jax.lax.scan(pull_back, grads, jnp.arange(accum_steps))
        return (loss, stats), grads

    def embed(params, frozen, images, tokens, rng):
        variables = {"params": params, **frozen}
        return model.apply(variables, images, tokens, True, rngs={"patch_dropout": rng})[:2]

    def temperature(params):
        return model.apply({"params": params}, method=clip.CLIP.temperature)

    gradient = whole_batch if accum_steps == 1 else accumulated

    def gradient_fn(params, images, tokens, rng, frozen=None):
        # frozen: the variables that are not trained, e.g. {"batch_stats": ...} of a ResNet tower.
        return gradient(params, images, tokens, rng, frozen or {})

    return gradient_fn


def make_train_step(
    model: clip.CLIP,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_fn: losses.LossFn,
    accum_steps: int = 1,
    seed: int = 0,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step ``(state, batch) -> (state, metrics)``.

    batch: {"image": uint8 [B, S, S, 3], "tokens": int32 [B, L]} (global arrays).
    The step's randomness (FLIP's patch choice) is drawn from ``seed`` and the step
    number, so a resumed run draws what the uninterrupted one would have. A non-finite
    loss or gradient leaves params and optimizer state as they were (`clip_jax.nonfinite`);
    the metrics' ``nonfinite`` is 1.0 for such a step, else 0.0.
    """
    gradient_fn = make_gradient_fn(model, loss_fn, accum_steps)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images = transforms.normalize(batch["image"])
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        (loss, stats), grads = gradient_fn(state.params, images, batch["tokens"], rng, state.model_state)
        grad_norm = optax.global_norm(grads)
        ok = nonfinite.finite(loss, grad_norm)
        clamp = lambda p: clip.clamp_logit_scale(p, clip.scale_cap(model))
        params, opt_state = optim.update_if(ok, tx, grads, state.opt_state, state.params, clamp, grad_norm)
        stats = {
            **stats,
            "loss": loss,
            "logit_scale": jnp.exp(params["logit_scale"]),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "nonfinite": 1.0 - ok.astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state, state.model_state), stats

    return train_step


def compile_train_step(step_fn, state_shardings_, mesh: Mesh):
    """jit with explicit in/out shardings; the old state's buffers are donated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings_, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings_, sharding.replicated(mesh)),
        donate_argnums=0,
    )


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
    abstract, shardings = state_shardings(r.model, tx, r.mesh)
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
    fingerprint = checkpoint.data_fingerprint(
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
            step = make_train_step(
                r.model,
                tx,
                schedule,
                losses.make_loss(config.train.loss, r.mesh),
                config.train.accum_steps,
                config.train.seed,
            )
            step_fn = compile_train_step(step, shardings, r.mesh)
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
                config.train.total_steps, variables(result["state"]), logger, recorder
            )
        ):
            result["eval"] = evals
    return result


def write_run_files(r: Run) -> None:
    """``config.json`` and the run's tokenizer (export and inference need nothing else)."""
    storage.write_text(os.path.join(r.workdir, "config.json"), r.config.to_json_best_effort(indent=2))
    storage.copy_file(r.data.tokenizer, os.path.join(r.workdir, TOKENIZER_FILE))


def initial_state(r: Run, tx, checkpoints, abstract, shardings, batches, recorder) -> TrainState:
    """The latest checkpoint (the iterator repositioned), else a fresh state, from
    ``config.train.init_from`` weights when given (fine-tuning: a fresh optimizer)."""
    with recorder.phase("restore"):
        state = checkpoints.restore(abstract, shardings, batches)
    if state is not None:
        if r.primary:
            print(f"resumed from step {int(state.step)}", flush=True)
        return state
    init = jax.jit(lambda rng: init_state(r.model, tx, rng), out_shardings=shardings)
    state = init(jax.random.key(r.config.train.seed))
    if r.config.train.init_from:
        overrides = r.config.train.get("init_from_overrides")
        params, model_state = inference.matching_variables(
            r.config.train.init_from, state.params, state.model_state, overrides
        )
        fresh = lambda p, m: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), m)
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
    for step in range(first_step, total_steps + 1):
        with recorder.phase("data"):
            batch = next(batches)
        with recorder.phase("compile" if step == first_step else "train"), profiler.step(step):
            state, step_metrics = step_fn(state, sharding.to_global(batch, r.mesh))
        profiler.stepped(step, state)
        watch.push(step, step_metrics["nonfinite"])  # reads the previous step's flag
        if step % config.train.log_every == 0 or step in (first_step, total_steps):
            watch.flush()
            drawn = elastic.source_metrics(batches)
            counted = {"nonfinite_steps": watch.total}
            result["train"] = logger.write(step, {**step_metrics, **counted, **drawn})
            recorder.write(step)
            if drawn and r.primary:
                print(f"data: examples per source {drawn}", flush=True)
            if skipped.total_skipped:
                print(f"data (process {jax.process_index()}): {skipped.as_dict()}", flush=True)
        with recorder.phase("checkpoint"):
            preempted = checkpoints.reached_preemption(step)
            checkpoints.save(step, state, batches, step_metrics, force=preempted)
        if preempted:
            print(f"preempted: saved step {step}, exiting", flush=True)
            break
        if evals := r.evaluations.run_due(step, variables(state), logger, recorder):
            result["eval"] = evals
    watch.flush()
    if not preempted and checkpoints.latest_step() != total_steps:
        with recorder.phase("checkpoint"):
            checkpoints.save(total_steps, state, batches, step_metrics, force=True)
    recorder.switch("other")
    return {**result, "state": state, "preempted": preempted}


def variables(state: TrainState) -> dict:
    """The model's variables in ``state``: {"params": ..., **model_state}."""
    return {"params": state.params, **state.model_state}


def log_model_summary(abstract: TrainState, mesh: Mesh) -> None:
    count = sum(x.size for x in jax.tree.leaves(abstract.params))
    print(f"model: {count:,} parameters; mesh {dict(mesh.shape)}", flush=True)
