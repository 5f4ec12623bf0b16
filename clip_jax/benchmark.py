"""Step speed, MFU and memory of the training step; the loss's memory against the batch.

    python -m clip_jax.benchmark --variant=ViT-B/32 --batch=32 --dtype=float32 --torch
    python -m clip_jax.benchmark --variant=tiny --batch=64 --flip=0.5
    python -m clip_jax.benchmark --loss_memory --devices=8

Everything compared is measured in the same run (machines are noisy). Every timing
is the median (with min and max) of ``--steps`` timed steps after ``--warmup`` untimed
ones (after the compile):

- the full train step (forward, backward, AdamW; state donated) of clip_jax:
  compile time, median step time, pairs/s, model FLOPs per step from the
  formula in ANCHORS.md (24 N d^2 + 4 N^2 d per layer and token count N,
  x3 for a training step) beside XLA's cost analysis, achieved FLOP/s as a
  share of the best matmul rate measured on this machine in this run (MFU),
  and the compiled executable's memory;
- ``--torch``: HF transformers' ``CLIPModel`` (PyTorch) on the same shapes, batch
  and optimizer, and the ratio of pairs/s. Then each framework runs in a process of
  its own (clip_jax in this module without ``--torch``, with the matmul peak), this
  one only orchestrates; ``--runs=N`` repeats the pair, alternating which goes first,
  and reports medians over runs (`clip_jax.side_by_side` states the fairness rules);
- ``--breakdown``: forward+backward alone, the optimizer update alone (as the
  step runs it, `optim.update_if`, and as a select of new against old state, the
  code before), and the whole step both ways, each jitted with the state donated,
  timed in turns;
- ``--flip``: the same step with that share of image patches dropped, as a ratio;
- ``--loss_memory``: per-device scratch memory of loss + gradient (compiled, not
  run) for the dense, local-rows and ring losses as the global batch doubles,
  and the largest batch each fits in ``--budget_mib``.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags

from clip_jax import cli, side_by_side, storage, torch_reference

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "ViT-B/32", "model variant (clip_jax.models.clip.VARIANTS)")
flags.DEFINE_integer("batch", 32, "global batch", lower_bound=1)
flags.DEFINE_string("dtype", "float32", "compute dtype: float32 | bfloat16")
flags.DEFINE_string("loss", "softmax", "config.train.loss")
flags.DEFINE_integer("accum_steps", 1, "micro-batches per step", lower_bound=1)
flags.DEFINE_string("remat", "none", "none | full | dots")
flags.DEFINE_bool("scan", False, "nn.scan over blocks")
flags.DEFINE_integer("steps", 5, "timed steps (the median is reported)", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "untimed steps before the timed ones (after the compile)", lower_bound=0)
flags.DEFINE_bool(
    "torch",
    False,
    "also time HF transformers' CLIPModel (PyTorch) on the same work; each side in its own process",
)
flags.DEFINE_integer(
    "runs", 1, "with --torch: side-by-sides, alternating which goes first; medians over runs", lower_bound=1
)
flags.DEFINE_integer(
    "child_timeout_s", 7200, "with --torch: seconds each side's process may take", lower_bound=1
)
flags.DEFINE_list(
    "peak_sizes", [], "matmul sizes n of the peak (best over them); default 1024..4096, GPU 4096..16384"
)
flags.DEFINE_bool(
    "breakdown", False, "also time forward+backward alone and the optimizer update alone (cond and select)"
)
flags.DEFINE_float("flip", 0.0, "also time the step with this share of patches dropped (FLIP)")
flags.DEFINE_bool("loss_memory", False, "sweep the losses' per-device memory against the global batch")
flags.DEFINE_integer("devices", 0, "simulated CPU devices (sets XLA_FLAGS; 0: leave as is)")
flags.DEFINE_integer("budget_mib", 64, "per-device memory budget of the loss sweep")
flags.DEFINE_string("json", None, "also write the results here")


def matmul_peak(dtype, sizes=(1024, 2048, 3072, 4096), repeats=3) -> dict:
    """The best FLOP/s of a square matmul over ``sizes`` (the machine's attainable rate)."""
    import jax

    best = {"flops_per_s": 0.0}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            f(a).block_until_ready()
            rate = 2 * n**3 / (time.perf_counter() - start)
            if rate > best["flops_per_s"]:
                best = {"flops_per_s": rate, "size": n}
    return best


def _timed(run_step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return times


def breakdown(model, tx, loss_fn, state, shardings, global_batch, steps: int, warmup: int) -> dict:
    """Median seconds, timed in turns: forward+backward alone, the update alone, and the whole
    step, each with the update as `optim.update_if` (cond) and as the select it replaced."""
    import jax
    import optax

    from clip_jax import nonfinite, optim, step
    from clip_jax.data import transforms
    from clip_jax.models import clip

    gradient_fn = step.make_gradient_fn(model, loss_fn, 1)
    clamp = lambda p: clip.clamp_logit_scale(p, clip.scale_cap(model))

    def grads_of(state, batch):
        images = transforms.normalize(batch["image"])
        rng = jax.random.fold_in(jax.random.key(0), state.step)
        (loss, _), grads = gradient_fn(state.params, images, batch["tokens"], rng, state.model_state)
        return loss, grads

    def update_cond(params, opt_state, grads, loss):
        grad_norm = optax.global_norm(grads)
        ok = nonfinite.finite(loss, grad_norm)
        return optim.update_if(ok, tx, grads, opt_state, params, clamp, grad_norm)

    def update_select(params, opt_state, grads, loss):
        ok = nonfinite.finite(loss, optax.global_norm(grads))
        updates, new_state = tx.update(grads, opt_state, params)
        new_params = clamp(optax.apply_updates(params, updates))
        return nonfinite.keep_if_finite(ok, new_params, params, new_state, opt_state)

    def whole_step(update):  # grads and update in one jit, as step.make_train_step
        def step(params, opt_state, state, batch):
            loss, grads = grads_of(state.replace(params=params), batch)
            return update(params, opt_state, grads, loss)

        return jax.jit(step, out_shardings=state_args, donate_argnums=(0, 1))

    state_args = (shardings.params, shardings.opt_state)
    forward_backward = jax.jit(grads_of)
    loss, grads = forward_backward(state, global_batch)
    jax.block_until_ready(grads)
    # One copy of the state goes through every variant in turn (each donates it): the
    # values differ between variants, the work does not; memory stays at two states.
    held = jax.tree.map(lambda x: x.copy(), (state.params, state.opt_state))
    variants = {
        "update (cond)": jax.jit(update_cond, out_shardings=state_args, donate_argnums=(0, 1)),
        "update (select, before)": jax.jit(update_select, out_shardings=state_args, donate_argnums=(0, 1)),
        "step (cond)": whole_step(update_cond),
        "step (select, before)": whole_step(update_select),
    }
    times = {"forward+backward": [], **{name: [] for name in variants}}
    for i in range(warmup + steps):
        start = time.perf_counter()
        jax.block_until_ready(forward_backward(state, global_batch))
        if i >= warmup:
            times["forward+backward"].append(time.perf_counter() - start)
        for name, fn in variants.items():
            start = time.perf_counter()
            held = fn(*held, state, global_batch) if name.startswith("step") else fn(*held, grads, loss)
            jax.block_until_ready(held)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_jax_step(
    variant, batch, dtype, loss, steps, warmup=3, patch_dropout=0.0, with_breakdown=False, **model_options
) -> dict:
    """Times clip_jax's full train step on all local devices (``warmup`` untimed steps, then the
    median of ``steps``); returns the figures."""
    import flax.linen as nn
    import jax
    import numpy as np

    from clip_jax import losses, optim, recipe, sharding, step
    from clip_jax.config_defaults import base_config
    from clip_jax.models import clip

    config = base_config()
    config.model.update(variant=variant, dtype=dtype, patch_dropout=patch_dropout)
    config.model.update({k: v for k, v in model_options.items() if k in ("remat", "scan")})
    config.train.loss = loss
    model = recipe.build_model(config)
    tx, schedule = optim.make_optimizer(config.optim, total_steps=1000)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "model": 1})
    size, length = model.config.vision.image_size, model.config.text.context_length
    rng = np.random.default_rng(0)
    batch_np = {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "tokens": rng.integers(1, model.config.text.vocab_size, (batch, length)).astype(np.int32),
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        _, shardings = step.state_shardings(model, tx, mesh)
        state = jax.jit(lambda r: step.init_state(model, tx, r), out_shardings=shardings)(jax.random.key(0))
        train_step = step.make_train_step(
            model, tx, schedule, losses.make_loss(loss, mesh), model_options.get("accum_steps", 1)
        )
        global_batch = sharding.to_global(batch_np, mesh)
        start = time.perf_counter()
        compiled = step.compile_train_step(train_step, shardings, mesh).lower(state, global_batch).compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}

        def run_step():
            holder["state"], metrics = compiled(holder["state"], global_batch)
            jax.block_until_ready(metrics)

        _timed(run_step, warmup)
        times = _timed(run_step, steps)
        parts = None
        if with_breakdown:
            loss_fn = losses.make_loss(loss, mesh)
            parts = breakdown(model, tx, loss_fn, holder["state"], shardings, global_batch, steps, warmup)
    step_s = statistics.median(times)
    patches = getattr(model.config.vision, "num_patches", None)  # None: a ResNet tower
    kept = None if patches is None else patches - int(patches * patch_dropout)
    flops = 3 * clip.forward_flops_per_pair(model.config, kept) * batch
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    mib = lambda name: getattr(memory, name, 0) / 2**20
    return {
        "framework": "clip_jax",
        **({"breakdown_s": parts} if parts else {}),
        "devices": len(jax.devices()),
        "device_kind": jax.devices()[0].device_kind,
        "cores": torch_reference.available_cores(),
        "compile_s": compile_s,
        "warmup": warmup,
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_s_all": times,
        "pairs_per_s": batch / step_s,
        "model_flops_per_step": flops,
        "xla_flops_per_step": float(cost.get("flops", 0.0)) * len(jax.devices()),
        "achieved_flops_per_s": flops / step_s,
        "memory_mib": {
            "arguments": mib("argument_size_in_bytes"),
            "outputs": mib("output_size_in_bytes"),
            "aliased": mib("alias_size_in_bytes"),
            "temp": mib("temp_size_in_bytes"),
            "peak_estimate": mib("argument_size_in_bytes")
            + mib("output_size_in_bytes")
            - mib("alias_size_in_bytes")
            + mib("temp_size_in_bytes"),
        },
    }


