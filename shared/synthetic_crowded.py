"""The ``crowded`` task family of ``stitchvlm.shared.synthetic``: many objects, several-token answers.

The basic family asks about one of 3-6 objects, named by one attribute, and a
model can answer from the question's last word: an early layer already knows
which tokens matter, so pruning from layer 2 costs nothing and random tokens
do as well as any guidance (issue 12). Here an early layer cannot know:

- 10-20 objects of two sizes (``small`` 22-28 px, ``large`` 44-50 px), one per
  cell of the 8 x 4 grid of 56 px cells of a 448 x 224 canvas (2 x 1 tiles of
  224 px plus the thumbnail; at 64 tokens per tile, 192 visual tokens). A cell
  is a 2 x 2 block of grid tokens: a large object is centred on the block, a
  small one on one of its four tokens (``SMALL_ON_TOKEN``), so that one token
  sees all of it;
- the object a question asks about is one of 10-20, so which tokens matter
  depends on the question's words, not on the image alone;
- answers of several tokens: two-digit numbers, two words;
- a textured grey background (``BACKGROUND_TEXTURE``), not a flat one.

Two sets of rules (``Rules``) say how a question names its objects:

- ``ONE_ATTRIBUTE`` (the family's, ``RULES``): by one attribute that no other
  object in the scene has ("the star", "the blue object");
- ``CONJUNCTIVE``: by two or three attributes, every word needed: for each
  named attribute the scene holds an object that matches all the others but
  not it ("the small green triangle" beside a large green triangle and a small
  green star). A 12-layer, 128-wide language model trained on the 2-core CPU
  learned to select by one attribute of two, not by both (README, issue 12);
  these rules stay for a larger model or budget.

Question types (``QTYPES``), as ``ONE_ATTRIBUTE`` / ``CONJUNCTIVE`` ask them:

- ``colour``: "What colour is the star?" / "... the small star?" (size + shape)
- ``shape``: "What shape is the blue object?" / "... the large blue object?"
- ``count``: "How many red objects are there?" (1 to 5; conjunctive: two
  attributes, among distractors that share one of them)
- ``number``: "What number is on the blue object?" / "... the large green square?"
  (two digits, on a large object; conjunctive: the objects that share two of
  the three attributes carry numbers too)
- ``describe``: "What size and colour is the star?" -> "small blue" (two
  words, both read off the one object: the second answer token must look
  again)
- ``spatial``: "What is directly left of the star?" -> "blue circle" (the
  object in the neighbouring grid cell, colour and shape; ``CONJUNCTIVE``
  only)
- ``relation``: "Is the star left or right of the blue object?" -> "left" (two
  named objects; "above or below" when asked that way)

Like the basic family: a pure function of (split, seed), its own split salts
(never the basic family's scenes), numpy and Pillow only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stitchvlm.shared.synthetic import (
    COLOURS,
    DIGIT_SHAPES,
    SHAPES,
    SPLITS,
    Example,
    Question,
    SceneObject,
    render,
)

CANVAS = (448, 224)  # (width, height) px: a 2 x 1 grid of 224 px tiles plus the thumbnail
CELL = 56  # grid cell side in px: 2 x 2 visual tokens of a 224 px tile at 64 tokens per tile
GRID_COLUMNS, GRID_ROWS = CANVAS[0] // CELL, CANVAS[1] // CELL  # 8 x 4
ALL_QTYPES = ("colour", "shape", "count", "number", "describe", "spatial", "relation")
SIZES = {"small": (22, 28), "large": (44, 50)}  # object side in px, inclusive ranges (small: within a token)
ATTRIBUTES = ("size", "colour", "shape")  # what a description may name, in the order it names them
# The conjunctive rules' attribute sets that may name one object: any two, or all three.
DESCRIPTIONS = (("size", "colour"), ("size", "shape"), ("colour", "shape"), ATTRIBUTES)
NUMBER_SHAPES = DIGIT_SHAPES  # shapes roomy enough to hold a printed number
NUMBERS = (10, 99)  # printed numbers, inclusive: always two digits, two answer tokens
MAX_COUNT = 5  # count questions ask about 1..MAX_COUNT objects
NEIGHBOURS = {"directly left of": (-1, 0), "directly right of": (1, 0), "directly above": (0, -1), "directly below": (0, 1)}  # fmt: skip
AXES = {"left or right of": (0, ("left", "right")), "above or below": (1, ("above", "below"))}
OBJECTS_PER_IMAGE = (10, 20)  # inclusive range at curriculum level 1
# Training curriculum only (every split is level 1). Below WARMUP_LEVEL a scene holds 1-2 objects and a
# question needs only a description that is unique (no twin for each attribute): the answer position
# learns to read an object's tokens before it must pick one by a conjunction. From a model trained
# from scratch without that phase, answer loss stayed at chance for 1500 steps (small) and 500
# (large), with 4 or 12 questions per image. From WARMUP_LEVEL to 1 the range grows from
# EASY_OBJECTS to OBJECTS_PER_IMAGE.
WARMUP_LEVEL = 0.4
WARMUP_OBJECTS = (1, 2)
EASY_OBJECTS = (4, 6)  # the range just after the warm-up
# In the warm-up the objects of the questions that do not depend on grid cells start WARMUP_SCALE times
# their size and shrink linearly to it at WARMUP_LEVEL: an object that covers a tenth of the tokens
# instead of 3% makes the answer's gradient through the visual tokens strong enough to learn from. On
# the small model, 800 warm-up steps at full size read the colour of 1-2 objects 20% of the time (7
# colours), at 2.5x 80%.
WARMUP_SCALE = 2.5
CELL_QTYPES = ("spatial", "relation")  # questions about grid cells: two objects, never scaled
# Scaled in the warm-up: not the cell questions, nor describe, whose answer is the object's size.
SCALED_QTYPES = ("colour", "shape", "count", "number")
# A small object sits inside one of the four 28 px tokens of its cell's 2 x 2 block (jitter kept within
# it), not on their shared corner: there a 24 px object left each token as little as a 10 x 10 px corner
# of it (a sixth of the object).
SMALL_ON_TOKEN = True
# The background: smooth grey noise of +- BACKGROUND_TEXTURE levels (drawn on a 16 px lattice, bilinear)
# plus +- _PIXEL_NOISE per pixel, on the basic family's light grey. On a flat background every background
# token is the same, and a trained small model used them as a diffuse attention sink: in its layers 1
# and 2, 58% and 77% of the attention on visual tokens went to background tokens (54% of |V|), so the
# score A ranked background first. Textured (and with colour grounded on object tokens only,
# train_pair), 22% and 49% (small models at 3000 and 2500 steps, 30 test images each); A then prefers
# object tokens, though not yet the one a question asks about.
BACKGROUND_TEXTURE = 24.0
_TEXTURE_CELL = 16
_PIXEL_NOISE = 6.0
_JITTER = 2  # +- px of an object's centre around its cell's centre
_NUMBER_PROBABILITY = 0.5  # chance that a roomy shape carries a number
# Salts of the per-split random streams; distinct from the basic family's.
_SPLIT_KEYS = {"train": 0xC20D_0001, "val": 0xC20D_0002, "test": 0xC20D_0003}

Spec = dict  # an object not yet placed: size, colour, shape, digit


@dataclass(frozen=True)
class Rules:
    """How questions name their objects: which attribute sets, and whether every word is needed."""

    name: str
    qtypes: tuple[str, ...]  # the question types drawn, uniformly
    descriptions: tuple[tuple[str, ...], ...]  # the sets that may name a spatial or relation referent
    colour_by: tuple[str, ...]  # what names the object a colour question asks about
    shape_by: tuple[str, ...]
    number_by: tuple[str, ...]
    describe_by: tuple[str, ...]
    counts_by: tuple[tuple[str, ...], ...]  # the sets a count question names
    # True: for each named attribute the scene holds a twin that differs only in it (planted), so no
    # word of a description can be left out; False: a description need only name one object.
    every_word_needed: bool


# The family's mix (issue 12, second pair). Out of it: ``spatial`` (a neighbour's colour and shape),
# which the first crowded large (12 layers, 12000 steps) answered 10% of the time, near chance (1/49):
# a question no model learns takes the same share of every method's accuracy and hides their
# differences. ``describe`` asks its two words instead. ``number`` names its object by colour, which
# the first large found every time (shape questions, 100%), so that what is left is reading the number.
ONE_ATTRIBUTE = Rules(
    "one-attribute",
    qtypes=("colour", "shape", "count", "number", "describe", "relation"),
    descriptions=(("colour",), ("shape",)),
    colour_by=("shape",),
    shape_by=("colour",),
    number_by=("colour",),
    describe_by=("shape",),
    counts_by=(("colour",), ("shape",)),
    every_word_needed=False,
)
CONJUNCTIVE = Rules(
    "conjunctive",
    qtypes=("colour", "shape", "count", "number", "spatial", "relation"),
    descriptions=DESCRIPTIONS,
    colour_by=("size", "shape"),
    shape_by=("size", "colour"),
    number_by=ATTRIBUTES,
    describe_by=("colour", "shape"),  # not drawn: the answer would name a word of the question
    counts_by=DESCRIPTIONS[:3],
    every_word_needed=True,
)
RULES = ONE_ATTRIBUTE  # the family's rules: the splits, the training stream and its follow-up questions
QTYPES = RULES.qtypes  # the family's question types


def example_rng(seed: int | Sequence[int], split: str) -> np.random.Generator:
    """The random stream of one crowded example: the seed salted with the split's key."""
    if split not in _SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    key = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if any(k < 0 for k in key):
        raise ValueError(f"seeds must be non-negative, got {seed!r}")
    return np.random.default_rng([_SPLIT_KEYS[split], *key])


