"""A recipe's objects: what a config turns into before a run or an evaluation starts.

The one place that builds the model from ``config.model`` (with the tokenizer's
vocabulary), opens the tokenizer, resolves ``config.data`` into files (generating the
demo's data when asked) and builds the evaluators of ``config.eval``. The training
loop (`clip_jax.train`), the commands and `clip_jax.workdir` call it; it imports none
of them.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import ml_collections

from clip_jax import checkpoint, data_fingerprint, losses, storage, validation
from clip_jax.data import emoji_data, mixture, scenes
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.eval import evaluator, suite
from clip_jax.models import clip, shapes


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the data of a run lies, resolved from the config (never written back into it)."""

    train_files: list[str]
    tokenizer: str
    scenes: scenes.ScenesDataset | None = None
    sources: tuple[mixture.Source, ...] = ()  # a weighted mixture (then train_files: all their files)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A config's model (with its tokenizer's vocabulary), tokenizer and data."""

    model: clip.CLIP
    tokenizer: Tokenizer
    data: DataSpec


def build_model(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> clip.CLIP:
    """The model of ``config.model``; ``vocab_size`` (the tokenizer's) replaces the variant's.

    A sigmoid loss gives the model SigLIP's learnable bias and temperature init.
    """
    variant = model_shape(config, vocab_size)
    if config.train.loss in losses.SIGMOID_LOSSES:
        variant = dataclasses.replace(
            variant,
            logit_scale_init=losses.sigmoid_scale_init(config.train),
            logit_bias_init=losses.sigmoid_bias_init(config.train),
        )
    return clip.CLIP(
        variant,
        dtype=jnp.dtype(config.model.dtype),
        patch_dropout=config.model.patch_dropout,
        remat=config.model.remat,
        scan=config.model.scan,
        max_logit_scale=config.train.get("max_logit_scale"),
    )


def model_shape(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> clip.CLIPConfig:
    """``config.model.variant`` with the overrides ``model.vision``, ``model.text``, ``model.embed_dim``."""
    m = config.model
    return shapes.from_sections(
        m.variant, m.get("vision"), m.get("text"), m.get("embed_dim"),
        vocab_size=vocab_size, context_length=m.context_length,
    )  # fmt: skip


def model_and_tokenizer(
    config: ml_collections.ConfigDict, tokenizer_file: str
) -> tuple[clip.CLIP, Tokenizer]:
    """The tokenizer at ``tokenizer_file`` (the config's context length) and the model with its
    vocabulary."""
    context_length = model_shape(config).text.context_length
    tokenizer = Tokenizer(tokenizer_file, context_length, config.data.get("tokenizer_layout"))
    return build_model(config, tokenizer.vocab_size), tokenizer


def build(config: ml_collections.ConfigDict, workdir: str) -> Recipe:
    """The data (`resolve_data`), tokenizer and model of a run in ``workdir``."""
    data = resolve_data(config, workdir)
    model, tokenizer = model_and_tokenizer(config, data.tokenizer)
    return Recipe(model, tokenizer, data)


def evaluators(config: ml_collections.ConfigDict, recipe: Recipe) -> list[evaluator.Evaluator]:
    """The evaluators of ``config.eval.evaluators`` (`clip_jax.eval.suite.build`)."""
    image_size = recipe.model.config.vision.image_size
    return suite.build(config.eval, scenes_dataset=recipe.data.scenes, image_size=image_size)


def resolve_data(config: ml_collections.ConfigDict, workdir: str) -> DataSpec:
    """Generates the synthetic scenes when the config asks for them; else checks the paths.

    Generated scenes are not replaced under a run that has checkpoints: their data would
    change under it (DataChangedError, before anything is written).
    """
    data = config.data
    if data.get("scenes"):
        spec = data.scenes
        directory = spec.dir or storage.local_dir(workdir, "scenes")
        sizes = {
            "num_train": spec.num_train,
            "num_heldout_things": spec.num_heldout_things,
            "num_heldout_scenes": spec.num_heldout_scenes,
            "image_size": model_shape(config).vision.image_size,
            "vocab_size": spec.vocab_size,
        }
        recorded = scenes.recorded_spec(directory)
        wanted = scenes.dataset_spec(seed=spec.seed, **sizes)
        if recorded not in (None, wanted) and checkpoint.has_steps(os.path.join(workdir, "checkpoints")):
            changed = ", ".join(
                f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in wanted.items() if recorded.get(k) != v
            )
            raise data_fingerprint.DataChangedError(
                f"{directory} holds the scenes this run was trained on ({changed}); regenerating them "
                "would change its data. Use a new --workdir, or config.data.scenes.dir for the new scenes."
            )
        dataset = scenes.ensure_dataset(directory, seed=spec.seed, **sizes)
        return DataSpec(dataset.train_files, dataset.tokenizer, dataset)
    if data.get("emoji"):  # the emoji demo: made in WORKDIR/data, under the same rule as the scenes
        has_steps = checkpoint.has_steps(os.path.join(workdir, "checkpoints"))
        dataset = emoji_data.resolve(config, workdir, model_shape(config).vision.image_size, has_steps)
        return DataSpec(dataset.train_files, dataset.tokenizer)
    sources = validation.data_sources(config)
    if sources:
        return DataSpec([f for s in sources for f in s.files], data.tokenizer, sources=tuple(sources))
    return DataSpec(validation.data_files(config), data.tokenizer)
