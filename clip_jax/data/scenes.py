"""Procedurally generated captioned scenes: the embedded demo dataset.

Each image holds one or two coloured shapes of two sizes at random positions;
captions describe them ("a small red circle above a large blue square"), with
attributes sometimes left out and two-object relations stated either way
round. Some (colour, shape) combinations are HELD OUT: they never appear in
training, and the evaluation sets are built from them, so zero-shot accuracy
on them measures generalisation to unseen compositions, not memory.

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

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 45, 175),
    "orange": (240, 125, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.24, "large": 0.42}  # diameter as a share of the image side
# relation -> (its converse, the sign of (dx, dy) from the first object to the second)
RELATIONS = {
    "to the left of": ("to the right of", (1, 0)),
    "to the right of": ("to the left of", (-1, 0)),
    "above": ("below", (0, 1)),
    "below": ("above", (0, -1)),
}
# One combination per colour, spread over the shapes: never seen in training.
HELD_OUT = frozenset((colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS))
TRAIN_COMBOS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)
HELD_OUT_COMBOS = tuple(sorted(HELD_OUT))

# Zero-shot prompts, the CLIP recipe of averaging prompt embeddings: the shape
# classifier is ensembled over every colour (so no class prompt leans towards
# the colours its shape was trained with) and the colour classifier over
# every shape.
SHAPE_TEMPLATES = ("a {}",) + tuple(f"a {colour} {{}}" for colour in COLOURS)
COLOUR_TEMPLATES = tuple(f"a {{}} {shape}" for shape in SHAPES)


def fix_articles(text: str) -> str:
    """'a orange square' -> 'an orange square'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def prompts(templates: tuple[str, ...], name: str) -> list[str]:
    """The zero-shot prompts of one class name."""
    return [fix_articles(t.format(name)) for t in templates]


SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges
VERSION = 1  # bump when the generator's output changes


@dataclasses.dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    centre: tuple[float, float]  # in [0, 1]^2


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, side: int) -> None:
    cx, cy = thing.centre[0] * side, thing.centre[1] * side
    r = SIZES[thing.size] * side / 2
    fill = COLOURS[thing.colour]
    if thing.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif thing.shape == "square":
        q = r * 0.85
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif thing.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
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
    """Centres for 1-2 things that do not overlap and, for two, agree with ``direction``."""
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
    if not (drop and rng.random() < 0.15):
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


ALL_COMBOS = tuple((c, s) for c in COLOURS for s in SHAPES)


def _split(seed: int, split: int, count: int, image_size: int) -> Iterator[dict]:
    """Records of one split: 0 = train, 1 = held-out single things, 2 = held-out scenes.

    Held-out scenes put a held-out combination beside any other thing. The
    ``labels`` describe the first (for held-out splits: the held-out) thing.
    """
    for i in range(count):
        rng = np.random.default_rng([seed, split, i])
        if split == 0:
            slots = [TRAIN_COMBOS] * (1 if rng.random() < 0.4 else 2)
        else:
            slots = [HELD_OUT_COMBOS] if split == 1 else [HELD_OUT_COMBOS, ALL_COMBOS]
        image, caption, things = make_scene(rng, image_size, slots, drop=split == 0)
        yield {
            "key": f"{split}-{i:07d}",
            "image": _encode_png(image),
            "caption": caption,
            "labels": {
                "shape": SHAPES.index(things[0].shape),
                "colour": list(COLOURS).index(things[0].colour),
            },
        }


@dataclasses.dataclass(frozen=True)
class ScenesDataset:
    """Where a generated scenes dataset lies."""

    train_files: list[str]
    heldout_things: str
    heldout_scenes: str
    tokenizer: str


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
    spec = {
        "version": VERSION,
        "num_train": num_train,
        "num_heldout_things": num_heldout_things,
        "num_heldout_scenes": num_heldout_scenes,
        "image_size": image_size,
        "vocab_size": vocab_size,
        "seed": seed,
        "num_shards": num_shards,
    }
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
    with open(done, "w") as f:  # written last: its presence means the rest is complete
        json.dump(spec, f)
    return dataset
