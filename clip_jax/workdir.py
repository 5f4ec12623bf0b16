"""Reading a training run's workdir (finished or still running): its config, tokenizer,
checkpoint steps and weights.

export, evaluate, inference, report and the emoji demo read runs through this module;
`clip_jax.train` writes what it reads (``config.json``, `TOKENIZER_FILE`, ``checkpoints/``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from clip_jax import recipe, storage
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.models import clip

# A run's sentencepiece model, copied into its workdir at the start.
TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One step of a run: its config, model (the tokenizer's vocabulary), tokenizer and weights."""

    config: ml_collections.ConfigDict
    model: clip.CLIP
    tokenizer: Tokenizer
    tokenizer_path: str
    step: int
    params: Any  # the params, plus "batch_stats" of a ResNet tower (as `restore_params` returns)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote to ``WORKDIR/config.json``."""
    return ml_collections.ConfigDict(storage.read_json(os.path.join(workdir, CONFIG_FILE)))


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The run's sentencepiece model: the copy in the workdir, else (runs from before runs
    carried one) located as `recipe.resolve_data` does, without generating data."""
    carried = os.path.join(workdir, TOKENIZER_FILE)
    if storage.exists(carried):
        return carried
    scenes = config.data.get("scenes")
    if scenes:
        return os.path.join(scenes.get("dir") or storage.local_dir(workdir, "scenes"), TOKENIZER_FILE)
    return config.data.tokenizer


def steps(workdir: str) -> list[int]:
    """The run's checkpointed steps, in order."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def restore_params(workdir: str, model: clip.CLIP, step: int | None) -> tuple[int, Any]:
    """(step, weights) from ``WORKDIR/checkpoints`` on this process's first device; only the weights are read.

    The weights are the params, plus ``batch_stats`` for a ResNet tower (the train
    state's ``model_state``), laid out as `openai_resnet.merge_variables` does.
    """
    rng = jax.random.key(0)
    variables = dict(jax.eval_shape(lambda: model.init(rng, *clip.dummy_inputs(model.config))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # each process reads all
    place = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nn.meta.unbox(tree)
    )
    target = {"params": place(variables.pop("params"))}
    if variables:
        target["model_state"] = place(variables)
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"{workdir}/checkpoints: no step {step} (have {manager.all_steps()})")
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        item = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        restored = jax.tree.map(np.asarray, manager.restore(step, args=ocp.args.Composite(state=item)).state)
    finally:
        manager.close()
    return step, {**restored["params"], **restored.get("model_state", {})}


def load(
    workdir: str, step: int | None = None, config: ml_collections.ConfigDict | None = None
) -> Checkpoint:
    """A run's checkpoint at ``step`` (default: the latest). ``config``: the run's own unless given."""
    config = read_config(workdir) if config is None else config
    path = tokenizer_path(config, workdir)
    model, tokenizer = recipe.model_and_tokenizer(config, path)
    step, params = restore_params(workdir, model, step)
    return Checkpoint(config, model, tokenizer, path, step, params)
