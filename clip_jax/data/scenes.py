"""Procedurally generated captioned scenes: the embedded demo dataset.

Each image holds one or two shapes of two sizes at random positions, coloured
or in plain dark ink; captions describe them ("a small red circle above a
large blue bar", "a large cross"), with attributes sometimes left out and
two-object relations stated either way round. Some (colour, shape)
combinations are HELD OUT: they never appear in training, and the evaluation
sets are built from them, so zero-shot accuracy on them measures
generalisation to unseen compositions, not memory.

Everything is a pure function of the seed: the same data on every machine.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from clip_jax.data import records, tokenizer

# Eight hues around the colour wheel: each held-out colour has neighbours that
# are seen with the held-out shape, so an unseen pair lies between seen ones.
COLOURS = {
    "red": (215, 35, 35),
    "orange": (240, 125, 15),
    "yellow": (235, 200, 25),
    "green": (35, 160, 60),
    "cyan": (20, 180, 200),
    "blue": (35, 75, 215),
    "purple": (135, 45, 175),
    "pink": (235, 100, 170),
}
# Things drawn in plain dark ink, their colour never named: they make shape,
# not colour, the only way to tell many training pairs apart, so the model
# learns shape features that carry over to colours it never saw a shape in.
PLAIN = "plain"
PLAIN_INK = (70, 70, 70)
# Shapes that differ even at a few pixels: outline (disc, triangle), aspect ratio (bar), topology (cross).
SHAPES = ("circle", "bar", "triangle", "cross")
SIZES = {"small": 0.3, "large": 0.5}  # diameter as a share of the image side
# relation -> (its converse, the sign of (dx, dy) from the first object to the second)
RELATIONS = {
    "to the left of": ("to the right of", (1, 0)),
    "to the right of": ("to the left of", (-1, 0)),
    "above": ("below", (0, 1)),
    "below": ("above", (0, -1)),
}
# One (colour, shape) pair per shape is never seen in training.
HELD_OUT = frozenset({("red", "circle"), ("green", "bar"), ("blue", "triangle"), ("purple", "cross")})
HELD_OUT_COMBOS = tuple(sorted(HELD_OUT))
ALL_COMBOS = tuple((c, s) for c in COLOURS for s in SHAPES)
# Training things: the coloured pairs not held out, and plain things (~30%).
PLAIN_WEIGHT = 3
TRAIN_COMBOS = tuple(c for c in ALL_COMBOS if c not in HELD_OUT) + PLAIN_WEIGHT * tuple(
    (PLAIN, s) for s in SHAPES
)

# Zero-shot prompts, averaged per class as in CLIP: shapes are named without a
# colour, colours are ensembled over every shape.
SHAPE_TEMPLATES = ("a {}", "a small {}", "a large {}")
COLOUR_TEMPLATES = tuple(f"a {{}} {shape}" for shape in SHAPES)


def fix_articles(text: str) -> str:
    """'a orange square' -> 'an orange square'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def prompts(templates: tuple[str, ...], name: str) -> list[str]:
    """The zero-shot prompts of one class name."""
    return [fix_articles(t.format(name)) for t in templates]


SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges
VERSION = 4  # bump when the generator's output changes


@dataclasses.dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    centre: tuple[float, float]  # in [0, 1]^2


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, side: int) -> None:
    cx, cy = thing.centre[0] * side, thing.centre[1] * side
    r = SIZES[thing.size] * side / 2
    fill = PLAIN_INK if thing.colour == PLAIN else COLOURS[thing.colour]
    if thing.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif thing.shape == "bar":
        draw.rectangle((cx - r, cy - r * 0.35, cx + r, cy + r * 0.35), fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # cross
        t = r * 0.35
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)


