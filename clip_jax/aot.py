"""Ahead-of-time compile of the train step for a TPU slice you do not have.

    python -m clip_jax.aot --config=configs/b16.py --topology=v5e-256
    python -m clip_jax.aot --config=configs/b16.py --topology=v4-128 --config.model.remat=full

Builds the slice's devices from libtpu's topology description (no TPU needed,
only ``pip install 'clip-jax-tpu[tpu]'``), lowers and compiles the real train
step (``step.make_train_step`` with the run's state and batch shardings) for
them, and prints XLA's per-device memory analysis next to the chip's HBM, and
XLA's cost analysis (FLOPs, bytes accessed) with the roofline bound it implies
on the chip: the least step time and the most MFU the slice could reach.
Exit code 0 when it fits, 1 when it does not: also when XLA refuses to compile
because the step's buffers exceed HBM (``RESOURCE_EXHAUSTED``), the case this check exists
for. Then it suggests what to change.

Without libtpu (or with ``--platform=cpu``) it compiles for as many simulated
CPU devices instead. That checks shapes, shardings and divisibility, but its
memory figure is XLA:CPU's, labelled as such: only indicative of a TPU's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import time

import flax.linen as nn
import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from clip_jax import chips, cli, losses, optim, recipe, sharding, step, telemetry, validation

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    hbm_gib: float  # per chip (one JAX device per chip; v4/v5p megacore)
    cores_per_chip_in_name: int  # v4-128 counts TensorCores (64 chips); v5e-256 counts chips
    three_d: bool  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bandwidth: float  # HBM bytes/s per chip


def _generation(chip: str, cores_per_chip_in_name: int, three_d: bool) -> Generation:
    spec = chips.CHIPS[chip]  # the one accelerator table (clip_jax/chips.py), shared with telemetry
    return Generation(spec.hbm_gib, cores_per_chip_in_name, three_d, spec.bf16_flops, spec.hbm_bandwidth)


GENERATIONS = {
    "v4": _generation("v4", 2, True),
    "v5e": _generation("v5e", 1, False),
    "v5p": _generation("v5p", 2, True),
    "v6e": _generation("v6e", 1, False),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# Chips -> torus shape, the shapes Cloud TPU slices come in.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {
    4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
    512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # "v5e-256", as gcloud's --accelerator-type names it
    generation: str  # "v5e"
    chips: int
    libtpu_name: str  # "v5e:16x16", as libtpu's topology description names it

    @property
    def hbm_bytes(self) -> int:
        return int(GENERATIONS[self.generation].hbm_gib * GIB)


def parse_topology(name: str) -> Topology:
    """'v5e-256' / 'v5litepod-256' / 'v4-128' / 'v5p-128' / 'v6e-256' -> Topology."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite)-(\d+)", name)
    if not match:
        raise validation.ConfigError(f"--topology={name!r}: use e.g. v4-128, v5e-256, v5p-256, v6e-64")
    generation = _ALIASES.get(match.group(1), match.group(1))
    spec = GENERATIONS[generation]
    chips = int(match.group(2)) // spec.cores_per_chip_in_name
    shapes = _SHAPES_3D if spec.three_d else _SHAPES_2D
    if chips not in shapes:
        raise validation.ConfigError(
            f"--topology={name!r}: no {generation} slice of {chips} chips; try {sorted(shapes)}"
        )
    return Topology(f"{generation}-{match.group(2)}", generation, chips, f"{generation}:{shapes[chips]}")


def tpu_devices(topology: Topology) -> list:
    """Compile-only TPU devices of the slice, from libtpu (raises when libtpu is missing)."""
    from jax.experimental import topologies

    # v4/v5p: one JAX device per chip (megacore), as on the real slice; libtpu's default is per core.
    kwargs = {"chip_config_name": "megacore"} if GENERATIONS[topology.generation].three_d else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name, **kwargs)
    return list(desc.devices)


