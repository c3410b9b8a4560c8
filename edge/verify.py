"""Verification of an export: ONNX Runtime against the float32 PyTorch model on one sample.

``verify_export`` runs the vision graph, a prefill and ``VERIFY_DECODE_STEPS``
decode passes of an export directory on the CPU EP and the same passes
through transformers (eager attention, so the reference score is transformers'
own attention probabilities), and compares image embeddings, logits, KV and
visual scores within ``TOLERANCES`` of the export's dtype. ``stitch-export``
calls it before it publishes an export; it changes nothing on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import InternVLForConditionalGeneration

from stitchvlm.shared.prompt import build_prompt

from .export_modules import check_supported
from .runtime import CPU, EdgeModel

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def load_model(
    model_dir: str | Path, dtype: str = "fp32", device: str = "cpu"
) -> InternVLForConditionalGeneration:
    """The checkpoint in ``dtype`` on ``device``, eager attention (its probabilities: the score's reference)."""
    model = InternVLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=TORCH_DTYPES[dtype], attn_implementation="eager"
    )
    check_supported(model)
    return model.to(device).eval()


@dataclass(frozen=True)
class Tolerance:
    """|ort - reference| <= atol + rtol * max|reference| over a whole tensor."""

    atol: float  # absolute floor
    rtol: float  # relative to the largest magnitude in the reference tensor

    def bound(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max(initial=0.0))


@dataclass(frozen=True)
class DtypeTolerances:
    """How far an export of one dtype may be from the float32 PyTorch model."""

    logits: Tolerance
    kv: Tolerance  # present keys and values
    visual_scores: Tolerance
    image_embeds: Tolerance


# Measured on the sharpened tiny test model (weights std 0.2, logits up to ~7):
# fp32: max|diff| 2e-5 on logits and KV, reordered float32 sums only.
# fp16: the graph is 0.46% of max|logits| off the float32 model; transformers' own fp16
# forward is 0.65% off, so the bound (2% of the largest magnitude) leaves room for a
# deeper model while an export bug (wrong RoPE, mask, layer) is off by tens of percent.
TOLERANCES = {
    "fp32": DtypeTolerances(
        logits=Tolerance(1e-4, 1e-5),
        kv=Tolerance(1e-4, 1e-5),
        visual_scores=Tolerance(1e-4, 1e-5),
        image_embeds=Tolerance(1e-5, 1e-5),
    ),
    "fp16": DtypeTolerances(
        logits=Tolerance(2e-3, 2e-2),
        kv=Tolerance(2e-3, 2e-2),
        visual_scores=Tolerance(2e-3, 2e-2),
        image_embeds=Tolerance(2e-3, 2e-2),
    ),
}


VERIFY_QUESTION = "What colour is the circle?"
VERIFY_TILES = 2  # a grid of two tiles' worth of visual tokens, random pixels
VERIFY_DECODE_STEPS = 2


@dataclass(frozen=True)
class Check:
    """One compared tensor."""

    name: str  # e.g. "decode 1 logits"
    diff: float  # max |ort - torch|
    bound: float  # the tolerance it must stay within

    @property
    def ok(self) -> bool:
        return self.diff <= self.bound


@dataclass(frozen=True)
class VerifyReport:
    dtype: str
    checks: tuple[Check, ...]

    def lines(self) -> list[str]:
        return [
            f"{'ok  ' if c.ok else 'FAIL'} {c.name}: max|diff| {c.diff:.3e} (bound {c.bound:.3e})"
            for c in self.checks
        ]

    def raise_if_failed(self) -> None:
        failed = [c for c in self.checks if not c.ok]
        if failed:
            names = ", ".join(f"{c.name} {c.diff:.3e} > {c.bound:.3e}" for c in failed)
            raise ValueError(f"{self.dtype} export differs from PyTorch beyond tolerance: {names}")


@dataclass(frozen=True, eq=False)
class ReferencePass:
    """One PyTorch forward pass, copied out of the live cache."""

    logits: np.ndarray  # [seq, vocab]
    kv: list[np.ndarray]  # key_0, value_0, ... each [kv_heads, past + seq, head_dim]
    visual_scores: np.ndarray  # [past + seq]: DESIGN's sum over layers, heads and scored queries


