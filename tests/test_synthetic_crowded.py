"""The ``crowded`` task family (``stitchvlm.shared.synthetic_crowded``): determinism, disjoint splits,
descriptions that name one object (one attribute under the family's rules; under the conjunctive
rules, with every word needed), answers the objects and pixels support, several answer tokens.

The checks parse the question text themselves and judge it against the object
list (and, for colours, the rendered pixels), not through the generator's
helpers, so a planting bug that leaves a question ambiguous fails here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from stitchvlm.shared import synthetic_crowded as crowded
from stitchvlm.shared.layout import TilingConfig
from stitchvlm.shared.preprocess import compute_layout
from stitchvlm.shared.synthetic import (
    COLOURS,
    FAMILIES,
    SHAPES,
    SPLITS,
    Example,
    Question,
    dataset,
    family_qtypes,
    make_example,
    more_questions,
    vocabulary_corpus,
)


def image_hash(example: Example) -> str:
    return hashlib.sha256(example.image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return dataset("train", 150, family="crowded")


@pytest.fixture(scope="module")
def conjunctive() -> list[Example]:
    return [crowded.make_example((0, i), "train", rules=crowded.CONJUNCTIVE) for i in range(150)]


@pytest.fixture(params=["one-attribute", "conjunctive"])
def ruled(request, examples, conjunctive) -> tuple[crowded.Rules, list[Example]]:
    """Both sets of rules with 150 training examples each: the family's and the conjunctive one."""
    if request.param == "one-attribute":
        return crowded.ONE_ATTRIBUTE, examples
    return crowded.CONJUNCTIVE, conjunctive


def parse_description(words: list[str]) -> dict[str, str]:
    """["small", "green", "triangle"] -> {"size": ..., "colour": ..., "shape": ...}; "object" names no shape."""
    values = {}
    for word in words:
        if word in crowded.SIZES:
            values["size"] = word
        elif word in COLOURS:
            values["colour"] = word
        elif word.rstrip("s") in SHAPES or word.removesuffix("es") in SHAPES:
            values["shape"] = (
                word if word in SHAPES else next(s for s in SHAPES if word in (s + "s", s + "es"))
            )
        else:
            assert word in ("object", "objects"), word
    return values


def named(example: Example, values: dict[str, str]) -> list:
    return [o for o in example.objects if all(getattr(o, k) == v for k, v in values.items())]


def assert_every_word_needed(example: Example, values: dict[str, str]) -> None:
    """The description names one object, and leaving out any of its words names several."""
    assert len(values) >= 2, example.question
    assert len(named(example, values)) == 1, example.question
    for key in values:
        assert len(named(example, {k: v for k, v in values.items() if k != key})) >= 2, (
            example.question,
            key,
        )


def referents(example: Example) -> list[dict[str, str]]:
    """The descriptions after each "the" of the question, up to the next relation word or "?"."""
    words = example.question[:-1].split()
    stops = {"left", "right", "above", "below", "or", "of"}
    found, current = [], None
    for word in words:
        if word == "the":
            current = []
            found.append(current)
        elif current is not None and word not in stops:
            current.append(word)
        else:
            current = None
    return [parse_description(d) for d in found]


def test_same_seed_same_example_and_disjoint_splits_and_families(examples):
    """Guards against hidden global randomness, a split leaking into another, or the crowded family
    reusing the basic family's scenes."""
    a, b = make_example(7, "val", family="crowded"), make_example(7, "val", family="crowded")
    assert a.image.tobytes() == b.image.tobytes() and (a.question, a.answer) == (b.question, b.answer)
    seen: dict[str, str] = {}
    for split in SPLITS:
        for example in examples if split == "train" else dataset(split, 150, family="crowded"):
            assert seen.setdefault(image_hash(example), split) == split
    basic = {image_hash(e) for e in dataset("train", 50)}
    assert not basic & {image_hash(e) for e in examples[:50]}
    with pytest.raises(ValueError, match="unknown task family"):
        make_example(0, "train", family="hard")
    assert FAMILIES == ("basic", "crowded") and make_example(0).family == "basic"
    assert (
        crowded.RULES is crowded.ONE_ATTRIBUTE
        and examples[0].question
        == crowded.make_example((0, 0), "train", rules=crowded.ONE_ATTRIBUTE).question
    )


