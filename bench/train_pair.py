"""Train the synthetic pair: a small and a large InternVL from scratch on ``stitchvlm.shared.synthetic``.

    python bench/train_pair.py --out shared/models [--models small large --small-steps 3000
                                --large-steps 8000 --batch 8 --seed 0 --device cpu|cuda --threads 2]
    python bench/train_pair.py --family crowded --models large --threads 1 --resume

Both models share one tokenizer (``build_tokenizer`` over the dataset's
vocabulary) and one tiling, and see the same training stream. Inputs are built
exactly as serving builds them (``build_prompt``, ``answer_ids``,
``preprocess_image`` of a checkpoint's own files), so training and serving see
identical token sequences and pixels. Each image is one multi-turn conversation
(``--questions`` per image); the loss covers the answer tokens and their closing
``<|im_end|>``, plus two auxiliary losses whose heads are dropped after training
(``bench/grounding.py``; early answer at the question's last word). AdamW with
linear warmup and cosine decay; seeded, so the same arguments on the same device
and thread count give the same weights.

Writes ``<out>/synthetic-small`` and ``<out>/synthetic-large`` (InternVL3-*-hf
layout via ``save_checkpoint``), ``<out>/accuracy.json`` (per-example test
predictions, accuracy overall and per question type) and ``<out>/MODEL_CARD.md``.
``--family`` picks the task family (``synthetic.FAMILIES``) and with it the
presets (``FAMILY_PRESETS``: for ``crowded`` a 12-layer large LM), the tiling
(``FAMILY_TILING``: 64 tokens per tile for ``crowded``) and the output names
(``crowded-small`` / ``crowded-large`` under ``shared/models/crowded`` by default).
The early-answer loss moves the answer into the question's text positions
within the first layers, a shortcut of where the answer's attention goes, so
the crowded family refuses it (its default weight there is 0); the grounding
loss only shapes what each visual token's embedding says, not which tokens the
LM reads, and stays (``--grounding 0`` turns it off).

Training is resumable: every ``--checkpoint-every`` steps (and at the end) the
model, grounding heads, optimizer, step, running means and history go to
``<checkpoint-dir>/<name>.pt`` (written whole, then renamed); ``--resume``
continues from there, and a resumed run ends with the weights of an
uninterrupted one (same device and thread count). ``--extra-steps N`` adds a
warm restart after the schedule (warmup to ``--extra-lr``, cosine down again,
scenes at full difficulty, new training images): with ``--resume`` it extends
a run that trained without it, from its checkpoint.

It does not export ONNX or tune thresholds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from grounding import (  # bench/grounding.py
    GroundingHeads,
    ProjectorTap,
    TiedGroundingHeads,
    attribute_accuracy,
    attribute_loss,
    attributes_of,
    stack_targets,
    token_targets,
)
from model_card import (
    checkpoint_megabytes,
    merge_results,
    write_accuracy,
    write_model_card,
)  # bench/model_card.py
from pair_presets import (  # bench/pair_presets.py; the tables are re-exported for callers of train_pair
    CROWDED_PRESETS,  # noqa: F401
    CROWDED_TILING,  # noqa: F401
    FAMILY_MAX_NEW_TOKENS,
    FAMILY_OUT,
    FAMILY_PREFIX,
    FAMILY_PRESETS,
    FAMILY_TILING,
    PRESETS,
    TILING,  # noqa: F401
)
from train_state import Progress, load_state, rewarm_scale, save_state  # bench/train_state.py
from transformers import InternVLForConditionalGeneration

from stitchvlm.cloud.checkpoints import (
    TinyPreset,
    build_tokenizer,
    save_checkpoint,
    tiny_internvl_config,
)
from stitchvlm.shared.layout import Layout
from stitchvlm.shared.model_files import ModelFiles
from stitchvlm.shared.preprocess import normalize_tiles, preprocess_image, tile_image
from stitchvlm.shared.prompt import answer_ids, build_prompt, decode_answer, render_chat_template
from stitchvlm.shared.synthetic import (
    DEFAULT_FAMILY,
    FAMILIES,
    Example,
    Question,
    exact_match,
    family_qtypes,
    iter_dataset,
    more_questions,
    vocabulary_corpus,
)

IGNORE_INDEX = -100  # label of positions outside the loss
FOLLOW_UP_SALT = 0xF0110  # salts the random stream that picks a training image's follow-up questions
TEST_EXAMPLES = 300  # fixed test split size the card reports


@dataclass(frozen=True)
class TrainConfig:
    """One model's optimisation schedule."""

    steps: int  # optimizer steps
    batch: int = 8  # images per step
    lr: float = 1e-3  # peak learning rate
    warmup: float = 0.05  # fraction of steps with linear warmup
    min_lr: float = 0.05  # final learning rate as a fraction of the peak (cosine floor)
    weight_decay: float = 0.05  # AdamW decoupled decay (matrices only)
    grad_clip: float = 1.0  # global gradient-norm clip
    eval_every: int = 1000  # steps between validation accuracy checks (0: only at the end)
    val_examples: int = 200  # validation examples per check
    seed: int = 0  # weight init and training-stream seed
    # Fraction of steps over which scenes go from 2 objects to the standard 3-6: with two, which object
    # a question means is a coin flip the model soon learns to call; with six, the first signal is faint.
    curriculum: float = 0.25
    # Questions asked about each training image: the first as serving asks it, the rest as follow-up
    # turns of one conversation (the image's tokens are computed once for all of them).
    questions: int = 4
    # Weight of a loss on predicting the answer's first token at the question's last word (the word
    # that names the object: "What colour is the triangle?"). That is one attention hop from the
    # image; the answer position proper needs two (find the word, then the object), and a model from
    # scratch sits on a long plateau before it finds both at once.
    early_answer: float = 1.0
    # Weight of the auxiliary grounding loss (grounding.py) next to the answer loss; 0 turns it off.
    grounding: float = 1.0
    # Read the grounding targets through the LM's tied word embeddings (TiedGroundingHeads), or
    # through separate linear heads (GroundingHeads).
    tied_grounding: bool = True
    family: str = DEFAULT_FAMILY  # task family of the training stream (synthetic.FAMILIES)
    # A warm restart after the first schedule: ``extra_steps`` more steps, warmup (the same fraction of
    # them) to ``extra_lr``, then cosine to ``extra_lr * min_lr``; scenes stay at level 1 (the curriculum
    # is a fraction of ``steps``) and the training stream goes on past step ``steps``. A run's first
    # ``steps`` steps do not depend on it, so a run trained without it extends by resuming with it.
    extra_steps: int = 0
    extra_lr: float = 3e-4

    @property
    def total_steps(self) -> int:
        return self.steps + self.extra_steps

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown task family {self.family!r}; expected one of {FAMILIES}")
        if self.extra_steps < 0:
            raise ValueError(f"extra_steps must be >= 0, got {self.extra_steps}")
        if self.family != "basic" and self.early_answer > 0:
            # Issue 12: the answer read off at the question's last word lets the late layers and the
            # generated tokens ignore the image, which is where the pruning study must look.
            raise ValueError(
                "the early-answer loss shortcuts where attention goes; it is for the basic family only"
            )


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Encoded:
    """One training conversation about one image."""

    input_ids: np.ndarray  # [S] int64
    labels: np.ndarray  # [S] int64: answer ids (with EOS) on the answers, IGNORE_INDEX elsewhere
    tiles: np.ndarray  # [tiles, 3, tile, tile] uint8, what preprocess_image normalises
    layout: Layout
    # (position, answer's first id) per question: the question's last word, which names the object
    early: list[tuple[int, int]]