def object_limits(level: float) -> tuple[int, int]:
    """(fewest, most) objects at a curriculum level: 1-2 below WARMUP_LEVEL, then 4-6 growing to the
    standard 10-20 at 1."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    if level < WARMUP_LEVEL:
        return WARMUP_OBJECTS
    t = (level - WARMUP_LEVEL) / (1.0 - WARMUP_LEVEL)
    (lo0, hi0), (lo1, hi1) = EASY_OBJECTS, OBJECTS_PER_IMAGE
    return lo0 + round(t * (lo1 - lo0)), hi0 + round(t * (hi1 - hi0))


def object_scale(level: float) -> float:
    """The side of a warm-up object as a multiple of its ``SIZES`` side: WARMUP_SCALE at level 0,
    shrinking linearly to 1 at WARMUP_LEVEL, 1 from there on."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    return 1.0 + (WARMUP_SCALE - 1.0) * max(0.0, 1.0 - level / WARMUP_LEVEL)


def make_example(
    seed_or_rng: int | Sequence[int] | np.random.Generator,
    split: str = "train",
    level: float = 1.0,
    rules: Rules = RULES,
) -> Example:
    """One crowded example (``synthetic.make_example(..., family="crowded")`` calls this, with the
    family's ``RULES``)."""
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else example_rng(seed_or_rng, split)
    limits = object_limits(level)
    qtype = rules.qtypes[int(rng.integers(len(rules.qtypes)))]
    if level < WARMUP_LEVEL:
        scale = object_scale(level) if qtype in SCALED_QTYPES else 1.0
        objects, q = _warmup_scene(rng, qtype, rules, scale)
        return Example(_render(objects, rng), q.text, q.answer, qtype, q.region, objects, "crowded")
    while True:  # a planted scene can break a description (a filler twin); draw again from the stream
        planted = _PLANT[qtype](rng, limits, rules)
        if planted is not None:
            objects, q = planted
            image = _render(objects, rng)
            return Example(image, q.text, q.answer, qtype, q.region, objects, "crowded")


