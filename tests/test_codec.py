"""The kept-token index codec against the KeptTokens spec in cascade.proto.

Expected bytes are derived by hand from the spec, or produced by an independent
reference: protobuf's own packed-varint serialisation and a per-bit Python loop.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stitchvlm.shared import codec
from stitchvlm.shared.errors import RequestError
from stitchvlm.shared.pb import cascade_pb2

KT = cascade_pb2.KeptTokens


def reference_varints(values: list[int]) -> bytes:
    """LEB128 of ``values`` as protobuf writes a packed repeated uint32: strip tag and length."""
    wire = KT(indices=values).SerializeToString()
    assert wire[0] == (4 << 3) | 2  # field 4, wire type LEN
    pos = 1
    while wire[pos] & 0x80:  # skip the length varint
        pos += 1
    return wire[pos + 1 :]


def reference_bitmap(indices: list[int], n: int) -> bytes:
    out = bytearray((n + 7) // 8)
    for i in indices:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def over_the_wire(enc: codec.EncodedIndices) -> KT:
    return KT.FromString(enc.to_proto().SerializeToString())


def decode_msg(msg: KT, n: int) -> np.ndarray:
    return codec.decode_indices(msg.encoding, msg.data, msg.indices, msg.count, n)


def expect_error(code: grpc.StatusCode, fragment: str, *, encoding, data=b"", plain=(), count, n):
    with pytest.raises(RequestError) as info:
        codec.decode_indices(encoding, data, plain, count, n)
    assert info.value.code == code, info.value
    assert fragment in info.value.message, info.value.message


@st.composite
def index_sets(draw):
    """(indices, |V|): a random non-empty ascending subset, dense or sparse."""
    n = draw(st.integers(1, 5000))
    density = draw(st.sampled_from([0.001, 0.05, 0.09, 0.35, 0.64, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random(n) < density
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        idx = np.array([draw(st.integers(0, n - 1))])
    return idx.astype(np.int64), n


# ----------------------------------------------------------------------------- exact bytes


def test_delta_varint_bytes_by_hand():
    """Guards against a wrong LEB128 (MSB-first groups, missing continuation bit) or absolute values."""
    # deltas: 0, 3, 128, 169, 16384
    #   0 -> 00; 3 -> 03; 128 = 1_0000000b -> 80 01; 169 = 1_0101001b -> (0x29|0x80) 01 = a9 01;
    #   16384 = 2^14 -> 80 80 01
    indices = [0, 3, 131, 300, 16684]
    enc = codec.encode_indices(indices, 20000, "DELTA_VARINT")
    assert enc.encoding == KT.DELTA_VARINT
    assert enc.data == bytes([0x00, 0x03, 0x80, 0x01, 0xA9, 0x01, 0x80, 0x80, 0x01])
    assert enc.count == 5 and enc.plain == ()
    assert decode_msg(over_the_wire(enc), 20000).tolist() == indices


def test_bitmap_bytes_by_hand():
    """Guards against MSB-first bit order or a bitmap not padded to whole bytes."""
    # |V| = 12 -> 2 bytes. Token 0 and 3 -> byte 0 = 0b0000_1001; token 9 -> bit 1 of byte 1.
    enc = codec.encode_indices([0, 3, 9], 12, "BITMAP")
    assert enc.encoding == KT.BITMAP
    assert enc.data == bytes([0x09, 0x02])
    assert decode_msg(over_the_wire(enc), 12).tolist() == [0, 3, 9]


def test_plain_by_hand():
    """Guards against PLAIN writing into ``data`` instead of the repeated field."""
    enc = codec.encode_indices(np.array([2, 7, 11], dtype=np.int32), 12, "PLAIN")
    assert (enc.encoding, enc.data, enc.count, enc.plain) == (KT.PLAIN, b"", 3, (2, 7, 11))
    msg = over_the_wire(enc)
    assert list(msg.indices) == [2, 7, 11]
    assert decode_msg(msg, 12).dtype == np.int64


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(index_sets(), st.sampled_from(["BITMAP", "DELTA_VARINT", "PLAIN", "auto"]))
def test_round_trip_against_reference(case, encoding):
    """Guards against encode/decode drifting from the spec (checked against independent encoders)."""
    idx, n = case
    enc = codec.encode_indices(idx, n, encoding)
    assert enc.count == idx.size
    deltas = [int(idx[0])] + np.diff(idx).tolist()
    if enc.encoding == KT.BITMAP:
        assert enc.data == reference_bitmap(idx.tolist(), n)
    elif enc.encoding == KT.DELTA_VARINT:
        assert enc.data == reference_varints(deltas)
    decoded = decode_msg(over_the_wire(enc), n)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, idx)


@settings(max_examples=150, deadline=None)
@given(index_sets())
def test_auto_picks_the_smaller_payload(case):
    """Guards against auto choosing by a wrong size estimate (sizes measured on the real payloads)."""
    idx, n = case
    bitmap = len(codec.encode_indices(idx, n, "BITMAP").data)
    varint = len(codec.encode_indices(idx, n, "DELTA_VARINT").data)
    auto = codec.encode_indices(idx, n, "auto")
    assert len(auto.data) == min(bitmap, varint)
    assert auto.encoding == (KT.BITMAP if bitmap <= varint else KT.DELTA_VARINT)
    assert codec.encoded_sizes(idx, n) == {"BITMAP": bitmap, "DELTA_VARINT": varint}


def test_auto_tie_and_extremes():
    """Guards against a tie going to DELTA_VARINT, and against auto ignoring density."""
    # |V| = 16: bitmap 2 bytes; [0, 5] -> varints 00 05, 2 bytes: a tie -> BITMAP.
    assert codec.encode_indices([0, 5], 16).encoding == KT.BITMAP
    # One token of 3328: bitmap 416 bytes, varint <= 2 bytes.
    assert codec.encode_indices([3000], 3328).encoding == KT.DELTA_VARINT
    # Every token kept: bitmap 416 bytes, varint 3328 bytes.
    assert codec.encode_indices(np.arange(3328), 3328).encoding == KT.BITMAP


def test_largest_uint32_index_parses():
    """Guards against a varint decoder that drops the top 4 bits of a 5-byte varint."""
    top = 2**32 - 1  # ff ff ff ff 0f
    data = bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
    assert reference_varints([top]) == data
    # Parsed correctly it is exactly |V| and so out of range (not malformed).
    expect_error(
        grpc.StatusCode.OUT_OF_RANGE, f"index {top}", encoding=KT.DELTA_VARINT, data=data, count=1, n=top
    )
    assert codec.decode_indices(
        KT.DELTA_VARINT, bytes([0xFE, 0xFF, 0xFF, 0xFF, 0x0F]), (), 1, top
    ).tolist() == [top - 1]


def test_padded_varint_is_accepted():
    """Guards against refusing a non-canonical varint that protobuf itself accepts (<= 10 bytes)."""
    padded_five = bytes([0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00])
    # Field 4 as one unpacked varint (tag 0x20): protobuf's parser reads 5.
    assert list(KT.FromString(b"\x20" + padded_five).indices) == [5]
    assert codec.decode_indices(KT.DELTA_VARINT, padded_five, (), 1, 10).tolist() == [5]


# ----------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("encoding", [KT.ENCODING_UNSPECIFIED, 7])
def test_unknown_encoding(encoding):
    """Guards against an unset or future encoding being decoded as something else."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "kept.encoding", encoding=encoding, data=b"\x01", count=1, n=8
    )


