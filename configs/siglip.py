"""SigLIP (Zhai et al. 2023) two-towers with the sigmoid loss, big_vision's shapes.

``arg`` picks the variant: B/16 (default), B/16-256, B/16-384, L/16-256, So400m/14-384
(`clip_jax.models.clip.VARIANTS` "SigLIP-<arg>"). Any tower field can be overridden,
e.g. a SigLIP-shaped tower of another size::

    python -m clip_jax.main --config=configs/siglip.py:B/16 --workdir=gs://BUCKET/runs/siglip \
        --config.data.train_files='gs://BUCKET/webli/train-*.array_record' \
        --config.data.tokenizer=gs://BUCKET/webli/tokenizer.model \
        --config.model.vision.image_size=256 --config.model.text.layers=6

Texts are pooled at the last position, so the tokenizer pads every caption to the full
context (64 tokens), as SigLIP's does.
"""

from clip_jax.config_defaults import base_config


def get_config(arg=None):
    c = base_config()
    c.model.variant = f"SigLIP-{arg or 'B/16'}"
    c.model.dtype = "bfloat16"
    c.train.loss = "sigmoid_ring"  # learnable temperature and bias (t, b): init log(10), -10
    c.train.batch_size = 32768
    c.train.total_steps = 9_000_000_000 // 32768  # 9B examples seen
    c.optim.update(lr=1e-3, weight_decay=1e-4, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=5000)
    c.sharding.mesh = {"data": 1, "fsdp": -1, "model": 1}
    return c.lock()