def _render(objects: Sequence[SceneObject], rng: np.random.Generator) -> Image.Image:
    return render(objects, rng, CANVAS, texture=background_texture)


def background_texture(rng: np.random.Generator, canvas: tuple[int, int]) -> np.ndarray:
    """``[height, width]`` float32 grey-level offsets: smooth noise of +- BACKGROUND_TEXTURE on a
    _TEXTURE_CELL px lattice (bilinear), plus +- _PIXEL_NOISE per pixel."""
    width, height = canvas
    lattice = rng.uniform(
        -BACKGROUND_TEXTURE, BACKGROUND_TEXTURE, (height // _TEXTURE_CELL + 2, width // _TEXTURE_CELL + 2)
    )
    size = (width + 2 * _TEXTURE_CELL, height + 2 * _TEXTURE_CELL)
    smooth = np.asarray(Image.fromarray(lattice.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    return smooth[:height, :width] + rng.uniform(-_PIXEL_NOISE, _PIXEL_NOISE, (height, width)).astype(
        np.float32
    )


def vocabulary_corpus() -> list[str]:
    """Sentences that hold every word of every crowded question and answer, for a tokenizer."""
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    lines = [f"What colour is the {z} {s}? {c}" for z in sizes for s in shapes for c in colours]
    lines += [f"What shape is the {z} {c} object? {s}" for z in sizes for c in colours for s in shapes]
    lines += [f"How many {z} {c} objects are there? {n}" for z in sizes for c in colours for n in range(1, 6)]
    lines += [f"How many {c} {_plural(s)} are there? 3" for c in colours for s in shapes]
    lines += [f"How many {z} {_plural(s)} are there? 2" for z in sizes for s in shapes]
    lines += [f"What number is on the {z} {c} {s}? 47" for z in sizes for c in colours for s in NUMBER_SHAPES]
    lines += [f"What number is on the {c} object? 47" for c in colours]
    lines += [f"What size and colour is the {s}? {z} {c}" for s in shapes for z in sizes for c in colours]
    lines += [f"What is {r} the {z} {c} {s}? {c} {s}" for r in NEIGHBOURS for z in sizes for c in colours for s in shapes]  # fmt: skip
    lines += [f"Is the {z} {c} object {a} the {s}? {w}" for a, (_, ws) in AXES.items() for w in ws for z in sizes for c in colours for s in shapes]  # fmt: skip
    # Answers open the assistant turn with no leading space; repeated, since BPE merges only pairs seen twice.
    lines += [*colours, *shapes, "left", "right", "above", "below", *(f"{c} {s}" for c in colours for s in shapes)] * 3  # fmt: skip
    lines += [f"{z} {c}" for z in sizes for c in colours] * 3
    return lines


# ---------------------------------------------------------------------------
# Descriptions and the questions a scene answers
# ---------------------------------------------------------------------------


def cell_of(obj: SceneObject) -> tuple[int, int]:
    """(column, row) of the grid cell an object sits in."""
    return int(obj.centre[0] // CELL), int(obj.centre[1] // CELL)


def matches(obj: SceneObject, values: dict[str, str]) -> bool:
    return all(getattr(obj, name) == value for name, value in values.items())


def values_of(obj: SceneObject, attributes: Sequence[str]) -> dict[str, str]:
    return {name: getattr(obj, name) for name in attributes}


def is_warmup(objects: Sequence[SceneObject]) -> bool:
    """A warm-up scene of the curriculum (never in a split: those hold at least 10 objects)."""
    return len(objects) <= WARMUP_OBJECTS[1]


def describes(
    objects: Sequence[SceneObject], target: SceneObject, attributes: Sequence[str], rules: Rules = RULES
) -> bool:
    """True when ``attributes`` of ``target`` name it alone and, where ``rules`` need every word, each
    of them is needed: left out, the rest name at least two objects (in a warm-up scene naming it
    alone is enough)."""
    values = values_of(target, attributes)
    if sum(matches(o, values) for o in objects) != 1:
        return False
    if not rules.every_word_needed or is_warmup(objects):
        return True
    for name in attributes:
        rest = {k: v for k, v in values.items() if k != name}
        if sum(matches(o, rest) for o in objects) < 2:
            return False
    return True


def phrase(values: dict[str, str]) -> str:
    """``{"size": "small", "colour": "green", "shape": "triangle"}`` -> "the small green triangle"."""
    words = [values[name] for name in ("size", "colour") if name in values]
    return "the " + " ".join([*words, values.get("shape", "object")])


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def plural_phrase(values: dict[str, str]) -> str:
    """``{"size": "small", "colour": "red"}`` -> "small red objects"; with a shape, "red circles"."""
    words = [values[name] for name in ("size", "colour") if name in values]
    return " ".join([*words, _plural(values["shape"]) if "shape" in values else "objects"])


def _union(boxes: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    array = np.array(boxes)
    return (*array[:, :2].min(axis=0).tolist(), *array[:, 2:].max(axis=0).tolist())


def colour_question(o: SceneObject, rules: Rules = RULES) -> Question:
    return Question(f"What colour is {phrase(values_of(o, rules.colour_by))}?", o.colour, "colour", o.box)


def shape_question(o: SceneObject, rules: Rules = RULES) -> Question:
    return Question(f"What shape is {phrase(values_of(o, rules.shape_by))}?", o.shape, "shape", o.box)


def describe_question(o: SceneObject, rules: Rules = RULES) -> Question:
    text = f"What size and colour is {phrase(values_of(o, rules.describe_by))}?"
    return Question(text, f"{o.size} {o.colour}", "describe", o.box)


def number_question(o: SceneObject, rules: Rules = RULES) -> Question:
    return Question(f"What number is on {phrase(values_of(o, rules.number_by))}?", o.digit, "number", o.box)


def count_question(values: dict[str, str], objects: Sequence[SceneObject]) -> Question:
    counted = [o.box for o in objects if matches(o, values)]
    text = f"How many {plural_phrase(values)} are there?"
    return Question(text, str(len(counted)), "count", _union(counted))


def spatial_question(reference: SceneObject, attributes, relation: str, answer: SceneObject) -> Question:
    text = f"What is {relation} {phrase(values_of(reference, attributes))}?"
    return Question(text, f"{answer.colour} {answer.shape}", "spatial", answer.box)


def relation_question(a: SceneObject, a_attrs, b: SceneObject, b_attrs, axis: str) -> Question:
    index, words = AXES[axis]
    answer = words[0] if cell_of(a)[index] < cell_of(b)[index] else words[1]
    text = f"Is {phrase(values_of(a, a_attrs))} {axis} {phrase(values_of(b, b_attrs))}?"
    return Question(text, answer, "relation", _union([a.box, b.box]))


def _counts_well(objects: Sequence[SceneObject], values: dict[str, str], rules: Rules) -> bool:
    """1..MAX_COUNT objects match ``values`` and, where ``rules`` need every word, for each of its
    attributes more match without it."""
    count = sum(matches(o, values) for o in objects)
    if not 1 <= count <= MAX_COUNT:
        return False
    if not rules.every_word_needed or is_warmup(objects):
        return True
    return all(sum(matches(o, {k: v for k, v in values.items() if k != name}) for o in objects) > count
               for name in values)  # fmt: skip


def scene_questions(objects: Sequence[SceneObject], qtype: str, rules: Rules = RULES) -> list[Question]:
    """Every question of ``qtype`` the scene answers unambiguously under ``rules``, in a fixed order."""
    if qtype == "colour":
        return [colour_question(o, rules) for o in objects if describes(objects, o, rules.colour_by, rules)]
    if qtype == "shape":
        return [shape_question(o, rules) for o in objects if describes(objects, o, rules.shape_by, rules)]
    if qtype == "describe":
        return [
            describe_question(o, rules) for o in objects if describes(objects, o, rules.describe_by, rules)
        ]
    if qtype == "number":
        numbered = [
            o for o in objects if o.digit is not None and o.size == "large"
        ]  # small print: never asked
        return [number_question(o, rules) for o in numbered if describes(objects, o, rules.number_by, rules)]
    if qtype == "count":
        questions, seen = [], set()
        for attributes in rules.counts_by:
            for o in objects:
                values = values_of(o, attributes)
                if tuple(values.items()) not in seen and _counts_well(objects, values, rules):
                    seen.add(tuple(values.items()))
                    questions.append(count_question(values, objects))
        return questions
    named = [(o, a) for o in objects for a in rules.descriptions if describes(objects, o, a, rules)]
    if qtype == "spatial":
        by_cell = {cell_of(o): o for o in objects}
        questions = []
        for o, attrs in named:
            column, row = cell_of(o)
            for relation, (dx, dy) in NEIGHBOURS.items():
                neighbour = by_cell.get((column + dx, row + dy))
                if neighbour is not None:
                    questions.append(spatial_question(o, attrs, relation, neighbour))
        return questions
    if qtype == "relation":
        questions = []
        for (a, a_attrs), (b, b_attrs) in ((x, y) for x in named for y in named if x[0] is not y[0]):
            for axis, (index, _) in AXES.items():
                if cell_of(a)[index] != cell_of(b)[index]:
                    questions.append(relation_question(a, a_attrs, b, b_attrs, axis))
        return questions
    raise ValueError(f"unknown question type {qtype!r}; expected one of {ALL_QTYPES}")


# ---------------------------------------------------------------------------
# Planted scenes
# ---------------------------------------------------------------------------

Planted = tuple[tuple[SceneObject, ...], Question]
_CHOICES = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES}


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _spec(rng: np.random.Generator, number: bool | None = None, **fixed: str) -> Spec:
    """An object with ``fixed`` attributes, the rest random; ``number``: True forces one (on a roomy
    shape), None draws one with ``_NUMBER_PROBABILITY`` on large roomy shapes."""
    spec = {name: fixed.get(name) or _pick(rng, _CHOICES[name]) for name in ATTRIBUTES}
    if number is None:  # small print is never asked about, and is not drawn unless forced
        number = (
            spec["shape"] in NUMBER_SHAPES and spec["size"] == "large" and rng.random() < _NUMBER_PROBABILITY
        )
    spec["digit"] = str(int(rng.integers(NUMBERS[0], NUMBERS[1] + 1))) if number else None
    return spec


def _twin_but(rng: np.random.Generator, values: dict[str, str], name: str, **extra) -> Spec:
    """An object that matches ``values`` except ``name``, which it has otherwise (a distractor)."""
    other = _pick(rng, [v for v in _CHOICES[name] if v != values[name]])
    return _spec(rng, **{**values, name: other}, **extra)


def _fillers(rng: np.random.Generator, n: int, avoid: Sequence[dict[str, str]]) -> list[Spec]:
    """``n`` random objects, none matching any of ``avoid``."""
    specs = []
    while len(specs) < n:
        spec = _spec(rng)
        if not any(all(spec[k] == v for k, v in values.items()) for values in avoid):
            specs.append(spec)
    return specs


def _n_objects(rng: np.random.Generator, limits: tuple[int, int], at_least: int) -> int:
    return max(at_least, int(rng.integers(limits[0], limits[1] + 1)))


def _referent(
    rng: np.random.Generator, attributes: Sequence[str], rules: Rules, **extra
) -> tuple[Spec, list[Spec]]:
    """A target and, where ``rules`` need every word, one distractor per named attribute."""
    target = _spec(rng, **extra)
    if not rules.every_word_needed:
        return target, []
    values = {name: target[name] for name in attributes}
    return target, [_twin_but(rng, values, name) for name in attributes]


def _place(
    rng: np.random.Generator,
    specs: Sequence[Spec],
    fixed: dict[int, int] | None = None,
    scale: float = 1.0,
):
    """Objects for ``specs`` in order, each centred (+- ``_JITTER``) in its own cell; ``fixed`` maps a
    spec's index to a cell index (row * GRID_COLUMNS + column). ``scale`` multiplies every side (the
    warm-up's big objects); an object that would leave the canvas is moved inside it."""
    fixed = fixed or {}
    free = [c for c in range(GRID_COLUMNS * GRID_ROWS) if c not in fixed.values()]
    drawn = iter(rng.choice(free, size=len(specs) - len(fixed), replace=False).tolist())
    placed = []
    for index, spec in enumerate(specs):
        row, column = divmod(fixed[index] if index in fixed else next(drawn), GRID_COLUMNS)
        side = int(rng.integers(SIZES[spec["size"]][0], SIZES[spec["size"]][1] + 1))
        side = round(side * scale)
        jx, jy = (int(j) for j in rng.integers(-_JITTER, _JITTER + 1, 2))
        if SMALL_ON_TOKEN and spec["size"] == "small" and scale == 1.0:
            # on one of the cell's four tokens (a quarter cell from its centre), jitter kept inside it
            room = (CELL // 2 - side) // 2
            jx, jy = (max(-room, min(room, j)) + CELL // 4 * (2 * int(rng.integers(2)) - 1) for j in (jx, jy))
        x0 = min(max(column * CELL + (CELL - side) // 2 + jx, 0), CANVAS[0] - side)
        y0 = min(max(row * CELL + (CELL - side) // 2 + jy, 0), CANVAS[1] - side)
        box = (x0, y0, x0 + side, y0 + side)
        placed.append(SceneObject(spec["shape"], spec["colour"], box, spec["digit"], spec["size"]))
    return tuple(placed)


_ASK_ATTRIBUTE = {"colour": colour_question, "shape": shape_question, "describe": describe_question}
_NAMED_BY = {"colour": "colour_by", "shape": "shape_by", "describe": "describe_by"}


def _plant_attribute(qtype: str):
    ask = _ASK_ATTRIBUTE[qtype]

    def plant(rng: np.random.Generator, limits, rules: Rules) -> Planted | None:
        attributes = getattr(rules, _NAMED_BY[qtype])
        target, distractors = _referent(rng, attributes, rules)
        values = {name: target[name] for name in attributes}
        n = _n_objects(rng, limits, 1 + len(distractors))
        objects = _place(rng, [target, *distractors, *_fillers(rng, n - 1 - len(distractors), [values])])
        planted = describes(objects, objects[0], attributes, rules)
        return (objects, ask(objects[0], rules)) if planted else None

    return plant


def _plant_number(rng: np.random.Generator, limits, rules: Rules) -> Planted | None:
    target = _spec(rng, number=True, size="large", shape=_pick(rng, NUMBER_SHAPES))
    values = {name: target[name] for name in rules.number_by}
    distractors = []
    if rules.every_word_needed:
        # The three twins carry numbers too: reading the wrong one of them is the mistake to make.
        other_shape = _pick(rng, [shape for shape in NUMBER_SHAPES if shape != values["shape"]])
        distractors = [
            _twin_but(rng, values, "size", number=True),
            _twin_but(rng, values, "colour", number=True),
            _spec(rng, number=True, **{**values, "shape": other_shape}),
        ]
    n = _n_objects(rng, limits, 1 + len(distractors))
    objects = _place(rng, [target, *distractors, *_fillers(rng, n - 1 - len(distractors), [values])])
    planted = describes(objects, objects[0], rules.number_by, rules)
    return (objects, number_question(objects[0], rules)) if planted else None


def _plant_count(rng: np.random.Generator, limits, rules: Rules) -> Planted | None:
    attributes = rules.counts_by[int(rng.integers(len(rules.counts_by)))]
    first = _spec(rng)
    values = {name: first[name] for name in attributes}
    count = int(rng.integers(1, MAX_COUNT + 1))
    counted = [first, *(_spec(rng, **values) for _ in range(count - 1))]
    distractors = []
    if rules.every_word_needed:
        distractors = [
            _twin_but(rng, values, name) for name in attributes for _ in range(int(rng.integers(1, 3)))
        ]
    n = _n_objects(rng, limits, count + len(distractors))
    specs = [*counted, *distractors, *_fillers(rng, n - count - len(distractors), [values])]
    objects = _place(rng, specs)
    return (objects, count_question(values, objects)) if _counts_well(objects, values, rules) else None


def _plant_spatial(rng: np.random.Generator, limits, rules: Rules) -> Planted | None:
    attributes = rules.descriptions[int(rng.integers(len(rules.descriptions)))]
    relation = _pick(rng, NEIGHBOURS)
    reference, distractors = _referent(rng, attributes, rules)
    values = {name: reference[name] for name in attributes}
    n = _n_objects(rng, limits, 2 + len(distractors))
    fillers = _fillers(rng, n - 1 - len(distractors), [values])
    dx, dy = NEIGHBOURS[relation]
    columns = range(max(0, -dx), GRID_COLUMNS - max(0, dx))
    rows = range(max(0, -dy), GRID_ROWS - max(0, dy))
    column, row = int(rng.choice(columns)), int(rng.choice(rows))
    cells = {0: row * GRID_COLUMNS + column, 1: (row + dy) * GRID_COLUMNS + column + dx}
    objects = _place(rng, [reference, fillers[0], *distractors, *fillers[1:]], cells)
    if not describes(objects, objects[0], attributes, rules):
        return None
    return objects, spatial_question(objects[0], attributes, relation, objects[1])


def _plant_relation(rng: np.random.Generator, limits, rules: Rules) -> Planted | None:
    a_attrs = rules.descriptions[int(rng.integers(len(rules.descriptions)))]
    b_attrs = rules.descriptions[int(rng.integers(len(rules.descriptions)))]
    a, a_distractors = _referent(rng, a_attrs, rules)
    b, b_distractors = _referent(rng, b_attrs, rules)
    avoid = [{k: a[k] for k in a_attrs}, {k: b[k] for k in b_attrs}]
    named = [a, b, *a_distractors, *b_distractors]
    objects = _place(rng, [*named, *_fillers(rng, _n_objects(rng, limits, len(named)) - len(named), avoid)])
    if not (
        describes(objects, objects[0], a_attrs, rules) and describes(objects, objects[1], b_attrs, rules)
    ):
        return None
    axes = [axis for axis, (i, _) in AXES.items() if cell_of(objects[0])[i] != cell_of(objects[1])[i]]
    return objects, relation_question(objects[0], a_attrs, objects[1], b_attrs, _pick(rng, axes))


def _overlap(objects: Sequence[SceneObject]) -> bool:
    boxes = [o.box for o in objects]
    return any(
        a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
    )


def _warmup_scene(rng: np.random.Generator, qtype: str, rules: Rules, scale: float = 1.0) -> Planted:
    """1-2 random objects, sides times ``scale`` and not overlapping, and a random question of
    ``qtype`` the scene answers (drawn until one does)."""
    while True:
        n = int(rng.integers(WARMUP_OBJECTS[0], WARMUP_OBJECTS[1] + 1))
        if qtype in CELL_QTYPES:
            n = 2  # a neighbour, a second object
        objects = _place(rng, [_spec(rng) for _ in range(n)], scale=scale)
        if _overlap(objects):
            continue
        questions = scene_questions(objects, qtype, rules)
        if questions:
            return objects, questions[int(rng.integers(len(questions)))]


_PLANT = {
    "colour": _plant_attribute("colour"),
    "shape": _plant_attribute("shape"),
    "describe": _plant_attribute("describe"),
    "count": _plant_count,
    "number": _plant_number,
    "spatial": _plant_spatial,
    "relation": _plant_relation,
}
