"""Quality: what pruning keeps of the large model's accuracy, and what the SEE cascade saves.

On the first ``--n`` examples of the synthetic test split (``stitchvlm.shared.synthetic``,
``--family`` basic or crowded; exact match, greedy, ``--max-new-tokens`` 4 or 6 by family), in one
process:

- **large**: the large checkpoint, unpruned (``SGPModel`` with no kept set);
- **small**: the small checkpoint through its ONNX export (``EdgeModel``, CPU EP);
- the large model with ``R`` of its visual tokens kept from layer ``K`` on
  (``SGPModel``, ``--prune-layer``, default 2), R in 64%, 35%, 9%, the kept set
  chosen by:
  - **sgp**: the small model's score ``A = A^P + sum A^D`` from its greedy
    generation on ONNX Runtime (what the edge sends), top-R;
  - **sgp_prefill**: the small model's prefill-only score ``A^P`` (the
    prefill pass's in-graph score over the visual span), top-R;
  - **sgp_k0**: ``A`` as sgp, pruned before the first layer (K = 0);
  - **fastv**: the large model's OWN attention at layer ``K - 1`` of the
    prompt pass: the mean over heads of the LAST prompt position's attention
    on each visual token (FastV's ranking, as its reference implementation
    does it), top-R, pruned from layer K;
  - **random**: seeded uniform scores (one draw per example, so the kept sets
    are nested across R), top-R;
  - **oracle**: the large model's own global attention, ``A``'s definition
    computed from the large model's full generation (one eager teacher-forced
    pass over prompt + generated answer with ``output_attentions``; by
    causality the same probabilities as prefill + decode steps).
- **the paper's operating points** (DESIGN "The paper's token ratio"): K at the
  paper's fraction of depth (2/48, 9/48, 19/48 of the large model's L layers,
  rounded to a layer and at least 1 so that FastV has a layer to read) with
  r = 5%, 20%, 40% kept from layer K on; each (K, r) point runs its own
  ``SGPModel`` (the cloud keeps K a server setting). Reported: the
  layer-averaged token ratio ``(K + (L - K) k / |V|) / L`` (k the kept count),
  the FLOP ratio to the unpruned large model, and for sgp, sgp_prefill, fastv
  (at K - 1 of that point), random and oracle the accuracy with its standard
  error; columns ``<method>_p9``, ``_p35``, ``_p64`` (named after the paper's
  ratios, whatever this model's ratio comes out).
- **ranking quality apart from accuracy**, per operating point: the overlap of
  each method's top-r set with the oracle's (share of the oracle's k tokens it
  also keeps) and the Spearman rank correlation of its scores with the
  oracle's over all |V| tokens (``overlap_<method>_<p>``,
  ``spearman_<method>_<p>``); and, against the scene itself rather than a
  model, the share of the visual tokens under the question's region (the
  object or objects its answer is read from) that the top-r set keeps, for
  these methods and the oracle (``region_<method>_<p>``; random keeps k / |V|
  of them on average).
- **scene** (``scene_<p>``, at the operating points only): the kept set takes
  the question's region's tokens first, then the oracle's order; what a guide
  that knew where the answer is could keep, a reference for the others.
- **how much a score concentrates on what the question reads**: the share of
  a score's mass on the region's tokens divided by the region's share of the
  tokens (1 = no preference; ``lift_<method>`` for the small model's A and
  A^P, FastV's ranking at K and the oracle), and the same for each layer of the large model alone
  (its attention from the text after the image, summed over heads:
  ``lift_layer<l>``). A guide can only keep the tokens its own map prefers.
- **SEE cascade**: for every threshold tau (each distinct gate value, so the
  sweep is exact), exit rate = share with ``gate >= tau``; cascade accuracy =
  the small model's answer when it exits, else large + sgp at
  ``--cascade-retention`` (default 9%, the SDK default; the unpruned large
  model as a second reference); gates: combined ``S = (S_conf + S_cons)/2``,
  confidence only, consistency only. ``exit_rate_at_1pt``: the highest exit
  rate of the combined gate whose cascade accuracy is at least large - 1 point.
- **relative compute** = (small cost + (1 - exit rate) x pruned-large cost) /
  unpruned-large cost. Costs are FLOPs counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on the first example (all test
  images have one size, so every example has the same |V|): vision tower +
  prompt (prefill) pass; for the small model also its S_cons pass (prompt with
  the top r_c tokens, K = 0). Decode steps (1-2 tokens here) are left out.

Writes ``--out``/quality.md (tables), quality_retention.png, quality_see.png and
quality_records.json (every answer); progress on stderr; the last stdout line
is one JSON object. It neither trains nor exports by itself (the ONNX export is
``stitch-export``'s, cached as the demo caches it).

    python bench/quality.py                       # the embedded pair, n = 300
    python bench/quality.py --n 40 --small DIR --large DIR
    python bench/quality.py --family crowded     # the crowded pair (shared/models/crowded), n = 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pair_presets import FAMILY_MAX_NEW_TOKENS, FAMILY_OUT  # bench/pair_presets.py
from quality_report import (  # bench/quality_report.py; the column tables are re-exported
    CURVE,
    GATES,
    LIFTED_METHODS,
    PAPER_METHODS,  # noqa: F401
    PAPER_POINTS,
    PRUNED_METHODS,  # noqa: F401
    RANKED_METHODS,
    RETENTIONS,
    key,
    markdown,
    plot,
)
from torch.utils.flop_counter import FlopCounterMode
from transformers import InternVLForConditionalGeneration

from stitchvlm.cloud.sgp import SGPModel, kept_sequence_positions
from stitchvlm.edge.demo import (
    EMBEDDED_LARGE,
    EMBEDDED_SMALL,
    default_cache_dir,
    embedded_model_dir,
    ensure_export,
)
from stitchvlm.edge.gate import DEFAULT_CONSISTENCY_RETENTION, consistency_probs
from stitchvlm.edge.runtime import CPU, EdgeGeneration, EdgeModel
from stitchvlm.shared.model_files import ModelFiles
from stitchvlm.shared.preprocess import compute_layout, preprocess_image, token_regions
from stitchvlm.shared.prompt import PromptIds, build_prompt, decode_answer
from stitchvlm.shared.scoring import confidence_score, consistency_score, keep_count, top_r_indices
from stitchvlm.shared.synthetic import (
    DEFAULT_FAMILY,
    FAMILIES,
    Example,
    exact_match,
    family_qtypes,
    iter_dataset,
)

RESULTS = Path(__file__).resolve().parent / "results"
# Per family: the pair it is scored on by default (the committed pair train_pair.py writes)
# and where its report goes.
_CROWDED = Path(__file__).resolve().parent.parent / FAMILY_OUT["crowded"]
FAMILY_PAIR = {
    "basic": (embedded_model_dir(EMBEDDED_SMALL), embedded_model_dir(EMBEDDED_LARGE)),
    "crowded": (_CROWDED / "crowded-small", _CROWDED / "crowded-large"),
}
FAMILY_RESULTS = {"basic": RESULTS, "crowded": RESULTS / "crowded"}


def progress(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class QualityConfig:
    """One benchmark run."""

    small_dir: Path  # small checkpoint (exported to ONNX for the edge runtime)
    large_dir: Path  # large checkpoint (PyTorch)
    n: int = 300  # test examples: the first n of the test split
    seed: int = 0  # test split seed
    prune_layer: int = 2  # K of the pruned large model (>= 1: FastV needs layer K - 1)
    cascade_retention: float = 0.09  # R of the escalated requests in the SEE sweep
    consistency_retention: float = DEFAULT_CONSISTENCY_RETENTION  # r_c of S_cons
    max_new_tokens: int | None = None  # None: FAMILY_MAX_NEW_TOKENS of the family
    random_seed: int = 0  # seed of the random-token baseline
    out_dir: Path = Path("bench/results")  # tables, plots, records
    cache_dir: Path | None = None  # ONNX export cache; None: the demo's default
    family: str = DEFAULT_FAMILY  # task family of the test split (synthetic.FAMILIES)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown task family {self.family!r}; expected one of {FAMILIES}")
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", FAMILY_MAX_NEW_TOKENS[self.family])
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.prune_layer < 1:
            raise ValueError("prune_layer must be >= 1: FastV ranks by the attention of layer K - 1")
        if self.cascade_retention not in RETENTIONS:
            raise ValueError(f"cascade_retention must be one of {RETENTIONS}")


# ----------------------------------------------------------------------------- pure pieces


def fastv_scores(layer_attention: np.ndarray, query: int, visual_start: int, visual_end: int) -> np.ndarray:
    """FastV's ranking: the mean over heads of query ``query``'s attention on each visual token.

    layer_attention: [heads, T, T] softmax probabilities of layer K - 1. Returns [|V|] float64.
    """
    return layer_attention[:, query, visual_start:visual_end].astype(np.float64).mean(axis=0)


def global_attention_scores(attentions: np.ndarray, visual_start: int, visual_end: int) -> np.ndarray:
    """DESIGN's score A from every layer's attention of one causal pass over prompt (+ answer).

    attentions: [layers, heads, T, T]. Sums attn[l, h, q, v] over layers, heads and
    every query q after the image (q >= visual_end). Returns [|V|] float64.
    """
    return layer_scores(attentions, visual_start, visual_end).sum(axis=0)


def paper_layer(fraction: float, num_layers: int) -> int:
    """K at ``fraction`` of depth: rounded to a layer, at least 1 (FastV reads layer K - 1)."""
    return min(num_layers, max(1, round(fraction * num_layers)))


def token_ratio(prune_layer: int, num_layers: int, kept: int, num_visual: int) -> float:
    """The paper's layer-averaged token ratio: every visual token in layers 0..K-1, ``kept`` of
    ``num_visual`` from layer K on, averaged over the ``num_layers`` layers."""
    return (prune_layer + (num_layers - prune_layer) * kept / num_visual) / num_layers


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``x`` [n], ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors [n] (ties averaged); nan when one is constant."""
    ra, rb = average_ranks(np.asarray(a)), average_ranks(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def top_overlap(scores: np.ndarray, reference: np.ndarray, retention: float) -> float:
    """Share of ``reference``'s top-R set (DESIGN's selection) that ``scores``' top-R set also holds."""
    kept, wanted = top_r_indices(scores, retention), top_r_indices(reference, retention)
    return len(np.intersect1d(kept, wanted)) / len(wanted)


def region_mask(example: Example, tiling) -> np.ndarray:
    """[|V|] bool: the visual tokens whose image box overlaps the question's region (``example.region``)."""
    width, height = example.image.size
    boxes = token_regions(compute_layout(width, height, tiling), width, height)  # [V, 4]
    x0, y0, x1, y1 = example.region
    return (np.minimum(boxes[:, 2], x1) > np.maximum(boxes[:, 0], x0)) & (
        np.minimum(boxes[:, 3], y1) > np.maximum(boxes[:, 1], y0)
    )


def region_recall(scores: np.ndarray, inside: np.ndarray, retention: float) -> float:
    """Share of the ``inside`` tokens [|V|] that ``scores``' top-R set keeps; nan when none is inside."""
    if not inside.any():
        return float("nan")
    return float(inside[top_r_indices(scores, retention)].sum() / inside.sum())


def region_first(scores: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Scores [|V|] that rank every ``inside`` token above every other, each group in ``scores``'
    order (``scores`` >= 0): a kept set chosen from the scene's truth, not from any model."""
    return scores / max(float(scores.max()), 1e-30) + 2.0 * inside


def region_lift(scores: np.ndarray, inside: np.ndarray) -> float:
    """Share of ``scores``' mass [|V|] on the ``inside`` tokens over the share of tokens inside
    (1: no preference for the region); nan when no token is inside or the scores sum to 0."""
    total = float(scores.sum())
    if not inside.any() or total <= 0:
        return float("nan")
    return float(scores[inside].sum()) / total / float(inside.mean())


def layer_scores(attentions: np.ndarray, visual_start: int, visual_end: int) -> np.ndarray:
    """Per layer, the attention on each visual token from every query after the image, summed over
    heads and queries: [layers, |V|] (their sum over layers is ``global_attention_scores``)."""
    return attentions[:, :, visual_end:, visual_start:visual_end].astype(np.float64).sum(axis=(1, 2))


def standard_error(correct: np.ndarray) -> float:
    """Standard error of a mean of 0/1 outcomes [n]: sqrt(p (1 - p) / n)."""
    p = float(np.mean(correct))
    return float(np.sqrt(p * (1 - p) / len(correct)))


def random_scores(num_visual: int, random_seed: int, index: int) -> np.ndarray:
    """Uniform scores [|V|] for example ``index``; one draw per example, so top-R sets are nested."""
    return np.random.default_rng([random_seed, index]).random(num_visual)


@dataclass(frozen=True)
class Sweep:
    """The SEE gate's exact threshold sweep over one run."""

    taus: np.ndarray  # [m] thresholds, ascending; the last is +inf (nothing exits)
    exit_rates: np.ndarray  # [m] share of examples with gate >= tau
    accuracies: np.ndarray  # [m] cascade accuracy: small when exiting, else the escalated answer


def sweep_thresholds(gate: np.ndarray, small_correct: np.ndarray, escalated_correct: np.ndarray) -> Sweep:
    """Every distinct operating point: tau at each distinct gate value, then +inf.

    gate, small_correct, escalated_correct: [n]. Exit when ``gate >= tau`` (the SDK's rule).
    """
    gate = np.asarray(gate, np.float64)
    taus = np.append(np.unique(gate), np.inf)  # [m]
    exits = gate[None, :] >= taus[:, None]  # [m, n]
    correct = np.where(exits, np.asarray(small_correct, bool), np.asarray(escalated_correct, bool))  # [m, n]
    return Sweep(taus=taus, exit_rates=exits.mean(axis=1), accuracies=correct.mean(axis=1))


def best_exit_rate(sweep: Sweep, reference_accuracy: float, margin: float = 0.01) -> int | None:
    """Index of the sweep point with the highest exit rate whose accuracy >= reference - margin.

    None when no point gets there. A 1e-12 slack absorbs float rounding of "exactly one point below".
    """
    ok = sweep.accuracies >= reference_accuracy - margin - 1e-12  # [m]
    if not ok.any():
        return None
    return int(np.flatnonzero(ok)[np.argmax(sweep.exit_rates[ok])])


def relative_compute(exit_rate, small_cost: float, escalated_cost: float, reference_cost: float):
    """(small + (1 - exit rate) x escalated) / reference: every question runs the small model,
    the escalated share also the pruned large one; reference = the unpruned large model alone."""
    return (small_cost + (1.0 - np.asarray(exit_rate, np.float64)) * escalated_cost) / reference_cost


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs of ``run()`` as ``FlopCounterMode`` counts them (matmuls, convolutions, SDPA)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- the small model


@dataclass(frozen=True)
class SmallOutcome:
    answer: str  # greedy answer on ONNX Runtime
    s_conf: float  # SEE confidence
    s_cons: float  # SEE consistency
    scores: np.ndarray  # [|V|] A = A^P + sum A^D
    prefill_scores: np.ndarray  # [|V|] A^P


def prefill_scores(model: EdgeModel, gen: EdgeGeneration) -> np.ndarray:
    """A^P of ``gen``: the in-graph score of one prefill pass over its prompt, queries after the image."""
    prompt = gen.prompt
    length, start, end = len(prompt.input_ids), prompt.visual_start, prompt.visual_end
    embeds = model.embed(prompt.input_ids)  # [S, hidden]
    embeds[start:end] = gen.image_embeds
    query_mask = (np.arange(length) >= end).astype(np.float32)  # [S]
    step = model.decode(
        embeds[None], np.arange(length)[None], query_mask[None], model.empty_cache(), num_logits=1
    )
    return step.visual_scores[0, start:end].astype(np.float64)


def run_small(model: EdgeModel, example: Example, config: QualityConfig) -> SmallOutcome:
    gen = model.generate(example.image, example.question, config.max_new_tokens)
    return SmallOutcome(
        answer=gen.text,
        s_conf=confidence_score(gen.token_probs),
        s_cons=consistency_score(consistency_probs(model, gen, config.consistency_retention)),
        scores=gen.visual_scores,
        prefill_scores=prefill_scores(model, gen),
    )


# ----------------------------------------------------------------------------- the large model


@dataclass(frozen=True, eq=False)
class LargeInput:
    """One example ready for the large model."""

    prompt: PromptIds
    inputs_embeds: torch.Tensor  # [1, S, hidden] with the image features spliced in


class TorchVLM:
    """A checkpoint in PyTorch with eager attention (its probabilities feed FastV and the oracle)."""

    def __init__(self, model_dir: Path, prune_layer: int):
        self.files = ModelFiles.load(model_dir)
        model = InternVLForConditionalGeneration.from_pretrained(
            model_dir, attn_implementation="eager", local_files_only=True
        ).eval()
        self.sgp = SGPModel(model, prune_layer)  # pruned from layer K
        self.sgp_k0 = SGPModel(model, 0)  # pruned before the first layer
        self.model = model
        self.prune_layer = self.sgp.prune_layer
        self.num_layers = self.sgp.num_layers
        # the paper's operating points: name -> K on this model's depth, each K its own SGPModel
        self.paper_layers = {name: paper_layer(f, self.num_layers) for name, (f, _) in PAPER_POINTS.items()}
        self.sgp_at = {k: SGPModel(model, k) for k in sorted(set(self.paper_layers.values()))}

    def prepare(self, example: Example) -> LargeInput:
        pixel_values, layout = preprocess_image(example.image, self.files.tiling)
        prompt = build_prompt(self.files, example.question, layout.num_visual_tokens)
        features = self.sgp.image_features(torch.from_numpy(pixel_values))
        return LargeInput(prompt, self.sgp.embed(torch.from_numpy(prompt.input_ids), features))

    def keep_positions(self, inp: LargeInput, keep_visual: np.ndarray | None) -> torch.Tensor | None:
        if keep_visual is None:
            return None
        prompt = inp.prompt
        return kept_sequence_positions(
            len(prompt.input_ids),
            prompt.visual_start,
            prompt.num_visual_tokens,
            torch.from_numpy(keep_visual),
        )

    def generate(
        self, inp: LargeInput, keep_visual: np.ndarray | None, max_new_tokens: int, k0=False, layer=None
    ):
        """Greedy token ids with ``keep_visual`` (ascending visual indices; None = all) from layer K
        (or 0 with ``k0``, or ``layer``, one of ``paper_layers``' values)."""
        sgp = self.sgp_k0 if k0 else (self.sgp if layer is None else self.sgp_at[layer])
        keep = self.keep_positions(inp, keep_visual)
        return sgp.generate(inp.inputs_embeds, keep, max_new_tokens, self.files.eos_token_ids).token_ids

    @torch.inference_mode()
    def attention_maps(self, inp: LargeInput, answer: Sequence[int]) -> np.ndarray:
        """[layers, heads, T, T] attention of one eager pass over prompt + answer[:-1] (T = S + N - 1)."""
        fed = torch.tensor(list(answer[:-1]), dtype=torch.long)[None]  # [1, N-1]
        embeds = torch.cat([inp.inputs_embeds, self.model.model.language_model.embed_tokens(fed)], dim=1)
        out = self.model.model.language_model(inputs_embeds=embeds, output_attentions=True)
        return torch.cat(out.attentions).float().numpy()

    def fastv_at(self, inp: LargeInput, attentions: np.ndarray, layer: int) -> np.ndarray:
        """FastV's ranking [|V|] for pruning from ``layer``: layer - 1's last prompt position."""
        prompt = inp.prompt
        last_prompt = len(prompt.input_ids) - 1
        return fastv_scores(attentions[layer - 1], last_prompt, prompt.visual_start, prompt.visual_end)

    def attention_scores(self, inp: LargeInput, answer: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(FastV scores at K, oracle scores), each [|V|], from one eager pass over prompt + answer[:-1]."""
        attentions = self.attention_maps(inp, answer)
        oracle = global_attention_scores(attentions, inp.prompt.visual_start, inp.prompt.visual_end)
        return self.fastv_at(inp, attentions, self.prune_layer), oracle


# ----------------------------------------------------------------------------- one example


def evaluate_example(
    index: int, example: Example, edge: EdgeModel, large: TorchVLM, config: QualityConfig
) -> dict:
    """Every method's answer to one example, the gate's scores and the truth."""
    small = run_small(edge, example, config)
    inp = large.prepare(example)
    answers = {"small": small.answer}
    full = large.generate(inp, None, config.max_new_tokens)
    answers["large"] = decode_answer(large.files, full)
    attentions = large.attention_maps(inp, full)
    per_layer = layer_scores(attentions, inp.prompt.visual_start, inp.prompt.visual_end)  # [L, |V|]
    oracle = per_layer.sum(axis=0)  # global_attention_scores, without slicing the maps again
    fastv = large.fastv_at(inp, attentions, large.prune_layer)
    ranked = {
        "sgp": small.scores,
        "sgp_prefill": small.prefill_scores,
        "sgp_k0": small.scores,
        "fastv": fastv,
        "random": random_scores(len(small.scores), config.random_seed, index),
        "oracle": oracle,
    }
    for method, scores in ranked.items():
        for retention in RETENTIONS:
            keep = top_r_indices(scores, retention)
            ids = large.generate(inp, keep, config.max_new_tokens, k0=method == "sgp_k0")
            answers[key(method, retention)] = decode_answer(large.files, ids)
    ranking = {}
    inside = region_mask(example, large.files.tiling)
    scene = region_first(oracle, inside)  # the same at every point; only FastV's layer moves
    for point, (_, retention) in PAPER_POINTS.items():
        layer = large.paper_layers[point]
        at_point = {**ranked, "fastv": large.fastv_at(inp, attentions, layer), "scene": scene}
        for method in PAPER_METHODS:
            ids = large.generate(
                inp, top_r_indices(at_point[method], retention), config.max_new_tokens, layer=layer
            )
            answers[f"{method}_{point}"] = decode_answer(large.files, ids)
        for method in RANKED_METHODS:
            ranking[f"overlap_{method}_{point}"] = top_overlap(at_point[method], oracle, retention)
            ranking[f"spearman_{method}_{point}"] = spearman(at_point[method], oracle)
        for method in (*RANKED_METHODS, "oracle"):
            ranking[f"region_{method}_{point}"] = region_recall(at_point[method], inside, retention)
    for method in LIFTED_METHODS:
        ranking[f"lift_{method}"] = region_lift(ranked[method], inside)
    for layer, scores in enumerate(per_layer):
        ranking[f"lift_layer{layer}"] = region_lift(scores, inside)
    return {
        "index": index,
        "qtype": example.qtype,
        "question": example.question,
        "truth": example.answer,
        "s_conf": small.s_conf,
        "s_cons": small.s_cons,
        "answers": answers,
        "correct": {name: exact_match(text, example.answer) for name, text in answers.items()},
        "ranking": ranking,
    }


def measure_costs(example: Example, large: TorchVLM, config: QualityConfig) -> dict[str, float]:
    """FLOPs of the small model's edge work and of the large model unpruned and at each R."""
    inp = large.prepare(example)
    pixels = torch.from_numpy(preprocess_image(example.image, large.files.tiling)[0])
    num_visual = inp.prompt.num_visual_tokens
    vision = count_flops(lambda: large.sgp.image_features(pixels))
    costs = {"large": vision + count_flops(lambda: large.sgp.prefill(inp.inputs_embeds, None))}
    for retention in RETENTIONS:
        keep = large.keep_positions(inp, np.arange(keep_count(retention, num_visual)))
        costs[key("sgp", retention)] = vision + count_flops(
            lambda k=keep: large.sgp.prefill(inp.inputs_embeds, k)
        )
    for point, (_, retention) in PAPER_POINTS.items():
        keep = large.keep_positions(inp, np.arange(keep_count(retention, num_visual)))
        sgp = large.sgp_at[large.paper_layers[point]]
        costs[f"sgp_{point}"] = vision + count_flops(lambda k=keep, m=sgp: m.prefill(inp.inputs_embeds, k))
    small = TorchVLM(config.small_dir, prune_layer=1)  # the ONNX graphs' PyTorch twin, for counting only
    s_inp = small.prepare(example)
    s_pixels = torch.from_numpy(preprocess_image(example.image, small.files.tiling)[0])
    r_c = keep_count(config.consistency_retention, s_inp.prompt.num_visual_tokens)
    consistency = small.keep_positions(s_inp, np.arange(r_c))
    costs["small"] = (
        count_flops(lambda: small.sgp.image_features(s_pixels))
        + count_flops(lambda: small.sgp.prefill(s_inp.inputs_embeds, None))
        + count_flops(lambda: small.sgp_k0.prefill(s_inp.inputs_embeds, consistency))
    )
    return {name: float(value) for name, value in costs.items()}


# ----------------------------------------------------------------------------- summary


def paper_points(large: TorchVLM, num_visual: int, costs: dict[str, float]) -> dict[str, dict]:
    """Each operating point's K, r, kept count, layer-averaged token ratio and FLOP ratio on this model."""
    points = {}
    for point, (fraction, retention) in PAPER_POINTS.items():
        layer, kept = large.paper_layers[point], keep_count(retention, num_visual)
        points[point] = {
            "depth_fraction": fraction,
            "layer": layer,
            "num_layers": large.num_layers,
            "retention": retention,
            "kept": kept,
            "num_visual": num_visual,
            "token_ratio": token_ratio(layer, large.num_layers, kept, num_visual),
            "flop_ratio": costs[f"sgp_{point}"] / costs["large"],
        }
    return points


def summarize(
    records: Sequence[dict], costs: dict[str, float], config: QualityConfig, points: dict | None = None
) -> dict:
    """Accuracies with standard errors, per question type, ranking agreement with the oracle, the
    three gates' sweeps and their best points at 1 point."""
    names = list(records[0]["correct"])
    correct = {name: np.array([r["correct"][name] for r in records]) for name in names}  # each [n]
    accuracy = {name: float(c.mean()) for name, c in correct.items()}
    stderr = {name: standard_error(c) for name, c in correct.items()}
    qtypes = np.array([r["qtype"] for r in records])
    per_qtype = {
        name: {
            q: float(correct[name][qtypes == q].mean())
            for q in family_qtypes(config.family)
            if (qtypes == q).any()
        }
        for name in names
    }
    ranking = {}
    for name in records[0].get("ranking", {}):
        values = np.array(
            [r["ranking"][name] for r in records], dtype=np.float64
        )  # [n], nan: constant scores
        values = values[~np.isnan(values)]
        mean = float(values.mean()) if len(values) else float("nan")
        se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        ranking[name] = {"mean": mean, "se": se}
    paired = {}  # SGP minus FastV per operating point, paired over examples
    for point in PAPER_POINTS:
        if f"sgp_{point}" in correct:
            diff = correct[f"sgp_{point}"].astype(float) - correct[f"fastv_{point}"].astype(float)
            se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
            paired[point] = {"sgp_minus_fastv": float(diff.mean()), "se": se}
    s_conf = np.array([r["s_conf"] for r in records])
    s_cons = np.array([r["s_cons"] for r in records])
    gates = {"combined": (s_conf + s_cons) / 2, "confidence": s_conf, "consistency": s_cons}
    escalated = key("sgp", config.cascade_retention)
    see = {}
    for gate, values in gates.items():
        for label, target in (("pruned", escalated), ("unpruned", "large")):
            sweep = sweep_thresholds(values, correct["small"], correct[target])
            compute = relative_compute(sweep.exit_rates, costs["small"], costs[target], costs["large"])
            best = best_exit_rate(sweep, accuracy["large"])
            columns = (sweep.taus, sweep.exit_rates, sweep.accuracies, compute)
            curve = {name: [float(v) for v in column] for name, column in zip(CURVE, columns, strict=True)}
            curve["best"] = None if best is None else {name: curve[name][best] for name in CURVE}
            see[f"{gate}/{label}"] = curve
    return {
        "n": len(records),
        "accuracy": accuracy,
        "stderr": stderr,
        "per_qtype": per_qtype,
        "ranking": ranking,
        "paired": paired,
        "points": points or {},
        "see": see,
        "costs": costs,
    }


def headline(summary: dict, config: QualityConfig, seconds: float) -> dict:
    """The last stdout line: accuracies by column name and the exit rates at 1 point."""
    out = {"n": summary["n"], **{k: round(v, 4) for k, v in summary["accuracy"].items()}}
    best = {name: curve["best"] or {} for name, curve in summary["see"].items()}  # {} where none gets there
    for gate in GATES:
        name = "exit_rate_at_1pt" if gate == "combined" else f"exit_rate_at_1pt_{gate}"
        out[name] = best[f"{gate}/pruned"].get("exit_rate")
    out["relative_compute_at_1pt"] = best["combined/pruned"].get("relative_compute")
    out["exit_rate_at_1pt_unpruned"] = best["combined/unpruned"].get("exit_rate")
    out["cascade_retention"] = config.cascade_retention
    out["prune_layer"] = config.prune_layer
    out["family"] = config.family
    out.update({name: round(value["mean"], 4) for name, value in summary["ranking"].items()})
    for point, geometry in summary["points"].items():
        out[f"layer_{point}"] = geometry["layer"]
        out[f"token_ratio_{point}"] = round(geometry["token_ratio"], 4)
        out[f"flop_ratio_{point}"] = round(geometry["flop_ratio"], 4)
    out["seconds"] = round(seconds, 1)
    return out


# ----------------------------------------------------------------------------- entry point


def progress_line(records: Sequence[dict], n: int, seconds: float) -> str:
    done = len(records)
    seen = " ".join(
        f"{m} {np.mean([r['correct'][m] for r in records]):.3f}" for m in ("large", "small", "sgp_r9")
    )
    return (
        f"{done}/{n} {seen} ({seconds / done:.1f} s/example, {seconds / done * (n - done) / 60:.1f} min left)"
    )


def run(config: QualityConfig) -> dict:
    """The whole benchmark; writes the outputs and returns the headline dict."""
    started = time.perf_counter()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    edge_dir = ensure_export(config.small_dir, config.cache_dir or default_cache_dir())
    edge = EdgeModel.load(edge_dir, providers=[CPU])
    large = TorchVLM(config.large_dir, config.prune_layer)
    records, costs = [], None
    for index, example in enumerate(iter_dataset("test", config.n, config.seed, family=config.family)):
        if costs is None:
            costs = measure_costs(example, large, config)
            points = paper_points(large, large.prepare(example).prompt.num_visual_tokens, costs)
        records.append(evaluate_example(index, example, edge, large, config))
        if (index + 1) % 10 == 0 or index + 1 == config.n:
            progress(progress_line(records, config.n, time.perf_counter() - started))
    summary = summarize(records, costs, config, points)
    seconds = time.perf_counter() - started
    meta = {"date": time.strftime("%Y-%m-%d"), "seconds": seconds}
    (config.out_dir / "quality.md").write_text(markdown(summary, config, meta))
    (config.out_dir / "quality_records.json").write_text(
        json.dumps(
            {"config": {k: str(v) for k, v in asdict(config).items()}, "summary": summary, "records": records}
        )
    )
    for path in plot(summary, config, config.out_dir):
        progress(f"wrote {path}")
    progress(f"wrote {config.out_dir / 'quality.md'}")
    return headline(summary, config, seconds)


def parse_args(argv: Sequence[str] | None) -> QualityConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small", type=Path, default=None, help="small checkpoint (default: the family's pair)"
    )
    parser.add_argument(
        "--large", type=Path, default=None, help="large checkpoint (default: the family's pair)"
    )
    parser.add_argument("--n", type=int, default=300, help="test examples")
    parser.add_argument("--seed", type=int, default=0, help="test split seed")
    parser.add_argument("--prune-layer", type=int, default=2, help="K (>= 1)")
    parser.add_argument("--cascade-retention", type=float, default=0.09, choices=RETENTIONS)
    parser.add_argument(
        "--family", choices=FAMILIES, default=DEFAULT_FAMILY, help="task family of the test split"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 4 (basic), 6 (crowded)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results[/crowded]")
    parser.add_argument("--cache", type=Path, default=None, help="ONNX export cache (default: the demo's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    args.small = args.small or FAMILY_PAIR[args.family][0]
    args.large = args.large or FAMILY_PAIR[args.family][1]
    args.out = args.out or FAMILY_RESULTS[args.family]
    if args.threads:
        torch.set_num_threads(args.threads)
    for flag, path in (("--small", args.small), ("--large", args.large)):
        if not (path / "config.json").is_file():
            parser.error(f"{flag} {path}: not a checkpoint directory")
    try:
        return QualityConfig(
            small_dir=args.small,
            large_dir=args.large,
            n=args.n,
            seed=args.seed,
            prune_layer=args.prune_layer,
            cascade_retention=args.cascade_retention,
            max_new_tokens=args.max_new_tokens,
            out_dir=args.out,
            cache_dir=args.cache,
            family=args.family,
        )
    except ValueError as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    print(json.dumps(run(config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
