"""A deterministic synthetic visual-question dataset: shapes, colours and digits on a 448 x 448 canvas.

The trained synthetic pair (DESIGN "Models") learns from these examples, and
the benchmarks measure accuracy, pruning quality and exit rate on them. Every
question's answer depends on a small part of the image (one object, or the few
objects of one colour), which ``Example.region`` names, so a pruning method
that keeps the right visual tokens keeps the answer.

Question types (``QTYPES``), in rising difficulty for a tiny model:

- ``colour``: "What colour is the triangle?" (the shape is unique in the image)
- ``shape``: "Which shape is blue?" (the colour is unique)
- ``count``: "How many objects are red?" (1 to 4)
- ``digit``: "What digit is inside the blue square?" (other shapes carry digits too)
- ``spatial``: "What shape is left of the red circle?" (exactly one object lies
  in that direction: inside the 90-degree cone around it)

Objects sit one per cell of the 8 x 8 grid of 56 px cells that the 2 x 2
tiling's visual tokens cover, so each object is what one grid-tile token sees.
``scene_questions`` lists every question a scene answers unambiguously (the
planted one among them); ``more_questions`` draws follow-ups for training.

Answers are one word or one digit; ``exact_match`` compares them. An example is
a pure function of (split, seed): each split salts its random streams with its
own key, so the same seed never gives the same scene in two splits. Only numpy
and Pillow are used (the edge imports this module); no torch, no font files
(digits use Pillow's built-in scalable font).

Two task families, chosen by name (``FAMILIES``, the ``family`` argument of
``make_example``, ``dataset``, ``iter_dataset``, ``vocabulary_corpus``): ``basic``
(the above, the default, what the embedded pair and the demo use) and
``crowded`` (``synthetic_crowded``: 10-20 objects of two sizes on a 448 x 224
canvas, questions that name one object of many by an attribute no other has
(or, under its conjunctive rules, by a conjunction), answers of several
tokens). Each family salts its splits with its own keys.

Not here: tokenization, tiling, or model inputs (``prompt`` and ``preprocess``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 448  # canvas side in px: 2 x 2 tiles of 224 px plus the thumbnail
QTYPES = ("colour", "shape", "count", "digit", "spatial")
SPLITS = ("train", "val", "test")
# Task families by name: "basic" is this module's, "crowded" synthetic_crowded's.
FAMILIES = ("basic", "crowded")
DEFAULT_FAMILY = "basic"
# Salts of the per-split random streams: a seed means a different scene in each split.
_SPLIT_KEYS = {"train": 0x5EED_0001, "val": 0x5EED_0002, "test": 0x5EED_0003}

# Named colours and their RGB; well apart, so a colour name is never ambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 45, 165),
    "orange": (245, 130, 20),
    "gray": (120, 120, 120),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
# Shapes roomy enough to hold a printed digit.
DIGIT_SHAPES = ("circle", "square", "diamond", "hexagon")
DIGITS = tuple("0123456789")
MAX_COUNT = 4  # count questions ask about 1..MAX_COUNT objects
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}

# Objects sit one per cell of an 8 x 8 grid of 56 px cells: the visual-token grid of the 2 x 2 tiling
# (224 px tiles, 4 x 4 tokens each), so each object is what one grid-tile token sees and what a
# quarter of one thumbnail token sees. With objects anywhere (the first design) the pair's tiny ViTs
# (28 px patches) saw every object cut differently: after 400 steps of a shape probe on each token,
# 17% of tokens named their object's shape (chance 14%); on the grid, 94%.
GRID_CELLS = 8  # cells per side
CELL = IMAGE_SIZE // GRID_CELLS  # cell side in px
_OBJECT_SIZES = (34, 48)  # object side in px, inclusive range
_JITTER = 2  # +- px of an object's centre around its cell's centre (keeps >= 4 px between neighbours)
_OBJECTS_PER_IMAGE = (3, 6)  # inclusive range
MAX_OBJECTS = _OBJECTS_PER_IMAGE[1]  # the most objects one image holds
_COLOUR_JITTER = 10  # +- per RGB channel, so colours are not one exact value
_DIGIT_PROBABILITY = 0.5  # chance that a roomy distractor shape carries a digit
_CONE_MARGIN = 12  # px: an object this close to a direction cone's edge makes a spatial question ambiguous


@dataclass(frozen=True)
class SceneObject:
    """One drawn object."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in px, half-open
    digit: str | None  # the digit printed inside, if any (the crowded family prints two-digit numbers)
    size: str | None = None  # "small" or "large" in the crowded family; None in the basic one

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Example:
    """One image, one question about it, and its answer."""

    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    question: str  # English question ending in "?"
    answer: str  # one word or digit, lower case
    qtype: str  # one of QTYPES
    region: tuple[int, int, int, int]  # (x0, y0, x1, y1): the object(s) the answer depends on
    objects: tuple[SceneObject, ...]  # everything drawn, in drawing order
    family: str = DEFAULT_FAMILY  # the task family it belongs to (FAMILIES)


