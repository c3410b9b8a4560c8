"""``bench/quality.py``: its pure pieces on hand-made numbers, its rankings against transformers, and
a tiny end-to-end run.

References: hand-computed FastV rows, score sums, threshold sweeps and compute
ratios; ``InternVLForConditionalGeneration.generate(output_attentions=True)``
with eager attention for FastV's and the oracle's rankings; a plain eager
forward for the small model's prefill-only score A^P.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from transformers import InternVLForConditionalGeneration  # noqa: E402

from stitchvlm.edge.export import ExportConfig, export_edge  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeModel  # noqa: E402
from stitchvlm.shared.preprocess import preprocess_image  # noqa: E402
from stitchvlm.shared.synthetic import dataset, exact_match  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
sys.path.insert(
    0, str(SCRIPT.parent)
)  # quality.py imports its sibling quality_report.py, as when run as a script


def _load_quality():
    spec = importlib.util.spec_from_file_location("stitch_bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


quality = _load_quality()


# ----------------------------------------------------------------------------- pure pieces


def test_fastv_scores_take_the_last_query_of_one_layer_averaged_over_heads():
    """Guards against FastV ranking by the wrong query row, summing instead of averaging heads,
    or reading keys outside the visual span."""
    heads, length, start, end = 2, 6, 1, 4
    attention = np.arange(heads * length * length, dtype=np.float32).reshape(heads, length, length)
    scores = quality.fastv_scores(attention, query=4, visual_start=start, visual_end=end)
    # head 0 row 4 = 24..29, head 1 row 4 = 60..65; keys 1..3 -> (25+61)/2, (26+62)/2, (27+63)/2
    np.testing.assert_array_equal(scores, [43.0, 44.0, 45.0])
    assert scores.dtype == np.float64


def test_global_attention_scores_sum_queries_after_the_image_only():
    """Guards against the oracle counting visual or pre-image queries, or leaving out a layer."""
    layers, heads, length, start, end = 2, 3, 5, 1, 3
    attentions = np.zeros((layers, heads, length, length))
    attentions[:, :, :end, start:end] = 100.0  # queries up to the image's end must not count
    attentions[0, 0, 3, 1], attentions[1, 2, 4, 2], attentions[1, 1, 4, 1] = 0.5, 0.25, 0.125
    attentions[:, :, 3:, 0] = 7.0  # a key outside the visual span
    scores = quality.global_attention_scores(attentions, start, end)
    np.testing.assert_array_equal(scores, [0.625, 0.25])


def test_random_scores_are_seeded_per_example():
    """Guards against a random baseline that changes between runs or repeats across examples."""
    a, b = quality.random_scores(50, 0, 3), quality.random_scores(50, 0, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, quality.random_scores(50, 0, 4))
    assert not np.array_equal(a, quality.random_scores(50, 1, 3))


# The hand table: gate values, whether the small model was right, whether the escalated answer was.
GATE = np.array([0.9, 0.8, 0.7, 0.6, 0.2])
SMALL_OK = np.array([1, 1, 0, 1, 0], bool)
ESCALATED_OK = np.array([1, 1, 1, 0, 1], bool)
# tau -> (exit rate, cascade accuracy), worked out by hand:
EXPECTED = {
    0.2: (1.0, 0.6),
    0.6: (0.8, 0.8),
    0.7: (0.6, 0.6),
    0.8: (0.4, 0.8),
    0.9: (0.2, 0.8),
    np.inf: (0.0, 0.8),
}


def test_threshold_sweep_on_a_hand_table():
    """Guards against a sweep that misses operating points, uses gate > tau instead of the SDK's
    gate >= tau, or mixes up which answer an exiting question gets."""
    sweep = quality.sweep_thresholds(GATE, SMALL_OK, ESCALATED_OK)
    np.testing.assert_array_equal(sweep.taus, list(EXPECTED))
    np.testing.assert_allclose(sweep.exit_rates, [e for e, _ in EXPECTED.values()])
    np.testing.assert_allclose(sweep.accuracies, [a for _, a in EXPECTED.values()])


@pytest.mark.parametrize(
    ("reference", "expected_tau"),
    [(0.8, 0.6), (0.81, 0.6), (0.805, 0.6), (0.6, 0.2), (0.95, None)],
)
def test_exit_rate_at_1pt_picks_the_highest_exit_rate_within_one_point(reference, expected_tau):
    """Guards against picking the first or lowest qualifying threshold (the curve is not monotone:
    tau 0.7 drops below 0.6's accuracy), a margin off by 100x, or a point returned when none qualifies."""
    sweep = quality.sweep_thresholds(GATE, SMALL_OK, ESCALATED_OK)
    best = quality.best_exit_rate(sweep, reference)
    if expected_tau is None:
        assert best is None
    else:
        assert sweep.taus[best] == expected_tau
        assert sweep.exit_rates[best] == EXPECTED[expected_tau][0]


def test_relative_compute():
    """Guards against charging the pruned large model for questions that exit, or dropping the
    small model's cost, which every question pays."""
    assert quality.relative_compute(0.0, 1.0, 4.0, 10.0) == pytest.approx(0.5)
    assert quality.relative_compute(1.0, 1.0, 4.0, 10.0) == pytest.approx(0.1)
    np.testing.assert_allclose(quality.relative_compute(np.array([0.25, 0.5]), 1.0, 4.0, 10.0), [0.4, 0.3])


def test_count_flops_counts_a_matmul():
    """Guards against the compute column measuring nothing (a counter outside the call) or
    multiply-adds instead of FLOPs: [3, 4] @ [4, 5] is 2 * 3 * 4 * 5 FLOPs."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert quality.count_flops(lambda: torch.nn.functional.linear(x, w)) == 120


def test_paper_layer_and_token_ratio_reproduce_the_papers_points():
    """Guards against the operating points drifting from the paper's: on its 48 layers, K = 2, 9, 19
    with r = 5%, 20%, 40% average to 9%, 35%, 64% of the visual tokens; on shallow models K is
    rounded and never below 1."""
    ratios = []
    for fraction, retention in quality.PAPER_POINTS.values():
        layer = quality.paper_layer(fraction, 48)
        ratios.append(round(100 * quality.token_ratio(layer, 48, retention * 1000, 1000)))
    assert [quality.paper_layer(f, 48) for f, _ in quality.PAPER_POINTS.values()] == [2, 9, 19]
    assert ratios == [9, 35, 64]
    assert [quality.paper_layer(f, 12) for f, _ in quality.PAPER_POINTS.values()] == [1, 2, 5]
    assert quality.token_ratio(1, 12, 9, 192) == pytest.approx((1 + 11 * 9 / 192) / 12)


def test_spearman_and_overlap_on_hand_numbers():
    """Guards against a rank correlation that ignores ties or sign, and an overlap that counts the
    wrong set: checked on vectors worked out by hand."""
    a = np.array([0.1, 0.4, 0.3, 0.9])
    assert quality.spearman(a, a * 10 + 1) == pytest.approx(1.0)
    assert quality.spearman(a, -a) == pytest.approx(-1.0)
    # ranks of [1, 2, 2, 3] are [0, 1.5, 1.5, 3]; of [1, 2, 3, 4] are [0, 1, 2, 3]: r = 4.5 / sqrt(4.5 * 5)
    assert quality.spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(
        4.5 / np.sqrt(22.5)
    )
    assert np.isnan(quality.spearman(np.ones(4), a))
    reference = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # top 40%: tokens 0-3
    scores = np.array([5.0, 0.0, 3.0, 0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0])  # top 40%: 4, 5, 0, 2
    assert quality.top_overlap(scores, reference, 0.4) == pytest.approx(0.5)
    assert quality.standard_error(np.array([1, 0, 1, 0])) == pytest.approx(0.25)


def test_region_tokens_and_their_recall_on_a_hand_worked_layout():
    """Guards against the scene-based ranking check naming the wrong tokens (tile order, the
    thumbnail's coarser raster, boxes that only touch) or dividing by the wrong count: an object in
    grid cell (1, 0) of a 448 x 224 crowded image, worked out by hand."""
    from dataclasses import replace

    from pair_presets import CROWDED_TILING

    example = replace(dataset("test", 1, family="crowded")[0], region=(56, 0, 112, 56))
    inside = quality.region_mask(example, CROWDED_TILING)
    # tile 0 (x 0-224): 8 x 8 tokens of 28 px, rows 0-1 and columns 2-3 -> 2, 3, 10, 11; tile 1 none;
    # the thumbnail (tokens 128-191) spans the whole image, 56 x 28 px a token: column 1, rows 0-1
    assert np.flatnonzero(inside).tolist() == [2, 3, 10, 11, 129, 137]
    scores = np.zeros(192)
    scores[[3, 137, 40, 41]] = [4.0, 3.0, 2.0, 1.0]  # top 2%: k = 3 -> tokens 3, 137, 40
    assert quality.region_recall(scores, inside, 0.02) == pytest.approx(2 / 6)
    assert np.isnan(quality.region_recall(scores, np.zeros(192, bool), 0.02))
    # the scene's kept set: every region token before any other, each group in the scores' order
    first = quality.region_first(scores, inside)
    assert quality.top_r_indices(first, 0.02).tolist() == [2, 3, 137]  # k = 3: 4.0, 3.0, a tie to index 2
    assert quality.region_recall(first, inside, 0.04) == pytest.approx(1.0)  # k = 7 >= 6 inside
    assert set(quality.top_r_indices(first, 0.04)) == {2, 3, 10, 11, 129, 137, 40}


def test_region_lift_and_per_layer_scores_on_hand_numbers():
    """Guards against the concentration measure dividing by the wrong share (tokens, not mass) or the
    per-layer scores reading queries before the image or summing over layers."""
    inside = np.array([True, False, False, False])  # a quarter of the tokens
    assert quality.region_lift(np.array([2.0, 1.0, 1.0, 0.0]), inside) == pytest.approx(0.5 / 0.25)
    assert quality.region_lift(np.ones(4), inside) == pytest.approx(1.0)
    assert np.isnan(quality.region_lift(np.ones(4), np.zeros(4, bool)))
    assert np.isnan(quality.region_lift(np.zeros(4), inside))
    # 2 layers, 1 head, T = 5: position 0 text, 1-2 visual, 3-4 text after the image
    attentions = np.zeros((2, 1, 5, 5), np.float32)
    attentions[0, 0, 2, 1] = 7.0  # a visual query: not counted
    attentions[0, 0, 3, 1], attentions[0, 0, 4, 2] = 1.0, 2.0
    attentions[1, 0, 4, 1] = 3.0
    per_layer = quality.layer_scores(attentions, 1, 3)
    assert per_layer.tolist() == [[1.0, 2.0], [3.0, 0.0]]
    assert per_layer.sum(axis=0).tolist() == quality.global_attention_scores(attentions, 1, 3).tolist()


# ----------------------------------------------------------------------------- rankings vs transformers


def test_fastv_and_oracle_scores_equal_transformers_generate(tiny_large_checkpoint):
    """Guards against the one teacher-forced pass not reproducing generation's attention (wrong fed
    tokens, missing causal mask), FastV reading another layer than K - 1 or a row other than the last
    prompt token, and the oracle missing decode passes."""
    torch.manual_seed(0)
    large = quality.TorchVLM(tiny_large_checkpoint, prune_layer=2)
    example = dataset("test", 1, seed=5)[0]
    inp = large.prepare(example)
    generated = large.generate(inp, None, max_new_tokens=6)
    fastv, oracle = large.attention_scores(inp, generated)

    reference = InternVLForConditionalGeneration.from_pretrained(
        tiny_large_checkpoint, attn_implementation="eager"
    ).eval()
    ids = torch.from_numpy(inp.prompt.input_ids)[None]
    pixels = torch.from_numpy(preprocess_image(example.image, large.files.tiling)[0])
    with torch.no_grad():
        out = reference.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            max_new_tokens=6,
            do_sample=False,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    assert out.sequences[0, ids.shape[1] :].tolist() == list(generated)
    start, end = inp.prompt.visual_start, inp.prompt.visual_end
    expected_fastv = out.attentions[0][1][0, :, -1, start:end].double().mean(0).numpy()
    np.testing.assert_allclose(fastv, expected_fastv, rtol=1e-5, atol=1e-7)
    expected_oracle = np.zeros(end - start)
    for step, layers in enumerate(out.attentions):
        queries = slice(end, None) if step == 0 else slice(None)
        for attention in layers:  # [1, heads, queries, keys]
            expected_oracle += attention[0, :, queries, start:end].double().sum(dim=(0, 1)).numpy()
    np.testing.assert_allclose(oracle, expected_oracle, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_edge(tiny_checkpoint, tmp_path_factory) -> EdgeModel:
    out = tmp_path_factory.mktemp("quality-edge") / "fp32"
    export_edge(ExportConfig(model_dir=tiny_checkpoint, out_dir=out, verify=False))
    return EdgeModel.load(out, providers=[CPU])


def test_prefill_scores_equal_transformers_prompt_attention(tiny_edge, tiny_checkpoint):
    """Guards against the A^P ablation scoring visual or pre-image queries, reusing the full A,
    or reading the wrong span of the graph's score output."""
    example = dataset("test", 1, seed=2)[0]
    gen = tiny_edge.generate(example.image, example.question, 4, ignore_eos=True)
    ours = quality.prefill_scores(tiny_edge, gen)

    reference = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    ids = torch.from_numpy(gen.prompt.input_ids)[None]
    pixels = torch.from_numpy(preprocess_image(example.image, tiny_edge.files.tiling)[0])
    with torch.no_grad():
        out = reference.eval()(input_ids=ids, pixel_values=pixels, output_attentions=True)
    attentions = torch.cat(out.attentions).numpy()  # [layers, heads, S, S]
    expected = quality.global_attention_scores(attentions, gen.prompt.visual_start, gen.prompt.visual_end)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert (gen.visual_scores - ours > 0).all()  # the 3 decode passes add attention everywhere


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(("family", "n"), [("basic", 4), ("crowded", 2)])
def test_quality_end_to_end_on_tiny_checkpoints(family, n, tiny_checkpoint, tiny_large_checkpoint, tmp_path):
    """Guards against the script's outputs drifting from its records (the headline accuracy not
    being the exact-match rate of the recorded answers), missing columns, or values out of range,
    for both task families."""
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--n", str(n), "--small", str(tiny_checkpoint)]
        + ["--large", str(tiny_large_checkpoint), "--out", str(out), "--cache", str(tmp_path / "cache")]
        + ["--threads", "1", "--family", family],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    headline = json.loads(done.stdout.strip().splitlines()[-1])
    required = {"large", "small", "sgp_r9", "fastv_r9", "random_r9", "sgp_r35", "exit_rate_at_1pt"}
    required |= {"sgp_p9", "fastv_p9", "random_p9", "oracle_p9", "scene_p9", "sgp_p35", "sgp_p64"}
    required |= {"overlap_sgp_p9", "overlap_fastv_p9", "overlap_random_p9", "spearman_sgp_p9"}
    required |= {f"region_{m}_p9" for m in ("sgp", "fastv", "random", "oracle")}
    assert required <= headline.keys()
    for method in quality.PRUNED_METHODS:
        for retention in quality.RETENTIONS:
            assert 0.0 <= headline[quality.key(method, retention)] <= 1.0
    for method in quality.PAPER_METHODS:
        for point in quality.PAPER_POINTS:
            assert 0.0 <= headline[f"{method}_{point}"] <= 1.0
    for method in quality.RANKED_METHODS:
        for point in quality.PAPER_POINTS:
            assert 0.0 <= headline[f"overlap_{method}_{point}"] <= 1.0
            assert -1.0 <= headline[f"spearman_{method}_{point}"] <= 1.0
            assert 0.0 <= headline[f"region_{method}_{point}"] <= 1.0
    lifts = [f"lift_{m}" for m in quality.LIFTED_METHODS] + [f"lift_layer{layer}" for layer in range(6)]
    assert set(lifts) <= headline.keys() and "lift_layer6" not in headline  # tiny-large: 6 layers
    assert all(headline[name] >= 0 or np.isnan(headline[name]) for name in lifts)
    # tiny-large has 6 layers: K = max(1, round(6 * f)) = 1, 1, 2 for f = 2/48, 9/48, 19/48
    assert [headline[f"layer_{p}"] for p in quality.PAPER_POINTS] == [1, 1, 2]
    assert 0 < headline["flop_ratio_p9"] < headline["flop_ratio_p35"] < headline["flop_ratio_p64"] < 1
    assert headline["token_ratio_p9"] < headline["token_ratio_p35"] < headline["token_ratio_p64"] < 1
    assert headline["n"] == n and headline["family"] == family
    assert 0.0 <= headline["exit_rate_at_1pt"] <= 1.0  # a random large model is 0%: every rate qualifies
    assert headline["relative_compute_at_1pt"] > 0

    records = json.loads((out / "quality_records.json").read_text())["records"]
    examples = dataset("test", n, seed=0, family=family)
    assert [r["truth"] for r in records] == [e.answer for e in examples]
    for name in ("large", "small", "sgp_r9", "fastv_r9", "sgp_p9", "fastv_p9", "oracle_p64"):
        matches = [exact_match(r["answers"][name], e.answer) for r, e in zip(records, examples, strict=True)]
        assert headline[name] == pytest.approx(np.mean(matches))
    table = (out / "quality.md").read_text()
    assert "| large, all visual tokens |" in table and "FastV" in table
    assert (out / "quality_retention.png").stat().st_size > 1000
    assert (out / "quality_see.png").stat().st_size > 1000
    assert (out / "quality_paper.png").stat().st_size > 1000
    assert "The paper's operating points" in table and "Spearman" in table
    assert "| large model, layer 5 |" in table