def render(things: list[Thing], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [S, S, 3]: a light, slightly tinted background with the things drawn on it."""
    side = image_size * SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    img = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(img)
    for thing in things:
        _draw(draw, thing, side)
    img = img.resize((image_size, image_size), Image.BOX)
    noise = rng.normal(0, 4, size=(image_size, image_size, 3))
    return np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, sizes: list[str], direction: tuple[int, int] | None):
    """Centres for 1-2 things; two lie apart (touching at most) along ``direction``."""
    while True:
        centres = []
        for size in sizes:
            r = SIZES[size] / 2
            centres.append(tuple(rng.uniform(r + 0.02, 1 - r - 0.02, size=2)))
        if len(centres) == 1:
            return centres
        (x0, y0), (x1, y1) = centres
        dx, dy = x1 - x0, y1 - y0
        gap = (SIZES[sizes[0]] + SIZES[sizes[1]]) / 2
        along, across = (dx, dy) if direction[0] else (dy, dx)
        sign = direction[0] or direction[1]
        if along * sign > gap * 0.8 and abs(across) < abs(along) * 0.6:
            return centres


def _phrase(thing: Thing, rng: np.random.Generator, drop: bool) -> str:
    words = []
    if not (drop and rng.random() < 0.3):
        words.append(thing.size)
    if thing.colour != PLAIN and not (drop and rng.random() < 0.15):
        words.append(thing.colour)
    words.append(thing.shape)
    return fix_articles("a " + " ".join(words))


def make_scene(rng: np.random.Generator, image_size: int, slots, drop: bool):
    """One scene of ``len(slots)`` things, each drawn from its slot's (colour, shape) list.

    Returns (image uint8 [S, S, 3], caption, things).
    """
    num_things = len(slots)
    picks = [combos[rng.integers(len(combos))] for combos in slots]
    sizes = [str(rng.choice(list(SIZES))) for _ in picks]
    relation = str(rng.choice(list(RELATIONS))) if num_things == 2 else None
    centres = _place(rng, sizes, RELATIONS[relation][1] if relation else None)
    things = [Thing(c, s, z, xy) for (c, s), z, xy in zip(picks, sizes, centres, strict=True)]
    phrases = [_phrase(t, rng, drop) for t in things]
    if relation is None:
        caption = phrases[0]
    elif rng.random() < 0.5:
        caption = f"{phrases[0]} {relation} {phrases[1]}"
    else:
        caption = f"{phrases[1]} {RELATIONS[relation][0]} {phrases[0]}"
    return render(things, image_size, rng), caption, things


def _encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _split(seed: int, split: int, count: int, image_size: int) -> Iterator[dict]:
    """Records of one split: 0 = train, 1 = held-out single things, 2 = held-out scenes.

    Held-out scenes put a held-out combination beside any coloured thing.
    Held-out records carry ``labels`` (shape and colour indices) of their
    held-out thing.
    """
    for i in range(count):
        rng = np.random.default_rng([seed, split, i])
        if split == 0:
            slots = [TRAIN_COMBOS] * (1 if rng.random() < 0.4 else 2)
        else:
            slots = [HELD_OUT_COMBOS] if split == 1 else [HELD_OUT_COMBOS, ALL_COMBOS]
        image, caption, things = make_scene(rng, image_size, slots, drop=split == 0)
        record = {"key": f"{split}-{i:07d}", "image": _encode_png(image), "caption": caption}
        if split:
            shape, colour = things[0].shape, things[0].colour
            record["labels"] = {"shape": SHAPES.index(shape), "colour": list(COLOURS).index(colour)}
        yield record


@dataclasses.dataclass(frozen=True)
class ScenesDataset:
    """Where a generated scenes dataset lies."""

    train_files: list[str]
    heldout_things: str
    heldout_scenes: str
    tokenizer: str


def dataset_spec(*, num_shards: int = 4, seed: int = 0, **sizes: int) -> dict:
    """What `ensure_dataset` records in ``DONE.json`` for these arguments."""
    return {"version": VERSION, **sizes, "seed": seed, "num_shards": num_shards}


def recorded_spec(directory: str) -> dict | None:
    """The spec of the complete dataset in ``directory`` (its ``DONE.json``), or None."""
    try:
        with open(os.path.join(directory, "DONE.json")) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def ensure_dataset(
    directory: str,
    *,
    num_train: int,
    num_heldout_things: int,
    num_heldout_scenes: int,
    image_size: int,
    vocab_size: int,
    seed: int = 0,
    num_shards: int = 4,
) -> ScenesDataset:
    """Generates the dataset into ``directory`` unless an identical one is already there."""
    spec = dataset_spec(
        num_train=num_train,
        num_heldout_things=num_heldout_things,
        num_heldout_scenes=num_heldout_scenes,
        image_size=image_size,
        vocab_size=vocab_size,
        seed=seed,
        num_shards=num_shards,
    )
    train, things, scenes = (
        os.path.join(directory, n) for n in ("train", "heldout_things", "heldout_scenes")
    )
    dataset = ScenesDataset(
        train_files=records.shard_paths(train, num_shards),
        heldout_things=records.shard_paths(things, 1)[0],
        heldout_scenes=records.shard_paths(scenes, 1)[0],
        tokenizer=os.path.join(directory, "tokenizer.model"),
    )
    done = os.path.join(directory, "DONE.json")
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f) == spec:
                return dataset
    os.makedirs(directory, exist_ok=True)
    train_records = list(_split(seed, 0, num_train, image_size))
    records.write_shards(train_records, train, num_shards)
    captions = (r["caption"] for r in train_records)
    tokenizer.train_sentencepiece(captions, dataset.tokenizer, vocab_size)
    records.write_shards(_split(seed, 1, num_heldout_things, image_size), things, 1)
    records.write_shards(_split(seed, 2, num_heldout_scenes, image_size), scenes, 1)
    # Written last: its presence means the rest is complete. Several processes
    # may generate the same files at once; every write is atomic.
    records.write_atomically(done, json.dumps(spec).encode())
    return dataset