def normalize_answer(text: str) -> str:
    """Lower case, surrounding space and trailing periods removed, inner whitespace collapsed."""
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction: str, truth: str) -> bool:
    """True when the two answers are equal after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(truth)


def example_rng(seed: int | Sequence[int], split: str) -> np.random.Generator:
    """The random stream of one example: the seed salted with the split's key."""
    if split not in _SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    key = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if any(k < 0 for k in key):
        raise ValueError(f"seeds must be non-negative, got {seed!r}")
    return np.random.default_rng([_SPLIT_KEYS[split], *key])


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    return family


def family_qtypes(family: str = DEFAULT_FAMILY) -> tuple[str, ...]:
    """The question types of a task family, in the order tables list them."""
    if check_family(family) == "crowded":
        from stitchvlm.shared import synthetic_crowded  # imports this module; loaded on first use

        return synthetic_crowded.QTYPES
    return QTYPES


def make_example(
    seed_or_rng: int | Sequence[int] | np.random.Generator,
    split: str = "train",
    level: float = 1.0,
    family: str = DEFAULT_FAMILY,
) -> Example:
    """One example, a pure function of the seed (salted by ``split``) or of the given generator.

    ``level`` in [0, 1] is for a training curriculum only: below 1 the image holds fewer
    objects (``scene_limits``); every split is defined at level 1. ``family`` picks the
    task family (``FAMILIES``).
    """
    if check_family(family) == "crowded":
        from stitchvlm.shared import synthetic_crowded

        return synthetic_crowded.make_example(seed_or_rng, split, level)
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else example_rng(seed_or_rng, split)
    limits = scene_limits(level)
    qtype = QTYPES[int(rng.integers(len(QTYPES)))]
    while True:  # a planted spatial scene can be ambiguous; draw again from the same stream
        planted = _ASK[qtype](rng, limits)
        if planted is not None:
            objects, q = planted
            return Example(render(objects, rng), q.text, q.answer, qtype, q.region, objects)


@dataclass(frozen=True)
class SceneLimits:
    """How crowded a scene may be."""

    min_objects: int  # fewest objects drawn (questions that need more draw more)
    max_objects: int  # most objects drawn