def test_examples_are_well_formed(ruled):
    """Guards against a type never drawn (or one drawn that the rules leave out), scenes outside 10-20
    objects, objects off their cells, tokens or sizes, and numbers that are not two digits."""
    rules, examples = ruled
    assert {e.qtype for e in examples} == set(rules.qtypes) <= set(crowded.ALL_QTYPES)
    assert set(crowded.QTYPES) == set(family_qtypes("crowded")) == set(crowded.ONE_ATTRIBUTE.qtypes)
    assert "spatial" not in crowded.QTYPES and "describe" in crowded.QTYPES
    for example in examples:
        assert example.image.size == crowded.CANVAS and example.family == "crowded"
        assert 10 <= len(example.objects) <= 20 and example.question.endswith("?")
        cells = {crowded.cell_of(o) for o in example.objects}
        assert len(cells) == len(example.objects)
        for obj in example.objects:
            side = obj.box[2] - obj.box[0]
            lo, hi = crowded.SIZES[obj.size]
            assert lo <= side <= hi and obj.box[3] - obj.box[1] == side
            column, row = crowded.cell_of(obj)
            # large: on the cell's centre (the corner of its 2 x 2 tokens); small: on one token's centre
            if obj.size == "large":
                assert abs(obj.centre[0] - (column + 0.5) * crowded.CELL) <= 2.5
                assert abs(obj.centre[1] - (row + 0.5) * crowded.CELL) <= 2.5
            else:  # inside one 28 px token of the cell's 2 x 2
                token = crowded.CELL // 2
                assert (
                    obj.box[0] // token == (obj.box[2] - 1) // token and obj.box[0] >= column * crowded.CELL
                )
                assert obj.box[1] // token == (obj.box[3] - 1) // token and obj.box[1] >= row * crowded.CELL
            assert obj.digit is None or (len(obj.digit) == 2 and obj.shape in crowded.NUMBER_SHAPES)


def test_one_attribute_descriptions_name_one_object(examples):
    """Guards against an ambiguous question under the family's rules: each description (and each
    count) is one attribute, and each description names exactly one object of the 10-20."""
    kinds = set()
    for example in examples:
        if example.qtype == "count":
            values = parse_description(example.question.removeprefix("How many ").split()[:-2])
            assert len(values) == 1, example.question
            kinds.add(("count", *values))
            continue
        descriptions = referents(example)
        assert len(descriptions) == (2 if example.qtype == "relation" else 1), example.question
        for values in descriptions:
            assert len(values) == 1 and len(named(example, values)) == 1, example.question
            kinds.add((example.qtype, *values))
    assert {k for k in kinds if k[0] in ("colour", "shape", "number", "describe")} == {
        ("colour", "shape"),
        ("shape", "colour"),
        ("number", "colour"),
        ("describe", "shape"),
    }
    assert {k[1] for k in kinds if k[0] in ("count", "relation")} == {"colour", "shape"}


def test_conjunctive_named_objects_need_every_word(conjunctive):
    """Guards against conjunctive questions an early layer could answer from one word: each
    description names exactly one object and drops to several without any one of its words."""
    for example in conjunctive:
        if example.qtype == "count":
            continue
        descriptions = referents(example)
        assert len(descriptions) == (2 if example.qtype == "relation" else 1), example.question
        for values in descriptions:
            assert_every_word_needed(example, values)


def dominant_colour(example: Example, box) -> str:
    x0, y0, x1, y1 = box
    pixels = np.asarray(example.image)[y0:y1, x0:x1].reshape(-1, 3).astype(np.float64)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    distance = np.linalg.norm(pixels[:, None] - palette[None], axis=-1)
    names = distance.argmin(axis=1)[distance.min(axis=1) < 40]
    return list(COLOURS)[int(np.bincount(names).argmax())]


