"""The pair trainer's inputs (bench/train_pair.py, bench/grounding.py) against independent references.

What the trainer feeds the model must be what serving feeds it (prompt ids,
pixels) plus well-formed training-only extras (follow-up turns rendered by
transformers' own chat template, grounding targets that name the object under
each token, early-answer positions on the question's last word).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # train_pair imports its sibling grounding.py, as when run as a script

import grounding  # noqa: E402
import train_pair  # noqa: E402
import train_state  # noqa: E402
from transformers import AutoTokenizer, InternVLForConditionalGeneration  # noqa: E402

from stitchvlm.cloud.checkpoints import build_tokenizer, save_checkpoint, tiny_internvl_config  # noqa: E402
from stitchvlm.shared.model_files import ModelFiles  # noqa: E402
from stitchvlm.shared.preprocess import compute_layout, preprocess_image  # noqa: E402
from stitchvlm.shared.synthetic import (  # noqa: E402
    CELL,
    COLOURS,
    DIGITS,
    SHAPES,
    make_example,
    more_questions,
    vocabulary_corpus,
)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """An untrained checkpoint of the small preset with the pair's tokenizer and tiling."""
    tokenizer = build_tokenizer(vocabulary_corpus())
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(tiny_internvl_config(train_pair.PRESETS["small"], tokenizer))
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("pair") / "small", train_pair.TILING)


def test_conversation_ids_equal_transformers_chat_template(small_dir):
    """Guards against training turns that serving would never produce: the whole multi-turn sequence
    must be transformers' ``apply_chat_template`` of the conversation with the image expanded as
    ``InternVLProcessor`` expands it; labels only on the answers and their ``<|im_end|>``."""
    files = ModelFiles.load(small_dir)
    hf = AutoTokenizer.from_pretrained(small_dir)
    for seed in range(4):
        example = make_example(seed, "train")
        follow_ups = more_questions(example, np.random.default_rng(seed), 3)
        encoded = train_pair.encode_example(files, example, follow_ups)

        content = [{"type": "image"}, {"type": "text", "text": example.question}]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": example.answer}]
        for question in follow_ups:
            messages += [
                {"role": "user", "content": question.text},
                {"role": "assistant", "content": question.answer},
            ]
        text = hf.apply_chat_template(messages, tokenize=False)
        n = encoded.layout.num_visual_tokens
        text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * n + "</img>", 1)
        reference = hf(text)["input_ids"]
        # the template's last "\n" follows the final <|im_end|>; generation never sees it
        assert encoded.input_ids.tolist() == reference[:-1] and hf.decode(reference[-1:]) == "\n"

        supervised = encoded.labels[encoded.labels != train_pair.IGNORE_INDEX]
        answers = [example.answer, *(q.answer for q in follow_ups)]
        assert hf.decode(supervised.tolist()) == "".join(f"{a}<|im_end|>" for a in answers)
        assert np.array_equal(encoded.labels[encoded.labels != train_pair.IGNORE_INDEX], supervised)

        # early answers: the token right before each "?" ends the question's last word
        questions = [example.question, *(q.text for q in follow_ups)]
        assert len(encoded.early) == len(questions)
        for (position, first_id), question, answer in zip(encoded.early, questions, answers, strict=True):
            last_word = question[:-1].split()[-1]
            assert hf.decode(encoded.input_ids[position : position + 2].tolist()).strip() == f"{last_word}?"
            assert first_id == hf(answer, add_special_tokens=False)["input_ids"][0]


def test_batch_pixels_equal_serving_pixels_bit_for_bit(small_dir):
    """Guards against the trainer's fast uint8 -> float path drifting from ``preprocess_image``."""
    files = ModelFiles.load(small_dir)
    examples = [make_example(seed, "train") for seed in range(3)]
    batch = train_pair.collate(files, examples)
    serving = np.concatenate([preprocess_image(e.image, files.tiling)[0] for e in examples])
    assert batch["pixel_values"].dtype == torch.float32
    assert np.array_equal(batch["pixel_values"].numpy(), serving)