@pytest.mark.parametrize(
    "encoding, data, plain",
    [
        (KT.PLAIN, b"", (1, 8)),
        (KT.DELTA_VARINT, bytes([1, 7]), ()),  # 1, 8
    ],
)
def test_index_out_of_range(encoding, data, plain):
    """Guards against pruning with an index past the image's visual tokens (names the index)."""
    expect_error(
        grpc.StatusCode.OUT_OF_RANGE,
        "index 8 at position 1",
        encoding=encoding,
        data=data,
        plain=plain,
        count=2,
        n=8,
    )


@pytest.mark.parametrize(
    "encoding, data, plain",
    [
        (KT.PLAIN, b"", (1, 4, 4, 6)),
        (KT.DELTA_VARINT, bytes([1, 3, 0, 2]), ()),  # 1, 4, 4, 6
    ],
)
def test_duplicate_index(encoding, data, plain):
    """Guards against a duplicate silently keeping one token fewer than counted."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "duplicate index 4 at position 2",
        encoding=encoding,
        data=data,
        plain=plain,
        count=4,
        n=8,
    )


def test_unsorted_plain():
    """Guards against accepting a list the pruning gather would reorder."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "indices not ascending: 2 at position 2 follows 5",
        encoding=KT.PLAIN,
        plain=(1, 5, 2),
        count=3,
        n=8,
    )