def test_answers_follow_from_the_objects_and_pixels(ruled):
    """Guards against wrong answers: colours read from the pixels at the region, shapes, numbers and
    counts from the object list, neighbours from the grid, relations from the centres."""
    rules, examples = ruled
    for example in examples:
        q, answer = example.qtype, example.answer
        descriptions = referents(example)
        if q == "count":
            values = parse_description(example.question.removeprefix("How many ").split()[:-2])
            count = len(named(example, values))
            assert str(count) == answer and 1 <= count <= crowded.MAX_COUNT
            for key in values if rules.every_word_needed else ():  # distractors: more without a word
                assert len(named(example, {k: v for k, v in values.items() if k != key})) > count
            continue
        (target,) = named(example, descriptions[0])
        if q == "colour":
            assert dominant_colour(example, example.region) == answer == target.colour
        elif q == "shape":
            assert answer == target.shape and dominant_colour(example, target.box) == target.colour
        elif q == "describe":
            lo, hi = crowded.SIZES[target.size]
            assert answer == f"{target.size} {target.colour}" and lo <= target.box[2] - target.box[0] <= hi
            assert dominant_colour(example, example.region) == target.colour
        elif q == "number":
            assert answer == target.digit and target.size == "large" and len(answer) == 2
            if rules.every_word_needed:
                twins = [o for o in example.objects if o is not target and o.digit is not None]
                assert len(twins) >= 3  # the objects one word away carry numbers too
        elif q == "spatial":
            relation = next(r for r in crowded.NEIGHBOURS if r in example.question)
            dx, dy = crowded.NEIGHBOURS[relation]
            column, row = crowded.cell_of(target)
            (there,) = [o for o in example.objects if crowded.cell_of(o) == (column + dx, row + dy)]
            assert answer == f"{there.colour} {there.shape}" and len(answer.split()) == 2
        elif q == "relation":
            (other,) = named(example, descriptions[1])
            if "left or right" in example.question:
                assert answer == ("left" if target.centre[0] < other.centre[0] else "right")
            else:
                assert answer == ("above" if target.centre[1] < other.centre[1] else "below")


def test_planted_questions_are_scene_questions_and_follow_ups_stay_in_the_family(ruled):
    """Guards against training follow-ups judged by other rules than the planted question, or drawn
    from the basic family."""
    rules, examples = ruled
    for example in examples[:40]:
        asked = crowded.scene_questions(example.objects, example.qtype, rules)
        assert Question(example.question, example.answer, example.qtype, example.region) in asked
        if rules is not crowded.RULES:
            continue  # follow-ups are the family's: asked by its rules
        follow = more_questions(example, np.random.default_rng(3), 3)
        assert follow == more_questions(example, np.random.default_rng(3), 3)
        assert {f.qtype for f in follow} <= set(crowded.QTYPES) and example.question not in [
            f.text for f in follow
        ]


def test_curriculum_levels_only_thin_training_scenes():
    """Guards against the curriculum changing the standard splits or not simplifying scenes."""
    assert crowded.object_limits(1.0) == crowded.OBJECTS_PER_IMAGE
    standard = make_example(4, "train", family="crowded")
    assert image_hash(make_example(4, "train", 1.0, "crowded")) == image_hash(standard)
    warmup = [make_example((0, i), "train", 0.0, "crowded") for i in range(30)]
    assert {len(e.objects) for e in warmup} == {1, 2}
    for example in warmup:  # each question still answered by the scene it asks about
        asked = crowded.scene_questions(example.objects, example.qtype)
        assert Question(example.question, example.answer, example.qtype, example.region) in asked
    easy = [make_example((0, i), "train", crowded.WARMUP_LEVEL, "crowded") for i in range(30)]
    assert max(len(e.objects) for e in easy) <= 6  # 4-6 (conjunctive rules add their twins)
    assert min(len(e.objects) for e in easy) >= 4


