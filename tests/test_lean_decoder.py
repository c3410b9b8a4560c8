"""The lean decoder graph (``edge.lean_decoder``) against PyTorch and the explicit graph.

References: transformers' own forward and ``generate`` with eager attention
(logits, KV, attention probabilities for the score), and the traced explicit
graph (``export_modules.ScoringDecoder``), which stays the reference the built
graph is tested against (STYLE 14). The model is ``test_export``'s sharpened
tiny checkpoint (peaked attention, so masking, RoPE or score bugs show). fp32.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from conftest import make_test_image  # noqa: E402
from test_export import (  # noqa: E402
    FP32_LOGITS_ATOL,
    SAMPLES,
    _hf_passes,
    _prefill_inputs,
    _sample,  # noqa: E402
)
from test_runtime import CASES, MAX_NEW_TOKENS, RETENTIONS, _hf_case, assert_same_run_without_torch  # noqa: E402
from transformers import InternVLForConditionalGeneration  # noqa: E402

from stitchvlm.edge import runtime  # noqa: E402
from stitchvlm.edge.export import ExportConfig, export_edge, main  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeModel, KVBuffers  # noqa: E402
from stitchvlm.edge.sidecar import SIDECAR_NAME, EdgeSidecar  # noqa: E402
from stitchvlm.edge.verify import TOLERANCES  # noqa: E402
from stitchvlm.shared.scoring import top_r_indices  # noqa: E402

EXPLICIT_VS_LEAN_ATOL = 2e-5  # two fp32 graphs of the same model: reordered sums only


@pytest.fixture(scope="module")
def explicit_dir(sharp_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "explicit"
    export_edge(ExportConfig(model_dir=sharp_checkpoint, out_dir=out, verify=False))
    return out


@pytest.fixture(scope="module")
def lean(lean_dir) -> EdgeModel:
    return EdgeModel.load(lean_dir, providers=[CPU])


@pytest.fixture(scope="module")
def explicit(explicit_dir) -> EdgeModel:
    return EdgeModel.load(explicit_dir, providers=[CPU])


@pytest.fixture(scope="module")
def reference(sharp_checkpoint):
    return InternVLForConditionalGeneration.from_pretrained(
        sharp_checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def test_lean_graph_is_built_of_fused_ops(lean_dir, lean):
    """Guards against the lean export silently being the traced graph (or growing its shape
    arithmetic back), against KV caches copied by Concat every pass, and against a sidecar that
    does not tell the runtime to bind shared buffers."""
    sidecar = EdgeSidecar.load(lean_dir)
    assert sidecar.graph == "lean" and lean.shared_kv
    layers = sidecar.dims.num_layers
    graph = onnx.load(str(lean_dir / sidecar.graphs.decoder)).graph
    ops = Counter(node.op_type for node in graph.node)
    assert ops["GroupQueryAttention"] == layers
    # q and k rotated inside GroupQueryAttention; RotaryEmbedding only on the scoring rows' q
    gqa = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert all(next(a.i for a in node.attribute if a.name == "do_rotary") == 1 for node in gqa)
    assert all(node.input[1] == node.input[2] == "" for node in gqa)  # packed q|k|v
    assert ops["RotaryEmbedding"] == layers and ops["Split"] == 0
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["SimplifiedLayerNormalization"] == 1
    assert ops["Constant"] == 0
    # Concat builds the rotary slots and the score's shape vectors (six per pass), never a
    # cache or activation
    concats = [node for node in graph.node if node.op_type == "Concat"]
    assert len(concats) <= 6
    assert all(name.split(".")[0] in ("score", "rotary") for n in concats for name in n.input)
    # one softmax per layer, for the score rows beside the fused attention, and nothing else
    assert ops["Softmax"] == layers
    assert len(graph.node) <= 40 * layers
    assert [i.name for i in graph.input] == sidecar.io.decoder_inputs(layers)
    assert [o.name for o in graph.output] == sidecar.io.decoder_outputs(layers)


def test_zero_biases_are_left_out_and_others_kept(sharp_checkpoint, tiny_checkpoint):
    """Guards against the q|k|v bias being dropped when it matters (the sharpened checkpoint's
    are random, and the export's verification against PyTorch covers their values) and against an
    all-zero bias costing an Add in every pass (a fresh checkpoint's, as onnxruntime-genai's
    builder leaves them out)."""
    from stitchvlm.edge.lean_decoder import build_lean_decoder
    from stitchvlm.edge.sidecar import GraphIO

    def bias_adds(checkpoint):
        model = InternVLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        biases = [layer.self_attn.q_proj.bias for layer in model.model.language_model.layers]
        graph = build_lean_decoder(model, GraphIO()).graph
        adds = [n for n in graph.node if n.op_type == "Add" and n.name.endswith("qkv_bias")]
        return len(adds), len(biases), all(bool(b.any()) for b in biases), not any(bool(b.any()) for b in biases)

    adds, layers, all_nonzero, _ = bias_adds(sharp_checkpoint)
    assert all_nonzero and adds == layers
    adds, layers, _, all_zero = bias_adds(tiny_checkpoint)
    assert all_zero and adds == 0


def test_sidecar_graph_field_and_older_versions(lean_dir):
    """Guards against a runtime binding a lean graph's cache as the explicit graph's (or the
    reverse): the field must round-trip, an unknown graph must be refused, and a version-2
    sidecar (written before the field existed) must read as the explicit graph it describes."""
    data = json.loads((lean_dir / SIDECAR_NAME).read_text())
    assert data["graph"] == "lean" and data["format_version"] == 7
    with pytest.raises(ValueError, match="graph must be one of"):
        EdgeSidecar.from_json(json.dumps({**data, "graph": "fused"}))
    older = {key: value for key, value in data.items() if key != "graph"} | {"format_version": 2}
    assert EdgeSidecar.from_json(json.dumps(older)).graph == "explicit"


@pytest.mark.parametrize(("size_seed", "question"), SAMPLES)
def test_lean_matches_pytorch_on_prefill_and_decode(lean, reference, size_seed, question, image_factory):
    """Guards against wrong RoPE (positions, rotate-half layout, cos/sin cache), GQA head mapping,
    q/k/v bias or split order, residual/norm wiring of the Skip norms, a KV buffer written at the
    wrong offset, and the last-rows LM head gathering the wrong rows."""
    pixel_values, prompt = _sample(lean, size_seed, question, image_factory)
    passes, fed = _hf_passes(reference, prompt.input_ids, pixel_values, decode_steps=2)
    embeds = lean.embed(prompt.input_ids)
    embeds[prompt.visual_start : prompt.visual_end] = lean.encode_image(pixel_values)
    length = len(prompt.input_ids)
    step = lean.decode(
        embeds[None],
        np.arange(length)[None],
        np.zeros((1, length), np.float32),
        lean.empty_cache(capacity=length + 2),
    )
    steps = [step]
    for index, token in enumerate(fed):
        step = lean.decode(
            lean.embed([token])[None], np.array([[length + index]]), np.ones((1, 1), np.float32), step.cache
        )
        steps.append(step)
    kv_bound = TOLERANCES["fp32"].kv
    for ours, (logits, kv) in zip(steps, passes, strict=True):
        np.testing.assert_allclose(ours.logits[0], logits, rtol=0, atol=FP32_LOGITS_ATOL)
        for value, expected in zip(lean.cache_arrays(ours.cache), kv, strict=True):
            np.testing.assert_allclose(value[0], expected, rtol=0, atol=kv_bound.bound(expected))


def test_lean_equals_explicit_graph_pass_by_pass(lean, explicit, image_factory):
    """Guards against the score beside the fused attention differing from the explicit graph's
    (wrong causal offset of the scoring rows, wrong row window, rows weighted by the wrong mask
    entries, a missing layer), and against the shared-buffer KV path drifting from the Concat path
    over decode steps: logits, KV and scores of a prefill with an uneven score mask, decode
    steps, and a pass that scores nothing."""
    embeds, positions, query_mask = _prefill_inputs(explicit, *SAMPLES[0], image_factory)
    length = positions.shape[1]
    uneven = query_mask.copy()
    uneven[0, length - 9 : length - 3] = 0.0  # holes inside the window: their weight must stay 0
    uneven[0, length - 1] = 2.5  # a weight other than 1 scales its row
    for mask in (query_mask, uneven, np.zeros_like(query_mask)):
        ours = lean.decode(embeds, positions, mask, lean.empty_cache(capacity=length + 4), num_logits=3)
        theirs = explicit.decode(embeds, positions, mask, explicit.empty_cache(), num_logits=3)
        np.testing.assert_allclose(ours.logits, theirs.logits, rtol=0, atol=EXPLICIT_VS_LEAN_ATOL)
        np.testing.assert_allclose(
            ours.visual_scores, theirs.visual_scores, rtol=0, atol=EXPLICIT_VS_LEAN_ATOL
        )
    assert not ours.visual_scores.any()  # nothing scored: exactly zero, not just small
    ours = lean.decode(embeds, positions, query_mask, lean.empty_cache(capacity=length + 4), num_logits=1)
    theirs = explicit.decode(embeds, positions, query_mask, explicit.empty_cache(), num_logits=1)
    for step in range(4):
        token = int(theirs.logits[0, -1].argmax())
        assert int(ours.logits[0, -1].argmax()) == token
        feed = (explicit.embed([token])[None], np.array([[length + step]]), np.ones((1, 1), np.float32))
        ours, theirs = lean.decode(*feed, ours.cache), explicit.decode(*feed, theirs.cache)
        np.testing.assert_allclose(ours.logits, theirs.logits, rtol=0, atol=EXPLICIT_VS_LEAN_ATOL)
        np.testing.assert_allclose(
            ours.visual_scores, theirs.visual_scores, rtol=0, atol=EXPLICIT_VS_LEAN_ATOL
        )
        for a, b in zip(lean.cache_arrays(ours.cache), explicit.cache_arrays(theirs.cache), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=EXPLICIT_VS_LEAN_ATOL)


@pytest.fixture(scope="module", params=range(len(CASES)), ids=["7tiles", "3tiles"])
def case(request, reference, lean):
    """(image, question, the lean runtime's generation beside transformers')."""
    (width, height, seed), question = CASES[request.param]
    image = make_test_image(width, height, seed)
    return image, question, _hf_case(reference, lean, image, question)


def test_lean_generation_equals_transformers_and_explicit_graph(case, explicit):
    """Guards against the lean runtime path (buffers sized to prompt + budget, decode positions,
    seqlens_k from the mask) diverging from transformers' greedy generate or from the explicit
    graph token for token, and against a score over the whole generation that is off the DESIGN
    definition: it must equal transformers' attentions and pick the same top-R sets at 9/35/64%."""
    image, question, hf = case
    assert list(hf.ours.token_ids) == hf.hf_tokens
    np.testing.assert_allclose(hf.ours.token_probs, hf.hf_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hf.ours.visual_scores, hf.hf_scores, rtol=1e-5, atol=1e-6)
    old = explicit.generate(image, question, MAX_NEW_TOKENS)
    assert old.token_ids == hf.ours.token_ids
    np.testing.assert_allclose(hf.ours.visual_scores, old.visual_scores, rtol=1e-5, atol=1e-6)
    for retention in RETENTIONS:
        expected = top_r_indices(hf.hf_scores, retention)
        np.testing.assert_array_equal(top_r_indices(hf.ours.visual_scores, retention), expected)
        np.testing.assert_array_equal(top_r_indices(old.visual_scores, retention), expected)


@pytest.mark.parametrize("retention", [0.05, 1.0])
def test_lean_consistency_pass_equals_explicit_graph(case, lean, explicit, retention):
    """Guards against the consistency pass on the lean graph losing the original position ids of
    kept visual tokens (RotaryEmbedding must take position_ids, not count from the cache) or
    reading p'_i from the wrong rows; at R = 100% it must reproduce generation's probabilities."""
    _, _, hf = case
    prompt, answer = hf.ours.prompt, hf.ours.token_ids
    kept = top_r_indices(hf.ours.visual_scores, retention)
    ours = lean.teacher_forced_probs(prompt, hf.ours.image_embeds, kept, answer)
    theirs = explicit.teacher_forced_probs(prompt, hf.ours.image_embeds, kept, answer)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-8)
    if retention == 1.0:
        np.testing.assert_allclose(ours, hf.ours.token_probs, rtol=1e-5, atol=1e-8)


