"""The synthetic dataset (determinism, disjoint splits, answers the pixels support) and the trained pair.

The dataset checks read the rendered pixels, not only the generator's own
object list, so a drawing bug (wrong colour, object not drawn, count off)
fails here. The slow checks load the committed checkpoints the way serving
does and re-run greedy generation through transformers on the first test
examples, against the predictions the trainer recorded in ``accuracy.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stitchvlm.shared.layout import TilingConfig
from stitchvlm.shared.preprocess import compute_layout
from stitchvlm.shared.synthetic import (
    CELL,
    COLOURS,
    IMAGE_SIZE,
    QTYPES,
    RELATIONS,
    SPLITS,
    Example,
    Question,
    SceneLimits,
    dataset,
    exact_match,
    family_qtypes,
    make_example,
    more_questions,
    scene_limits,
    scene_questions,
)
from stitchvlm.shared.synthetic_crowded import CANVAS as CROWDED_CANVAS

MODELS_DIR = Path(__file__).resolve().parents[1] / "shared" / "models"
CHECKED_TEST_EXAMPLES = 60  # how many test examples the slow check re-generates
# Greedy answers may flip on a near-tie between the trainer's thread count and this one-thread run.
ALLOWED_FLIPS = 2


def image_hash(example: Example) -> str:
    return hashlib.sha256(example.image.tobytes()).hexdigest()


def nearest_colour_names(pixels: np.ndarray, max_distance: float = 40.0) -> np.ndarray:
    """Name index (into COLOURS) of each RGB pixel's nearest named colour, -1 when none is close."""
    palette = np.array(list(COLOURS.values()), dtype=np.float64)  # [colours, 3]
    distance = np.linalg.norm(pixels[..., None, :].astype(np.float64) - palette, axis=-1)  # [..., colours]
    names = distance.argmin(axis=-1)
    return np.where(distance.min(axis=-1) <= max_distance, names, -1)


def dominant_colour(example: Example, box: tuple[int, int, int, int]) -> str:
    """The named colour most pixels inside ``box`` are closest to (background and digit ink left out)."""
    x0, y0, x1, y1 = box
    names = nearest_colour_names(np.asarray(example.image)[y0:y1, x0:x1]).ravel()
    names = names[names >= 0]
    return list(COLOURS)[int(np.bincount(names).argmax())]


def count_objects(mask: np.ndarray, min_pixels: int = 100) -> int:
    """Connected 4-neighbour regions of ``mask`` (plain BFS) not nested inside another region's box.

    A digit's closed loop ("0", "6", "8", "9") leaves an island of the fill colour inside
    the shape: it lies within the shape's box, so it is not counted as an object.
    """
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    boxes = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, members = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            members.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(members) >= min_pixels:
            ys, xs = np.array(members).T
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))

    def nested(a, b) -> bool:
        return a != b and b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]

    return sum(not any(nested(box, other) for other in boxes) for box in boxes)


@pytest.fixture(scope="module")
def train_examples() -> list[Example]:
    return dataset("train", 150)


def test_same_seed_gives_identical_examples():
    """Guards against hidden global randomness (np.random, PIL state) making examples irreproducible."""
    for seed in (0, 7, (3, 41)):
        a, b = make_example(seed, "val"), make_example(seed, "val")
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.question, a.answer, a.qtype, a.region) == (b.question, b.answer, b.qtype, b.region)
    first = dataset("test", 5, seed=3)
    again = dataset("test", 5, seed=3)
    assert [image_hash(e) for e in first] == [image_hash(e) for e in again]
    assert [e.question for e in first] == [e.question for e in again]
    assert image_hash(make_example(0, "train")) != image_hash(make_example(1, "train"))
    assert image_hash(dataset("test", 1, seed=3)[0]) != image_hash(dataset("test", 1, seed=4)[0])


def test_splits_never_share_an_example(train_examples):
    """Guards against test or val examples leaking into training (same seeds reused across splits)."""
    seen: dict[tuple[str, str], str] = {}
    for split in SPLITS:
        examples = train_examples if split == "train" else dataset(split, 150)
        for example in examples:
            key = (image_hash(example), example.question)
            assert seen.setdefault(key, split) == split, f"{split} repeats an example of {seen[key]}"
    # The same seed in two splits must not give the same image either.
    assert len({image_hash(make_example(5, split)) for split in SPLITS}) == len(SPLITS)