def loss_memory_sweep(budget_mib: int, dim: int = 512, max_batch: int = 2**20) -> dict:
    """Per-device scratch bytes of loss + gradient, compiled on the local devices, as B doubles."""
    import jax
    import jax.numpy as jnp

    from clip_jax import losses, sharding

    mesh = sharding.make_mesh({"data": -1})
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    results = {}
    for name in ("softmax_dense", "softmax", "softmax_ring", "sigmoid_ring"):
        loss_fn = losses.make_loss(name, mesh)
        grad_fn = jax.jit(jax.grad(lambda *a, f=loss_fn: f(*a)[0], (0, 1, 2)))
        rows, batch = [], 8 * len(jax.devices())
        while batch <= max_batch:
            spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding.batch_sharding(mesh))
            with jax.set_mesh(mesh):
                memory = grad_fn.lower(spec, spec, scalar, scalar).compile().memory_analysis()
            used = (memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 2**20
            rows.append({"global_batch": batch, "mib_per_device": round(used, 2)})
            if used > budget_mib:
                break
            batch *= 2
        fits = [r["global_batch"] for r in rows if r["mib_per_device"] <= budget_mib]
        results[name] = {"rows": rows, "max_batch": max(fits) if fits else 0}
        print(
            f"{name:14s} largest global batch within {budget_mib} MiB/device: {results[name]['max_batch']:,}"
        )
        for r in rows:
            print(f"    B={r['global_batch']:>9,}  {r['mib_per_device']:10.2f} MiB/device")
    dense = results["softmax_dense"]["max_batch"]
    results["ring_over_dense"] = results["softmax_ring"]["max_batch"] / max(dense, 1)
    results["ring_over_local_rows"] = results["softmax_ring"]["max_batch"] / max(
        results["softmax"]["max_batch"], 1
    )
    print(
        f"ring / dense max batch: {results['ring_over_dense']:.1f}x; ring / local rows: "
        f"{results['ring_over_local_rows']:.1f}x"
    )
    return results


def _print_step(label: str, r: dict, peak: float) -> None:
    mfu = r["achieved_flops_per_s"] / peak if peak else float("nan")
    print(
        f"{label:28s} step {r['step_s']:.3f} s (min {r['step_s_min']:.3f}, max {r['step_s_max']:.3f})  "
        f"{r['pairs_per_s']:8.1f} pairs/s  "
        f"{r['achieved_flops_per_s'] / 1e9:9.1f} GFLOP/s  MFU {100 * mfu:5.1f}%"
        + (f"  compile {r['compile_s']:.1f} s" if "compile_s" in r else "")
    )


def _peak_sizes() -> tuple[int, ...] | None:
    try:
        sizes = tuple(int(n) for n in FLAGS.peak_sizes)
    except ValueError:
        raise cli.UserError(
            f"--peak_sizes={','.join(FLAGS.peak_sizes)}: give whole numbers, e.g. 1024,2048"
        ) from None
    if any(n < 1 for n in sizes):
        raise cli.UserError(f"--peak_sizes={','.join(FLAGS.peak_sizes)}: sizes must be positive")
    return sizes or None


def _bench_jax(results: dict) -> None:
    """The matmul peak and clip_jax's step (and FLIP, breakdown) in this process, into ``results``."""
    import jax

    dtype = jax.numpy.dtype(FLAGS.dtype)
    gpu = jax.default_backend() == "gpu"
    sizes = _peak_sizes() or ((4096, 8192, 16384) if gpu else (1024, 2048, 3072, 4096))
    results["matmul_peak"] = matmul_peak(dtype, sizes)
    peak = results["matmul_peak"]["flops_per_s"]
    print(f"matmul peak ({FLAGS.dtype}): {peak / 1e9:.1f} GFLOP/s at n={results['matmul_peak']['size']}")
    options = {"remat": FLAGS.remat, "scan": FLAGS.scan, "accum_steps": FLAGS.accum_steps}
    args = (FLAGS.variant, FLAGS.batch, FLAGS.dtype, FLAGS.loss, FLAGS.steps, FLAGS.warmup)
    results["clip_jax"] = r = bench_jax_step(*args, with_breakdown=FLAGS.breakdown, **options)
    _print_step(f"clip_jax {FLAGS.variant} b{FLAGS.batch}", r, peak)
    for name, seconds in r.get("breakdown_s", {}).items():
        share = None if name.startswith("update") else r["model_flops_per_step"] / seconds / peak
        print(f"  {name:24s} {seconds:.3f} s" + (f"  MFU {100 * share:5.1f}%" if share else ""))
    print(
        f"  model FLOPs/step {r['model_flops_per_step'] / 1e9:.1f} G (formula), XLA cost analysis "
        f"{r['xla_flops_per_step'] / 1e9:.1f} G; memory {json.dumps(r['memory_mib'])}"
    )
    results["mfu"] = r["achieved_flops_per_s"] / peak
    if FLAGS.flip:
        results["clip_jax_flip"] = f = bench_jax_step(*args, patch_dropout=FLAGS.flip, **options)
        _print_step(f"  + FLIP {FLAGS.flip:.0%}", f, peak)
        results["flip_speedup"] = r["step_s"] / f["step_s"]
        print(f"  FLIP {FLAGS.flip:.0%}: step time without / with masking {results['flip_speedup']:.2f}x")


def _jax_child_flags() -> dict:
    """This command's flags for the clip_jax process of a side-by-side (no --torch, --runs, --json)."""
    names = ("variant", "batch", "dtype", "loss", "accum_steps", "remat", "scan", "steps", "warmup")
    names += ("breakdown", "flip", "devices")
    return {**{n: FLAGS[n].value for n in names}, "peak_sizes": ",".join(FLAGS.peak_sizes)}


def main(argv):
    del argv
    if FLAGS.dtype not in ("float32", "bfloat16"):
        raise cli.UserError(f"--dtype={FLAGS.dtype}: use float32 or bfloat16")
    if FLAGS.runs > 1 and not FLAGS.torch:
        raise cli.UserError(f"--runs={FLAGS.runs} repeats the side-by-side: add --torch")
    _peak_sizes()
    if FLAGS.torch and not FLAGS.loss_memory:
        # Both sides in processes of their own: this one starts no JAX backend.
        results = side_by_side.run(_jax_child_flags(), FLAGS.runs, FLAGS.child_timeout_s)
    else:
        if FLAGS.devices:
            os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={FLAGS.devices}"
        results = {}
        if FLAGS.loss_memory:
            results["loss_memory"] = loss_memory_sweep(FLAGS.budget_mib)
        else:
            _bench_jax(results)
    if FLAGS.json:
        storage.write_json(FLAGS.json, results)


if __name__ == "__main__":
    cli.run(main)