def test_grounding_targets_name_the_object_in_its_token_cell():
    """Guards against targets that label the wrong token: computed here from the cell grid (an
    object in cell (column, row) is grid tile (row // 4) * 2 + column // 4, token (row % 4) * 4 +
    column % 4), independently of ``token_regions``."""
    layout = compute_layout(448, 448, train_pair.TILING)
    assert layout.grid_columns == layout.grid_rows == 2 and layout.tokens_per_tile == 16
    for seed in range(10):
        example = make_example(seed, "train")
        targets = grounding.token_targets(example, layout)  # [80, 3]
        expected = np.zeros((64, 3), dtype=np.int64)  # the four grid tiles' tokens
        for obj in example.objects:
            column, row = int(obj.centre[0] // CELL), int(obj.centre[1] // CELL)
            token = ((row // 4) * 2 + column // 4) * 16 + (row % 4) * 4 + column % 4
            digit = 0 if obj.digit is None else 1 + DIGITS.index(obj.digit)
            expected[token] = (1 + list(COLOURS).index(obj.colour), 1 + SHAPES.index(obj.shape), digit)
        assert np.array_equal(targets[:64], expected)
        # thumbnail tokens (112 px of the image each) name one of the objects they hold, or none
        for token in range(16):
            ty, tx = divmod(token, 4)
            inside = [o for o in example.objects if o.centre[0] // 112 == tx and o.centre[1] // 112 == ty]
            colour, shape, _ = targets[64 + token]
            if not inside:
                assert (colour, shape) == (0, 0)
            else:
                assert (colour, shape) in {
                    (1 + list(COLOURS).index(o.colour), 1 + SHAPES.index(o.shape)) for o in inside
                }


def test_projector_tap_returns_the_embeddings_spliced_into_the_prompt(small_dir):
    """Guards against grounding heads reading other vectors than the visual tokens the LM gets."""
    files = ModelFiles.load(small_dir)
    model = InternVLForConditionalGeneration.from_pretrained(small_dir).eval()
    tap = grounding.ProjectorTap(model)
    batch = train_pair.collate(files, [make_example(seed, "train") for seed in range(2)])
    with torch.no_grad():
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
        features = model.model.get_image_features(batch["pixel_values"]).pooler_output
    tap.remove()
    assert torch.equal(tap.visual_embeds(2), features.reshape(2, -1, features.shape[-1]))


def test_a_few_training_steps_run_and_lower_the_loss(small_dir, tmp_path):
    """Guards against the training loop (follow-ups, grounding, early answers, curriculum) crashing
    or not learning: a handful of steps on one repeated batch must lower the answer loss."""
    files = ModelFiles.load(small_dir)
    config = train_pair.TrainConfig(
        steps=12, batch=2, lr=3e-3, eval_every=0, questions=3, grounding=1.0, early_answer=1.0
    )
    val = [make_example(seed, "val") for seed in range(2)]
    model, stats = train_pair.train_model(
        "small", train_pair.PRESETS["small"], files, config, torch.device("cpu"), val
    )
    assert stats["steps"] == 12 and len(stats["history"]) == 1 and stats["history"][0]["step"] == 12
    assert stats["final_loss"] < stats["first_loss"]


def test_separate_runs_merge_into_one_record(tmp_path):
    """Guards against a second per-model run (``--models large`` after ``--models small``) dropping the
    first model from accuracy.json: the meta it compares holds tuples (TilingConfig) where the file,
    read back from JSON, holds lists."""
    import model_card

    meta = {"seed": 0, "test_examples": 300, "tiling": train_pair.asdict(train_pair.TILING)}
    model_card.write_accuracy(tmp_path, {"small": {"test": {"accuracy": 0.5}}}, meta)
    merged = model_card.merge_results(
        tmp_path, {"large": {"test": {"accuracy": 0.7}}}, meta, ["small", "large"]
    )
    assert list(merged) == ["small", "large"] and merged["small"]["test"]["accuracy"] == 0.5
    other_test = {**meta, "test_examples": 100}
    assert list(model_card.merge_results(tmp_path, {"large": {}}, other_test, ["small", "large"])) == [
        "large"
    ]


# ----------------------------------------------------------------------------- the crowded family


@pytest.fixture(scope="module")
def crowded_small_dir(tmp_path_factory) -> Path:
    """An untrained checkpoint of the crowded family's small preset, its tokenizer and tiling."""
    tokenizer = build_tokenizer(vocabulary_corpus("crowded"))
    torch.manual_seed(0)
    preset = train_pair.CROWDED_PRESETS["small"]
    model = InternVLForConditionalGeneration(tiny_internvl_config(preset, tokenizer))
    out = tmp_path_factory.mktemp("crowded") / "small"
    return save_checkpoint(model, tokenizer, out, train_pair.CROWDED_TILING)


def test_crowded_grounding_targets_put_the_tens_left_and_the_units_right():
    """Guards against crowded targets naming the wrong object, missing the size, or giving every
    token of a two-digit number the same digit: computed here from the 8 x 4 cell grid (cell
    (column, row) is grid tile column // 4, tokens (2 row + dy, 2 (column % 4) + dx) of 8 x 8)."""
    from stitchvlm.shared import synthetic_crowded as crowded

    layout = compute_layout(*crowded.CANVAS, train_pair.CROWDED_TILING)
    assert (layout.grid_columns, layout.grid_rows, layout.tokens_per_tile) == (2, 1, 64)
    names = grounding.CROWDED_ATTRIBUTES
    numbers_seen = 0
    for seed in range(6):
        example = make_example(seed, "train", family="crowded")
        targets = grounding.token_targets(example, layout)  # [192, 4]
        assert targets.shape == (192, 4)
        for obj in example.objects:
            column, row = crowded.cell_of(obj)
            under = (int(obj.centre[0] // 28) % 2, int(obj.centre[1] // 28) % 2)  # a small one's token
            for dy in (0, 1):
                for dx in (0, 1):
                    token = (column // 4) * 64 + (2 * row + dy) * 8 + 2 * (column % 4) + dx
                    colour, shape, size, digit = targets[token]
                    if obj.size == "small" and (dx, dy) != under:  # a small object fills one token
                        assert (colour, shape, size, digit) == (0, 0, 0, 0)
                        continue
                    assert (colour, shape, size) == (
                        1 + names["colour"].index(obj.colour),
                        1 + names["shape"].index(obj.shape),
                        1 + names["size"].index(obj.size),
                    )
                    expected = 0 if obj.digit is None else 1 + DIGITS.index(obj.digit[dx])
                    assert digit == expected
                    numbers_seen += obj.digit is not None
    assert numbers_seen > 0


def test_grounding_loss_scores_colour_on_background_only_when_asked(monkeypatch):
    """Guards against the crowded family's grounding pulling every background token towards one
    "background" colour (a ready-made attention sink) or the basic family's losing that term:
    against cross-entropies computed here in numpy."""
    rng = np.random.default_rng(0)
    classes = [8, 8, 3, 11]  # colour, shape, size, digit: 1 + classes each (0: background / none)
    n = 40
    targets = np.zeros((n, 4), dtype=np.int64)
    objects = rng.random(n) < 0.5
    for i, c in enumerate(classes[:3]):
        targets[objects, i] = rng.integers(1, c, objects.sum())
    digits = objects & (rng.random(n) < 0.5)
    targets[digits, 3] = rng.integers(1, classes[3], digits.sum())
    logits = [rng.normal(size=(n, c)) for c in classes]

    def cross_entropy(z, y):
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))

    where = [objects, objects, objects, digits]
    on_objects = [cross_entropy(z[w], t[w]) for z, t, w in zip(logits, targets.T, where, strict=True)]
    everywhere = [cross_entropy(logits[0], targets[:, 0]), *on_objects[1:]]
    as_torch = [torch.from_numpy(z) for z in logits], torch.from_numpy(targets)[None]
    with_background = grounding.attribute_loss(*as_torch).item()
    without = grounding.attribute_loss(*as_torch, background=False).item()
    assert with_background == pytest.approx(np.mean(everywhere), rel=1e-9)
    assert without == pytest.approx(np.mean(on_objects), rel=1e-9)
    calls = []

    def record(*args, ground_background, **kwargs):
        calls.append(ground_background)
        raise StopIteration  # the step's batch and flags are all this test needs

    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}
    monkeypatch.setattr(train_pair, "training_losses", record)
    monkeypatch.setattr(train_pair, "training_batch", lambda files, config, step: batch)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    for family in ("basic", "crowded"):
        config = train_pair.TrainConfig(
            steps=1, family=family, early_answer=1.0 if family == "basic" else 0.0
        )
        with pytest.raises(StopIteration):
            train_pair.train_step(None, None, None, None, optimizer, None, config, 0, "cpu", None)
    assert calls == [True, False]


def test_the_crowded_family_refuses_the_early_answer_loss():
    """Guards against training the crowded pair with the loss that moves answers into the question's
    text positions (issue 12: it lets late layers ignore the image, so pruning can never hurt)."""
    with pytest.raises(ValueError, match="shortcuts"):
        train_pair.TrainConfig(steps=1, family="crowded", early_answer=1.0)
    with pytest.raises(SystemExit):
        train_pair.parse_args(["--family", "crowded", "--early-answer", "0.5"])
    assert train_pair.parse_args(["--family", "crowded"]).early_answer == 0.0
    assert train_pair.parse_args([]).early_answer == 1.0


def test_an_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(crowded_small_dir, tmp_path):
    """Guards against a resume that loses optimizer moments, restarts the schedule or the data stream,
    or skips / repeats a step: 5 seeded steps with checkpoints every 2, halted after 3 (the third
    step lost, as in a kill) and resumed, end bit-for-bit at the uninterrupted run's weights."""
    files = ModelFiles.load(crowded_small_dir)
    preset = train_pair.CROWDED_PRESETS["small"]
    config = train_pair.TrainConfig(
        steps=5, batch=2, questions=2, eval_every=0, early_answer=0.0, family="crowded", curriculum=0.5
    )
    val = [make_example(0, "val", family="crowded")]
    cpu = torch.device("cpu")
    whole, whole_stats = train_pair.train_model(
        "small", preset, files, config, cpu, val, tmp_path / "whole.pt", checkpoint_every=2
    )
    checkpoint = tmp_path / "halted.pt"
    _, halted = train_pair.train_model(
        "small", preset, files, config, cpu, val, checkpoint, checkpoint_every=2, halt_after=3
    )
    assert halted == {"halted_at": 3}
    assert torch.load(checkpoint, weights_only=False)["progress"]["step"] == 2
    portable = tmp_path / "portable.pt"  # of the step-2 checkpoint, resumed below
    assert train_state.main(["portable", str(checkpoint), str(portable)]) == 0
    resumed, resumed_stats = train_pair.train_model(
        "small", preset, files, config, cpu, val, checkpoint, checkpoint_every=2, resume=True
    )
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed_stats["first_loss"] == whole_stats["first_loss"]
    assert resumed_stats["history"] == whole_stats["history"]

    other = train_pair.TrainConfig(**{**train_pair.asdict(config), "lr": 5e-4})
    with pytest.raises(ValueError, match="another run"):
        train_pair.train_model("small", preset, files, other, cpu, val, checkpoint, resume=True)

    # The step-2 checkpoint made portable (no optimizer state): a resume from it runs steps 2-4 with fresh
    # AdamW moments at REWARM_STEPS' ramp of the schedule's learning rate; computed here step by step.
    assert train_state.main(["portable", str(portable), str(tmp_path / "again.pt")]) == 2  # already is
    state = torch.load(portable, weights_only=False)
    assert "optimizer" not in state and portable.stat().st_size < checkpoint.stat().st_size
    ramped, ramped_stats = train_pair.train_model(
        "small", preset, files, config, cpu, val, portable, checkpoint_every=2, resume=True
    )
    torch.manual_seed(config.seed)
    model = InternVLForConditionalGeneration(tiny_internvl_config(preset, files.tokenizer)).train()
    heads = train_pair.make_heads(model, files, config, cpu)
    tap = train_pair.ProjectorTap(model)
    trained = torch.nn.ModuleList([model, heads])
    trained.load_state_dict(state["trained"])
    optimizer = train_pair.make_optimizer(trained, config)
    torch.set_rng_state(state["torch_rng"])
    means = train_pair.RunningMeans()
    for step in range(2, 5):
        scale = (step - 2 + 1) / train_state.REWARM_STEPS
        train_pair.train_step(model, heads, tap, trained, optimizer, files, config, step, cpu, means, scale)
    tap.remove()
    expected, got = model.state_dict(), ramped.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not all(torch.equal(whole.state_dict()[k], got[k]) for k in expected)  # the ramp changed them
    assert torch.load(portable, weights_only=False)["progress"]["rewarm_from"] == 2  # later saves keep it
    assert ramped_stats["steps"] == 5 and ramped_stats["first_loss"] == whole_stats["first_loss"]


def test_the_crowded_card_lists_its_own_question_types_tiles_and_models(tmp_path):
    """Guards against a crowded record rendered with the basic family's card (its question types,
    chance levels, 5 tiles of 16 tokens and synthetic-* names)."""
    import model_card

    from stitchvlm.shared import synthetic_crowded

    qtypes = synthetic_crowded.QTYPES
    test = {"accuracy": 0.25, "per_qtype": {q: 0.25 for q in qtypes}}
    preset = train_pair.asdict(train_pair.CROWDED_PRESETS["small"])
    train = {"parameters": 890_000, "preset": preset, "history": [{"step": 500, "val_accuracy": 0.2}]}
    meta = {
        "family": "crowded",
        "seed": 0,
        "test_examples": 300,
        "tiling": train_pair.asdict(train_pair.CROWDED_TILING),
        "vocab_size": 486,
        "device": "cpu",
        "torch": "2.13.0",
        "platform": "linux",
        "val_examples": 200,
    }
    record = {"small": {"train": train, "test": test, "first_60_accuracy": 0.25, "checkpoint_mb": 3.6}}
    model_card.write_accuracy(tmp_path, record, meta)
    model_card.write_model_card(tmp_path)
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "| model | overall | " + " | ".join(qtypes) + " | first 60 |" in card
    assert "| crowded-small | 25.0 |" in card and "synthetic-" not in card
    assert "2 x 1 grid + thumbnail = 3 tiles, 64 tokens per tile, 192 visual tokens" in card
    assert "number 1/90" in card and "early-answer loss" in card and "warm-up" in card
    assert "- crowded-small (step: accuracy on 200 val examples): 500: 20%" in card


def test_a_run_extended_by_a_warm_restart_ends_with_the_weights_of_one_trained_with_it(
    crowded_small_dir, tmp_path
):
    """Guards against an extension that restarts the stream or the optimizer, keeps the old schedule's
    floor, or resumes from a checkpoint of another extension: 3 seeded steps, then 2 more after a warm
    restart resumed from their checkpoint, end bit-for-bit at a 3 + 2 step run's weights."""
    files = ModelFiles.load(crowded_small_dir)
    preset = train_pair.CROWDED_PRESETS["small"]
    config = train_pair.TrainConfig(
        steps=3, batch=2, questions=2, eval_every=0, early_answer=0.0, family="crowded", curriculum=0.5
    )
    extended = train_pair.replace(config, extra_steps=2, extra_lr=5e-4)
    assert [train_pair.learning_rate(s, extended) for s in range(3)] == [
        train_pair.learning_rate(s, config) for s in range(3)
    ]
    assert train_pair.learning_rate(3, extended) == 5e-4  # warmup of one step, then cosine from the new peak
    assert train_pair.curriculum_level(4, extended) == 1.0
    val = [make_example(0, "val", family="crowded")]
    cpu = torch.device("cpu")
    whole, whole_stats = train_pair.train_model(
        "small", preset, files, extended, cpu, val, tmp_path / "whole.pt"
    )
    first = tmp_path / "first.pt"
    train_pair.train_model("small", preset, files, config, cpu, val, first)
    resumed, stats = train_pair.train_model("small", preset, files, extended, cpu, val, first, resume=True)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert stats["steps"] == whole_stats["steps"] == 5
    import model_card

    row = model_card._model_row("crowded-small", {"train": stats, "checkpoint_mb": 3.6})
    assert "| 3 + 2 x 2 x 2 | 0.001, then 0.0005 |" in row
    other = train_pair.replace(config, extra_steps=3)
    with pytest.raises(ValueError, match="another run"):
        train_pair.train_model("small", preset, files, other, cpu, val, tmp_path / "whole.pt", resume=True)