def test_examples_are_well_formed(train_examples):
    """Guards against a question type never drawn, off-canvas regions or non-RGB images."""
    assert {e.qtype for e in train_examples} == set(QTYPES)
    for example in train_examples:
        assert example.image.size == (IMAGE_SIZE, IMAGE_SIZE) and example.image.mode == "RGB"
        x0, y0, x1, y1 = example.region
        assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
        assert example.question.endswith("?") and example.answer == example.answer.strip().lower()
        assert len(example.answer.split()) == 1


def test_colour_answers_match_the_pixels(train_examples):
    """Guards against a colour answer that is not the colour drawn at the asked object (or region)."""
    checked = 0
    for example in train_examples:
        if example.qtype == "colour":
            assert dominant_colour(example, example.region) == example.answer, example.question
            shape = example.question.removeprefix("What colour is the ").removesuffix("?")
            assert sum(o.shape == shape for o in example.objects) == 1, "the asked shape must be unique"
            checked += 1
        elif example.qtype in ("shape", "digit"):  # the asked colour is drawn at the region
            asked_colour = next(word for word in example.question[:-1].split() if word in COLOURS)
            assert dominant_colour(example, example.region) == asked_colour, example.question
            checked += 1
    assert checked >= 30


def test_count_answers_match_the_pixels(train_examples):
    """Guards against a count answer that differs from the number of drawn objects of that colour."""
    names = list(COLOURS)
    counted = [e for e in train_examples if e.qtype == "count"]
    assert len(counted) >= 15
    for example in counted:
        colour = example.question.removeprefix("How many objects are ").removesuffix("?")
        mask = nearest_colour_names(np.asarray(example.image), max_distance=30.0) == names.index(colour)
        assert count_objects(mask) == int(example.answer), example.question
        assert sum(o.colour == colour for o in example.objects) == int(example.answer)


def test_digit_and_spatial_answers_are_unambiguous(train_examples):
    """Guards against questions with two valid answers (twin target objects, two objects in the cone)."""
    for example in train_examples:
        if example.qtype == "digit":
            words = example.question[:-1].split()
            colour, shape = words[-2], words[-1]
            twins = [o for o in example.objects if (o.colour, o.shape) == (colour, shape)]
            assert len(twins) == 1 and twins[0].digit == example.answer
        if example.qtype == "spatial":
            relation = next(r for r in RELATIONS if f" {r} " in example.question)
            colour, shape = example.question[:-1].split()[-2:]
            (reference,) = [o for o in example.objects if (o.colour, o.shape) == (colour, shape)]
            dx, dy = RELATIONS[relation]
            rx, ry = reference.centre
            # Independent of the generator's margin: the answer must be the only object in the half plane
            # whose direction is within 45 degrees of the relation.
            in_cone = [
                o
                for o in example.objects
                if o is not reference
                and (o.centre[0] - rx) * dx + (o.centre[1] - ry) * dy
                > abs((o.centre[0] - rx) * dy - (o.centre[1] - ry) * dx)
            ]
            assert len(in_cone) == 1 and in_cone[0].shape == example.answer
            assert in_cone[0].box == example.region


def test_curriculum_levels_only_simplify_training_scenes():
    """Guards against the curriculum knob changing the standard splits, or not simplifying scenes."""
    assert scene_limits(1.0) == SceneLimits(min_objects=3, max_objects=6)
    standard = make_example(11, "train")
    assert image_hash(make_example(11, "train", level=1.0)) == image_hash(standard)
    assert {len(example.objects) for example in dataset_at_level(0.0, 40)} == {2}
    assert {len(example.objects) for example in dataset("train", 60)} == {3, 4, 5, 6}
    with pytest.raises(ValueError):
        scene_limits(1.5)


