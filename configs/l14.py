"""ViT-L/14 with the CLIP paper's recipe (Radford et al. 2021): global batch 32,768,
32 epochs of 400M pairs (390,625 steps), AdamW lr 4e-4, weight decay 0.2,
beta2 0.98, eps 1e-6, 2,000 warmup steps then cosine, bf16 compute, FSDP.

    python -m clip_jax.main --config=configs/l14.py --workdir=gs://BUCKET/runs/l14 \
        --config.data.train_files='gs://BUCKET/laion400m/train-*.array_record' \
        --config.data.tokenizer=gs://BUCKET/laion400m/tokenizer.model
"""

from clip_jax.config_defaults import clip_paper_recipe


def get_config(arg=None):
    del arg
    return clip_paper_recipe("ViT-L/14", lr=4e-4).lock()