def test_warmup_objects_start_big_and_shrink_to_standard_size():
    """Guards against the warm-up's size ramp leaking past WARMUP_LEVEL, scaling the questions that
    depend on grid cells, or drawing objects off the canvas or on top of each other."""
    assert crowded.object_scale(0.0) == crowded.WARMUP_SCALE
    assert crowded.object_scale(crowded.WARMUP_LEVEL) == crowded.object_scale(1.0) == 1.0
    lo, hi = min(r[0] for r in crowded.SIZES.values()), max(r[1] for r in crowded.SIZES.values())
    for level in (0.0, crowded.WARMUP_LEVEL / 2, crowded.WARMUP_LEVEL):
        scale = crowded.object_scale(level)
        for i in range(40):
            example = make_example((1, i), "train", level, "crowded")
            sides = [o.box[2] - o.box[0] for o in example.objects]
            expected = (
                scale if example.qtype in crowded.SCALED_QTYPES and level < crowded.WARMUP_LEVEL else 1.0
            )
            assert all(round(lo * expected) <= side <= round(hi * expected) for side in sides), (level, sides)
            for o in example.objects:
                assert min(o.box[:2]) >= 0
                assert o.box[2] <= crowded.CANVAS[0] and o.box[3] <= crowded.CANVAS[1]
            assert not crowded._overlap(example.objects)
            assert example.image.size == crowded.CANVAS


def test_answers_take_several_tokens_and_images_many_visual_tokens():
    """Guards against a family whose answers are one token (the generated tokens' attention A^D would
    not matter) or whose images give fewer than ~160 visual tokens at 64 per tile."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("torch")
    from stitchvlm.cloud.checkpoints import build_tokenizer

    tokenizer = build_tokenizer(vocabulary_corpus("crowded"))
    examples = dataset("test", 60, family="crowded")
    for example in examples:
        if example.qtype in ("number", "spatial", "describe"):
            assert len(tokenizer.encode(example.answer).ids) >= 2, example.answer
    tiling = TilingConfig(tile_size=224, min_tiles=1, max_tiles=6, use_thumbnail=True, tokens_per_tile=64)
    layout = compute_layout(*crowded.CANVAS, tiling)
    assert (layout.grid_columns, layout.grid_rows, layout.num_tiles) == (2, 1, 3)
    assert layout.num_visual_tokens == 192


def test_the_background_is_textured_and_objects_keep_their_pixels():
    """Guards against a flat background (every background token the same: a ready-made attention sink
    that the score A ranks first) and against a texture painted over objects or their numbers."""
    from stitchvlm.shared.synthetic import render

    example = next(e for e in dataset("test", 20, family="crowded") if any(o.digit for o in e.objects))
    flat = np.asarray(render(example.objects, np.random.default_rng(1), crowded.CANVAS)).astype(int)
    textured = render(example.objects, np.random.default_rng(1), crowded.CANVAS, crowded.background_texture)
    textured = np.asarray(textured).astype(int)
    level = flat[0, 0]  # the flat background's grey (no object reaches the corner at level 1)
    drawn = np.abs(flat - level).sum(axis=-1) > 0  # every pixel an object or its number changed
    assert (textured[drawn] == flat[drawn]).all()
    offset = (textured - level)[~drawn].astype(float)  # [pixels, 3], grey: the channels agree
    assert (offset[:, 0] == offset[:, 2]).all()
    limit = crowded.BACKGROUND_TEXTURE + crowded._PIXEL_NOISE
    assert np.abs(offset).max() <= limit + 1 and 8 < offset.std() < limit
    residual = (textured - level)[..., 0].astype(float)
    residual[drawn] = np.nan
    right = residual[:, :-1], residual[:, 1:]
    both = ~np.isnan(right[0]) & ~np.isnan(right[1])
    assert np.corrcoef(right[0][both], right[1][both])[0, 1] > 0.5  # smooth, not only pixel noise
    # and the family's images are drawn that way: the top row (background only: objects start at y >= 1)
    rows = [np.asarray(e.image)[0].astype(float).std() for e in dataset("test", 10, family="crowded")]
    assert min(rows) > 4.0
