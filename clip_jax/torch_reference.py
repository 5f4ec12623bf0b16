"""HF transformers' ``CLIPModel`` (PyTorch) on clip_jax's shapes: the benchmark's yardstick.

Same variant shapes, batch, loss (HF's symmetric CLIP loss), gradient clipping
and AdamW (decoupled weight decay) as clip_jax's step; random weights and data.
Needs ``torch`` and ``transformers`` (the ``test`` extra).

Run by ``benchmark --torch`` as a process of its own, which never imports JAX (so
PyTorch has the cores alone and no XLA thread pool or buffer is resident):

    python -m clip_jax.torch_reference --spec=SPEC.json --json=RESULT.json

SPEC.json is `make_spec`'s dict (written by the benchmark, which knows the model's
shapes); RESULT.json is `bench_hf_step`'s. This module imports nothing of
``clip_jax.models`` for that reason: the shapes arrive as plain values.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from absl import flags

from clip_jax import cli, storage
from clip_jax.data import bounded, skips

MAX_SPEC_BYTES = 1 << 20
SPEC_KEYS = ("hf_config", "batch", "dtype", "steps", "warmup", "model_flops_per_step", "vocab_size")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def hf_config_kwargs(config) -> dict[str, Any]:
    """``transformers.CLIPConfig``'s arguments for a clip_jax ``CLIPConfig`` of a ViT variant,
    as plain JSON values."""
    vision, text = config.vision, config.text
    return {
        "projection_dim": config.embed_dim,
        "vision_config": {
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": vision.activation,
            "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": text.activation,
            "layer_norm_eps": 1e-5,
        },
    }


def hf_config(config):
    """A transformers ``CLIPConfig`` of the same shapes as a clip_jax one."""
    import transformers

    return transformers.CLIPConfig(**hf_config_kwargs(config))


def make_spec(config, batch: int, dtype: str, steps: int, warmup: int, model_flops_per_step: float) -> dict:
    """The work `bench_hf_step` times, as JSON values: shapes, batch, dtype, step counts and the
    model FLOPs per step (clip_jax's formula, so both sides' rates count the same work)."""
    return {
        "hf_config": hf_config_kwargs(config),
        "batch": batch,
        "dtype": dtype,
        "steps": steps,
        "warmup": warmup,
        "model_flops_per_step": model_flops_per_step,
        "vocab_size": config.text.vocab_size,
    }


def read_spec(path: str) -> dict:
    """`make_spec`'s dict from ``path`` (bounded read); cli.UserError naming the file otherwise."""
    try:
        spec = json.loads(bounded.read_file(path, MAX_SPEC_BYTES))
    except skips.BadRecord as e:
        raise cli.UserError(f"--spec={path}: cannot read it ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise cli.UserError(f"--spec={path}: not valid JSON ({e})") from None
    missing = [k for k in SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise cli.UserError(f"--spec={path}: not a benchmark spec (missing {missing}); see make_spec")
    if spec["dtype"] not in ("float32", "bfloat16"):
        raise cli.UserError(f"--spec={path}: dtype {spec['dtype']!r} is not float32 or bfloat16")
    return spec


def bench_hf_step(spec: dict) -> dict:
    """``spec["warmup"]`` untimed then ``spec["steps"]`` timed training steps of HF's CLIPModel;
    float32 on CPU (all available cores), bf16 autocast on GPU. Median, min and max seconds."""
    import torch
    import transformers

    threads = available_cores()
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.CLIPConfig(**spec["hf_config"])
    model = transformers.CLIPModel(hf).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    batch, size = spec["batch"], hf.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    tokens = torch.randint(
        1, spec["vocab_size"], (batch, hf.text_config.max_position_embeddings), device=device
    )
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=spec["dtype"] == "bfloat16")

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(spec["warmup"]):
        run_step()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = spec["model_flops_per_step"]
    return {
        "framework": f"transformers {transformers.__version__} / torch {torch.__version__}",
        "device": device,
        "threads": threads if device == "cpu" else torch.get_num_threads(),
        "jax_imported": "jax" in sys.modules,  # the fairness rule, checked by the tests
        "warmup": spec["warmup"],
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_s_all": times,
        "pairs_per_s": batch / step_s,
        "model_flops_per_step": flops,
        "achieved_flops_per_s": flops / step_s,
    }


def main(argv):
    del argv
    result = bench_hf_step(read_spec(flags.FLAGS.spec))
    print(
        f"HF transformers (PyTorch, {result['device']}, {result['threads']} threads): step median "
        f"{result['step_s']:.3f} s (min {result['step_s_min']:.3f}, max {result['step_s_max']:.3f}; "
        f"{len(result['step_s_all'])} timed after {result['warmup']} untimed)",
        flush=True,
    )
    if flags.FLAGS.json:
        storage.write_json(flags.FLAGS.json, result)


if __name__ == "__main__":
    flags.DEFINE_string("spec", None, "the work to time: make_spec's JSON (written by clip_jax.benchmark)")
    flags.DEFINE_string("json", None, "write the result here (JSON)")
    flags.mark_flag_as_required("spec")
    cli.run(main)
