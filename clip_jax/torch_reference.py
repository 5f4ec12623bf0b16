"""HF transformers' ``CLIPModel`` (PyTorch) on clip_jax's shapes: the benchmark's yardstick.

Same variant shapes, batch, loss (HF's symmetric CLIP loss), gradient clipping
and AdamW (decoupled weight decay) as clip_jax's step; random weights and data.
Needs ``torch`` and ``transformers`` (the ``test`` extra).
"""

from __future__ import annotations

import os
import statistics
import time

from clip_jax.models import clip


def hf_config(config: clip.CLIPConfig):
    """A transformers ``CLIPConfig`` of the same shapes as a clip_jax one."""
    import transformers

    vision, text = config.vision, config.text
    return transformers.CLIPConfig(
        projection_dim=config.embed_dim,
        vision_config={
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": vision.activation,
            "layer_norm_eps": 1e-5,
        },
        text_config={
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": text.activation,
            "layer_norm_eps": 1e-5,
        },
    )


def bench_hf_step(variant: str, batch: int, dtype: str, steps: int) -> dict:
    """Median time of one training step of HF's CLIPModel; float32 on CPU, bf16 autocast on GPU."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    config = clip.get_variant(variant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.CLIPModel(hf_config(config)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    size, length = config.vision.image_size, config.text.context_length
    pixels = torch.randn(batch, 3, size, size, device=device)
    tokens = torch.randint(1, config.text.vocab_size, (batch, length), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        run_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = 3 * clip.forward_flops_per_pair(config) * batch
    return {
        "framework": f"transformers {transformers.__version__} / torch {torch.__version__}",
        "step_s": step_s,
        "step_s_all": times,
        "pairs_per_s": batch / step_s,
        "model_flops_per_step": flops,
        "achieved_flops_per_s": flops / step_s,
    }
