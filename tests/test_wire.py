"""Proto <-> dataclass conversion at the boundary, and request validation by status code."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from stitchvlm.shared import wire
from stitchvlm.shared.errors import RequestError
from stitchvlm.shared.layout import Layout, TilingConfig, layout_fingerprint
from stitchvlm.shared.pb import cascade_pb2
from stitchvlm.shared.scoring import keep_count, top_r_indices
from stitchvlm.shared.types import CloudReply, CloudRequest, Timings

# 3 x 2 tiles + thumbnail, 256 tokens a tile: |V| = 7 * 256 = 1792.
LAYOUT = Layout(tile_size=448, grid_columns=3, grid_rows=2, thumbnail=True, tokens_per_tile=256)
FINGERPRINT = layout_fingerprint(LAYOUT, TilingConfig())


def make_request(retention: float = 0.35, seed: int = 0, **overrides) -> CloudRequest:
    scores = np.random.default_rng(seed).random(LAYOUT.num_visual_tokens)  # [|V|]
    fields = dict(
        image=b"\x89PNG\r\n\x1a\nfake",
        mime_type="image/png",
        prompt="What does the sign say?",
        kept_indices=top_r_indices(scores, retention),
        num_visual_tokens=LAYOUT.num_visual_tokens,
        retention=retention,
        layout=LAYOUT,
        layout_fingerprint=FINGERPRINT,
        max_new_tokens=17,
        request_id="req-1",
        model="internvl3-8b",
    )
    fields.update(overrides)
    return CloudRequest(**fields)


def over_the_wire(msg):
    return type(msg).FromString(msg.SerializeToString())


def expect_error(msg: cascade_pb2.AnswerRequest, code: grpc.StatusCode, fragment: str, **kwargs) -> None:
    with pytest.raises(RequestError) as info:
        wire.request_from_proto(over_the_wire(msg), **kwargs)
    assert info.value.code == code, info.value
    assert fragment in info.value.message, info.value.message


def assert_same_request(got: CloudRequest, want: CloudRequest) -> None:
    for f in dataclasses.fields(CloudRequest):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "kept_indices":
            assert a.dtype == np.int64
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, f.name


@pytest.mark.parametrize("encoding", ["auto", "BITMAP", "DELTA_VARINT", "PLAIN"])
@pytest.mark.parametrize("retention", [0.09, 0.35, 0.64, 1.0])
def test_request_round_trip(encoding, retention):
    """Guards against a field dropped or renamed between CloudRequest and AnswerRequest."""
    req = make_request(retention)
    assert req.kept_indices.size == keep_count(retention, 1792)
    msg = wire.request_to_proto(req, encoding)
    if encoding != "auto":
        assert cascade_pb2.KeptTokens.Encoding.Name(msg.kept.encoding) == encoding
    assert msg.layout.fingerprint == FINGERPRINT
    assert_same_request(wire.request_from_proto(over_the_wire(msg)), req)


def test_missing_generation_gets_the_default():
    """Guards against 0 new tokens (or a second, drifting default) when generation is omitted."""
    msg = wire.request_to_proto(make_request())
    msg.ClearField("generation")
    got = wire.request_from_proto(over_the_wire(msg))
    assert got.max_new_tokens == wire.DEFAULT_MAX_NEW_TOKENS
    assert CloudRequest.__dataclass_fields__["max_new_tokens"].default == wire.DEFAULT_MAX_NEW_TOKENS
    assert wire.DEFAULT_MAX_NEW_TOKENS >= 1


def test_empty_image_allowed_when_not_validated():
    """Guards against the opt-out flag being ignored."""
    msg = wire.request_to_proto(make_request(image=b""))
    assert wire.request_from_proto(over_the_wire(msg), validate_image_present=False).image == b""
    expect_error(msg, grpc.StatusCode.INVALID_ARGUMENT, "image")


def _mutated(mutate) -> cascade_pb2.AnswerRequest:
    msg = wire.request_to_proto(make_request())
    mutate(msg)
    return msg


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda m: m.ClearField("image"), "image is empty"),
        (lambda m: m.ClearField("prompt"), "prompt"),
        (lambda m: setattr(m, "prompt", "  \n\t "), "prompt"),
        (lambda m: m.ClearField("layout"), "layout is missing"),
        (lambda m: m.ClearField("num_visual_tokens"), "num_visual_tokens"),
        (lambda m: setattr(m, "retention", 0.0), "retention"),
        (lambda m: setattr(m, "retention", -0.35), "retention"),
        (lambda m: setattr(m, "retention", 1.5), "retention"),
        (lambda m: setattr(m, "retention", float("nan")), "retention"),
        (lambda m: m.ClearField("kept"), "kept is missing"),
        (lambda m: setattr(m.generation, "max_new_tokens", 0), "generation.max_new_tokens"),
        (lambda m: setattr(m.layout, "tokens_per_tile", 0), "layout.tokens_per_tile"),
        (lambda m: setattr(m.kept, "encoding", 0), "kept.encoding"),
    ],
)
def test_missing_or_invalid_fields(mutate, fragment):
    """Guards against a half-filled request reaching the engine instead of a precise INVALID_ARGUMENT."""
    expect_error(_mutated(mutate), grpc.StatusCode.INVALID_ARGUMENT, fragment)


def test_count_must_match_retention():
    """Guards against the cloud pruning to a different k than the R the edge claims."""
    req = make_request(0.35)
    fewer = dataclasses.replace(req, kept_indices=req.kept_indices[:-1])  # 626 of 627
    expect_error(
        wire.request_to_proto(fewer),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected 627 indices for R=0.35 |V|=1792, got 626",
    )
    # The same indices declared with R = 0.64 (k = 1146) are also refused.
    expect_error(
        wire.request_to_proto(dataclasses.replace(req, retention=0.64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected 1146 indices",
    )


def test_layout_token_count_mismatch():
    """Guards against pruning indices that refer to another token grid than the layout's."""
    other = Layout(tile_size=448, grid_columns=2, grid_rows=2, thumbnail=True, tokens_per_tile=256)  # 1280
    msg = wire.request_to_proto(make_request())
    msg.layout.CopyFrom(wire.layout_to_proto(other, FINGERPRINT))
    expect_error(msg, grpc.StatusCode.FAILED_PRECONDITION, "layout has 1280 visual tokens")