def abstract_inputs(config: ml_collections.ConfigDict, devices: list):
    """(jitted step, abstract sharded TrainState, abstract sharded batch, mesh). Call inside the mesh."""
    mesh = sharding.make_mesh(config.sharding.mesh, devices)
    validation.check_batch(config, mesh)
    model = recipe.build_model(config)  # the variant's own vocabulary (no tokenizer file needed)
    tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps)
    # Outside jax.set_mesh: nothing may run on compile-only devices (state_shardings draws a key).
    with nn.logical_axis_rules(sharding.RULES):
        abstract, shardings = step.state_shardings(model, tx, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        loss_fn = losses.make_loss(config.train.loss, mesh)
        train_step = step.make_train_step(
            model, tx, schedule, loss_fn, config.train.accum_steps, config.train.seed
        )
        step_fn = step.compile_train_step(train_step, shardings, mesh)
    length, canvas_size = model.config.text.context_length, config.data.get("canvas_size", 0)
    size = canvas_size or model.config.vision.image_size
    batch_sharding = sharding.batch_sharding(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(
        (config.train.batch_size, *shape), dtype, sharding=batch_sharding
    )
    batch = {"image": spec((size, size, 3), "uint8"), "tokens": spec((length,), "int32")}
    if canvas_size:  # crops resized in the step (clip_jax/data/canvas.py)
        batch.update(box=spec((4,), "float32"), extent=spec((2,), "int32"))
    return step_fn, state, batch, mesh


def compile_step(config: ml_collections.ConfigDict, devices: list) -> dict:
    """Lowers and compiles the train step for ``devices``; XLA's per-device memory analysis (bytes)."""
    step_fn, state, batch, mesh = abstract_inputs(config, devices)
    start = time.monotonic()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        compiled = step_fn.lower(state, batch).compile()
    stats = compiled.memory_analysis()
    memory = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,  # donated state buffers reused for the new state
        "temporaries": stats.temp_size_in_bytes,
        "code": stats.generated_code_size_in_bytes,
    }
    memory["total"] = (
        memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"] + memory["code"]
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per program
    return {
        "memory": memory,
        # Per device: for an SPMD executable XLA analyses the one partitioned program each device runs
        # (tests/test_aot.py checks: the tiny step on 1 device reports ~8x the FLOPs it does on 8).
        "cost": {"flops": cost.get("flops", 0.0), "bytes_accessed": cost.get("bytes accessed", 0.0)},
        "compile_s": round(time.monotonic() - start, 1),
        "mesh": dict(mesh.shape),
    }


def model_flops(config: ml_collections.ConfigDict) -> float:
    """Model FLOPs of one train step: 3 x forward (benchmark.py's formula), FLIP's kept patches."""
    model = recipe.build_model(config)
    return telemetry.train_flops_per_pair(model.config, config.model.patch_dropout) * config.train.batch_size


def loop_caveat(config: ml_collections.ConfigDict) -> str | None:
    """XLA's cost analysis counts a while loop's body ONCE, not once per trip (measured: the tiny
    model's FLOPs drop to a third with scan over its 4- and 3-layer towers), so a step with loops is
    under-counted and its roofline too optimistic. Says so rather than print a wrong bound silently."""
    loops = [("scan", config.model.scan), ("accum_steps > 1", config.train.accum_steps > 1)]
    loops = [name for name, on in loops if on]
    if not loops:
        return None
    return f"{' and '.join(loops)}: XLA counts a loop body once: FLOPs, bytes and this bound are too low"


def roofline(cost: dict, step_model_flops: float, chips: int, generation: Generation) -> dict:
    """The least step time XLA's per-device ``cost`` allows on the chip, and the MFU it caps.

    step >= max(FLOPs / peak, bytes / HBM bandwidth) per chip (no overlap loss, no collectives'
    wire time); MFU <= model FLOPs / (chips x peak x step). ``xla_to_model_flops`` > 1 is XLA's
    extra work: recomputation under remat, the optimizer, the loss, elementwise ops.
    """
    compute_s = cost["flops"] / generation.peak_flops
    memory_s = cost["bytes_accessed"] / generation.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    return {
        "compute_s": compute_s,
        "memory_s": memory_s,
        "step_s": step_s,
        "bound": "compute" if compute_s >= memory_s else "HBM bandwidth",
        "model_flops": step_model_flops,
        "mfu_bound": step_model_flops / (chips * generation.peak_flops * step_s),
        "xla_to_model_flops": cost["flops"] * chips / step_model_flops,
    }


def report(config: ml_collections.ConfigDict, topology: Topology, platform: str) -> dict:
    """Compiles for the slice (``platform`` "tpu": libtpu; "cpu": simulated CPU devices); a summary."""
    if platform == "tpu":
        devices = tpu_devices(topology)
    else:
        devices = jax.devices("cpu")
        if len(devices) != topology.chips:
            raise RuntimeError(f"{len(devices)} CPU devices, {topology.chips} needed (set before JAX starts)")
    try:
        result = compile_step(config, devices)
        total = result["memory"]["total"]
        spec = GENERATIONS[topology.generation]
        # No FLOPs reported (a backend without cost analysis): no bound rather than a made-up one.
        if result["cost"]["flops"] > 0:
            result["roofline"] = roofline(result["cost"], model_flops(config), len(devices), spec)
            result["roofline"]["caveat"] = loop_caveat(config)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # XLA refuses a program whose buffers exceed HBM: the answer is "does not fit", not a crash.
        result, total = out_of_memory(str(e)), None
    return {
        "topology": topology.name,
        "libtpu_topology": topology.libtpu_name,
        "compiled_for": "TPU (libtpu AOT)" if platform == "tpu" else "simulated CPU devices (XLA:CPU figure)",
        "variant": config.model.variant,
        "batch_size": config.train.batch_size,
        "per_device_batch": config.train.batch_size
        // sharding.batch_devices(sharding.make_mesh(config.sharding.mesh, devices)),
        "remat": config.model.remat,
        "loss": config.train.loss,
        **result,
        "per_device_gib": round(total / GIB, 2) if total is not None else result.pop("used_gib"),
        "hbm_gib": GENERATIONS[topology.generation].hbm_gib,
        "fits": total is not None and total <= topology.hbm_bytes,
    }


def out_of_memory(message: str) -> dict:
    """The summary fields of a compile XLA refused for lack of memory: its own first line, and the
    GiB it needed when it says ("Used 17.30G of 15.75G hbm", or libtpu 0.0.42's "the total memory
    required for HLO temporaries (17.30G) exceeds ..."), else None."""
    first = next((line.strip() for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message)
    used = re.search(r"Used ([\d.]+)([KMGT])", message) or re.search(
        r"required for [^(]*\(([\d.]+)([KMGT])", message
    )
    scale = {"K": 1 / (1 << 20), "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    return {
        "memory": None,
        "compile_error": first[:500],
        "used_gib": round(float(used.group(1)) * scale[used.group(2)], 2) if used else None,
    }


SUGGESTIONS = (
    "--config.model.remat=full (recompute activations in the backward pass)",
    "a smaller --config.train.batch_size, or --config.train.accum_steps=2 (same batch, half the activations)",
    "more chips: a larger --topology",
)


def verdict(summary: dict) -> str:
    """One line: the figure and whether it fits; what to try when it does not."""
    used = "over" if summary["per_device_gib"] is None else f"{summary['per_device_gib']} GiB"
    line = (
        f"{summary['variant']} batch {summary['batch_size']} on {summary['topology']} "
        f"({summary['compiled_for']}): {used} per device, "
        f"{'fits' if summary['fits'] else 'does NOT fit'} in {summary['hbm_gib']} GiB HBM"
    )
    if summary.get("roofline"):
        line += "\n" + roofline_line(summary["roofline"], summary["compiled_for"])
    if not summary["fits"]:
        line += "\ntry: " + "; ".join(SUGGESTIONS)
    return line


def roofline_line(bound: dict, compiled_for: str) -> str:
    """The roofline bound in one line (labelled as XLA:CPU's when it is)."""
    line = (
        f"roofline: step >= {bound['step_s'] * 1e3:.1f} ms ({bound['bound']}-bound: FLOPs "
        f"{bound['compute_s'] * 1e3:.1f} ms, HBM {bound['memory_s'] * 1e3:.1f} ms per chip), "
        f"MFU <= {100 * bound['mfu_bound']:.1f}%; XLA FLOPs / model FLOPs = {bound['xla_to_model_flops']:.2f}"
    )
    if not compiled_for.startswith("TPU"):
        line += " (XLA:CPU's cost analysis: indicative only)"
    if bound.get("caveat"):
        line += f"\n  caution: {bound['caveat']}"
    return line


def define_flags() -> None:
    """The command's flags (defined only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/b16.py.")
    flags.DEFINE_string("topology", "v5e-256", "Target slice as gcloud names it: v4-128, v5e-256, ...")
    flags.DEFINE_enum(
        "platform",
        "auto",
        ["auto", "tpu", "cpu"],
        "auto: TPU AOT when libtpu is installed, else simulated CPU.",
    )
    flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {argv[1:]} (flags start with --)")
    topology = parse_topology(flags.FLAGS.topology)
    platform = flags.FLAGS.platform
    if platform == "auto":
        platform = "tpu" if importlib.util.find_spec("libtpu") else "cpu"
    if platform == "tpu":
        # Compile-only: no lock on the (absent) chips, no GCE metadata queries for the slice.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if platform == "cpu":
        print(f"compiling for {topology.chips} simulated CPU devices (no libtpu: memory is XLA:CPU's)")
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", topology.chips)
    summary = report(flags.FLAGS.config, topology, platform)
    print(json.dumps(summary, indent=2))
    print(verdict(summary))
    return 0 if summary["fits"] else 1


if __name__ == "__main__":
    define_flags()
    cli.run(main)
