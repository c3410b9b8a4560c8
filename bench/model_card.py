"""The synthetic pair's record: ``accuracy.json`` (every figure, per-example predictions) and ``MODEL_CARD.md``.

``bench/train_pair.py`` writes the record; the card is rendered from the record
alone, so it can be rewritten (``train_pair.py --card-only``) without retraining
and ``tests/test_synthetic.py`` can re-check every figure it states.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pair_presets import FAMILY_MAX_NEW_TOKENS  # bench/pair_presets.py

from stitchvlm.shared import synthetic_crowded as crowded
from stitchvlm.shared.synthetic import family_qtypes

CHANCE = {"colour": "1/7", "shape": "1/7", "count": "1/4", "digit": "1/10", "spatial": "1/7"}


def checkpoint_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def write_accuracy(out: Path, results: dict[str, dict], meta: dict) -> None:
    """accuracy.json: every number of the card plus per-example test predictions, for tests to read."""
    (out / "accuracy.json").write_text(json.dumps({"meta": meta, "models": results}, indent=1) + "\n")


def merge_results(out: Path, results: dict[str, dict], meta: dict, order: Sequence[str]) -> dict[str, dict]:
    """``results`` plus the models an earlier run recorded in accuracy.json on the same test set.

    Lets the two models train in separate processes (one thread each) and share one card;
    ``order``: the model names in the order the card lists them.
    """
    if not (out / "accuracy.json").exists():
        return results
    record = json.loads((out / "accuracy.json").read_text())
    as_recorded = json.loads(json.dumps(meta))  # tuples become lists, as in the file
    same_test = all(record["meta"].get(k) == as_recorded[k] for k in ("seed", "test_examples", "tiling"))
    merged = {name: r for name, r in record["models"].items() if same_test and name not in results}
    merged.update(results)
    return {name: merged[name] for name in order if name in merged}


# What each family's card says about its data; the rest of the card is common.
FAMILY_DATA = {
    "basic": [
        "- 448 x 448 images of 3-6 coloured shapes (7 colours, 7 shapes, 34-48 px; some hold a printed",
        "  digit), one per cell of an 8 x 8 grid of 56 px cells (the visual-token grid of the 2 x 2 tiling),",
        "  on a light background; each test image has one question, answered with one word or digit",
    ],
    "crowded": [
        "- 448 x 224 images of 10-20 objects (7 colours, 7 shapes, two sizes: small 22-28 px, large",
        "  44-50 px; large roomy shapes may hold a printed two-digit number), one per cell of an 8 x 4 grid",
        "  of 56 px cells, a large object on its cell's 2 x 2 block of visual tokens, a small one inside one",
        "  of those tokens, on a textured grey background",
        "- every object a question names is named by one attribute (its colour or its shape) that no",
        "  other object in the scene has (`ONE_ATTRIBUTE` rules); answers are one word, a two-digit",
        "  number, a count (1-5) or two words (`shared/synthetic_crowded.py`)",
        "- each test image has one question",
    ],
}
FAMILY_CURRICULUM = {
    "basic": [
        "- curriculum: scenes start with 2 objects and reach the standard 3-6 after the fraction of steps below"
    ],
    "crowded": [
        f"- curriculum over the fraction of steps below: its first {crowded.WARMUP_LEVEL:.0%} (`WARMUP_LEVEL`) shows "
        f"warm-up scenes",
        f"  of {'-'.join(map(str, crowded.WARMUP_OBJECTS))} objects whose questions need only a unique "
        f"description (those not about grid cells drawn {crowded.WARMUP_SCALE:g}x larger at first,",
        f"  shrinking to size, `WARMUP_SCALE`); then {'-'.join(map(str, crowded.EASY_OBJECTS))} objects, growing to",
        f"  the standard {'-'.join(map(str, crowded.OBJECTS_PER_IMAGE))} at its end",
    ],
}
FAMILY_TILES = {
    "basic": ("2 x 2 grid + thumbnail", 5),
    "crowded": ("2 x 1 grid + thumbnail", 3),
}  # (grid, tiles)
FAMILY_CHANCE = {
    "basic": CHANCE,
    "crowded": {
        "colour": "1/7",
        "shape": "1/7",
        "count": "1/5",
        "number": "1/90",
        "describe": "1/14",
        "spatial": "1/49",
        "relation": "1/2",
    },
}


def write_model_card(out: Path) -> None:
    """MODEL_CARD.md from accuracy.json (the task family's own data section and question types)."""
    record = json.loads((out / "accuracy.json").read_text())
    meta, results = record["meta"], record["models"]
    family = meta.get("family", "basic")
    prefix = "synthetic" if family == "basic" else family
    qtypes = family_qtypes(family)
    chance = FAMILY_CHANCE[family]
    tiling = meta["tiling"]
    grid, tiles = FAMILY_TILES[family]
    lines = [
        f"# Synthetic pair ({family} family): {prefix}-small and {prefix}-large",
        "",
        "Two InternVL models (the `InternVLForConditionalGeneration` architecture of the InternVL3-*-hf",
        f"checkpoints) trained from scratch by `bench/train_pair.py --family {family}` on",
        "`stitchvlm.shared.synthetic`. They exist so the cascade has a small and a large model that",
        "really answer and differ in how well. Not for any other use.",
        "",
        "## Data",
        "",
        *FAMILY_DATA[family],
        f"- question types: {', '.join(qtypes)} (uniform); train, val and test are disjoint seed streams",
        f"- test: the first {meta['test_examples']} examples of the `test` split, seed {meta['seed']}",
        f"- tiling: {tiling['tile_size']} px tiles, {grid} = {tiles} tiles, "
        f"{tiling['tokens_per_tile']} tokens per tile, {tiles * tiling['tokens_per_tile']} visual tokens",
        f"- tokenizer: byte-level BPE, {meta['vocab_size']} tokens, shared by both models",
        "",
        "## Training",
        "",
        f"- device: {meta['device']}, torch {meta['torch']}, {meta['platform']}",
        "- each training image is one conversation: the question exactly as serving sends it, then",
        "  further questions about the same image as follow-up turns (the chat template's multi-turn",
        "  form); loss on every answer token and its `<|im_end|>`",
        *_auxiliary_losses(family),
        *FAMILY_CURRICULUM[family],
        "- AdamW (betas 0.9/0.98, weight decay on matrices), warmup then cosine decay",
        *[
            f"- {prefix}-{name}: `{r['train']['command']}` (torch threads: {r['train']['threads']})"
            for name, r in results.items()
            if "command" in r["train"]
        ],
        "",
        "| model | ViT (width x depth) | LM (width x depth) | parameters | steps x images x questions "
        "| peak lr | curriculum | train time | images/s | safetensors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(_model_row(f"{prefix}-{name}", r))
    if family == "basic":
        lines += _steps_note(results)
    lines += [
        "",
        f"## Test accuracy (%, exact match, greedy `model.generate`, at most "
        f"{FAMILY_MAX_NEW_TOKENS[family]} new tokens)",
        "",
        "| model | overall | " + " | ".join(qtypes) + " | first 60 |",
        "| --- | ---: | " + " | ".join("---:" for _ in qtypes) + " | ---: |",
    ]
    for name, r in results.items():
        t = r["test"]
        per_type = " | ".join(f"{100 * t['per_qtype'].get(q, float('nan')):.1f}" for q in qtypes)
        lines.append(
            f"| {prefix}-{name} | {100 * t['accuracy']:.1f} | {per_type} | {100 * r['first_60_accuracy']:.1f} |"
        )
    lines += [
        "",
        "Chance level per type: " + ", ".join(f"{q} {chance[q]}" for q in qtypes) + ".",
        "Per-example test predictions are in `accuracy.json`; `tests/test_synthetic.py` re-scores them",
        "and re-generates the first 60 with transformers.",
        "",
        "## Validation during training",
        "",
    ]
    for name, r in results.items():
        if "history" not in r["train"]:
            lines.append(f"- {prefix}-{name}: reused from an earlier run (`--reuse`), no history recorded")
            continue
        points = ", ".join(f"{h['step']}: {100 * h['val_accuracy']:.0f}%" for h in r["train"]["history"])
        lines.append(f"- {prefix}-{name} (step: accuracy on {meta['val_examples']} val examples): {points}")
    lines.append("")
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def _auxiliary_losses(family: str) -> list[str]:
    grounding = [
        "- an auxiliary grounding loss, dropped with its head after training (the checkpoints are the",
        "  plain model): each visual token's embedding predicts the attributes of the object it covers,",
        "  through the LM's tied word embeddings. It does not supervise attention: which visual tokens a",
        "  model reads (what SGP's scores measure) is learned from the answers",
    ]
    if family == "basic":
        return [
            *grounding,
            "- an early-answer loss, also dropped: the answer's first token predicted already at the",
            "  question's last word, one attention hop from the image",
        ]
    return [
        *grounding,
        "  (colour, like the other attributes, only on tokens that cover an object: background tokens are",
        "  not all pulled towards one direction)",
        "- no early-answer loss (it would move the answer into the question's text positions in the",
        "  first layers, a shortcut of where attention goes)",
    ]


def _steps_note(results: dict[str, dict]) -> list[str]:
    """Why the small model trains for fewer steps, with both validation curves at the small's last step."""
    small, large = results.get("small", {}).get("train", {}), results.get("large", {}).get("train", {})
    if "history" not in small or "history" not in large or small["steps"] >= large["steps"]:
        return []
    step = small["history"][-1]["step"]
    at_step = {h["step"]: h["val_accuracy"] for h in large["history"]}
    if step not in at_step:
        return []
    return [
        "",
        f"The small model trains for {small['steps']} steps, the large for {large['steps']}: less compute for",
        "the cheaper model, as a deployment would spend it, and the gap the cascade needs. At equal steps",
        "the larger model is not much ahead on this task: a synthetic-small trained for 8000 steps with",
        "this recipe reached 64.7% on the test split (colour 100, shape 100, count 60.0, digit 19.6,",
        "spatial 38.3; one run, 30 min on one thread). At step "
        f"{step} the large model had {100 * at_step[step]:.1f}% on val (mid-schedule),",
        f"the small {100 * small['history'][-1]['val_accuracy']:.1f}% (end of its schedule).",
    ]


def _model_row(name: str, r: dict) -> str:
    s, p = r["train"], r["train"]["preset"]
    sizes = (
        f"| {name} | {p['vision_hidden']} x {p['vision_layers']} | {p['text_hidden']} x "
        f"{p['text_layers']} | {s['parameters'] / 1e6:.2f}M"
    )
    if "config" not in s:  # --reuse: trained by an earlier run whose figures are not recorded here
        return f"{sizes} | — | — | — | — | — | {r['checkpoint_mb']:.1f} MB |"
    c = s["config"]
    steps, lr = s["steps"], f"{c['lr']:g}"
    if c.get("extra_steps"):  # a warm restart after the first schedule (train_pair --extra-steps)
        steps, lr = f"{c['steps']} + {c['extra_steps']}", f"{lr}, then {c['extra_lr']:g}"
    return (
        f"{sizes} | {steps} x {s['batch']} x {c['questions']} | {lr} | {c['curriculum']:g} "
        f"| {s['train_seconds'] / 60:.1f} min | {s['samples_per_second']:.1f} | {r['checkpoint_mb']:.1f} MB |"
    )