def test_codec_errors_pass_through():
    """Guards against an out-of-range index being reported as something vaguer."""
    msg = wire.request_to_proto(make_request(), "PLAIN")
    msg.kept.indices[-1] = 1792
    expect_error(msg, grpc.StatusCode.OUT_OF_RANGE, "index 1792")
    msg.kept.indices[-1] = msg.kept.indices[-2]
    expect_error(msg, grpc.StatusCode.INVALID_ARGUMENT, "duplicate index")


def test_layout_round_trip_full_64_bit_fingerprint():
    """Guards against the fingerprint losing its top bit (fixed64 vs a signed type)."""
    for fp in (FINGERPRINT, 2**64 - 1, 2**63, 0):
        layout, got = wire.layout_from_proto(over_the_wire(wire.layout_to_proto(LAYOUT, fp)))
        assert (layout, got) == (LAYOUT, fp)
    assert layout.num_visual_tokens == 1792


def make_reply(**overrides) -> CloudReply:
    fields = dict(
        request_id="req-1",
        model="internvl3-8b",
        text="STOP",
        token_ids=(1234, 5, 151645),
        prompt_tokens=1850,
        pruned_prompt_tokens=685,
        num_visual_tokens=1792,
        kept_visual_tokens=627,
        prune_layer=2,
        timings=Timings(queue_ms=0.5, vision_ms=12.25, prefill_ms=30.0, decode_ms=80.125, total_ms=123.0),
    )
    fields.update(overrides)
    return CloudReply(**fields)


def test_reply_round_trip():
    """Guards against a reply field or a timing dropped on the way back to the edge."""
    reply = make_reply()
    assert wire.reply_from_proto(over_the_wire(wire.reply_to_proto(reply))) == reply


def test_reply_without_timings():
    """Guards against a reply from a minimal server failing to convert."""
    msg = wire.reply_to_proto(make_reply())
    msg.ClearField("timings")
    assert wire.reply_from_proto(over_the_wire(msg)).timings == Timings()