def test_objects_sit_one_per_token_cell(train_examples):
    """Guards against objects straddling the visual-token grid (the layout the pair is trained on):
    each object's centre lies within 2 px of a 56-px cell's centre, one object per cell."""
    for example in train_examples:
        cells = set()
        for obj in example.objects:
            cx, cy = obj.centre
            column, row = int(cx // CELL), int(cy // CELL)
            assert abs(cx - (column + 0.5) * CELL) <= 2.5 and abs(cy - (row + 0.5) * CELL) <= 2.5
            x0, y0, x1, y1 = obj.box
            assert column * CELL <= x0 and x1 <= (column + 1) * CELL
            assert row * CELL <= y0 and y1 <= (row + 1) * CELL
            cells.add((column, row))
        assert len(cells) == len(example.objects)


def test_every_planted_question_is_among_the_scene_questions(train_examples):
    """Guards against ``scene_questions`` (the follow-up questions of training) judging a scene
    differently from the planted question: same text, answer and region for every example."""
    for example in train_examples:
        asked = scene_questions(example.objects, example.qtype)
        assert Question(example.question, example.answer, example.qtype, example.region) in asked


def test_scene_questions_answer_from_the_objects():
    """Guards against follow-up questions with wrong or ambiguous answers, checked against the
    object list independently of the generator's helpers."""
    for seed in range(20):
        objects = make_example(seed, "train").objects
        for question in scene_questions(objects, "colour"):
            shape = question.text.removeprefix("What colour is the ").removesuffix("?")
            (only,) = [o for o in objects if o.shape == shape]
            assert question.answer == only.colour and question.region == only.box
        for question in scene_questions(objects, "shape"):
            colour = question.text.removeprefix("Which shape is ").removesuffix("?")
            (only,) = [o for o in objects if o.colour == colour]
            assert question.answer == only.shape
        for question in scene_questions(objects, "count"):
            colour = question.text.removeprefix("How many objects are ").removesuffix("?")
            assert int(question.answer) == sum(o.colour == colour for o in objects)
        for question in scene_questions(objects, "digit"):
            colour, shape = question.text[:-1].split()[-2:]
            (only,) = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
            assert question.answer == only.digit
    with pytest.raises(ValueError, match="unknown question type"):
        scene_questions(objects, "size")


def test_more_questions_are_new_distinct_and_seeded():
    """Guards against follow-ups repeating the planted question or each other, or depending on
    anything but the given generator."""
    example = make_example(9, "train")
    first = more_questions(example, np.random.default_rng(5), 6)
    assert first == more_questions(example, np.random.default_rng(5), 6)
    texts = [q.text for q in first]
    assert example.question not in texts and len(set(texts)) == len(texts)
    every = {q.text for qtype in QTYPES for q in scene_questions(example.objects, qtype)}
    assert set(texts) <= every
    assert len(more_questions(example, np.random.default_rng(5), 10_000)) == len(every) - 1


def dataset_at_level(level: float, n: int) -> list[Example]:
    return [make_example((0, index), "train", level) for index in range(n)]


def test_exact_match_normalisation():
    """Guards against marking "Red." or " red " wrong against "red", or "re d" right."""
    assert exact_match("Red.", "red")
    assert exact_match("  3 ", "3")
    assert exact_match("BLUE..", "blue")
    assert exact_match("light  blue", "light blue")
    assert not exact_match("re d", "red")
    assert not exact_match("red", "blue")
    assert not exact_match("", "red")


def test_a_448_image_is_five_tiles():
    """Guards against a tiling that gives the 448 px images fewer tiles than the pruning study assumes."""
    tiling = TilingConfig(tile_size=224, min_tiles=1, max_tiles=6, use_thumbnail=True, tokens_per_tile=16)
    layout = compute_layout(IMAGE_SIZE, IMAGE_SIZE, tiling)
    assert (layout.grid_columns, layout.grid_rows, layout.thumbnail, layout.num_tiles) == (2, 2, True, 5)


# ---------------------------------------------------------------------------
# The committed pair
# ---------------------------------------------------------------------------


# The pairs are trained by bench/train_pair.py and committed with their cards; until one is, its
# tests say so instead of failing on a missing file. Once <dir>/accuracy.json exists they run.
@dataclass(frozen=True)
class CommittedPair:
    family: str
    directory: Path
    prefix: str  # checkpoint names: <prefix>-small, <prefix>-large
    image_size: tuple[int, int]  # (width, height) of every image of the family
    tiles: int  # tiles of such an image (grid + thumbnail)
    max_new_tokens: int  # the trainer's generation length for the card's accuracy
    floor: float  # the small model's accuracy must exceed it (well above chance: it really answers)

    def names(self) -> tuple[str, str]:
        return (f"{self.prefix}-small", f"{self.prefix}-large")

    def record(self) -> dict:
        return json.loads((self.directory / "accuracy.json").read_text())


COMMITTED = {
    "basic": CommittedPair("basic", MODELS_DIR, "synthetic", (IMAGE_SIZE, IMAGE_SIZE), 5, 4, 0.3),
    "crowded": CommittedPair("crowded", MODELS_DIR / "crowded", "crowded", CROWDED_CANVAS, 3, 6, 0.2),
}


def committed(family: str):
    pair = COMMITTED[family]
    mark = pytest.mark.skipif(
        not (pair.directory / "accuracy.json").exists(),
        reason=f"the {family} pair is not committed yet ({pair.directory}/accuracy.json absent; bench/train_pair.py)",
    )
    return pytest.param(pair, marks=mark, id=family)


ALL_PAIRS = [committed(family) for family in COMMITTED]


@pytest.mark.parametrize("pair", ALL_PAIRS)
@pytest.mark.parametrize("size", ["small", "large"])
def test_committed_checkpoint_loads_like_any_hf_checkpoint(pair, size):
    """Guards against a committed pair that transformers or the torch-free edge reader cannot load."""
    from stitchvlm.shared.model_files import ModelFiles

    path = pair.directory / f"{pair.prefix}-{size}"
    files = ModelFiles.load(path)
    layout = compute_layout(*pair.image_size, files.tiling)
    assert layout.num_tiles == pair.tiles
    assert layout.num_visual_tokens == pair.tiles * files.tiling.tokens_per_tile
    size_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size_bytes < 30e6


@pytest.mark.slow
@pytest.mark.parametrize("pair", ALL_PAIRS)
def test_committed_pair_answers_as_recorded(pair):
    """Guards against committed weights, card and serving inputs drifting apart: re-generate 60 test answers.

    Loads each model with ``from_pretrained`` and its files with ``ModelFiles``,
    builds inputs with ``build_prompt`` / ``preprocess_image``, decodes with the
    checkpoint's own transformers tokenizer, and compares with accuracy.json.
    """
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from stitchvlm.shared.model_files import ModelFiles
    from stitchvlm.shared.preprocess import preprocess_image
    from stitchvlm.shared.prompt import build_prompt

    torch.set_num_threads(1)
    record = pair.record()
    examples = dataset("test", CHECKED_TEST_EXAMPLES, seed=record["meta"]["seed"], family=pair.family)
    accuracy = {}
    for name in pair.names():
        model = InternVLForConditionalGeneration.from_pretrained(pair.directory / name).eval()
        files = ModelFiles.load(pair.directory / name)
        tokenizer = AutoTokenizer.from_pretrained(pair.directory / name)
        predictions = []
        with torch.no_grad():
            for example in examples:
                pixels, layout = preprocess_image(example.image, files.tiling)
                ids = torch.from_numpy(
                    build_prompt(files, example.question, layout.num_visual_tokens).input_ids
                )
                output = model.generate(
                    input_ids=ids[None],
                    attention_mask=torch.ones_like(ids)[None],
                    pixel_values=torch.from_numpy(pixels),
                    max_new_tokens=pair.max_new_tokens,
                    do_sample=False,
                )
                predictions.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
        recorded = record["models"][name.removeprefix(f"{pair.prefix}-")]
        flips = sum(p != r for p, r in zip(predictions, recorded["test"]["predictions"], strict=False))
        assert flips <= ALLOWED_FLIPS, (
            f"{name}: {flips} of {CHECKED_TEST_EXAMPLES} answers differ from accuracy.json"
        )
        accuracy[name] = np.mean(
            [exact_match(p, e.answer) for p, e in zip(predictions, examples, strict=True)]
        )
        assert abs(accuracy[name] - recorded["first_60_accuracy"]) <= ALLOWED_FLIPS / CHECKED_TEST_EXAMPLES
    # The pair must really answer, and the large model must be the better one; neither is perfect.
    small, large = pair.names()
    assert pair.floor < accuracy[small] < accuracy[large] < 1.0


@pytest.mark.parametrize("pair", ALL_PAIRS)
def test_recorded_accuracy_matches_predictions_and_meets_the_gap(pair):
    """Guards against a card whose figures do not follow from its predictions, or a pair without a gap.

    Regenerates the test split, re-scores the recorded predictions with ``exact_match``
    (overall and per question type), and checks the issues' requirement: the large
    model at least 10 points better overall than the small one, neither at 100%.
    """
    record = pair.record()
    meta = record["meta"]
    examples = dataset("test", meta["test_examples"], seed=meta["seed"], family=pair.family)
    overall = {}
    for name, result in record["models"].items():
        test = result["test"]
        correct = [exact_match(p, e.answer) for p, e in zip(test["predictions"], examples, strict=True)]
        assert test["correct"] == correct
        assert test["accuracy"] == pytest.approx(np.mean(correct))
        for qtype in family_qtypes(pair.family):
            of_type = [ok for ok, e in zip(correct, examples, strict=True) if e.qtype == qtype]
            assert test["per_qtype"][qtype] == pytest.approx(np.mean(of_type)), (name, qtype)
        assert result["first_60_accuracy"] == pytest.approx(np.mean(correct[:CHECKED_TEST_EXAMPLES]))
        overall[name] = test["accuracy"]
    assert set(overall) == {"small", "large"}
    assert overall["large"] >= overall["small"] + 0.10
    assert overall["large"] < 1.0 and overall["small"] < 1.0
