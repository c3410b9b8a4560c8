"""The cloud engine in process: the whole request path against transformers.

The reference builds its inputs with transformers' own tokenizer, chat template
and GotOcr2ImageProcessorPil and runs ``model.generate``; the engine starts
from encoded image bytes and the question, like a request does.
"""

from __future__ import annotations

import dataclasses
import io

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402
from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration  # noqa: E402

from stitchvlm.cloud.engine import CloudEngine, EngineConfig  # noqa: E402
from stitchvlm.shared.errors import RequestError  # noqa: E402
from stitchvlm.shared.layout import layout_fingerprint  # noqa: E402
from stitchvlm.shared.preprocess import compute_layout  # noqa: E402
from stitchvlm.shared.scoring import keep_count  # noqa: E402
from stitchvlm.shared.types import CloudRequest  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_large_checkpoint):
    return CloudEngine.load(
        EngineConfig(model_dir=tiny_large_checkpoint, prune_layer=2, max_new_tokens_limit=64)
    )


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_request(engine, image, question, retention=1.0, max_new_tokens=10, seed=0, **overrides):
    layout = compute_layout(image.width, image.height, engine.files.tiling)
    n = layout.num_visual_tokens
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(n)[: keep_count(retention, n)])
    fields = dict(
        image=png(image),
        mime_type="image/png",
        prompt=question,
        kept_indices=keep,
        num_visual_tokens=n,
        retention=retention,
        layout=layout,
        layout_fingerprint=layout_fingerprint(layout, engine.files.tiling),
        max_new_tokens=max_new_tokens,
        request_id="t",
    )
    fields.update(overrides)
    return CloudRequest(**fields)


@pytest.mark.parametrize(
    ("size", "question"),
    [
        ((64, 64), "What colour is the square?"),
        ((230, 90), "How many circles?"),
        ((80, 300), "Read the digit."),
    ],
)
def test_full_retention_equals_transformers_generate(engine, tiny_large_checkpoint, size, question):
    """Invariant 3: at R = 100% the cloud's answer is transformers' greedy generation, token for token
    (guards against any drift in preprocessing, prompt building, embedding merge or the layer loop)."""
    image = make_test_image(*size, seed=size[0])
    reply = engine.answer(make_request(engine, image, question, max_new_tokens=10))

    model = InternVLForConditionalGeneration.from_pretrained(tiny_large_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_large_checkpoint)
    processor = GotOcr2ImageProcessorPil.from_pretrained(tiny_large_checkpoint)
    pixels = processor(images=image, crop_to_patches=True, return_tensors="pt")
    n_visual = int(pixels["num_patches"][0]) * model.config.image_seq_length
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * n_visual + "</img>", 1)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        pixel_values=pixels["pixel_values"],
        attention_mask=torch.ones_like(ids),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    expected = out[0, ids.shape[1] :].tolist()
    assert list(reply.token_ids) == expected
    assert reply.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.prompt_tokens == ids.shape[1] == reply.pruned_prompt_tokens
    assert reply.num_visual_tokens == reply.kept_visual_tokens == n_visual


def test_pruned_request_accounts_tokens(engine):
    """At R = 9% layers >= K see only text + kept tokens; the reply reports both lengths."""
    image = make_test_image(230, 90, seed=3)
    request = make_request(engine, image, "What is left of the circle?", retention=0.09)
    reply = engine.answer(request)
    kept = keep_count(0.09, request.num_visual_tokens)
    assert reply.kept_visual_tokens == kept
    assert reply.pruned_prompt_tokens == reply.prompt_tokens - request.num_visual_tokens + kept
    assert reply.prune_layer == 2 and reply.model == engine.model_id
    assert reply.timings.prefill_ms > 0 and reply.timings.vision_ms > 0


def test_errors_in_process(engine):
    """The in-process path (no wire decoding) still refuses bad requests with the gRPC status."""
    image = make_test_image(100, 100, seed=1)
    good = make_request(engine, image, "Which shape is red?", retention=0.35)
    other = compute_layout(300, 100, engine.files.tiling)
    cases = [
        (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (dict(max_new_tokens=0), grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
        (dict(max_new_tokens=65), grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
        (dict(image=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        (
            dict(num_visual_tokens=good.num_visual_tokens + 16),
            grpc.StatusCode.FAILED_PRECONDITION,
            "num_visual",
        ),
        (dict(layout_fingerprint=good.layout_fingerprint ^ 1), grpc.StatusCode.FAILED_PRECONDITION, "layout"),
        (dict(layout=other), grpc.StatusCode.FAILED_PRECONDITION, "layout"),
        (dict(kept_indices=good.kept_indices[::-1]), grpc.StatusCode.INVALID_ARGUMENT, "ascending"),
        (dict(kept_indices=good.kept_indices[:-1]), grpc.StatusCode.INVALID_ARGUMENT, "expected"),
        (dict(kept_indices=good.kept_indices + 10_000), grpc.StatusCode.OUT_OF_RANGE, "outside"),
        (dict(prompt="word " * 5000), grpc.StatusCode.OUT_OF_RANGE, "context"),
    ]
    for override, code, words in cases:
        with pytest.raises(RequestError) as info:
            engine.answer(dataclasses.replace(good, **override))
        assert info.value.code == code, override
        assert words in info.value.message, (override, info.value.message)
    assert engine.answer(good).token_ids  # still serving


def test_should_stop_cancels(engine):
    """Cancellation reaches the decode loop: should_stop makes answer raise CANCELLED."""
    request = make_request(engine, make_test_image(64, 64), "Describe it.", max_new_tokens=64)
    with pytest.raises(RequestError) as info:
        engine.answer(request, should_stop=lambda: True)
    assert info.value.code == grpc.StatusCode.CANCELLED
