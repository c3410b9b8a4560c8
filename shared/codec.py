"""Kept visual-token indices on the wire: the three ``KeptTokens`` encodings.

The spec is the ``KeptTokens`` message in ``proto/stitch/v1/cascade.proto``:

- BITMAP: ``ceil(|V| / 8)`` bytes, bit ``i % 8`` of byte ``i // 8`` (LSB first)
  set when token ``i`` is kept;
- DELTA_VARINT: unsigned LEB128 varints of the first index, then of each
  difference to the previous index (>= 1 in a valid list);
- PLAIN: the indices themselves in the repeated ``indices`` field.

``encode_indices`` is the sender's side and trusts nothing but raises
``ValueError``: a bad index list there is a bug in the caller. ``decode_indices``
is the receiver's side: its input is hostile, and every defect becomes a
``RequestError`` with the gRPC status the client should see. Both are numpy
vectorised (no per-index Python loop), so 20k indices take well under a
millisecond.

This module does not know the retention R or the expected count
``keep_count(R, |V|)``; ``wire`` checks that after decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from .errors import RequestError
from .pb import cascade_pb2

# The proto's enum values, so that an ``EncodedIndices`` drops into a KeptTokens as is.
BITMAP: int = cascade_pb2.KeptTokens.BITMAP
DELTA_VARINT: int = cascade_pb2.KeptTokens.DELTA_VARINT
PLAIN: int = cascade_pb2.KeptTokens.PLAIN
_BY_NAME = {"BITMAP": BITMAP, "DELTA_VARINT": DELTA_VARINT, "PLAIN": PLAIN}

# Indices are uint32 on the wire; a varint of a uint32 takes at most 5 bytes.
_UINT32_MAX = 2**32 - 1
_MAX_UINT32_VARINT_BYTES = 5
# The longest varint protobuf itself accepts (a uint64). Longer is malformed, shorter
# but over 5 bytes is a padded (non-canonical) encoding, accepted when it fits uint32.
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True)
class EncodedIndices:
    """One index list as it goes into a ``KeptTokens`` message."""

    encoding: int  # cascade_pb2.KeptTokens.Encoding value: BITMAP, DELTA_VARINT or PLAIN
    data: bytes  # BITMAP / DELTA_VARINT payload; empty for PLAIN
    count: int  # number of indices encoded
    plain: tuple[int, ...] = ()  # PLAIN payload; empty otherwise

    def to_proto(self) -> cascade_pb2.KeptTokens:
        return cascade_pb2.KeptTokens(
            encoding=self.encoding, data=self.data, count=self.count, indices=self.plain
        )


def encoding_name(encoding: int) -> str:
    """``"BITMAP"`` etc. for an enum value; ``"<n>"`` for a value this proto does not define."""
    try:
        return cascade_pb2.KeptTokens.Encoding.Name(encoding)
    except ValueError:
        return str(encoding)


# ----------------------------------------------------------------------------- encode


def _checked_indices(indices: np.ndarray | Sequence[int], num_visual_tokens: int) -> np.ndarray:
    """The sender's list as int64 after checking it is non-empty, ascending and in range."""
    if num_visual_tokens < 1 or num_visual_tokens > _UINT32_MAX:
        raise ValueError(f"num_visual_tokens must be in 1..{_UINT32_MAX}, got {num_visual_tokens}")
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("at least one visual token must be kept")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)  # idx: [k]
    if arr[0] < 0 or arr[-1] >= num_visual_tokens:
        raise ValueError(f"indices must lie in 0..{num_visual_tokens - 1}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError("indices must be strictly ascending")
    return arr


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes each uint32 value takes as a LEB128 varint (1..5)."""
    # values: [m] int64 in 0..2^32-1
    return 1 + sum((values >= (1 << (7 * j))).astype(np.int64) for j in range(1, _MAX_UINT32_VARINT_BYTES))


def _deltas(idx: np.ndarray) -> np.ndarray:
    # idx: [k] ascending -> [k]: first index, then differences
    return np.diff(idx, prepend=0)


def _encode_varints(values: np.ndarray) -> bytes:
    """Concatenated LEB128 varints of ``values`` (each < 2^32)."""
    # values: [m] int64
    lengths = _varint_lengths(values)  # [m]
    groups = np.arange(_MAX_UINT32_VARINT_BYTES)  # [5]
    septets = (values[:, None] >> (7 * groups)) & 0x7F  # [m, 5] 7-bit groups, least significant first
    more = groups[None, :] < (lengths[:, None] - 1)  # [m, 5] continuation bit: another byte follows
    used = groups[None, :] < lengths[:, None]  # [m, 5] bytes this varint occupies
    out = (septets | (more.astype(np.int64) << 7))[used]  # row-major: each varint's bytes in order
    return out.astype(np.uint8).tobytes()


def _encode_bitmap(idx: np.ndarray, num_visual_tokens: int) -> bytes:
    bits = np.zeros(num_visual_tokens, dtype=np.uint8)  # [|V|]
    bits[idx] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def encoded_sizes(indices: np.ndarray | Sequence[int], num_visual_tokens: int) -> dict[str, int]:
    """Payload bytes of BITMAP and DELTA_VARINT for this list, without encoding it."""
    idx = _checked_indices(indices, num_visual_tokens)
    return {
        "BITMAP": (num_visual_tokens + 7) // 8,
        "DELTA_VARINT": int(_varint_lengths(_deltas(idx)).sum()),
    }


def encode_indices(
    indices: np.ndarray | Sequence[int], num_visual_tokens: int, encoding: str = "auto"
) -> EncodedIndices:
    """Encode a strictly ascending index list within ``0..num_visual_tokens-1``.

    ``encoding`` is ``"BITMAP"``, ``"DELTA_VARINT"``, ``"PLAIN"`` or ``"auto"``,
    which picks the smaller payload of BITMAP and DELTA_VARINT (BITMAP on a tie).
    Raises ``ValueError`` for an empty, unsorted, duplicated or out-of-range list.
    """
    idx = _checked_indices(indices, num_visual_tokens)
    if encoding == "auto":
        sizes = encoded_sizes(idx, num_visual_tokens)
        encoding = "BITMAP" if sizes["BITMAP"] <= sizes["DELTA_VARINT"] else "DELTA_VARINT"
    if encoding not in _BY_NAME:
        raise ValueError(f"unknown encoding {encoding!r}; expected auto, {', '.join(_BY_NAME)}")
    count = int(idx.size)
    if encoding == "BITMAP":
        return EncodedIndices(BITMAP, _encode_bitmap(idx, num_visual_tokens), count)
    if encoding == "DELTA_VARINT":
        return EncodedIndices(DELTA_VARINT, _encode_varints(_deltas(idx)), count)
    return EncodedIndices(PLAIN, b"", count, tuple(idx.tolist()))


# ----------------------------------------------------------------------------- decode


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _decode_varints(data: bytes) -> np.ndarray:
    """LEB128 varints -> [m] int64 values, refusing truncated, over-long or > uint32 ones."""
    raw = np.frombuffer(data, dtype=np.uint8).astype(np.int64)  # [n_bytes]
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    if raw[-1] >= 0x80:
        raise _invalid("kept.data: truncated varint (the last byte has its continuation bit set)")
    last = np.flatnonzero(raw < 0x80)  # [m] the final byte of each varint
    first = np.concatenate([[0], last[:-1] + 1])  # [m]
    lengths = last - first + 1  # [m]
    if lengths.max() > _MAX_VARINT_BYTES:
        v = int(np.argmax(lengths > _MAX_VARINT_BYTES))
        raise _invalid(f"kept.data: varint {v} is longer than {_MAX_VARINT_BYTES} bytes")
    # Position of each byte within its varint; septet j carries bits 7j .. 7j+6.
    position = np.arange(raw.size) - np.repeat(first, lengths)  # [n_bytes]
    septets = raw & 0x7F  # [n_bytes]
    # A uint32 fills 4 septets and the low 4 bits of the 5th; anything above is too big.
    too_big = ((position == _MAX_UINT32_VARINT_BYTES - 1) & (septets > 0x0F)) | (
        (position >= _MAX_UINT32_VARINT_BYTES) & (septets > 0)
    )
    if too_big.any():
        v = int(np.searchsorted(last, np.argmax(too_big)))
        raise _invalid(f"kept.data: varint {v} exceeds uint32")
    # Septets past the 5th are zero padding now (checked above); clamp their shift to stay in int64.
    shifted = septets << (7 * np.minimum(position, _MAX_UINT32_VARINT_BYTES - 1))  # [n_bytes]
    return np.add.reduceat(shifted, first)  # [m]


def _decode_bitmap(data: bytes, num_visual_tokens: int) -> np.ndarray:
    expected = (num_visual_tokens + 7) // 8
    if len(data) != expected:
        raise _invalid(
            f"kept.data: a bitmap for {num_visual_tokens} visual tokens has {expected} bytes, got {len(data)}"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")  # [8 * expected]
    if bits[num_visual_tokens:].any():
        extra = num_visual_tokens + int(np.argmax(bits[num_visual_tokens:]))
        raise _invalid(f"kept.data: bitmap sets bit {extra} past num_visual_tokens={num_visual_tokens}")
    return np.flatnonzero(bits).astype(np.int64)


def _decode_payload(encoding: int, data: bytes, plain: Sequence[int], num_visual_tokens: int) -> np.ndarray:
    """The raw index list of one payload, before the order / range / count checks."""
    if encoding == PLAIN:
        if data:
            raise _invalid("kept.data must be empty for PLAIN (the indices go in kept.indices)")
        return np.asarray(plain, dtype=np.int64).reshape(-1)
    if encoding not in (BITMAP, DELTA_VARINT):
        raise _invalid(f"kept.encoding {encoding_name(encoding)} is not one of BITMAP, DELTA_VARINT, PLAIN")
    if len(plain):
        raise _invalid(
            f"kept.indices must be empty for {encoding_name(encoding)} (payload goes in kept.data)"
        )
    if encoding == BITMAP:
        return _decode_bitmap(data, num_visual_tokens)
    # Cheap guard before any work: |V| distinct indices need at most |V| varints.
    if len(data) > _MAX_VARINT_BYTES * num_visual_tokens:
        raise _invalid(f"kept.data: {len(data)} bytes is too long for {num_visual_tokens} visual tokens")
    deltas = _decode_varints(data)  # [m]
    if deltas.size > 1 and np.any(deltas[1:] == 0):
        pos = 1 + int(np.argmax(deltas[1:] == 0))
        raise _invalid(f"kept.data: duplicate index {int(deltas[:pos].sum())} at position {pos}")
    # Each delta < 2^32 and there are fewer than 2^31 of them (a gRPC message is < 2 GiB): no overflow.
    return np.cumsum(deltas)


def decode_indices(
    encoding: int, data: bytes, plain: Sequence[int], count: int, num_visual_tokens: int
) -> np.ndarray:
    """Decode and validate a received ``KeptTokens`` payload -> [k] int64, ascending.

    Raises ``RequestError``: INVALID_ARGUMENT for an unknown encoding, a malformed
    payload (truncated / over-long / > uint32 varint, wrong bitmap length, bits
    past ``num_visual_tokens``, payload in the wrong field), an empty list,
    duplicates, a list that is not ascending, or ``count`` not matching; and
    OUT_OF_RANGE for an index >= ``num_visual_tokens``.
    """
    if num_visual_tokens < 1:
        raise _invalid(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")
    idx = _decode_payload(encoding, data, plain, num_visual_tokens)  # [m]
    if idx.size == 0:
        raise _invalid("kept: at least one visual token must be kept, got none")
    if idx.min() < 0:  # only reachable from a PLAIN list built outside protobuf
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE, f"kept: negative index {int(idx.min())}")
    if idx.max() >= num_visual_tokens:
        pos = int(np.argmax(idx >= num_visual_tokens))
        raise RequestError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"kept: index {int(idx[pos])} at position {pos} is out of range "
            f"for num_visual_tokens={num_visual_tokens}",
        )
    steps = np.diff(idx)  # [m - 1]
    if np.any(steps == 0):
        pos = 1 + int(np.argmax(steps == 0))
        raise _invalid(f"kept: duplicate index {int(idx[pos])} at position {pos}")
    if np.any(steps < 0):
        pos = 1 + int(np.argmax(steps < 0))
        raise _invalid(
            f"kept: indices not ascending: {int(idx[pos])} at position {pos} follows {int(idx[pos - 1])}"
        )
    if idx.size != count:
        raise _invalid(f"kept.count is {count} but the payload holds {idx.size} indices")
    return idx
