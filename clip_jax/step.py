"""The jitted train step: the train state, its shardings, the gradient and the step.

What `clip_jax.train`'s loop runs, and what `clip_jax.aot` compiles for a slice and
`clip_jax.benchmark` times without a run: it knows models, losses, the optimizer and
shardings, never a config or a workdir. Choices (which loss, micro-batches or not) are
made when the step is BUILT, by picking functions; the traced step has no branches on
config values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from clip_jax import losses, nonfinite, optim, sharding
from clip_jax.data import canvas, transforms
from clip_jax.models import clip


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

    batch: {"image": uint8 [B, S, S, 3], "tokens": int32 [B, L]} (global arrays), or with
    canvases to resize first (`clip_jax.data.canvas`: "image" [B, C, C, 3], "box", "extent").
    The step's randomness (FLIP's patch choice) is drawn from ``seed`` and the step
    number, so a resumed run draws what the uninterrupted one would have. A non-finite
    loss or gradient leaves params and optimizer state as they were (`clip_jax.nonfinite`);
    the metrics' ``nonfinite`` is 1.0 for such a step, else 0.0.
    """
    gradient_fn = make_gradient_fn(model, loss_fn, accum_steps)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images = transforms.normalize(canvas.step_images(batch, model.config.vision.image_size))
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


def variables(state: TrainState) -> dict:
    """The model's variables in ``state``: {"params": ..., **model_state}."""
    return {"params": state.params, **state.model_state}
