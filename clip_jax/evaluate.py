"""Evaluation entry point and the demo's end-of-training report.

    python -m clip_jax.evaluate --workdir=DIR --task=zeroshot --dataset=cifar10
    python -m clip_jax.evaluate --workdir=DIR --task=zeroshot --dataset=folder:/data/val --templates=imagenet
    python -m clip_jax.evaluate --workdir=DIR --task=linear_probe --dataset=cifar10
    python -m clip_jax.evaluate --workdir=DIR --task=retrieval --dataset=array_record:'/data/coco-*'
    python -m clip_jax.evaluate --workdir=DIR --task=scenes   # the demo's full suite
    python -m clip_jax.evaluate --workdir=DIR --evaluators [--step=N|all] [--config=FILE]

``--dataset``: a TFDS name prepared in array_record format (``cifar10``,
``imagenet2012``; class names and templates from `clip_jax.zeroshot_metadata`),
``folder:ROOT`` (one folder per class) or ``array_record:GLOB`` (records with
``label``; ``--class_names=FILE`` names the classes). Results go to
``WORKDIR/eval/STEP_TASK_DATASET.json``. The pieces live in `clip_jax.eval`.

``--evaluators`` runs the recipe's evaluators (``config.eval.evaluators`` of the run's
``config.json``, or of ``--config=FILE``) through `clip_jax.eval.suite`, as the training
loop does (same numbers), on ``--step`` (default: the latest; ``all``: every checkpoint).
Each goes to ``WORKDIR/eval/STEP_NAME_HASH.json``, HASH a short hash of the evaluator's
kind and options: evaluations with other options do not overwrite each other.
"""

from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from clip_jax import cli, distributed, losses, recipe, sharding, storage, workdir, zeroshot_metadata
from clip_jax.data import captions, records, skips
from clip_jax.eval import evaluator, retrieval, scenes_suite, sources, stream, suite
from clip_jax.eval import linear_probe as probe
from clip_jax.eval.encode import Encoder
from clip_jax.eval.retrieval import recall_at_k, retrieval_metrics
from clip_jax.eval.table import print_table
from clip_jax.eval.zeroshot import (
    classification_metrics,
    classifier_weights,
    mean_per_class_recall,
    prompt_sets,
    ranks,
    topk_accuracy,
)
from clip_jax.interop import openai_resnet

__all__ = [
    "Encoder",
    "classifier_weights",
    "classification_metrics",
    "mean_per_class_recall",
    "print_table",
    "prompt_sets",
    "ranks",
    "recall_at_k",
    "retrieval_metrics",
    "topk_accuracy",
    "zero_shot",
]


def zero_shot(encoder, tokenizer, images: np.ndarray, labels: np.ndarray, class_prompts, prefix="") -> dict:
    """Prompt-ensemble classifier over ``class_prompts`` (C lists), scored on images [N, S, S, 3]."""
    weights = classifier_weights(encoder, tokenizer, class_prompts, show_progress=encoder.progress)
    return classification_metrics(encoder.images(images) @ weights.T, labels, prefix)