@pytest.mark.parametrize(
    "encoding, data, plain",
    [(KT.PLAIN, b"", (1, 2, 3)), (KT.DELTA_VARINT, bytes([1, 1, 1]), ()), (KT.BITMAP, bytes([0x0E]), ())],
)
def test_count_mismatch(encoding, data, plain):
    """Guards against trusting a payload that holds a different number of indices than it says."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "kept.count is 2 but the payload holds 3",
        encoding=encoding,
        data=data,
        plain=plain,
        count=2,
        n=8,
    )


@pytest.mark.parametrize(
    "data, fragment",
    [
        (bytes([0x80]), "truncated varint"),
        (bytes([0x05, 0x81]), "truncated varint"),
        (bytes([0x80] * 10 + [0x00]), "longer than 10 bytes"),
        (bytes([0x80, 0x80, 0x80, 0x80, 0x10]), "exceeds uint32"),  # 2^32
        (bytes([0x01, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]), "varint 1 exceeds uint32"),  # 2^35
    ],
)
def test_malformed_varints(data, fragment):
    """Guards against reading past a truncated varint or wrapping an over-large one into range."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, fragment, encoding=KT.DELTA_VARINT, data=data, count=1, n=2**32 - 1
    )


def test_varint_payload_too_long_for_v():
    """Guards against decoding megabytes of varints for a 16-token image."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "too long", encoding=KT.DELTA_VARINT, data=bytes(161), count=1, n=16
    )


@pytest.mark.parametrize("length", [0, 1, 3])
def test_bitmap_wrong_length(length):
    """Guards against a bitmap for another |V| being read as this one's."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"has 2 bytes, got {length}",
        encoding=KT.BITMAP,
        data=bytes([0x01] * length),
        count=1,
        n=12,
    )


def test_bitmap_bits_past_v():
    """Guards against silently dropping kept bits in the padding of the last byte."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bit 12 past num_visual_tokens=12",
        encoding=KT.BITMAP,
        data=bytes([0x01, 0x10]),
        count=2,
        n=12,
    )


@pytest.mark.parametrize(
    "encoding, data",
    [(KT.PLAIN, b""), (KT.DELTA_VARINT, b""), (KT.BITMAP, bytes(2))],
)
def test_empty_list(encoding, data):
    """Guards against a request that keeps no visual token at all."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least one visual token",
        encoding=encoding,
        data=data,
        count=0,
        n=12,
    )


def test_payload_in_the_wrong_field():
    """Guards against ignoring half of an ambiguous payload."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "kept.data must be empty",
        encoding=KT.PLAIN,
        data=b"\x01",
        plain=(1,),
        count=1,
        n=8,
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "kept.indices must be empty",
        encoding=KT.BITMAP,
        data=b"\x02",
        plain=(1,),
        count=1,
        n=8,
    )


def test_zero_visual_tokens():
    """Guards against decoding against an empty token grid."""
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "num_visual_tokens", encoding=KT.PLAIN, plain=(0,), count=1, n=0
    )


# ----------------------------------------------------------------------------- sender bugs


@pytest.mark.parametrize(
    "indices, n",
    [([], 8), ([3, 1], 8), ([1, 1], 8), ([8], 8), ([-1, 2], 8), ([0.0, 1.0], 8), ([[0, 1]], 8), ([0], 0)],
)
def test_encode_rejects_bad_lists(indices, n):
    """Guards against the edge sending a list the cloud must refuse anyway."""
    with pytest.raises(ValueError):
        codec.encode_indices(np.asarray(indices), n)


def test_encode_rejects_unknown_encoding():
    """Guards against a typo falling back to some encoding silently."""
    with pytest.raises(ValueError, match="unknown encoding"):
        codec.encode_indices([0], 8, "bitmap")


# ----------------------------------------------------------------------------- speed


@pytest.mark.parametrize("encoding", ["BITMAP", "DELTA_VARINT", "PLAIN"])
def test_decode_is_vectorised(encoding):
    """Guards against a per-index Python loop (about 50 ms for 100k indices; numpy takes ~1-2 ms)."""
    rng = np.random.default_rng(0)
    n = 400_000
    idx = np.sort(rng.choice(n, 100_000, replace=False))
    msg = over_the_wire(codec.encode_indices(idx, n, encoding))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        out = decode_msg(msg, n)
        best = min(best, time.perf_counter() - start)
    np.testing.assert_array_equal(out, idx)
    assert best < 0.015, f"{encoding}: {best * 1e3:.1f} ms for 100k indices"
