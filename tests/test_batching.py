"""Continuous batching against the single-request path (itself tested against transformers).

Each sequence batched with others, joining at different decode steps, must give
exactly the tokens it gives alone through ``SGPModel.generate`` (test_sgp checks
that one against ``model.generate`` and the stock forward), with each step's
logits within 1e-4; at R = 100% also those of ``model.generate``. Inputs are
built with transformers' tokenizer, chat template and image processor.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from test_sgp import eos_ids, hf_inputs  # noqa: E402

from stitchvlm.cloud.batch_cache import RowKVCache  # noqa: E402
from stitchvlm.cloud.sampling import TokenChooser, filtered_probabilities  # noqa: E402
from stitchvlm.cloud.scheduler import BatchConfig, BatchScheduler, SequenceInput  # noqa: E402
from stitchvlm.cloud.sgp import SGPModel, kept_sequence_positions  # noqa: E402
from stitchvlm.cloud.text import StopRule  # noqa: E402
from stitchvlm.shared.types import SamplingParams  # noqa: E402

K = 2
# (image size, question, retention, max_new_tokens, seed): mixed prompts, tilings, R and budgets
CASES = [
    ((64, 64), "What colour is the circle?", 1.0, 9, 0),
    ((200, 70), "How many shapes are there? Answer briefly.", 0.35, 12, 1),
    ((90, 260), "Describe the image.", 0.09, 7, 2),
    ((128, 64), "Where is the line?", 1.0, 14, 3),
    ((64, 190), "What colour is the circle?", 0.35, 5, 4),
    ((300, 120), "Describe the image.", 0.09, 11, 5),
    ((100, 100), "Is there a square?", 0.35, 8, 6),
    ((70, 140), "How many shapes are there? Answer briefly.", 1.0, 10, 7),
]


class Collect:
    """A SequenceSink that keeps everything it is told."""

    def __init__(self) -> None:
        self.streamed: list[int] = []
        self.result = None
        self.error = None

    def tokens(self, token_ids):
        self.streamed.extend(token_ids)

    def finished(self, result):
        self.result = result

    def failed(self, error):
        self.error = error


@pytest.fixture(scope="module")
def cases(hf):
    """Per case: pixel values, input ids, kept positions, visual span and the alone-run reference."""
    model, tokenizer, _ = hf
    sgp = SGPModel(model, prune_layer=K)
    out = []
    for size, question, retention, budget, seed in CASES:
        input_ids, pixel_values, vstart, n_visual = hf_inputs(hf, size, question, seed=seed)
        g = torch.Generator().manual_seed(seed)
        k = max(1, int(retention * n_visual))
        keep_visual = torch.sort(torch.randperm(n_visual, generator=g)[:k]).values
        keep = kept_sequence_positions(input_ids.shape[1], vstart, n_visual, keep_visual)
        embeds = sgp.embed(input_ids[0], sgp.image_features(pixel_values))
        alone = sgp.generate(embeds, keep, budget, eos_ids(tokenizer))
        out.append(dict(ids=input_ids, pixels=pixel_values, keep=keep, budget=budget, alone=alone, r=retention))
    return sgp, out


def sequence(case, tokenizer, sink, sampling=None, **kw):
    sampling = sampling or SamplingParams()
    rule = StopRule(frozenset(eos_ids(tokenizer)), case["budget"])
    return SequenceInput(
        pixel_values=case["pixels"].numpy(),
        input_ids=case["ids"][0].numpy(),
        keep_positions=case["keep"],
        rule=rule,
        sampling=sampling,
        sink=sink,
        record_logits=True,
        **kw,
    )


def run_until_done(scheduler, sinks, max_steps=200):
    for _ in range(max_steps):
        if all(s.result is not None or s.error is not None for s in sinks):
            return
        scheduler.step()
    raise AssertionError("scheduler did not finish every sequence")


def test_batched_equals_alone(hf, cases):
    """Guards against padding that leaks into attention, rows that swap caches when others leave,
    per-layer lengths mixed up between layers < K and >= K, and wrong decode positions."""
    model, tokenizer, _ = hf
    sgp, data = cases
    scheduler = BatchScheduler(sgp, BatchConfig(max_batch_size=5, max_batch_tokens=400))
    sinks = [Collect() for _ in data]
    arrivals = {0: [0, 1, 2], 2: [3, 4], 3: [5], 5: [6, 7]}  # step -> cases submitted before it
    for step in range(200):
        for i in arrivals.get(step, []):
            scheduler.submit(sequence(data[i], tokenizer, sinks[i]))
        if step > max(arrivals) and all(s.result is not None for s in sinks):
            break
        scheduler.step()
    lengths = set()
    for case, sink in zip(data, sinks, strict=True):
        assert sink.error is None
        result = sink.result
        assert result.token_ids == case["alone"].token_ids
        assert sink.streamed == result.token_ids
        assert result.pruned_prompt_tokens == case["alone"].pruned_prompt_tokens
        for mine, ref in zip(result.step_logits, case["alone"].step_logits, strict=True):
            torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)
        lengths.add(len(result.token_ids))
    assert len(lengths) > 2, "sequences should leave the batch at different steps"
    assert any(len(s.result.token_ids) > 1 for s in sinks)


def test_full_retention_batched_equals_transformers_generate(hf, cases):
    """R = 100% in a batch is the unpruned model: guards against a batch path that only matches itself."""
    model, tokenizer, _ = hf
    sgp, data = cases
    full = [c for c in data if c["r"] == 1.0]
    scheduler = BatchScheduler(sgp, BatchConfig(max_batch_size=8))
    sinks = [Collect() for _ in full]
    for case, sink in zip(full, sinks, strict=True):
        scheduler.submit(sequence(case, tokenizer, sink))
    run_until_done(scheduler, sinks)
    for case, sink in zip(full, sinks, strict=True):
        out = model.generate(
            input_ids=case["ids"],
            pixel_values=case["pixels"],
            attention_mask=torch.ones_like(case["ids"]),
            max_new_tokens=case["budget"],
            do_sample=False,
            eos_token_id=eos_ids(tokenizer),
        )
        assert sink.result.token_ids == out[0, case["ids"].shape[1] :].tolist()


def test_cancelled_row_leaves_others_unchanged(hf, cases):
    """A sequence cancelled mid-batch frees its row; guards against the row swap corrupting the others."""
    model, tokenizer, _ = hf
    sgp, data = cases
    scheduler = BatchScheduler(sgp, BatchConfig(max_batch_size=8))
    sinks = [Collect() for _ in data]
    cancel = {"now": False}
    for i, (case, sink) in enumerate(zip(data, sinks, strict=True)):
        stop = (lambda: cancel["now"]) if i == 1 else (lambda: False)
        scheduler.submit(sequence(case, tokenizer, sink, should_stop=stop))
    for _ in range(3):
        scheduler.step()
    cancel["now"] = True
    run_until_done(scheduler, sinks)
    assert sinks[1].error is not None and sinks[1].error.code.name == "CANCELLED"
    assert len(sinks[1].streamed) < data[1]["budget"]
    for i, (case, sink) in enumerate(zip(data, sinks, strict=True)):
        if i != 1:
            assert sink.result.token_ids == case["alone"].token_ids
    assert scheduler.counts == (0, 0)


def test_seeded_sampling_same_alone_and_batched(hf, cases):
    """A seeded request's tokens must not depend on its batch: guards against a shared generator."""
    model, tokenizer, _ = hf
    sgp, data = cases
    params = [
        SamplingParams(temperature=1.3, top_k=40, seed=11),
        SamplingParams(temperature=0.9, top_p=0.8, seed=12),
        SamplingParams(),  # greedy beside sampled rows
        SamplingParams(temperature=2.0, seed=13),
    ]
    picked = data[:4]

    def run(batch_size, order):
        scheduler = BatchScheduler(sgp, BatchConfig(max_batch_size=batch_size))
        sinks = {i: Collect() for i in order}
        for i in order:
            scheduler.submit(sequence(picked[i], tokenizer, sinks[i], sampling=params[i]))
            if batch_size == 1:
                run_until_done(scheduler, [sinks[i]])
        run_until_done(scheduler, list(sinks.values()))
        return {i: s.result.token_ids for i, s in sinks.items()}

    alone = run(1, [0, 1, 2, 3])
    batched = run(4, [3, 1, 0, 2])
    assert alone == batched
    assert alone[2] == picked[2]["alone"].token_ids  # greedy stays greedy
    sampled_differs = any(alone[i] != picked[i]["alone"].token_ids for i in (0, 1, 3))
    assert sampled_differs, "sampling at temperature >= 0.9 never left the greedy path"


