"""Diagnostic suite on the synthetic scenes: what CLIP-style models are known to get wrong.

Each probe is an image with a TRUE caption and a FALSE one that differs in one
respect; the model passes when it scores the true caption higher (a tie counts
half). Chance is 0.5 for every pairwise task.

- counting: one object vs two (a caption naming one object more, or one fewer);
- spatial: "A left of / right of / above / below B" vs the relation swapped;
- binding: "red circle ... blue bar" vs the colours swapped between the objects;
- size: "a small ..." vs "a large ...";
- colour, shape: a different colour or shape (controls: single attributes, no composition).

Images use the (colour, shape) pairs seen in training, so the tasks test
composition, not recognising unseen pairs. Plus `prompt_sensitivity`: zero-shot
shape/colour accuracy per prompt template, its spread, ensemble vs best single.
"""

from __future__ import annotations

import numpy as np

from clip_jax.data import scenes
from clip_jax.eval import zeroshot

TASKS = ("counting", "spatial", "binding", "size", "colour", "shape")
SEEN_COMBOS = tuple(c for c in scenes.ALL_COMBOS if c not in scenes.HELD_OUT)
RELATION_SLUGS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
# Prompt templates for the sensitivity report: the demo's own and reworded ones.
SHAPE_TEMPLATES = (*scenes.SHAPE_TEMPLATES, "one {}", "a {} shape", "a picture of a {}", "the {}")
COLOUR_TEMPLATES = (*scenes.COLOUR_TEMPLATES, "a {} thing", "something {}", "a {} shape", "the {} one")
_SEED_OFFSET = 100  # generator streams apart from the dataset's splits (0, 1, 2)


def phrase(thing: scenes.Thing, size: str | None = None, colour: str | None = None, shape=None) -> str:
    """'a small red circle', with any attribute replaced."""
    words = (size or thing.size, colour or thing.colour, shape or thing.shape)
    return scenes.fix_articles("a " + " ".join(words))


def relation(first: scenes.Thing, second: scenes.Thing) -> str:
    """Where ``first`` lies relative to ``second`` (image y grows downwards)."""
    dx, dy = second.centre[0] - first.centre[0], second.centre[1] - first.centre[1]
    if abs(dx) > abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _other(rng: np.random.Generator, options, current):
    return str(rng.choice([o for o in options if o != current]))


def _probe(task: str, rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, str, str, str]:
    """One (image, true caption, false caption, group) of ``task``."""
    pair = task in ("spatial", "binding") or (task == "counting" and rng.random() < 0.5)
    if task == "binding":  # two different colours and two different shapes
        c0, c1 = rng.choice(list(scenes.COLOURS), 2, replace=False)
        s0, s1 = rng.choice(scenes.SHAPES, 2, replace=False)
        slots = [[(str(c0), str(s0))], [(str(c1), str(s1))]]
    else:
        slots = [SEEN_COMBOS] * (2 if pair else 1)
    image, _, things = scenes.make_scene(rng, image_size, slots, drop=False)
    first = things[0]
    if pair:
        second = things[1]
        rel = relation(first, second)
        true = f"{phrase(first)} {rel} {phrase(second)}"
    if task == "counting":
        if pair:
            return image, true, phrase(first), "two objects"
        colour, shape = SEEN_COMBOS[rng.integers(len(SEEN_COMBOS))]
        extra = scenes.Thing(colour, shape, str(rng.choice(list(scenes.SIZES))), (0.5, 0.5))
        false = f"{phrase(first)} {rng.choice(list(scenes.RELATIONS))} {phrase(extra)}"
        return image, phrase(first), false, "one object"
    if task == "spatial":
        false = f"{phrase(first)} {scenes.RELATIONS[rel][0]} {phrase(second)}"
        return image, true, false, RELATION_SLUGS[rel]
    if task == "binding":
        swapped = f"{phrase(first, colour=second.colour)} {rel} {phrase(second, colour=first.colour)}"
        return image, true, swapped, "colours swapped"
    if task == "size":
        return image, phrase(first), phrase(first, size=_other(rng, scenes.SIZES, first.size)), first.size
    if task == "colour":
        return image, phrase(first), phrase(first, colour=_other(rng, scenes.COLOURS, first.colour)), "colour"
    return image, phrase(first), phrase(first, shape=_other(rng, scenes.SHAPES, first.shape)), "shape"


