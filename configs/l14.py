"""ViT-L/14 with the CLIP paper's recipe: as B/16 but lr 4e-4 (Radford et al. 2021).

    python -m clip_jax.main --config=configs/l14.py --workdir=gs://BUCKET/runs/l14 \
        --config.data.train_files='gs://BUCKET/laion400m/train-*.array_record' \
        --config.data.tokenizer=gs://BUCKET/laion400m/tokenizer.model
"""

from clip_jax.config_defaults import base_config

EPOCHS, DATASET_SIZE, BATCH = 32, 400_000_000, 32768


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.variant = "ViT-L/14"
    c.model.dtype = "bfloat16"
    c.train.batch_size = BATCH
    c.train.total_steps = EPOCHS * DATASET_SIZE // BATCH
    c.optim.lr = 4e-4
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 2000
    c.sharding.mesh = {"data": 1, "fsdp": -1, "model": 1}
    c.data.num_workers = 16
    # Required on the command line: c.data.train_files, c.data.tokenizer.
    return c.lock()
