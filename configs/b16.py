"""ViT-B/16 with the CLIP paper's recipe (Radford et al. 2021).

32 epochs of 400M pairs at a global batch of 32,768 = 390,625 steps; AdamW
lr 5e-4, weight decay 0.2, beta2 0.98, eps 1e-6, 2,000 warmup steps then
cosine; bf16 compute. FSDP over every device.

    python -m clip_jax.main --config=configs/b16.py --workdir=gs://BUCKET/runs/b16 \
        --config.data.train_files='gs://BUCKET/laion400m/train-*.array_record' \
        --config.data.tokenizer=gs://BUCKET/laion400m/tokenizer.model
"""

from clip_jax.config_defaults import base_config

EPOCHS, DATASET_SIZE, BATCH = 32, 400_000_000, 32768


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.variant = "ViT-B/16"
    c.model.dtype = "bfloat16"
    c.train.batch_size = BATCH
    c.train.total_steps = EPOCHS * DATASET_SIZE // BATCH
    c.optim.lr = 5e-4
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 2000
    c.sharding.mesh = {"data": 1, "fsdp": -1, "model": 1}
    c.data.num_workers = 16
    # Required on the command line: c.data.train_files, c.data.tokenizer.
    return c.lock()