def make_probes(task: str, count: int, image_size: int, seed: int = 0) -> dict:
    """{"image": uint8 [N, S, S, 3], "true": [N] str, "false": [N] str, "group": [N] str}."""
    items = [
        _probe(task, np.random.default_rng([seed, _SEED_OFFSET + TASKS.index(task), i]), image_size)
        for i in range(count)
    ]
    images, true, false, group = zip(*items, strict=True)
    return {"image": np.stack(images), "true": list(true), "false": list(false), "group": list(group)}


def pairwise_accuracy(image_emb: np.ndarray, true_emb: np.ndarray, false_emb: np.ndarray) -> np.ndarray:
    """[N] 1 where the true caption scores higher, 0.5 on a tie, 0 otherwise (all [N, E])."""
    true_score = np.sum(image_emb * true_emb, axis=1)
    false_score = np.sum(image_emb * false_emb, axis=1)
    return (true_score > false_score) + 0.5 * (true_score == false_score)


def run_suite(encoder, tokenizer, image_size: int, count: int = 200, seed: int = 0) -> dict[str, float]:
    """Every task of `TASKS` on ``count`` probes: {"diag_TASK_acc", "diag_TASK_acc_chance",
    "diag_TASK_GROUP_acc" (per relation, size, ...)}."""
    out: dict[str, float] = {}
    for task in TASKS:
        probes = make_probes(task, count, image_size, seed)
        hits = pairwise_accuracy(
            encoder.images(probes["image"]),
            encoder.texts(tokenizer(probes["true"])),
            encoder.texts(tokenizer(probes["false"])),
        )
        out[f"diag_{task}_acc"] = float(hits.mean())
        out[f"diag_{task}_acc_chance"] = 0.5
        groups = np.asarray(probes["group"])
        if len(set(groups)) > 1:
            for group in sorted(set(groups)):
                name = f"diag_{task}_{group.replace(' ', '_')}_acc"
                out[name], out[f"{name}_chance"] = float(hits[groups == group].mean()), 0.5
    return out


def single_things(count: int, image_size: int, seed: int, combos=SEEN_COMBOS) -> dict:
    """Images of one thing each: {"image", "labels": {"shape": [N], "colour": [N]}} (linear probes)."""
    images, shapes, colours = [], [], []
    for i in range(count):
        rng = np.random.default_rng([seed, _SEED_OFFSET + len(TASKS), i])
        image, _, (thing,) = scenes.make_scene(rng, image_size, [combos], drop=False)
        images.append(image)
        shapes.append(scenes.SHAPES.index(thing.shape))
        colours.append(list(scenes.COLOURS).index(thing.colour))
    return {"image": np.stack(images), "labels": {"shape": np.array(shapes), "colour": np.array(colours)}}


def prompt_sensitivity(encoder, tokenizer, image_emb: np.ndarray, labels: dict[str, np.ndarray]) -> dict:
    """Zero-shot shape and colour accuracy per template (`SHAPE_TEMPLATES`, `COLOUR_TEMPLATES`)."""
    return {
        "shape": zeroshot.prompt_sensitivity(
            encoder, tokenizer, image_emb, labels["shape"], scenes.SHAPES, SHAPE_TEMPLATES
        ),
        "colour": zeroshot.prompt_sensitivity(
            encoder, tokenizer, image_emb, labels["colour"], list(scenes.COLOURS), COLOUR_TEMPLATES
        ),
    }