def scene_limits(level: float) -> SceneLimits:
    """Limits at a curriculum level: 0 is 2 objects, 1 the standard 3-6."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    lo, hi = _OBJECTS_PER_IMAGE
    return SceneLimits(min_objects=2 + round(level * (lo - 2)), max_objects=2 + round(level * (hi - 2)))


def dataset(split: str, n: int, seed: int = 0, family: str = DEFAULT_FAMILY) -> list[Example]:
    """The first ``n`` examples of a split; example i is ``make_example((seed, i), split, family=family)``."""
    return list(iter_dataset(split, n, seed, family=family))


def iter_dataset(
    split: str, n: int, seed: int = 0, start: int = 0, level: float = 1.0, family: str = DEFAULT_FAMILY
) -> Iterator[Example]:
    """Examples ``start .. start + n - 1`` of a split, one at a time (``level``: see ``make_example``)."""
    for index in range(start, start + n):
        yield make_example((seed, index), split, level, family)


def vocabulary_corpus(family: str = DEFAULT_FAMILY) -> list[str]:
    """Sentences that hold every word of every question and answer, for training a tokenizer."""
    if check_family(family) == "crowded":
        from stitchvlm.shared import synthetic_crowded

        return synthetic_crowded.vocabulary_corpus()
    colours, shapes = list(COLOURS), list(SHAPES)
    lines = [f"What colour is the {s}? {c}" for s in shapes for c in colours]
    lines += [f"Which shape is {c}? {s}" for c in colours for s in shapes]
    lines += [f"How many objects are {c}? {n}" for c in colours for n in range(1, MAX_COUNT + 1)]
    lines += [f"What digit is inside the {c} {s}? {d}" for c in colours for s in DIGIT_SHAPES for d in DIGITS]
    lines += [f"What shape is {r} the {c} {s}? {s}" for r in RELATIONS for c in colours for s in shapes]
    # Answers open the assistant turn with no leading space; repeated, since BPE merges only pairs seen twice.
    lines += [*colours, *shapes, *DIGITS] * 3
    return lines


@dataclass(frozen=True)
class Question:
    """One question about a drawn scene, with its answer."""

    text: str  # English question ending in "?"
    answer: str  # one word or digit, lower case
    qtype: str  # one of QTYPES
    region: tuple[int, int, int, int]  # (x0, y0, x1, y1): the object(s) the answer depends on


def scene_questions(objects: Sequence[SceneObject], qtype: str) -> list[Question]:
    """Every question of ``qtype`` that ``objects`` answer with one unambiguous answer, in a fixed order.

    The planted question of an ``Example`` is always among them; the others let a
    trainer ask several questions about one image.
    """
    colours = Counter(o.colour for o in objects)
    shapes = Counter(o.shape for o in objects)
    kinds = Counter((o.colour, o.shape) for o in objects)
    questions = []
    if qtype == "colour":
        for o in objects:
            if shapes[o.shape] == 1:
                questions.append(_colour_question(o))
    elif qtype == "shape":
        for o in objects:
            if colours[o.colour] == 1:
                questions.append(_shape_question(o))
    elif qtype == "count":
        for colour, count in colours.items():
            if count <= MAX_COUNT:
                questions.append(_count_question(colour, objects))
    elif qtype == "digit":
        for o in objects:
            if o.digit is not None and kinds[(o.colour, o.shape)] == 1:
                questions.append(_digit_question(o))
    elif qtype == "spatial":
        for o in objects:
            if kinds[(o.colour, o.shape)] != 1:
                continue
            others = [other for other in objects if other is not o]
            for relation in RELATIONS:
                question = _spatial_question(o, relation, others)
                if question is not None:
                    questions.append(question)
    else:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")
    return questions


def more_questions(example: Example, rng: np.random.Generator, n: int) -> list[Question]:
    """Up to ``n`` further questions about ``example``'s image, none equal to its own.

    Each draws a question type uniformly among those the scene can answer, then
    a question of that type; no question repeats. For training only: the splits
    ask one question per image. Questions come from the example's own family.
    """
    qtypes = family_qtypes(example.family)
    if example.family == "crowded":
        from stitchvlm.shared import synthetic_crowded

        asked = synthetic_crowded.scene_questions
    else:
        asked = scene_questions
    pool = {q: [x for x in asked(example.objects, q) if x.text != example.question] for q in qtypes}
    chosen: list[Question] = []
    while len(chosen) < n:
        available = [q for q in qtypes if pool[q]]
        if not available:
            break
        options = pool[_pick(rng, available)]
        chosen.append(options.pop(int(rng.integers(len(options)))))
    return chosen


# ---------------------------------------------------------------------------
# Scenes planted for each question type
# ---------------------------------------------------------------------------

Planted = tuple[tuple[SceneObject, ...], Question]


def _colour_question(o: SceneObject) -> Question:
    return Question(f"What colour is the {o.shape}?", o.colour, "colour", o.box)


def _shape_question(o: SceneObject) -> Question:
    # The word that picks the object comes last, right before "?".
    return Question(f"Which shape is {o.colour}?", o.shape, "shape", o.box)


def _count_question(colour: str, objects: Sequence[SceneObject]) -> Question:
    boxes = np.array([o.box for o in objects if o.colour == colour])
    region = (*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist())
    return Question(f"How many objects are {colour}?", str(len(boxes)), "count", tuple(region))


def _digit_question(o: SceneObject) -> Question:
    return Question(f"What digit is inside the {o.colour} {o.shape}?", o.digit, "digit", o.box)


def _spatial_question(
    reference: SceneObject, relation: str, others: Sequence[SceneObject]
) -> Question | None:
    """The shape in ``relation`` of ``reference``, or None when no single object is clearly there."""
    placement = [_cone_placement(reference, other, RELATIONS[relation]) for other in others]
    # none, several, or one near the cone's edge: the question would have no single clear answer
    if placement.count("in") != 1 or "edge" in placement:
        return None
    answer = others[placement.index("in")]
    text = f"What shape is {relation} the {reference.colour} {reference.shape}?"
    return Question(text, answer.shape, "spatial", answer.box)


def _ask_colour(rng: np.random.Generator, limits: SceneLimits) -> Planted | None:
    shape = _pick(rng, SHAPES)
    target = _spec(rng, shape=shape)
    others = [_spec(rng, shapes=[s for s in SHAPES if s != shape]) for _ in range(_n_others(rng, limits))]
    objects = _place(rng, [target, *others])
    return objects, _colour_question(objects[0])


def _ask_shape(rng: np.random.Generator, limits: SceneLimits) -> Planted | None:
    colour = _pick(rng, COLOURS)
    target = _spec(rng, colour=colour)
    others = [_spec(rng, colours=[c for c in COLOURS if c != colour]) for _ in range(_n_others(rng, limits))]
    objects = _place(rng, [target, *others])
    return objects, _shape_question(objects[0])


def _ask_count(rng: np.random.Generator, limits: SceneLimits) -> Planted | None:
    colour = _pick(rng, COLOURS)
    count = min(int(rng.integers(1, MAX_COUNT + 1)), limits.max_objects)
    n_total = min(max(count + 1, _n_objects(rng, limits)), limits.max_objects)
    counted = [_spec(rng, colour=colour) for _ in range(count)]
    others = [_spec(rng, colours=[c for c in COLOURS if c != colour]) for _ in range(n_total - count)]
    objects = _place(rng, [*counted, *others])
    return objects, _count_question(colour, objects)


def _ask_digit(rng: np.random.Generator, limits: SceneLimits) -> Planted | None:
    colour, shape = _pick(rng, COLOURS), _pick(rng, DIGIT_SHAPES)
    target = _spec(rng, colour=colour, shape=shape, digit=_pick(rng, DIGITS))
    others = []
    for _ in range(_n_others(rng, limits)):  # any object but another (colour, shape) twin of the target
        other = _spec(rng)
        while (other["colour"], other["shape"]) == (colour, shape):
            other = _spec(rng)
        others.append(other)
    objects = _place(rng, [target, *others])
    return objects, _digit_question(objects[0])


def _ask_spatial(rng: np.random.Generator, limits: SceneLimits) -> Planted | None:
    colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
    relation = _pick(rng, RELATIONS)
    reference = _spec(rng, colour=colour, shape=shape)
    others = []
    for _ in range(max(1, _n_others(rng, limits))):  # the reference needs a neighbour
        other = _spec(rng)
        while (other["colour"], other["shape"]) == (colour, shape):
            other = _spec(rng)
        others.append(other)
    objects = _place(rng, [reference, *others])
    question = _spatial_question(objects[0], relation, objects[1:])
    return None if question is None else (objects, question)


_ASK = {
    "colour": _ask_colour,
    "shape": _ask_shape,
    "count": _ask_count,
    "digit": _ask_digit,
    "spatial": _ask_spatial,
}


def _cone_placement(reference: SceneObject, other: SceneObject, direction: tuple[int, int]) -> str:
    """Where ``other`` lies from ``reference``: "in" the 90-degree cone around ``direction``, "out"
    of it, or on its "edge" (within ``_CONE_MARGIN`` px of it: diagonal neighbours on the grid)."""
    (rx, ry), (ox, oy) = reference.centre, other.centre
    along = (ox - rx) * direction[0] + (oy - ry) * direction[1]
    across = abs((ox - rx) * direction[1] - (oy - ry) * direction[0])
    if along > across + _CONE_MARGIN:
        return "in"
    return "out" if along < across - _CONE_MARGIN else "edge"


# ---------------------------------------------------------------------------
# Object specs, placement and drawing
# ---------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _n_objects(rng: np.random.Generator, limits: SceneLimits) -> int:
    return int(rng.integers(limits.min_objects, limits.max_objects + 1))


def _n_others(rng: np.random.Generator, limits: SceneLimits) -> int:
    return _n_objects(rng, limits) - 1


def _spec(
    rng: np.random.Generator,
    colour: str | None = None,
    shape: str | None = None,
    digit: str | None = None,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
) -> dict:
    """An object not yet placed: colour, shape, digit (random where not given) and size."""
    shape = shape or _pick(rng, shapes)
    colour = colour or _pick(rng, colours)
    if digit is None and shape in DIGIT_SHAPES and rng.random() < _DIGIT_PROBABILITY:
        digit = _pick(rng, DIGITS)
    size = int(rng.integers(_OBJECT_SIZES[0], _OBJECT_SIZES[1] + 1))
    return {"colour": colour, "shape": shape, "digit": digit, "size": size}


def _place(rng: np.random.Generator, specs: list[dict]) -> tuple[SceneObject, ...]:
    """Boxes for ``specs`` in order, each centred (+- ``_JITTER`` px) in its own free grid cell."""
    cells = rng.choice(GRID_CELLS * GRID_CELLS, size=len(specs), replace=False)
    placed = []
    for spec, cell in zip(specs, cells, strict=True):
        row, column = divmod(int(cell), GRID_CELLS)
        size = spec["size"]
        jx, jy = (int(j) for j in rng.integers(-_JITTER, _JITTER + 1, 2))
        x0 = column * CELL + (CELL - size) // 2 + jx
        y0 = row * CELL + (CELL - size) // 2 + jy
        placed.append(
            SceneObject(spec["shape"], spec["colour"], (x0, y0, x0 + size, y0 + size), spec["digit"])
        )
    return tuple(placed)


def render(
    objects: Sequence[SceneObject],
    rng: np.random.Generator,
    canvas: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE),
    texture: Callable[[np.random.Generator, tuple[int, int]], np.ndarray] | None = None,
) -> Image.Image:
    """Draw ``objects`` on a light background of ``canvas`` (width, height) px with slightly jittered colours.

    ``texture``: when given, called as ``texture(rng, canvas)`` after the objects are drawn; its
    ``[height, width]`` grey-level offsets are added to the pixels no object covers.
    """
    level = int(rng.integers(228, 250))
    image = Image.new("RGB", canvas, (level, level, level))
    draw = ImageDraw.Draw(image)
    covered = Image.new("L", canvas, 0) if texture is not None else None  # 255 where an object is
    mark = ImageDraw.Draw(covered) if covered is not None else None
    for obj in objects:
        base = np.array(COLOURS[obj.colour])
        rgb = tuple(
            int(v) for v in np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
        )
        _draw_shape(draw, obj.shape, obj.box, rgb)
        if obj.digit is not None:
            _draw_digit(draw, obj, rgb)
        if mark is not None:  # the object's pixels, its digit's included (it can reach past the shape)
            _draw_shape(mark, obj.shape, obj.box, 255)
            if obj.digit is not None:
                _draw_digit(mark, obj, rgb, ink=255)
    if texture is None:
        return image
    pixels = np.asarray(image).astype(np.float32)
    background = np.asarray(covered) == 0
    pixels[background] += texture(rng, canvas)[background][:, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL boxes are inclusive
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        inset = r * 0.12  # a square as wide as a circle looks bigger; keep the areas comparable
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=rgb)
    elif shape == "star":
        points = [
            (cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
        draw.polygon(points, fill=rgb)
    elif shape == "cross":
        arm = r * 0.36
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=rgb)
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_digit(draw: ImageDraw.ImageDraw, obj: SceneObject, rgb, ink=None) -> None:
    # White on dark fills, black on light ones (yellow, orange), so the digit always shows.
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    ink = ink if ink is not None else (0, 0, 0) if luminance > 140 else (255, 255, 255)
    size = obj.box[2] - obj.box[0]
    scale = 0.55 if len(obj.digit) == 1 else 0.42  # two digits (the crowded family's numbers) side by side
    draw.text(obj.centre, obj.digit, fill=ink, font=_font(int(size * scale)), anchor="mm")


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow >= 10.1 ships a scalable default font; no font file from outside.
    return ImageFont.load_default(size=size)