def test_kv_buffers_are_shared_in_place_and_guarded(lean, image_factory):
    """Guards against the lean path copying its cache every pass (the buffers bound as present
    must be the ones bound as past), against a pass past the buffers' capacity writing out of
    bounds, against decoding twice from one cache, which would overwrite the newer cache's
    positions in the shared buffers, and against a padded mask GroupQueryAttention would misread."""
    embeds, positions, query_mask = _prefill_inputs(lean, *SAMPLES[1], image_factory)
    length = positions.shape[1]
    cache = lean.empty_cache(capacity=length + 1)
    addresses = [value.data_ptr() for value in cache.values]
    prefill = lean.decode(embeds, positions, query_mask, cache)
    assert isinstance(prefill.cache, KVBuffers) and prefill.cache.length == length
    assert [value.data_ptr() for value in prefill.cache.values] == addresses
    one = (lean.embed([3])[None], np.array([[length]]), np.ones((1, 1), np.float32))
    step = lean.decode(*one, prefill.cache)
    assert step.cache.length == length + 1
    assert [value.data_ptr() for value in step.cache.values] == addresses
    with pytest.raises(ValueError, match="extended"):
        lean.decode(*one, prefill.cache)
    with pytest.raises(ValueError, match="does not fit"):
        lean.decode(lean.embed([4])[None], np.array([[length + 1]]), np.ones((1, 1), np.float32), step.cache)
    with pytest.raises(ValueError, match="KVBuffers"):
        lean.decode(embeds, positions, query_mask, [])
    padded = np.ones((1, length), np.int64)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="no padding"):
        lean.decode(embeds, positions, query_mask, lean.empty_cache(), attention_mask=padded)


