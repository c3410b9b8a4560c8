"""Train the synthetic pair: a small and a large InternVL from scratch on ``stitchvlm.shared.synthetic``.

    python bench/train_pair.py --out shared/models [--small-steps N --large-steps N
                                --batch 16 --seed 0 --device cpu|cuda --threads 2]

Both models share one tokenizer (``build_tokenizer`` over the dataset's
vocabulary) and one tiling, and see the same training stream. Inputs are built
exactly as serving builds them (``build_prompt``, ``answer_ids``,
``preprocess_image`` of a checkpoint's own files), so training and serving see
identical token sequences and pixels. The loss covers the answer tokens and the
closing ``<|im_end|>`` only. AdamW with linear warmup and cosine decay; seeded,
so the same arguments on the same device and thread count give the same weights.

Writes ``<out>/synthetic-small`` and ``<out>/synthetic-large`` (InternVL3-*-hf
layout via ``save_checkpoint``), ``<out>/accuracy.json`` (per-example test
predictions, accuracy overall and per question type) and ``<out>/MODEL_CARD.md``.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import InternVLForConditionalGeneration

from stitchvlm.cloud.checkpoints import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TinyPreset,
    build_tokenizer,
    save_checkpoint,
    tiny_internvl_config,
)
from stitchvlm.shared.layout import TilingConfig
from stitchvlm.shared.model_files import ModelFiles
from stitchvlm.shared.preprocess import preprocess_image
from stitchvlm.shared.prompt import answer_ids, build_prompt, decode_answer
from stitchvlm.shared.synthetic import (
    QTYPES,
    Example,
    exact_match,
    iter_dataset,
    vocabulary_corpus,
)

# The pair's sizes. Same vision geometry, so one tiling serves both: 224 px tiles, patch 28, 16 tokens
# per tile (80 visual tokens; 64 per tile made a step ~10x slower on 2 CPU cores). The large model is
# wider and deeper in both towers. Init std 0.1, not the HF 0.02: with 0.02 attention stays uniform over
# the visual tokens and a model from scratch takes thousands of steps to start looking at the objects.
PRESETS: dict[str, TinyPreset] = {
    "small": TinyPreset(
        vision_hidden=64,
        vision_layers=2,
        vision_heads=4,
        image_size=224,
        patch_size=28,
        text_hidden=128,
        text_layers=4,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=512,
        initializer_range=0.1,
    ),
    "large": TinyPreset(
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        image_size=224,
        patch_size=28,
        text_hidden=256,
        text_layers=6,
        text_heads=8,
        text_kv_heads=2,
        text_intermediate=1024,
        initializer_range=0.1,
    ),
}
# 448 px images -> 2 x 2 grid + thumbnail = 5 tiles, 320 visual tokens.
TILING = TilingConfig(
    tile_size=224,
    min_tiles=1,
    max_tiles=6,
    use_thumbnail=True,
    tokens_per_tile=16,
    image_mean=IMAGENET_MEAN,
    image_std=IMAGENET_STD,
)
IGNORE_INDEX = -100  # label of positions outside the loss
TEST_EXAMPLES = 300  # fixed test split size the card reports
MAX_NEW_TOKENS = 4  # answers are one token plus <|im_end|>


@dataclass(frozen=True)
class TrainConfig:
    """One model's optimisation schedule."""

    steps: int  # optimizer steps
    batch: int = 16  # examples per step
    lr: float = 1e-3  # peak learning rate
    warmup: float = 0.05  # fraction of steps with linear warmup
    min_lr: float = 0.05  # final learning rate as a fraction of the peak (cosine floor)
    weight_decay: float = 0.05  # AdamW decoupled decay (matrices only)
    grad_clip: float = 1.0  # global gradient-norm clip
    eval_every: int = 250  # steps between validation accuracy checks (0: only at the end)
    val_examples: int = 64  # validation examples per check
    seed: int = 0  # weight init and training-stream seed
    # Fraction of steps over which images go from one big object to the standard 3-6 small ones: a
    # model from scratch first learns what an object looks like, then which of several the question means.
    curriculum: float = 0.5


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def encode_example(files: ModelFiles, example: Example) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, labels, pixel_values) of one example, as serving builds the prompt and pixels.

    labels are ``IGNORE_INDEX`` on the prompt and the answer ids (with EOS) on the answer.
    """
    pixels, layout = preprocess_image(example.image, files.tiling)  # pixels: [tiles, 3, tile, tile]
    prompt = build_prompt(files, example.question, layout.num_visual_tokens).input_ids
    answer = np.asarray(answer_ids(files, example.answer, add_eos=True), dtype=np.int64)
    input_ids = np.concatenate([prompt, answer])
    labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int64), answer])
    return input_ids, labels, pixels


def collate(files: ModelFiles, examples: list[Example]) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask, labels ``[batch, seq]``; pixel_values ``[tiles, 3, h, w]``."""
    encoded = [encode_example(files, example) for example in examples]
    length = max(len(ids) for ids, _, _ in encoded)
    pad = files.pad_token_id if files.pad_token_id is not None else files.eos_token_ids[0]
    input_ids = np.full((len(encoded), length), pad, dtype=np.int64)
    labels = np.full((len(encoded), length), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(encoded), length), dtype=np.int64)
    for row, (ids, target, _) in enumerate(encoded):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = target
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "pixel_values": torch.from_numpy(np.concatenate([pixels for _, _, pixels in encoded])),
    }


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@torch.no_grad()
def greedy_answer(model: InternVLForConditionalGeneration, files: ModelFiles, example: Example) -> str:
    """The model's greedy answer to one example through ``model.generate`` (what serving runs)."""
    pixels, layout = preprocess_image(example.image, files.tiling)
    prompt = build_prompt(files, example.question, layout.num_visual_tokens).input_ids
    device = model.device
    input_ids = torch.from_numpy(prompt)[None].to(device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.from_numpy(pixels).to(device),
        max_new_tokens=MAX_NEW_TOKENS,
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
    return {
        "n": len(examples),
        "accuracy": float(np.mean(correct)),
        "per_qtype": {q: float(np.mean(by_type[q])) for q in QTYPES if by_type[q]},
        "predictions": predictions,
        "correct": correct,
    }


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine down to ``lr * min_lr`` at the last step."""
    warmup = max(1, int(config.warmup * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def train_model(
    name: str, files: ModelFiles, config: TrainConfig, device: torch.device, val: list[Example]
) -> tuple[InternVLForConditionalGeneration, dict]:
    """Train one preset from a seeded init; returns the model and its training statistics."""
    torch.manual_seed(config.seed)
    model_config = tiny_internvl_config(PRESETS[name], files.tokenizer)
    model = InternVLForConditionalGeneration(model_config).to(device).train()
    optimizer = make_optimizer(model, config)
    params = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {params / 1e6:.2f}M parameters, {config.steps} steps x {config.batch}")

    started, smoothed, history = time.perf_counter(), None, []
    for step in range(config.steps):
        examples = iter_dataset(
            "train", config.batch, config.seed, step * config.batch, curriculum_level(step, config)
        )
        batch = collate(files, list(examples))
        batch = {key: value.to(device) for key, value in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        done = step + 1
        if done % 10 == 0 or done == config.steps:
            elapsed = time.perf_counter() - started
            rate = done * config.batch / elapsed
            eta = (config.steps - done) * config.batch / rate
            log(
                f"[{name}] step {done}/{config.steps} loss {smoothed:.4f} lr {learning_rate(step, config):.2e} "
                f"{rate:.1f} samples/s elapsed {elapsed / 60:.1f} min eta {eta / 60:.1f} min"
            )
        if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
            result = evaluate(model, files, val)
            history.append({"step": done, "val_accuracy": result["accuracy"], "loss": smoothed})
            per_type = " ".join(f"{q} {a:.2f}" for q, a in result["per_qtype"].items())
            log(f"[{name}] step {done} val accuracy {result['accuracy']:.3f} ({per_type})")

    seconds = time.perf_counter() - started
    stats = {
        "parameters": params,
        "steps": config.steps,
        "batch": config.batch,
        "train_seconds": round(seconds, 1),
        "samples_per_second": round(config.steps * config.batch / seconds, 2),
        "final_loss": smoothed,
        "history": history,
        "config": asdict(config),
        "preset": asdict(PRESETS[name]),
    }
    return model.eval(), stats


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# ---------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------


def write_accuracy(out: Path, results: dict[str, dict], meta: dict) -> None:
    """accuracy.json: every number of the card plus per-example test predictions, for tests to read."""
    (out / "accuracy.json").write_text(json.dumps({"meta": meta, "models": results}, indent=1) + "\n")


def write_model_card(out: Path) -> None:
    """MODEL_CARD.md from accuracy.json (so the card can be rewritten without retraining)."""
    record = json.loads((out / "accuracy.json").read_text())
    meta, results = record["meta"], record["models"]
    tiling = meta["tiling"]
    lines = [
        "# Synthetic pair: synthetic-small and synthetic-large",
        "",
        "Two InternVL models (the `InternVLForConditionalGeneration` architecture of the InternVL3-*-hf",
        "checkpoints) trained from scratch by `bench/train_pair.py` on `stitchvlm.shared.synthetic`:",
        "448 x 448 images of 3-6 coloured shapes (some holding a printed digit), one short question each,",
        "answered with one word or digit. They exist so the cascade has a small and a large model that",
        "really answer and differ in how well. Not for any other use.",
        "",
        "## Data",
        "",
        f"- question types: {', '.join(QTYPES)} (uniform); train, val and test are disjoint seed streams",
        f"- test: the first {meta['test_examples']} examples of the `test` split, seed {meta['seed']}",
        f"- tiling: {tiling['tile_size']} px tiles, 2 x 2 grid + thumbnail = 5 tiles, "
        f"{tiling['tokens_per_tile']} tokens per tile, {5 * tiling['tokens_per_tile']} visual tokens",
        f"- tokenizer: byte-level BPE, {meta['vocab_size']} tokens, shared by both models",
        "",
        "## Models and training",
        "",
        f"- device: {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, {meta['platform']}",
        "- AdamW (betas 0.9/0.98, weight decay on matrices), linear warmup then cosine decay, loss on the",
        "  answer tokens + `<|im_end|>`; curriculum: the first part of training (fraction below) starts",
        "  with one big object per image and moves linearly to the standard scenes",
        f"- command: `{meta['command']}`",
        "",
        "| model | ViT (width x depth) | LM (width x depth) | parameters | steps x batch | peak lr "
        "| curriculum | train time | samples/s | safetensors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        s, p = r["train"], r["train"]["preset"]
        if "config" not in s:  # --reuse: trained by an earlier run whose figures are not recorded here
            lines.append(
                f"| synthetic-{name} | {p['vision_hidden']} x {p['vision_layers']} | {p['text_hidden']} x "
                f"{p['text_layers']} | {s['parameters'] / 1e6:.2f}M | — | — | — | — | — | {r['checkpoint_mb']:.1f} MB |"
            )
            continue
        c = s["config"]
        lines.append(
            f"| synthetic-{name} | {p['vision_hidden']} x {p['vision_layers']} | {p['text_hidden']} x "
            f"{p['text_layers']} | {s['parameters'] / 1e6:.2f}M | {s['steps']} x {s['batch']} | {c['lr']:g} | "
            f"{c['curriculum']:g} | {s['train_seconds'] / 60:.1f} min | {s['samples_per_second']:.1f} | "
            f"{r['checkpoint_mb']:.1f} MB |"
        )
    lines += [
        "",
        "## Test accuracy (%, exact match, greedy `model.generate`, at most 4 new tokens)",
        "",
        "| model | overall | " + " | ".join(QTYPES) + " | first 60 |",
        "| --- | ---: | " + " | ".join("---:" for _ in QTYPES) + " | ---: |",
    ]
    for name, r in results.items():
        t = r["test"]
        per_type = " | ".join(f"{100 * t['per_qtype'].get(q, float('nan')):.1f}" for q in QTYPES)
        lines.append(
            f"| synthetic-{name} | {100 * t['accuracy']:.1f} | {per_type} | {100 * r['first_60_accuracy']:.1f} |"
        )
    lines += [
        "",
        "Chance level per type: colour 1/7, shape 1/7, count 1/4, digit 1/10, spatial 1/7.",
        "Per-example test predictions are in `accuracy.json`; `tests/test_synthetic.py` re-generates",
        "the first 60 with transformers and compares.",
        "",
        "## Validation during training",
        "",
    ]
    for name, r in results.items():
        if "history" not in r["train"]:
            lines.append(f"- synthetic-{name}: reused from an earlier run (`--reuse`), no history recorded")
            continue
        points = ", ".join(f"{h['step']}: {100 * h['val_accuracy']:.0f}%" for h in r["train"]["history"])
        lines.append(f"- synthetic-{name} (step: accuracy on {meta['val_examples']} val examples): {points}")
    lines.append("")
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def checkpoint_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("shared/models"))
    parser.add_argument("--small-steps", type=int, default=2400)
    parser.add_argument("--large-steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--small-lr", type=float, default=1e-3)
    parser.add_argument("--large-lr", type=float, default=7e-4)
    parser.add_argument("--curriculum", type=float, default=TrainConfig.curriculum)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--val-examples", type=int, default=100)
    parser.add_argument("--test-examples", type=int, default=TEST_EXAMPLES)
    parser.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from accuracy.json")
    parser.add_argument("--models", nargs="+", default=["small", "large"], choices=sorted(PRESETS))
    parser.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        choices=sorted(PRESETS),
        help="models already saved in --out: evaluate them for the card instead of training again",
    )
    return parser.parse_args(argv)


def train_one(name, tokenizer, steps, lrs, args, device, val):
    """Train preset ``name`` from scratch; returns (model, stats)."""
    with tempfile.TemporaryDirectory() as scratch:
        # The checkpoint's own files (tokenizer, template, tiling) build every input, as in serving.
        untrained = InternVLForConditionalGeneration(tiny_internvl_config(PRESETS[name], tokenizer))
        files = ModelFiles.load(save_checkpoint(untrained, tokenizer, Path(scratch) / name, TILING))
        config = TrainConfig(
            steps=steps[name],
            batch=args.batch,
            lr=lrs[name],
            eval_every=args.eval_every,
            val_examples=args.val_examples,
            seed=args.seed,
            curriculum=args.curriculum,
        )
        return train_model(name, files, config, device, val)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.card_only:
        write_model_card(args.out)
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer = build_tokenizer(vocabulary_corpus())
    val = list(iter_dataset("val", args.val_examples, seed=args.seed))
    test = list(iter_dataset("test", args.test_examples, seed=args.seed))
    steps = {"small": args.small_steps, "large": args.large_steps}
    lrs = {"small": args.small_lr, "large": args.large_lr}

    results = {}
    for name in args.models:
        if name in args.reuse:
            path = args.out / f"synthetic-{name}"
            model = InternVLForConditionalGeneration.from_pretrained(path).to(device).eval()
            # trained by an earlier run: only what the checkpoint itself says
            stats = {
                "reused": str(path),
                "parameters": sum(t.numel() for t in model.parameters()),
                "preset": asdict(PRESETS[name]),
            }
        else:
            model, stats = train_one(name, tokenizer, steps, lrs, args, device, val)
            path = save_checkpoint(model.to("cpu"), tokenizer, args.out / f"synthetic-{name}", TILING)
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
        "tiling": asdict(TILING),
        "command": " ".join(["python", *sys.argv]),
    }
    write_accuracy(args.out, results, meta)
    write_model_card(args.out)
    log(f"wrote {args.out / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
