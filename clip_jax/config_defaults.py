"""The defaults every recipe in ``configs/`` starts from (sections model, data,
optim, sharding, train, eval). A recipe overrides what differs; the command
line overrides the recipe (``--config.train.batch_size=4096``).
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

# Parameters without weight decay (regexes over '/'-joined paths): biases, the
# LayerNorm gains, positional embeddings, the class token and the logit scale.
NO_WEIGHT_DECAY = (
    r"bias$",
    r"(^|/)ln_\w+/scale$",
    r"pos_embedding$",
    r"class_token$",
    r"^logit_scale$",
    r"^logit_bias$",
    r"(^|/)(bn\d|downsample_bn)/scale$",  # BatchNorm gains of the ResNet towers
)


# The shape fields a recipe may override per tower, with their types. head_width
# (instead of heads) gives heads = width // head_width; mlp_dim (instead of mlp_ratio)
# the MLP's hidden size.
_SHAPE = {"width": int, "layers": int, "heads": int, "head_width": int, "mlp_ratio": float, "mlp_dim": int}
_SHAPE.update(activation=str, norm_eps=float)  # activation: quick_gelu | gelu | gelu_tanh
VISION_FIELDS = dict(
    _SHAPE,
    image_size=int,
    patch_size=int,
    pooling=str,  # class_token | map (SigLIP's attention pooling) | mean
    class_token=bool,
    patch_bias=bool,
    ln_pre=bool,
    projection=bool,  # False: the pooled feature is the embedding (width == embed_dim)
    proj_bias=bool,
)
TEXT_FIELDS = dict(_SHAPE, causal=bool, pooling=str, proj_bias=bool)  # pooling: eot | last


def _tower_overrides(fields: dict[str, type]) -> ConfigDict:
    return ConfigDict({name: config_dict.placeholder(kind) for name, kind in fields.items()})


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(
        {
            "variant": "ViT-B/16",  # a key of clip_jax.models.clip.VARIANTS
            "dtype": "bfloat16",  # compute dtype; parameters and optimizer state stay float32
            "context_length": config_dict.placeholder(int),  # None: the variant's
            "patch_dropout": 0.0,  # FLIP: share of image patches dropped in training
            "remat": "none",  # "none" | "full" | "dots": recompute block activations in backward
            "scan": False,  # nn.scan over each tower's blocks (faster compiles; stacked params)
            # Per-field overrides of the variant's shape (None: the variant's); see
            # clip_jax/models/vit.py and text.py for each field, models/shapes.py for the checks.
            "embed_dim": config_dict.placeholder(int),
            "vision": _tower_overrides(VISION_FIELDS),
            "text": _tower_overrides(TEXT_FIELDS),
        }
    )
    c.data = ConfigDict(
        {
            "train_files": config_dict.placeholder(str),  # glob(s) of ArrayRecord shards
            # A weighted mixture instead of train_files: {name: {"files": glob(s), "weight": w,
            # "format": "array_record", "caption_field": None}} (clip_jax/data/mixture.py), or a
            # TFDS split: {"format": "tfds", "tfds_name": ..., "weight": w} + config.data's tfds fields.
            "sources": ConfigDict(),
            # The record field with the caption(s) (None: "captions", a list, or "caption").
            "caption_field": config_dict.placeholder(str),
            "tokenizer": config_dict.placeholder(str),  # sentencepiece .model file
            # Its id layout: "clip_jax" (pad 0, unk 1, bos 2, eos 3) or "siglip" (SigLIP's shipped
            # models: pad 0, eos 1); None: read from the model's special ids (clip_jax/data/tokenizer.py).
            "tokenizer_layout": config_dict.placeholder(str),
            # "array_record" | "webdataset" (img2dataset tar shards read directly) | "tfds"
            "format": "array_record",
            # format "tfds": a TFDS dataset prepared in array_record format, read with
            # tfds.data_source (no TensorFlow). Captions from caption_key, or else
            # caption_template filled with the name of the label_key class.
            "tfds_name": config_dict.placeholder(str),  # "name[/config][:version]"
            "tfds_split": "train",  # TFDS split syntax: "train", "train[:90%]", ...
            "tfds_data_dir": config_dict.placeholder(str),  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
            "image_key": "image",
            "caption_key": config_dict.placeholder(str),
            "label_key": "label",
            "caption_template": "a photo of a {}.",
            "shuffle_seed": 0,
            "shuffle_buffer": 1000,  # webdataset only: samples held for shuffling
            "max_member_bytes": 64 * 2**20,  # webdataset only: a larger tar member is a counted skip
            "num_workers": 0,  # Grain worker processes for decoding (0: threads only)
            # Training augmentation: random-resized crop (area share, aspect ratio); else centre crop.
            "random_crop": True,
            "crop_scale": (0.9, 1.0),  # open_clip's CLIP default; torchvision's is (0.08, 1.0)
            "crop_ratio": (3 / 4, 4 / 3),
            # JPEGs decoded at 1/2, 1/4 or 1/8 scale when the crop still gets at least the output
            # size (libjpeg DCT scaling; clip_jax/data/sized_decode.py): within 2.5 grey levels mean
            # (PSNR > 35 dB) of a full decode; ~2x the images per core at 512 px stored, ~4x at 1024.
            # False: full decodes, the exact pixels of before.
            "reduced_decode": True,
            # > 0: each training crop is sent unresized in a canvas_size x canvas_size canvas
            # (>= the model's image size) and resized in the train step (bicubic, on device;
            # clip_jax/data/canvas.py), saving the host's resize (60-66% of a record's time); a
            # crop that does not fit is resized on the host as before. Within 0.3 grey levels mean
            # of the host resize; for TPU/GPU steps whose host is short of cores (on a CPU the
            # step's resize costs more than Pillow's). 0: the host resizes every crop.
            "canvas_size": 0,
            # Bad records are skipped, replaced and counted; above this share the run stops.
            "max_skip_fraction": 0.1,
            "stall_timeout_s": 600.0,  # no batch for this long: stop with an error, not a hang
        }
    )
    c.optim = ConfigDict(
        {
            "lr": 5e-4,
            "end_lr_factor": 0.0,  # cosine decays to lr * end_lr_factor
            "warmup_steps": 2000,
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-6,
            "weight_decay": 0.2,
            "wd_exclude": NO_WEIGHT_DECAY,
            "grad_clip_norm": 1.0,
            # Fine-tuning (clip_jax/optim.py): regexes over parameter paths that get no
            # update (LiT: ("^visual/",)), and {regex: factor} learning-rate multipliers
            # (a parameter matched by several takes the product; 0 freezes).
            "freeze": (),
            "lr_multipliers": ConfigDict(),
        }
    )
    c.sharding = ConfigDict({"mesh": ConfigDict({"data": 1, "fsdp": -1, "model": 1})})
    c.train = ConfigDict(
        {
            "batch_size": 32768,  # global, over all processes
            "total_steps": 10_000,
            "seed": 0,
            "log_every": 100,
            # softmax (local rows x gathered columns) | softmax_ring | softmax_dense |
            # sigmoid_ring | sigmoid_dense (SigLIP; adds a learnable logit bias)
            "loss": "softmax",
            # The sigmoid losses' initial t and b of the logits t x.y + b (None: SigLIP's 10, -10).
            "sigmoid_init_scale": config_dict.placeholder(float),
            "sigmoid_init_bias": config_dict.placeholder(float),
            # Cap on exp(logit_scale) after every update (None: 100 for the softmax losses, as
            # CLIP; none for the sigmoid ones, as big_vision; inf: no cap).
            "max_logit_scale": config_dict.placeholder(float),
            # Micro-batches per step; the gradient stays the whole batch's (all negatives).
            "accum_steps": 1,
            # Weights to start from when the workdir has no checkpoint (a checkpoint, i.e.
            # resuming, wins): a clip_jax workdir, a params export, an HF directory or an
            # OpenAI/open_clip state dict (anything clip_jax.inference.load reads).
            "init_from": config_dict.placeholder(str),
            # What init_from's bare OpenAI/open_clip state dict does not record, in the format of
            # export's --weights_overrides: "vision_heads=16,text_heads=16,activation=gelu".
            "init_from_overrides": config_dict.placeholder(str),
            # A step with a non-finite loss or gradient is not applied (and is counted); this
            # many in a row stop the run, naming the last good checkpoint.
            "max_nonfinite_steps": 10,
        }
    )
    c.eval = ConfigDict(
        {
            "batch_size": 256,  # the global eval batch
            # Named evaluator sections, each {"kind", "every" (steps; 0: at the end only), options}:
            # see clip_jax/eval/suite.py. The demo's: {"scenes": {"kind": "scenes", "every": ...}}.
            "evaluators": ConfigDict({}),
        }
    )
    # TensorBoard event files under WORKDIR/tensorboard (no TensorFlow); W&B when a project is set.
    c.logging = ConfigDict(
        {
            "tensorboard": True,
            "wandb_project": config_dict.placeholder(str),
            # Peak FLOP/s of one device for the logged MFU (None: clip_jax/chips.py's table for the
            # device kind and model dtype; a device it does not know logs no MFU).
            "peak_flops": config_dict.placeholder(float),
            # (first, last): a jax.profiler trace of those steps in WORKDIR/profile (process 0).
            "profile_steps": (),
        }
    )
    # Train state + data position under WORKDIR/checkpoints; a run resumes from the latest
    # intact step. keep: the last K; keep_period M: every M-th step is kept too (None: no).
    # allow_data_change: resume even when the data config differs from the checkpoint's.
    # accept_unverified: when no step verifies (no manifest, damaged files), restore the
    # latest committed one as it is instead of stopping.
    c.checkpoint = ConfigDict(
        {
            "every": 1000,
            "keep": 3,
            "keep_period": config_dict.placeholder(int),
            "allow_data_change": False,
            "accept_unverified": False,
        }
    )
    return c


# The CLIP paper's schedule: 32 epochs of 400M pairs at a global batch of 32,768.
PAPER_EPOCHS, PAPER_DATASET_SIZE, PAPER_BATCH = 32, 400_000_000, 32768


def clip_paper_recipe(variant: str, lr: float) -> ConfigDict:
    """Radford et al. 2021 for a ViT: batch 32,768 for 390,625 steps, AdamW (wd 0.2,
    betas (0.9, 0.98), eps 1e-6), 2,000 warmup steps then cosine, bf16 compute, FSDP
    over every device. ``config.data.train_files`` and ``config.data.tokenizer`` stay
    required overrides.
    """
    c = base_config()
    c.model.variant = variant
    c.model.dtype = "bfloat16"
    c.train.batch_size = PAPER_BATCH
    c.train.total_steps = PAPER_EPOCHS * PAPER_DATASET_SIZE // PAPER_BATCH
    c.optim.update(lr=lr, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, warmup_steps=2000)
    c.sharding.mesh = {"data": 1, "fsdp": -1, "model": 1}
    c.data.num_workers = 16
    return c