def reference_passes(
    model: InternVLForConditionalGeneration,
    input_ids: np.ndarray,
    pixel_values: np.ndarray,
    visual_end: int,
    decode_steps: int,
) -> tuple[list[ReferencePass], list[int]]:
    """transformers' own forward (eager attention): a prefill, then greedy decode steps.

    Returns the passes and the tokens fed to the decode steps.
    """
    ids = torch.tensor(np.asarray(input_ids, dtype=np.int64))[None]  # [1, S]
    # Prefill scores count the queries after the image; decode steps count their one query.
    query_mask = (torch.arange(ids.shape[1]) >= visual_end).float()  # [S]
    with torch.no_grad():
        out = model(
            input_ids=ids,
            pixel_values=torch.from_numpy(pixel_values).to(model.dtype),
            attention_mask=torch.ones_like(ids),
            use_cache=True,
            output_attentions=True,
        )
        passes, fed = [_reference_pass(out, query_mask)], []
        for _ in range(decode_steps):
            token = int(out.logits[0, -1].argmax())
            fed.append(token)
            total = out.past_key_values.get_seq_length() + 1
            out = model(
                input_ids=torch.tensor([[token]]),
                past_key_values=out.past_key_values,
                attention_mask=torch.ones(1, total, dtype=torch.int64),
                use_cache=True,
                output_attentions=True,
            )
            passes.append(_reference_pass(out, torch.ones(1)))
    return passes, fed


def _reference_pass(out, query_mask: torch.Tensor) -> ReferencePass:
    # attentions: per layer [1, heads, seq, past + seq]; query_mask: [seq]
    scores = sum((a[0].float() * query_mask[None, :, None]).sum(dim=(0, 1)) for a in out.attentions)
    kv = []
    for layer in out.past_key_values.layers:
        kv += [layer.keys[0].float().numpy().copy(), layer.values[0].float().numpy().copy()]
    return ReferencePass(logits=out.logits[0].float().numpy(), kv=kv, visual_scores=scores.numpy())


def verify_export(model_dir: str | Path, edge_dir: str | Path, dtype: str, seed: int = 0) -> VerifyReport:
    """Compare an export with the float32 PyTorch model on one random-pixel sample."""
    edge = EdgeModel.load(edge_dir, providers=[CPU])
    model = load_model(model_dir, "fp32")
    tol = TOLERANCES[dtype]
    tiling = edge.files.tiling
    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((VERIFY_TILES, 3, tiling.tile_size, tiling.tile_size)).astype(
        np.float32
    )
    prompt = build_prompt(edge.files, VERIFY_QUESTION, VERIFY_TILES * tiling.tokens_per_tile)
    visual = slice(prompt.visual_start, prompt.visual_end)

    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.from_numpy(pixel_values)).pooler_output
    reference_embeds = features.reshape(-1, features.shape[-1]).numpy()
    image_embeds = edge.encode_image(pixel_values)
    name = f"vision image_embeds ({edge.sidecar.vision_graph} graph)"
    checks = [_check(name, image_embeds, reference_embeds, tol.image_embeds)]

    passes, fed = reference_passes(
        model, prompt.input_ids, pixel_values, prompt.visual_end, VERIFY_DECODE_STEPS
    )
    embeds = edge.embed(prompt.input_ids)
    embeds[visual] = image_embeds
    length = len(prompt.input_ids)
    query_mask = (np.arange(length) >= prompt.visual_end).astype(np.float32)
    prefill = (embeds[None], np.arange(length)[None], query_mask[None])
    # lean graphs: KV buffers of exactly what the passes below fill (not the whole context)
    capacity = length + VERIFY_DECODE_STEPS
    step = edge.decode(*prefill, edge.empty_cache(capacity=capacity), num_logits=length)
    # what generation runs: the head on the last position only
    last = edge.decode(*prefill, edge.empty_cache(capacity=capacity), num_logits=1)
    checks.append(_check("prefill last logits", last.logits[0], passes[0].logits[-1:], tol.logits))
    steps = [step]
    for index, token in enumerate(fed):
        feed = edge.embed(np.array([token]))[None]
        step = edge.decode(feed, np.array([[length + index]]), np.ones((1, 1), np.float32), step.cache)
        steps.append(step)

    for index, (ort_step, ref) in enumerate(zip(steps, passes, strict=True)):
        name = "prefill" if index == 0 else f"decode {index}"
        checks.append(_check(f"{name} logits", ort_step.logits[0], ref.logits, tol.logits))
        # every layer's key and value, flattened into one vector per side
        kv = np.concatenate(
            [value[0].astype(np.float32).ravel() for value in edge.cache_arrays(ort_step.cache)]
        )
        checks.append(_check(f"{name} kv", kv, np.concatenate([t.ravel() for t in ref.kv]), tol.kv))
        checks.append(
            _check(f"{name} visual_scores", ort_step.visual_scores[0], ref.visual_scores, tol.visual_scores)
        )
    return VerifyReport(dtype=dtype, checks=tuple(checks))


def _check(name: str, ours: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> Check:
    if ours.shape != reference.shape:
        return Check(
            f"{name} shape {ours.shape} != {reference.shape}", float("inf"), tolerance.bound(reference)
        )
    diff = float(np.abs(ours.astype(np.float64) - reference.astype(np.float64)).max(initial=0.0))
    return Check(name, diff, tolerance.bound(reference))