def test_top_k_top_p_filters():
    """The filters keep exactly the tokens their definitions name (checked by hand on 5 logits)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0])
    probs = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, False, False, True, False]
    full = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(probs[[0, 3]], full[[0, 3]] / full[[0, 3]].sum())
    # sorted probabilities: 3.0 -> 0.61, 2.0 -> 0.22, 1.0 -> 0.08 ...; top_p 0.7 keeps the first two
    probs = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (probs > 0).tolist() == [True, False, False, True, False]
    probs = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert (probs > 0).tolist() == [False, False, False, True, False]
    chooser = TokenChooser(SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert {chooser.choose(logits) for _ in range(20)} == {3}


def test_row_cache_masks_and_swap():
    """Per-row lengths: masks hide exactly the padding, and removing a row moves the last one into it."""
    from transformers import DynamicCache

    cache = RowKVCache(num_layers=2, max_rows=4)
    for n in (3, 5, 2):
        dyn = DynamicCache()
        for layer in range(2):
            kv = torch.full((1, 1, n + layer, 2), float(n))  # layer 1 one longer: lengths differ by layer
            dyn.update(kv, kv, layer)
        cache.append(dyn)
    masks = cache.begin_step(torch.float32)
    cache.end_step(completed=False)
    assert [tuple(m.shape) for m in masks] == [(3, 1, 1, 6), (3, 1, 1, 7)]
    assert (masks[0][:, 0, 0] == 0).sum(-1).tolist() == [4, 6, 3]
    assert (masks[1][:, 0, 0] == 0).sum(-1).tolist() == [5, 7, 4]
    cache.remove(0)
    assert cache.lengths(0) == [2, 3] and cache.lengths(1) == [5, 6]
    assert float(cache.layers[0].keys[0, 0, 0, 0]) == 2.0


def test_stop_string_and_budget_rule():
    """StopRule: EOS first, then stop strings in the decoded text, then the budget."""
    decode = lambda ids: "".join(chr(96 + i) for i in ids)  # noqa: E731 - 1 -> "a"
    rule = StopRule(frozenset({0}), max_new_tokens=6, stop=("cd",), decode=decode)
    assert rule.finish_reason([1, 2]) is None
    assert rule.finish_reason([1, 2, 3, 4]) == "stop"
    assert rule.answer_text([1, 2, 3, 4, 5]) == "ab"
    assert rule.finish_reason([1, 0]) == "eos"
    assert rule.finish_reason([1, 1, 1, 1, 1, 1]) == "length"
    assert dataclasses.replace(rule, stop=()).finish_reason([1, 2, 3, 4]) is None


def half_precision_dtypes():
    """bfloat16 everywhere; float16 only on CUDA (CPU float16 matmuls are too slow and too coarse)."""
    params = [pytest.param(torch.bfloat16, "cpu", id="bf16-cpu")]
    cuda = torch.cuda.is_available()
    for dtype in (torch.bfloat16, torch.float16):
        params.append(
            pytest.param(
                dtype,
                "cuda",
                id=f"{str(dtype).removeprefix('torch.')}-cuda",
                marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda, reason="needs a CUDA GPU")],
            )
        )
    return params


@pytest.mark.parametrize(("dtype", "device"), half_precision_dtypes())
def test_half_precision_batch_runs_and_matches_alone(hf, cases, dtype, device):
    """bf16 / fp16: the batch path runs on the device and dtype (masks built in that dtype), and
    its greedy tokens follow the same model alone for at least the first tokens of each sequence.
    Guards against fp32-only masks (finfo of the wrong dtype) and device mix-ups in the cache."""
    model, tokenizer, _ = hf
    _, data = cases
    half = type(model)(model.config).to(device, dtype).eval()
    half.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    sgp = SGPModel(half, prune_layer=K)
    scheduler = BatchScheduler(sgp, BatchConfig(max_batch_size=8))
    sinks = [Collect() for _ in data]
    for case, sink in zip(data, sinks, strict=True):
        scheduler.submit(sequence(case, tokenizer, sink))
    run_until_done(scheduler, sinks)
    agree = 0
    for case, sink in zip(data, sinks, strict=True):
        assert sink.error is None and sink.result.step_logits[0].dtype == torch.float32
        embeds = sgp.embed(case["ids"][0], sgp.image_features(case["pixels"]))
        alone = sgp.generate(embeds, case["keep"], case["budget"], eos_ids(tokenizer)).token_ids
        agree += sink.result.token_ids[:3] == alone[:3]
    assert agree >= len(data) - 1, "half-precision batching diverged from the single path early"


def test_request_joins_after_the_buffers_grew_during_decode(hf, cases):
    """A row decodes past the cache's capacity (the buffers are reallocated inside the decode
    step), then another request joins. Guards against buffers born under inference mode being
    written in place outside it (torch refuses: every joining request failed with INTERNAL)."""
    model, tokenizer, _ = hf
    sgp, data = cases
    scheduler = BatchScheduler(sgp, BatchConfig(max_batch_size=4))
    long = dict(data[0], budget=80)  # a 33-token prompt: the 64-position buffers grow mid-decode
    first, short, second = Collect(), Collect(), Collect()
    scheduler.submit(sequence(long, tokenizer, first))
    scheduler.submit(sequence(data[4], tokenizer, short))  # leaves early: a free row stays allocated
    for _ in range(60):
        scheduler.step()
    assert short.result is not None and scheduler._cache.layers[0].capacity == (2, 128)
    scheduler.submit(sequence(data[1], tokenizer, second))
    run_until_done(scheduler, [first, second])
    assert first.error is None and second.error is None
    assert second.result.token_ids == data[1]["alone"].token_ids
    embeds = sgp.embed(long["ids"][0], sgp.image_features(long["pixels"]))
    assert first.result.token_ids == sgp.generate(embeds, long["keep"], 80, eos_ids(tokenizer)).token_ids


@pytest.mark.parametrize("k", [0, 2, 4])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padded_prefill_equals_each_prompt_alone(hf, cases, k, attention):
    """prefill_batch (prompts right-padded, then each row's kept tokens padded) against prefill of
    each prompt alone: next-token logits and every layer's KV. Guards against padding that leaks
    into attention, kept rows gathered from the wrong sequence, and per-row caches cut at the
    wrong length (layers < K hold S, layers >= K hold S')."""
    model, _, _ = hf
    _, data = cases
    model.config.text_config._attn_implementation = attention
    try:
        sgp = SGPModel(model, prune_layer=k)
        picked = data[:5]  # different lengths, R = 100 / 35 / 9%
        embeds = [sgp.embed(c["ids"][0], sgp.image_features(c["pixels"])) for c in picked]
        batched = sgp.prefill_batch(embeds, [c["keep"] for c in picked])
        for case, emb, (logits, cache, pruned) in zip(picked, embeds, batched, strict=True):
            ref_logits, ref_cache, ref_pruned = sgp.prefill(emb, case["keep"])
            assert pruned == ref_pruned
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
            for mine, ref in zip(cache.layers, ref_cache.layers, strict=True):
                assert mine.keys.shape == ref.keys.shape
                torch.testing.assert_close(mine.values, ref.values, atol=1e-4, rtol=1e-4)
    finally:
        model.config.text_config._attn_implementation = "sdpa"