# ------------------------------------------------------------------ command line

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when run as a program."""
    flags.DEFINE_string(
        "workdir", None, "A training run's directory (config.json, checkpoints/).", required=True
    )
    flags.DEFINE_string(
        "step", None, "Checkpoint step to evaluate (default: the latest; --evaluators: 'all')."
    )
    flags.DEFINE_bool("evaluators", False, "Run the recipe's evaluators (config.eval.evaluators).")
    config_flags.DEFINE_config_file("config", None, "--evaluators: take config.eval from this recipe.")
    flags.DEFINE_enum("task", "zeroshot", ["zeroshot", "retrieval", "linear_probe", "scenes"], "")
    flags.DEFINE_string("dataset", None, "TFDS name, folder:ROOT or array_record:GLOB.")
    flags.DEFINE_string("split", "test", "TFDS split evaluated (linear probe: the test split).")
    flags.DEFINE_string("train_split", "train", "TFDS split a linear probe is fitted on.")
    flags.DEFINE_string("train_dataset", None, "Linear probe on folders/shards: training set.")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir.")
    flags.DEFINE_string("class_names", None, "File of class names, one per line.")
    flags.DEFINE_string("templates", None, "imagenet | imagenet_simple | cifar | FILE (one per line).")
    flags.DEFINE_string("label_key", None, "array_record: record['labels'][KEY] instead of 'label'.")
    flags.DEFINE_integer("limit", None, "Evaluate at most this many images.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 256, "Encoder batch size.", lower_bound=1)


NAMED_TEMPLATES = {
    "imagenet": zeroshot_metadata.IMAGENET_TEMPLATES,
    "imagenet_simple": zeroshot_metadata.IMAGENET_SIMPLE_TEMPLATES,
    "cifar": zeroshot_metadata.CIFAR_TEMPLATES,
}


def load_images(dataset: str, split: str, image_size: int, tokenizer) -> dict:
    if dataset.startswith("folder:"):
        return sources.image_folder(dataset.removeprefix("folder:"), image_size, FLAGS.limit)
    if dataset.startswith("array_record:"):
        data = sources.array_record(dataset.removeprefix("array_record:"), image_size, FLAGS.label_key)
        return {k: v[: FLAGS.limit] if k != "class_names" else v for k, v in data.items()}
    return sources.tfds(dataset, split, image_size, tokenizer, FLAGS.tfds_data_dir, FLAGS.limit)


def class_prompts(dataset: str, found_names) -> list[list[str]]:
    """Class names (--class_names, else CLIP's list for a known dataset, else the data's) x templates."""
    known = zeroshot_metadata.lookup(dataset) if ":" not in dataset.split(":")[0] else None
    names = sources.read_class_names(FLAGS.class_names) if FLAGS.class_names else None
    names = names or (known[0] if known else None) or found_names
    if not names:
        raise cli.UserError(f"{dataset}: no class names; pass --class_names=FILE")
    templates = FLAGS.templates
    if templates:
        templates = NAMED_TEMPLATES.get(templates) or sources.read_templates(templates)
    else:
        templates = known[1] if known else ("a photo of a {}.",)
    return prompt_sets(names, templates)


def caption_retrieval(encoder, tokenizer, pattern: str, image_size: int) -> dict:
    """ArrayRecord records with ``captions`` (list) or ``caption``: every non-blank caption a query
    (a record without one is left out)."""
    images, texts, owner = [], [], []
    for record in records.read_all(records.expand(pattern, "--dataset=array_record:GLOB"))[: FLAGS.limit]:
        try:
            own = captions.all_texts(record)
        except skips.BadRecord:
            continue
        images.append(sources._decode(record["image"], image_size))
        texts += own
        owner += [len(images) - 1] * len(own)
    image_emb, text_emb = encoder.images(np.stack(images)), encoder.texts(tokenizer(texts))
    return retrieval.retrieval_metrics(image_emb, text_emb, np.asarray(owner))


def run_task(task: str, dataset: str | None, workdir_path: str) -> dict:
    run = workdir.load(workdir_path, _step(FLAGS.step))
    model, params, tokenizer, step = run.model, run.params, run.tokenizer, run.step
    encoder = Encoder(model, params, FLAGS.batch_size, progress=True)
    size = model.config.vision.image_size
    if task == "scenes":
        data = recipe.resolve_data(run.config, workdir_path).scenes
        results = scenes_suite.evaluate_scenes(
            model, params, tokenizer, data, FLAGS.batch_size, linear_probe=True, progress=True
        )
    elif task == "retrieval":
        results = caption_retrieval(encoder, tokenizer, dataset.removeprefix("array_record:"), size)
    elif task == "zeroshot":
        data = load_images(dataset, FLAGS.split, size, tokenizer)
        results = zero_shot(
            encoder, tokenizer, data["image"], data["label"], class_prompts(dataset, data["class_names"])
        )
    else:
        train_set = FLAGS.train_dataset or dataset
        fit, test = (
            load_images(train_set, FLAGS.train_split, size, tokenizer),
            load_images(dataset, FLAGS.split, size, tokenizer),
        )
        features, labels = encoder.images(fit["image"]), fit["label"]
        train_idx, val_idx = probe.validation_split(len(labels))
        num_classes = int(max(labels.max(), test["label"].max())) + 1
        results = probe.linear_probe(
            (features[train_idx], labels[train_idx]),
            (features[val_idx], labels[val_idx]),
            (encoder.images(test["image"]), test["label"]),
            num_classes,
        )
    return {"step": step, "task": task, "dataset": dataset, **results}


def _step(value: str | None) -> int | None:
    """--step: None (the latest) or a step number."""
    if value is None:
        return None
    if not value.isdigit():
        raise cli.UserError(f"--step={value}: a checkpoint step (or 'all' with --evaluators)")
    return int(value)


def run_evaluators(workdir_path: str, step: str | None, eval_config=None) -> dict[int, dict[str, dict]]:
    """The recipe's evaluators on the run's checkpoints (``step``: None for the latest, a number,
    or "all"), as the training loop runs them; writes ``eval/STEP_NAME_HASH.json`` per evaluator.
    Returns {step: {evaluator: metrics}}."""
    config = workdir.read_config(workdir_path)
    if eval_config is not None:
        config.unlock()
        config.eval = eval_config
    has_scenes = bool(config.data.get("scenes"))
    sections = suite.sections(config.eval, has_scenes)
    if not sections:
        raise cli.UserError("config.eval.evaluators is empty: nothing to evaluate (see --config=FILE)")
    steps = workdir.steps(workdir_path) if step == "all" else [_step(step)]
    mesh = sharding.make_mesh(config.sharding.mesh)
    out = {}
    for wanted in steps:
        run = workdir.load(workdir_path, wanted, config)
        scenes_dataset = recipe.resolve_data(config, workdir_path).scenes if has_scenes else None
        size = run.model.config.vision.image_size
        evaluators = suite.build(config.eval, scenes_dataset=scenes_dataset, image_size=size)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            ctx = evaluator.EvalContext(
                model=run.model,
                variables=stream.replicate(openai_resnet.split_variables(run.params), mesh),
                tokenizer=run.tokenizer,
                mesh=mesh,
                batch_size=config.eval.batch_size,
                train_batch_size=config.train.batch_size,
                loss_fn=losses.make_loss(config.train.loss, mesh),
                step=run.step,
                progress=True,
            )
            results = {e.name: e(ctx) for e in evaluators}
        for name, metrics in results.items():
            path = os.path.join(
                workdir_path, "eval", f"{run.step}_{name}_{suite.options_hash(sections[name])}.json"
            )
            if jax.process_index() == 0:
                storage.write_json(path, {"step": run.step, "evaluator": name, **metrics})
                print(f"wrote {path}")
        out[run.step] = results
    return out


def main(argv):
    del argv
    distributed.initialize(local_coordinator=False)  # several processes: as the flags say
    if FLAGS.evaluators:
        if FLAGS.task != "zeroshot" or FLAGS.dataset:  # zeroshot: the flag's default
            raise cli.UserError("--evaluators runs the recipe's evaluators: give no --task or --dataset")
        run_evaluators(FLAGS.workdir, FLAGS.step, FLAGS.config.eval if FLAGS.config else None)
        return
    if FLAGS.config:
        raise cli.UserError("--config=FILE is for --evaluators")
    if FLAGS.workdir is None or (FLAGS.task != "scenes" and not FLAGS.dataset):
        raise cli.UserError("--workdir and --dataset are required (--dataset not for --task=scenes)")
    results = run_task(FLAGS.task, FLAGS.dataset, FLAGS.workdir)
    print_table(f"{FLAGS.task} {FLAGS.dataset or 'scenes'} (step {results['step']})", results)
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", FLAGS.dataset or "scenes").strip("-")
    path = os.path.join(FLAGS.workdir, "eval", f"{results['step']}_{FLAGS.task}_{name}.json")
    storage.write_json(path, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    distributed.define_flags()
    cli.run(main)
