"""Evaluation entry point and the demo's end-of-training report.

    python -m clip_jax.evaluate --workdir=DIR --task=zeroshot --dataset=cifar10
    python -m clip_jax.evaluate --workdir=DIR --task=zeroshot --dataset=folder:/data/val --templates=imagenet
    python -m clip_jax.evaluate --workdir=DIR --task=linear_probe --dataset=cifar10
    python -m clip_jax.evaluate --workdir=DIR --task=retrieval --dataset=array_record:'/data/coco-*'
    python -m clip_jax.evaluate --workdir=DIR --task=scenes   # the demo's full suite

``--dataset``: a TFDS name prepared in array_record format (``cifar10``,
``imagenet2012``; class names and templates from `clip_jax.zeroshot_metadata`),
``folder:ROOT`` (one folder per class) or ``array_record:GLOB`` (records with
``label``; ``--class_names=FILE`` names the classes). Results go to
``WORKDIR/eval/STEP_TASK_DATASET.json``. The pieces live in `clip_jax.eval`.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from clip_jax import cli, diagnostics, storage, zeroshot_metadata
from clip_jax.data import captions, pipeline, records, scenes, skips
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.eval import linear_probe as probe
from clip_jax.eval import retrieval, sources
from clip_jax.eval.encode import Encoder
from clip_jax.eval.retrieval import recall_at_k, retrieval_metrics
from clip_jax.eval.zeroshot import (
    classification_metrics,
    classifier_weights,
    mean_per_class_recall,
    prompt_sets,
    ranks,
    topk_accuracy,
)
from clip_jax.models import clip

__all__ = [
    "Encoder",
    "classifier_weights",
    "classification_metrics",
    "evaluate_scenes",
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


def scenes_linear_probe(encoder, image_size: int, seed: int = 0) -> dict:
    """Linear probes for shape (4-way) and colour (8-way) on frozen features of single things."""
    data = diagnostics.single_things(1000, image_size, seed)
    features = encoder.images(data["image"])
    train_idx, val_idx = probe.validation_split(600, 0.2, seed)
    test = slice(600, None)
    out = {}
    for name, labels in data["labels"].items():
        train, held = (features[:600], labels[:600]), (features[test], labels[test])
        result = probe.linear_probe(
            (train[0][train_idx], train[1][train_idx]),
            (train[0][val_idx], train[1][val_idx]),
            held,
            num_classes=int(labels.max()) + 1,
        )
        out[f"linear_probe_{name}_acc"] = result["test_acc"]
        out[f"linear_probe_{name}_acc_chance"] = result["test_acc_chance"]
        out[f"linear_probe_{name}_l2"] = result["l2"]
    return out


def evaluate_scenes(
    model: clip.CLIP,
    params,
    tokenizer: Tokenizer,
    dataset: scenes.ScenesDataset,
    batch_size: int,
    mesh: Mesh | None = None,
    diagnostic_suite: bool = True,
    linear_probe: bool = False,
    progress: bool = False,
    probes: int = 200,
) -> dict:
    """The demo's evaluation: zero-shot shape/colour accuracy on held-out combinations,
    retrieval of held-out scenes, the diagnostic suite and prompt sensitivity
    (`clip_jax.diagnostics`, ``probes`` images per task), optionally linear probes.

    Returns the metrics with their chance levels (``*_chance``), confusion matrices and
    the per-template report (nested), and prints a table.
    """
    encoder = Encoder(model, params, batch_size, mesh, progress)
    size = model.config.vision.image_size
    things = pipeline.load_eval_set([dataset.heldout_things], tokenizer, size)
    image_emb = encoder.images(things["image"])
    results: dict = {}
    for attribute, names, templates in (
        ("shape", scenes.SHAPES, scenes.SHAPE_TEMPLATES),
        ("colour", list(scenes.COLOURS), scenes.COLOUR_TEMPLATES),
    ):
        weights = classifier_weights(encoder, tokenizer, [scenes.prompts(templates, n) for n in names])
        labels = things["labels"][attribute]
        results.update(classification_metrics(image_emb @ weights.T, labels, f"zero_shot_{attribute}_"))

    gallery = pipeline.load_eval_set([dataset.heldout_scenes], tokenizer, size)
    scene_emb, caption_emb = encoder.images(gallery["image"]), encoder.texts(gallery["tokens"])
    results.update(retrieval_metrics(scene_emb, caption_emb, np.arange(len(scene_emb))))
    if diagnostic_suite:
        results.update(diagnostics.run_suite(encoder, tokenizer, size, probes))
        results["prompt_sensitivity"] = diagnostics.prompt_sensitivity(
            encoder, tokenizer, image_emb, things["labels"]
        )
    if linear_probe:
        results.update(scenes_linear_probe(encoder, size))
    if jax.process_index() == 0:
        print_table("held-out scenes (never-seen colour+shape pairs) and diagnostics", results)
    return results


def print_table(title: str, results: dict) -> None:
    """The scalar metrics with their chance levels; nested results are summarised."""
    rows = [
        (name, value, results.get(f"{name}_chance", float("nan")))
        for name, value in results.items()
        if not name.endswith(("_chance", "_l2")) and isinstance(value, float)
    ]
    width = max([len("metric"), *(len(name) for name, _, _ in rows)]) + 2  # the longest name sets it
    print(f"\n{title}\n{'metric':<{width}}{'value':>8}{'chance':>9}")
    for name, value, chance in rows:
        print(f"{name:<{width}}{value:>8.1%}{chance:>9.1%}")
    for attribute, report in results.get("prompt_sensitivity", {}).items():
        print(
            f"prompts ({attribute}): ensemble {report['ensemble']:.1%}, best single "
            f"{report['best_single']:.1%}, worst {report['worst_single']:.1%}, spread {report['spread']:.1%}"
        )
    print(flush=True)


# ------------------------------------------------------------------ command line

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when run as a program."""
    flags.DEFINE_string(
        "workdir", None, "A training run's directory (config.json, checkpoints/).", required=True
    )
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
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


def load_run(workdir: str, step: int | None = None):
    """(model, params, Tokenizer, step, run config) of a training run's checkpoint."""
    from clip_jax import export, train  # train imports this module

    config = export.run_config(workdir)
    path = export.tokenizer_path(config, workdir)
    tokenizer = Tokenizer(path, train.build_model(config).config.text.context_length)
    model = train.build_model(config, tokenizer.vocab_size)
    step, params = export.restore_params(workdir, model, step)
    return model, params, tokenizer, step, config


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


def run_task(task: str, dataset: str | None, workdir: str) -> dict:
    model, params, tokenizer, step, config = load_run(workdir, FLAGS.step)
    encoder = Encoder(model, params, FLAGS.batch_size, progress=True)
    size = model.config.vision.image_size
    if task == "scenes":
        from clip_jax import train

        data = train.resolve_data(config, workdir).scenes
        results = evaluate_scenes(
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


def main(argv):
    del argv
    if FLAGS.workdir is None or (FLAGS.task != "scenes" and not FLAGS.dataset):
        raise cli.UserError("--workdir and --dataset are required (--dataset not for --task=scenes)")
    results = run_task(FLAGS.task, FLAGS.dataset, FLAGS.workdir)
    if FLAGS.task != "scenes":  # evaluate_scenes prints its own table
        print_table(f"{FLAGS.task} {FLAGS.dataset or ''} (step {results['step']})", results)
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", FLAGS.dataset or "scenes").strip("-")
    path = os.path.join(FLAGS.workdir, "eval", f"{results['step']}_{FLAGS.task}_{name}.json")
    storage.write_json(path, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