def test_unfilled_buffer_positions_never_leak_into_results(lean, image_factory):
    """Guards against the score (which reads the whole buffer, masked) or the attention reading
    KV positions past the filled length: buffers full of NaN (as uninitialised device memory may
    be) must give exactly the results of zeroed ones."""
    import onnxruntime

    embeds, positions, query_mask = _prefill_inputs(lean, *SAMPLES[1], image_factory)
    length = positions.shape[1]
    dims = lean.sidecar.dims
    shape = (1, dims.num_kv_heads, length + 5, dims.head_dim)
    nan = KVBuffers.of(
        [
            onnxruntime.OrtValue.ortvalue_from_numpy(np.full(shape, np.nan, np.float32))
            for _ in range(2 * dims.num_layers)
        ]
    )
    clean = lean.empty_cache(capacity=length + 5)
    results = []
    for cache in (nan, clean):
        step = lean.decode(embeds, positions, query_mask, cache, num_logits=1)
        step = lean.decode(
            lean.embed([5])[None], np.array([[length]]), np.ones((1, 1), np.float32), step.cache
        )
        results.append(step)
    assert np.isfinite(results[0].logits).all() and np.isfinite(results[0].visual_scores).all()
    np.testing.assert_array_equal(results[0].logits, results[1].logits)
    np.testing.assert_array_equal(results[0].visual_scores, results[1].visual_scores)