def encode_example(files: ModelFiles, example: Example, follow_ups: Sequence[Question] = ()) -> Encoded:
    """One example as serving builds its prompt and tiles, plus ``follow_ups`` as further turns.

    The first turn is exactly what serving sends (``build_prompt``) followed by the answer and
    ``<|im_end|>``; each of ``follow_ups`` adds a user turn and its answer, rendered by the
    checkpoint's chat template as a multi-turn conversation about the same image.
    """
    tiles, layout = tile_image(example.image, files.tiling)
    prompt = build_prompt(files, example.question, layout.num_visual_tokens).input_ids
    pieces = [(prompt, False), (answer_ids(files, example.answer, add_eos=True), True)]
    for question in follow_ups:
        turn = render_chat_template(files, [{"role": "user", "content": question.text}])
        # "\n" closes the previous assistant turn as the template renders it ("<|im_end|>\n")
        pieces.append((files.tokenizer.encode("\n" + turn, add_special_tokens=False).ids, False))
        pieces.append((answer_ids(files, question.answer, add_eos=True), True))
    input_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in pieces])
    labels = np.concatenate(
        [
            np.asarray(ids, dtype=np.int64) if answer else np.full(len(ids), IGNORE_INDEX)
            for ids, answer in pieces
        ]
    )
    # Every question ends "?<|im_end|>": the token before "?" ends the word that names the object.
    marks = np.flatnonzero(input_ids == files.tokenizer.token_to_id("?"))
    starts = np.flatnonzero((labels != IGNORE_INDEX) & (np.roll(labels, 1) == IGNORE_INDEX))  # answers
    if len(marks) != len(starts):
        raise ValueError(f"{len(marks)} question marks for {len(starts)} answers: {example.question!r}")
    early = [(int(mark) - 1, int(input_ids[start])) for mark, start in zip(marks, starts, strict=True)]
    return Encoded(input_ids, labels, tiles, layout, early)