def test_lean_batch_axis_is_dynamic(lean):
    """Guards against a batch axis the built graph (Reshape targets, per-row seqlens_k, the
    rotary slots) gets wrong: a batch of two rows equals each row alone, positions skipping
    included; rows at different positions are refused (the rotary caches follow row 0)."""
    rng = np.random.default_rng(0)
    dims = lean.sidecar.dims
    embeds = rng.standard_normal((2, 5, dims.hidden_size)).astype(np.float32)
    with pytest.raises(ValueError, match="position_ids must be equal"):
        lean.decode(
            embeds,
            np.stack([np.arange(5), np.array([0, 1, 2, 7, 8])]),
            np.ones((2, 5), np.float32),
            lean.empty_cache(batch=2, capacity=8),
        )
    positions = np.stack([np.array([0, 1, 2, 7, 8])] * 2)
    scored = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], np.float32)
    both = lean.decode(embeds, positions, scored, lean.empty_cache(batch=2, capacity=8))
    for row in range(2):
        alone = lean.decode(
            embeds[row : row + 1],
            positions[row : row + 1],
            scored[row : row + 1],
            lean.empty_cache(capacity=8),
        )
        np.testing.assert_allclose(both.logits[row], alone.logits[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(both.visual_scores[row], alone.visual_scores[0], rtol=0, atol=1e-5)


def test_no_scores_lean_graph_is_the_same_decoder_without_the_score(
    lean, sharp_checkpoint, tmp_path, image_factory
):
    """Guards against the benchmark's unscored lean graph being another model than the served one
    or still computing the score (its softmaxes are the score's only ones)."""
    import onnxruntime

    out = tmp_path / "lean-no-scores"
    assert main(["--model", str(sharp_checkpoint), "--out", str(out), "--graph", "lean", "--no-scores"]) == 0
    sidecar = EdgeSidecar.load(out)
    assert sidecar.graph == "lean" and not sidecar.with_scores
    graph = onnx.load(str(out / sidecar.graphs.decoder)).graph
    assert not any(node.op_type == "Softmax" for node in graph.node)
    layers = sidecar.dims.num_layers
    assert [o.name for o in graph.output] == sidecar.io.decoder_outputs(layers, with_scores=False)
    embeds, positions, query_mask = _prefill_inputs(lean, *SAMPLES[0], image_factory)
    capacity = positions.shape[1]
    scored = lean.decode(embeds, positions, query_mask, lean.empty_cache(capacity=capacity), num_logits=2)
    session = onnxruntime.InferenceSession(str(out / sidecar.graphs.decoder), providers=[CPU])
    empty = np.zeros((1, sidecar.dims.num_kv_heads, capacity, sidecar.dims.head_dim), np.float32)
    feed = {
        "inputs_embeds": embeds,
        "position_ids": positions,
        "attention_mask": np.ones_like(positions),
        "num_logits": np.array(2, dtype=np.int64),
    } | {name: empty.copy() for name in sidecar.io.past_names(layers)}
    logits, *presents = session.run(None, feed)
    np.testing.assert_allclose(logits, scored.logits, rtol=0, atol=1e-6)
    for ours, reference in zip(presents, lean.cache_arrays(scored.cache), strict=True):
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_lean_runtime_runs_with_torch_and_transformers_absent(lean_dir, lean, tmp_path):
    """Guards against the lean graph's runtime path (KVBuffers, shared binding) needing torch or
    transformers (DESIGN invariant 5), and against results that depend on them being loaded."""
    assert_same_run_without_torch(lean_dir, lean, tmp_path)


@pytest.fixture(scope="module")
def lean16_dir(sharp_checkpoint, tmp_path_factory) -> Path:
    """fp16 lean export (export_edge verifies it against float32 PyTorch at the fp16 tolerances)."""
    out = tmp_path_factory.mktemp("edge") / "lean16"
    export_edge(ExportConfig(model_dir=sharp_checkpoint, out_dir=out, dtype="fp16", graph="lean"))
    return out


def test_lean_fp16_export_verifies_within_documented_tolerance(lean16_dir, explicit):
    """Guards against a float16 lean graph losing its float32 islands (the score's softmax and
    sum, the logits) or changing the I/O dtypes the runtime binds: the export's own verification
    against float32 PyTorch must pass at the fp16 tolerances, and greedy tokens must match."""
    lean16 = EdgeModel.load(lean16_dir, providers=[CPU])
    types = {i.name: i.type for i in [*lean16.decoder.get_inputs(), *lean16.decoder.get_outputs()]}
    assert types["inputs_embeds"] == types["past_key_0"] == types["present_value_0"] == "tensor(float16)"
    assert types["logits"] == types["visual_scores"] == types["score_query_mask"] == "tensor(float)"
    image = make_test_image(150, 90, seed=3)
    half = lean16.generate(image, "What colour is the circle?", 4)
    full = explicit.generate(image, "What colour is the circle?", 4)
    assert half.token_ids == full.token_ids
    bound = TOLERANCES["fp16"].visual_scores.bound(full.visual_scores)
    assert np.abs(half.visual_scores - full.visual_scores).max() <= bound


def test_float32_lean_graph_stays_off_cuda(lean_dir):
    """Guards against a float32 lean export being put on the CUDA EP, whose GroupQueryAttention is
    float16 only: ORT would place the attention on the CPU and the shared KV buffers would break."""
    with pytest.raises(ValueError, match="--dtype fp16"):
        EdgeModel.load(lean_dir, providers=["CUDAExecutionProvider", CPU])
    assert EdgeModel.load(lean_dir).device == "cpu"  # the default picks the CPU for it


def test_float32_lean_graph_on_a_cuda_machine_says_it_runs_on_the_cpu(lean_dir, monkeypatch):
    """Guards against the default (lean fp32) export quietly running on the CPU of a GPU machine:
    the runtime must say so and name the fix."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    monkeypatch.setattr(runtime, "_nvidia_device_present", lambda: True)
    with pytest.warns(UserWarning, match="--dtype fp16"):
        assert EdgeModel.load(lean_dir).device == "cpu"
    monkeypatch.setattr(runtime, "_nvidia_device_present", lambda: False)  # onnxruntime-gpu, no GPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EdgeModel.load(lean_dir).device == "cpu"


@pytest.mark.gpu
def test_lean_fp16_cuda_matches_cpu(lean16_dir):
    """Guards against the shared KV buffers on the device (one OrtValue bound as past and present
    through IO binding on CUDA) or the CUDA GroupQueryAttention kernel diverging from the CPU."""
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider")
    gpu = EdgeModel.load(lean16_dir)
    if gpu.device != "cuda":
        pytest.skip("CUDA provider could not start (no GPU or CUDA libraries)")
    cpu = EdgeModel.load(lean16_dir, providers=[CPU])
    image = make_test_image(150, 90, seed=3)
    on_gpu = gpu.generate(image, "What colour is the circle?", MAX_NEW_TOKENS)
    on_cpu = cpu.generate(image, "What colour is the circle?", MAX_NEW_TOKENS)
    assert on_gpu.token_ids == on_cpu.token_ids
    np.testing.assert_allclose(on_gpu.token_probs, on_cpu.token_probs, rtol=2e-2)
    bound = TOLERANCES["fp16"].visual_scores.bound(on_cpu.visual_scores)
    assert np.abs(on_gpu.visual_scores - on_cpu.visual_scores).max() <= bound