def collate(
    files: ModelFiles,
    examples: list[Example],
    grounding: bool = False,
    follow_ups: Sequence[Sequence[Question]] | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask, labels ``[batch, seq]``; pixel_values ``[tiles, 3, h, w]``.

    With ``grounding``, also ``token_targets`` ``[batch, V, 3]`` (``grounding.token_targets``);
    ``follow_ups[i]``: further questions about example i's image (``encode_example``).
    """
    follow_ups = follow_ups or [()] * len(examples)
    encoded = [encode_example(files, e, f) for e, f in zip(examples, follow_ups, strict=True)]
    length = max(len(enc.input_ids) for enc in encoded)
    pad = files.pad_token_id if files.pad_token_id is not None else files.eos_token_ids[0]
    input_ids = np.full((len(encoded), length), pad, dtype=np.int64)
    labels = np.full((len(encoded), length), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(encoded), length), dtype=np.int64)
    for row, enc in enumerate(encoded):
        input_ids[row, : len(enc.input_ids)] = enc.input_ids
        labels[row, : len(enc.labels)] = enc.labels
        attention_mask[row, : len(enc.input_ids)] = 1
    tiles = np.concatenate([enc.tiles for enc in encoded])  # [tiles, 3, h, w] uint8
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "pixel_values": torch.from_numpy(normalize_tiles(tiles, files.tiling)),
        # [n, 3]: (row, position, answer's first id) of every question's last word
        "early_answers": torch.tensor(
            [(row, *pair) for row, enc in enumerate(encoded) for pair in enc.early]
        ),
    }
    if grounding:
        batch["token_targets"] = stack_targets(
            [token_targets(e, enc.layout) for e, enc in zip(examples, encoded, strict=True)]
        )
    return batch


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@torch.no_grad()
def greedy_answer(model: InternVLForConditionalGeneration, files: ModelFiles, example: Example) -> str:
    """The model's greedy answer to one example through ``model.generate`` (what serving runs),
    at most ``FAMILY_MAX_NEW_TOKENS`` of its family."""
    pixels, layout = preprocess_image(example.image, files.tiling)
    prompt = build_prompt(files, example.question, layout.num_visual_tokens).input_ids
    device = model.device
    input_ids = torch.from_numpy(prompt)[None].to(device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.from_numpy(pixels).to(device),
        max_new_tokens=FAMILY_MAX_NEW_TOKENS[example.family],
        do_sample=False,
    )
    return decode_answer(files, output[0, input_ids.shape[1] :].tolist())


def evaluate(model: InternVLForConditionalGeneration, files: ModelFiles, examples: list[Example]) -> dict:
    """Greedy predictions and exact-match accuracy, overall and per question type."""
    was_training = model.training
    model.eval()
    predictions = [greedy_answer(model, files, example) for example in examples]
    model.train(was_training)
    correct = [exact_match(p, e.answer) for p, e in zip(predictions, examples, strict=True)]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for ok, example in zip(correct, examples, strict=True):
        by_type[example.qtype].append(ok)
    qtypes = family_qtypes(examples[0].family) if examples else ()
    return {
        "n": len(examples),
        "accuracy": float(np.mean(correct)),
        "per_qtype": {q: float(np.mean(by_type[q])) for q in qtypes if by_type[q]},
        "predictions": predictions,
        "correct": correct,
    }


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine down to ``lr * min_lr`` at step ``steps``; past it, the
    same shape again over ``extra_steps`` with peak ``extra_lr``."""
    if step >= config.steps:
        return _warmup_cosine(step - config.steps, config.extra_steps, config.extra_lr, config)
    return _warmup_cosine(step, config.steps, config.lr, config)


def _warmup_cosine(step: int, steps: int, peak: float, config: TrainConfig) -> float:
    warmup = max(1, int(config.warmup * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_identity(config: TrainConfig, preset: TinyPreset) -> dict:
    """What a checkpoint must match to be resumed: config and preset (the restart's fields only when
    there is one, so checkpoints written before they existed still match)."""
    fields = asdict(config)
    if not config.extra_steps:
        del fields["extra_steps"], fields["extra_lr"]
    return {"config": fields, "preset": asdict(preset)}


def curriculum_level(step: int, config: TrainConfig) -> float:
    """Scene level of a step's images (``synthetic.scene_limits``): 0 at the start, 1 after the ramp."""
    ramp = config.curriculum * config.steps
    return 1.0 if ramp <= 0 else min(1.0, step / ramp)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # No decay on norms, biases and embeddings-like vectors: only matrices are decayed.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


def training_batch(files: ModelFiles, config: TrainConfig, step: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s batch: training examples ``step * batch ..``, each with its follow-up questions."""
    first = step * config.batch
    level = curriculum_level(step, config)
    examples = list(iter_dataset("train", config.batch, config.seed, first, level, config.family))
    follow_ups = [
        more_questions(
            example, np.random.default_rng([config.seed, first + i, FOLLOW_UP_SALT]), config.questions - 1
        )
        for i, example in enumerate(examples)
    ]
    return collate(files, examples, grounding=True, follow_ups=follow_ups)


def training_losses(
    model: InternVLForConditionalGeneration,
    heads: torch.nn.Module,
    tap: ProjectorTap,
    batch: dict[str, torch.Tensor],
    early_answer: bool = True,
    ground_background: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The losses of one batch (answers, early answers unless ``early_answer`` is off, grounding,
    whose colour term covers background tokens when ``ground_background``; ``TrainConfig`` weighs
    them) and the grounding heads' accuracies, for the progress line."""
    batch = dict(batch)
    targets = batch.pop("token_targets")  # [batch, V, 3]
    early = batch.pop("early_answers")  # [n, 3]: row, position, answer's first id
    output = model(**batch)
    grounding_logits = heads.logits(tap.visual_embeds(len(batch["input_ids"])))
    losses = {"answer": output.loss}
    if early_answer:
        early_logits = output.logits[early[:, 0], early[:, 1]]  # [n, vocab]
        losses["early"] = torch.nn.functional.cross_entropy(early_logits, early[:, 2])
    losses["grounding"] = attribute_loss(grounding_logits, targets, background=ground_background)
    with torch.no_grad():
        return losses, attribute_accuracy(grounding_logits, targets)


class RunningMeans:
    """Exponential moving averages of named losses, for the progress line and the history."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.values: dict[str, float] = {}

    def update(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            if math.isnan(value):  # e.g. no digit in this batch
                continue
            old = self.values.get(key, value)
            self.values[key] = self.decay * old + (1 - self.decay) * value

    def __str__(self) -> str:
        return " ".join(f"{key} {value:.4f}" for key, value in self.values.items())


def make_heads(model, files: ModelFiles, config: TrainConfig, device) -> torch.nn.Module:
    """The grounding heads of ``config``'s family (grounding.py); they train with the model and are dropped."""
    attributes = attributes_of(config.family)
    if config.tied_grounding:
        word_ids = {
            name: [answer_ids(files, word)[0] for word in words] for name, words in attributes.items()
        }
        return TiedGroundingHeads(model.get_input_embeddings(), word_ids).to(device)
    return GroundingHeads(model.config.text_config.hidden_size, attributes).to(device)


def train_model(
    name: str,
    preset: TinyPreset,
    files: ModelFiles,
    config: TrainConfig,
    device: torch.device,
    val: list[Example],
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    halt_after: int | None = None,
) -> tuple[InternVLForConditionalGeneration, dict]:
    """Train one preset from a seeded init; returns the model and its training statistics.

    ``checkpoint``: where ``save_state`` writes every ``checkpoint_every`` steps and at the end;
    ``resume``: continue from it when it exists. ``halt_after``: return after that many steps
    without saving them, as a killed process would (for tests of resuming).
    """
    torch.manual_seed(config.seed)
    model_config = tiny_internvl_config(preset, files.tokenizer)
    model = InternVLForConditionalGeneration(model_config).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    heads = make_heads(model, files, config, device)
    tap = ProjectorTap(model)
    trained = torch.nn.ModuleList([model, heads])  # .parameters() lists a tensor the two share once
    optimizer = make_optimizer(trained, config)
    identity = run_identity(config, preset)
    # with a restart, a checkpoint of the same run without it is a prefix of this one up to step ``steps``
    prefix = run_identity(replace(config, extra_steps=0), preset) if config.extra_steps else None
    progress = Progress(history=[])
    if resume and checkpoint is not None and checkpoint.exists():
        progress = load_state(checkpoint, trained, optimizer, identity, prefix, config.steps)
        fresh = (
            " (portable: fresh optimizer, lr ramps up again)" if progress.rewarm_from == progress.step else ""
        )
        log(f"[{name}] resumed from {checkpoint} at step {progress.step}{fresh}")
    log(f"[{name}] {params / 1e6:.2f}M parameters, {config.total_steps} steps x {config.batch}")

    means = RunningMeans()
    means.values = dict(progress.means or {})
    started, resumed_at, done_before = time.perf_counter(), progress.step, progress.seconds
    for step in range(progress.step, config.total_steps):
        if halt_after is not None and step - resumed_at >= halt_after:
            tap.remove()
            return model.eval(), {"halted_at": step}
        scale = rewarm_scale(step, progress)
        first_loss = train_step(
            model, heads, tap, trained, optimizer, files, config, step, device, means, scale
        )
        progress.first_loss = first_loss if progress.first_loss is None else progress.first_loss
        done = step + 1
        progress.step, progress.seconds = done, done_before + time.perf_counter() - started
        if done % 10 == 0 or done == config.total_steps:
            rate = (done - resumed_at) * config.batch / (time.perf_counter() - started)
            eta = (config.total_steps - done) * config.batch / rate
            log(
                f"[{name}] step {done}/{config.total_steps} {means} lr {learning_rate(step, config) * scale:.2e} "
                f"{rate:.1f} images/s elapsed {progress.seconds / 60:.1f} min eta {eta / 60:.1f} min"
            )
        if (config.eval_every and done % config.eval_every == 0) or done == config.total_steps:
            result = evaluate(model, files, val)
            progress.history.append({"step": done, "val_accuracy": result["accuracy"], **means.values})
            per_type = " ".join(f"{q} {a:.2f}" for q, a in result["per_qtype"].items())
            log(f"[{name}] step {done} val accuracy {result['accuracy']:.3f} ({per_type})")
        if checkpoint is not None and (
            (checkpoint_every and done % checkpoint_every == 0) or done == config.total_steps
        ):
            progress.means = dict(means.values)
            save_state(checkpoint, trained, optimizer, progress, identity)

    stats = {
        "parameters": params,
        "steps": config.total_steps,
        "batch": config.batch,
        "train_seconds": round(progress.seconds, 1),
        "samples_per_second": round(config.total_steps * config.batch / max(progress.seconds, 1e-9), 2),
        "first_loss": progress.first_loss,
        "final_loss": means.values.get("answer"),
        "history": progress.history,
        "config": asdict(config),
        "preset": asdict(preset),
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", *sys.argv]),
    }
    tap.remove()
    return model.eval(), stats


def train_step(
    model, heads, tap, trained, optimizer, files, config, step, device, means, lr_scale: float = 1.0
) -> float:
    """One optimizer step on step ``step``'s batch at ``lr_scale`` times the schedule's learning rate;
    updates ``means``, returns the answer loss."""
    batch = training_batch(files, config, step)
    batch = {key: value.to(device) for key, value in batch.items()}
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, config) * lr_scale
    # Crowded: colour grounded on object tokens only, so that background tokens (textured) are not
    # all trained towards one "background" direction, a ready-made attention sink.
    losses, accuracies = training_losses(
        model, heads, tap, batch, config.early_answer > 0, ground_background=config.family == "basic"
    )
    total = losses["answer"]
    if config.early_answer:  # the same sum, in the same order, as before the weight could be 0
        total = total + config.early_answer * losses["early"]
    total = total + config.grounding * losses["grounding"]
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(trained.parameters(), config.grad_clip)
    optimizer.step()
    means.update({**{key: value.item() for key, value in losses.items()}, **accuracies})
    return losses["answer"].item()


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY, help="task family")
    parser.add_argument("--out", type=Path, default=None, help="default: shared/models or shared/models/crowded")
    parser.add_argument("--small-steps", type=int, default=3000)
    parser.add_argument("--large-steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=TrainConfig.batch, help="images per step")
    parser.add_argument("--small-lr", type=float, default=1e-3)
    parser.add_argument("--large-lr", type=float, default=1e-3)
    parser.add_argument("--curriculum", type=float, default=TrainConfig.curriculum)
    parser.add_argument(
        "--extra-steps",
        type=int,
        default=0,
        help="a warm restart after the schedule: this many more steps (resumes a finished run's checkpoint)",
    )
    parser.add_argument("--extra-lr", type=float, default=TrainConfig.extra_lr, help="the restart's peak lr")
    parser.add_argument("--grounding", type=float, default=TrainConfig.grounding, help="aux loss weight")
    parser.add_argument("--questions", type=int, default=TrainConfig.questions, help="questions per image")
    parser.add_argument(
        "--early-answer", type=float, default=None, help="aux weight (default 1 for basic, 0 for crowded)"
    )
    parser.add_argument("--grounding-heads", choices=["tied", "linear"], default="tied")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    parser.add_argument("--val-examples", type=int, default=TrainConfig.val_examples)
    parser.add_argument("--test-examples", type=int, default=TEST_EXAMPLES)
    parser.add_argument(
        "--checkpoint-every", type=int, default=250, help="steps between checkpoints (0: end only)"
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="default: <out>/checkpoints")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoints where they exist"
    )
    parser.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from accuracy.json")
    parser.add_argument("--models", nargs="+", default=["small", "large"], choices=sorted(PRESETS))
    parser.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        choices=sorted(PRESETS),
        help="models already saved in --out: evaluate them for the card instead of training again",
    )
    args = parser.parse_args(argv)
    args.out = args.out or FAMILY_OUT[args.family]
    args.checkpoint_dir = args.checkpoint_dir or args.out / "checkpoints"
    if args.early_answer is None:
        args.early_answer = TrainConfig.early_answer if args.family == "basic" else 0.0
    elif args.family != "basic" and args.early_answer > 0:
        parser.error("--early-answer shortcuts where attention goes; the crowded family trains without it")
    return args


def recorded_train_stats(out: Path, name: str) -> dict | None:
    if not (out / "accuracy.json").exists():
        return None
    return json.loads((out / "accuracy.json").read_text())["models"].get(name, {}).get("train")


def train_one(name, tokenizer, steps, lrs, args, device, val):
    """Train preset ``name`` of ``args.family`` (from its checkpoint with ``--resume``); returns (model, stats)."""
    with tempfile.TemporaryDirectory() as scratch:
        # The checkpoint's own files (tokenizer, template, tiling) build every input, as in serving.
        preset = FAMILY_PRESETS[args.family][name]
        untrained = InternVLForConditionalGeneration(tiny_internvl_config(preset, tokenizer))
        tiling = FAMILY_TILING[args.family]
        files = ModelFiles.load(save_checkpoint(untrained, tokenizer, Path(scratch) / name, tiling))
        config = TrainConfig(
            steps=steps[name],
            batch=args.batch,
            lr=lrs[name],
            eval_every=args.eval_every,
            val_examples=args.val_examples,
            seed=args.seed,
            curriculum=args.curriculum,
            grounding=args.grounding,
            questions=args.questions,
            early_answer=args.early_answer,
            tied_grounding=args.grounding_heads == "tied",
            family=args.family,
            extra_steps=args.extra_steps,
            extra_lr=args.extra_lr,
        )
        checkpoint = args.checkpoint_dir / f"{FAMILY_PREFIX[args.family]}-{name}.pt"
        return train_model(
            name, preset, files, config, device, val, checkpoint, args.checkpoint_every, args.resume
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.card_only:
        write_model_card(args.out)
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    family, prefix, tiling = args.family, FAMILY_PREFIX[args.family], FAMILY_TILING[args.family]
    tokenizer = build_tokenizer(vocabulary_corpus(family))
    val = list(iter_dataset("val", args.val_examples, seed=args.seed, family=family))
    test = list(iter_dataset("test", args.test_examples, seed=args.seed, family=family))
    steps = {"small": args.small_steps, "large": args.large_steps}
    lrs = {"small": args.small_lr, "large": args.large_lr}

    results = {}
    for name in args.models:
        if name in args.reuse:
            path = args.out / f"{prefix}-{name}"
            model = InternVLForConditionalGeneration.from_pretrained(path).to(device).eval()
            # trained by an earlier run: its recorded training figures if accuracy.json has them
            stats = recorded_train_stats(args.out, name) or {
                "reused": str(path),
                "parameters": sum(t.numel() for t in model.parameters()),
                "preset": asdict(FAMILY_PRESETS[family][name]),
            }
        else:
            model, stats = train_one(name, tokenizer, steps, lrs, args, device, val)
            path = save_checkpoint(model.to("cpu"), tokenizer, args.out / f"{prefix}-{name}", tiling)
        files = ModelFiles.load(path)
        started = time.perf_counter()
        test_result = evaluate(model, files, test)
        log(
            f"[{name}] test accuracy {test_result['accuracy']:.3f} on {len(test)} "
            f"in {time.perf_counter() - started:.0f} s: {test_result['per_qtype']}"
        )
        results[name] = {
            "train": stats,
            "test": test_result,
            "first_60_accuracy": float(np.mean(test_result["correct"][:60])),
            "checkpoint_mb": checkpoint_megabytes(path),
        }

    meta = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seed": args.seed,
        "test_examples": args.test_examples,
        "vocab_size": tokenizer.get_vocab_size(),
        "val_examples": args.val_examples,
        "tiling": asdict(tiling),
        "command": " ".join(["python", *sys.argv]),
    }
    if family != "basic":
        meta["family"] = (
            family  # the basic record keeps its keys, so a merge with the committed one still matches
        )
    write_accuracy(args.out, merge_results(args.out, results, meta, list(PRESETS)), meta)
    write_model_card(args.out)
    log(f"wrote {args.out / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
