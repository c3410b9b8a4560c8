"""Conversion between the ``stitch.v1`` messages and the internal dataclasses.

The one place where protobuf meets ``types``: the edge SDK calls
``request_to_proto`` / ``reply_from_proto``, the cloud servicer
``request_from_proto`` / ``reply_to_proto``. ``request_from_proto`` treats its
message as hostile and raises ``RequestError`` with the status to answer with.

It does not decode the image, compare the layout fingerprint with the cloud's
own layout, or apply the server's ``max_new_tokens`` limit: the servicer and
the engine do, since only they know the checkpoint and the server config.
"""

from __future__ import annotations

import math
from dataclasses import fields

import grpc

from . import codec
from .errors import RequestError
from .layout import Layout, TilingConfig
from .pb import cascade_pb2
from .scoring import keep_count
from .types import CloudReply, CloudRequest, SamplingParams, Timings

# max_new_tokens when a request carries no GenerationParams; the one default is CloudRequest's.
DEFAULT_MAX_NEW_TOKENS: int = next(f.default for f in fields(CloudRequest) if f.name == "max_new_tokens")
MAX_TEMPERATURE = 100.0  # above this, sampling is uniform noise for any model
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64  # per stop string


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ----------------------------------------------------------------------------- layout


def layout_to_proto(layout: Layout, fingerprint: int) -> cascade_pb2.Layout:
    return cascade_pb2.Layout(
        tile_size=layout.tile_size,
        grid_columns=layout.grid_columns,
        grid_rows=layout.grid_rows,
        thumbnail=layout.thumbnail,
        tokens_per_tile=layout.tokens_per_tile,
        fingerprint=fingerprint,
    )


def layout_from_proto(msg: cascade_pb2.Layout) -> tuple[Layout, int]:
    """(layout, fingerprint); INVALID_ARGUMENT when a size field is 0."""
    for name in ("tile_size", "grid_columns", "grid_rows", "tokens_per_tile"):
        if getattr(msg, name) == 0:
            raise _invalid(f"layout.{name} must be >= 1")
    layout = Layout(
        tile_size=msg.tile_size,
        grid_columns=msg.grid_columns,
        grid_rows=msg.grid_rows,
        thumbnail=msg.thumbnail,
        tokens_per_tile=msg.tokens_per_tile,
    )
    return layout, msg.fingerprint


def tiling_to_proto(tiling: TilingConfig) -> cascade_pb2.Tiling:
    """The ``Tiling`` of ``GetModelInfo``: the tiling the cloud applies (an operator's cap included)."""
    return cascade_pb2.Tiling(
        tile_size=tiling.tile_size,
        min_tiles=tiling.min_tiles,
        max_tiles=tiling.max_tiles,
        thumbnail=tiling.use_thumbnail,
        tokens_per_tile=tiling.tokens_per_tile,
        image_mean=list(tiling.image_mean),
        image_std=list(tiling.image_std),
    )


def tiling_from_proto(msg: cascade_pb2.Tiling) -> TilingConfig:
    """The cloud's published tiling; ``ValueError`` when it is incomplete (a zero size, not 3 means)."""
    if len(msg.image_mean) != 3 or len(msg.image_std) != 3:
        raise ValueError(
            f"tiling has {len(msg.image_mean)} means and {len(msg.image_std)} stds, expected 3 each"
        )
    return TilingConfig(
        tile_size=msg.tile_size,
        min_tiles=msg.min_tiles,
        max_tiles=msg.max_tiles,
        use_thumbnail=msg.thumbnail,
        tokens_per_tile=msg.tokens_per_tile,
        image_mean=tuple(msg.image_mean),
        image_std=tuple(msg.image_std),
    )


# ----------------------------------------------------------------------------- request


def request_to_proto(req: CloudRequest, encoding: str = "auto") -> cascade_pb2.AnswerRequest:
    """The wire form of ``req``; ``encoding`` as in ``codec.encode_indices`` (``"auto"``: smaller)."""
    kept = codec.encode_indices(req.kept_indices, req.num_visual_tokens, encoding)
    return cascade_pb2.AnswerRequest(
        request_id=req.request_id,
        model=req.model,
        image=req.image,
        image_mime_type=req.mime_type,
        prompt=req.prompt,
        num_visual_tokens=req.num_visual_tokens,
        retention=req.retention,
        kept=kept.to_proto(),
        layout=layout_to_proto(req.layout, req.layout_fingerprint),
        generation=generation_to_proto(req.max_new_tokens, req.sampling),
    )


def generation_to_proto(max_new_tokens: int, sampling: SamplingParams) -> cascade_pb2.GenerationParams:
    msg = cascade_pb2.GenerationParams(
        max_new_tokens=max_new_tokens,
        temperature=sampling.temperature,
        top_p=0.0 if sampling.top_p == 1.0 else sampling.top_p,
        top_k=sampling.top_k,
        stop=list(sampling.stop),
    )
    if sampling.seed is not None:
        msg.seed = sampling.seed
    return msg


def sampling_from_proto(msg: cascade_pb2.GenerationParams) -> SamplingParams:
    """The sampling settings of a request; INVALID_ARGUMENT names the field that is out of range."""
    temperature = float(msg.temperature)
    if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise _invalid(f"generation.temperature must be in 0..{MAX_TEMPERATURE:g}, got {temperature}")
    top_p = float(msg.top_p)
    if not math.isfinite(top_p) or not 0.0 <= top_p <= 1.0:
        raise _invalid(f"generation.top_p must be in (0, 1] (0 for off), got {top_p}")
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise _invalid(f"generation.stop holds {len(msg.stop)} strings; at most {MAX_STOP_STRINGS}")
    for text in msg.stop:
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise _invalid(f"generation.stop strings must be 1..{MAX_STOP_CHARS} characters, got {len(text)}")
    return SamplingParams(
        temperature=temperature,
        top_k=int(msg.top_k),
        top_p=top_p if top_p > 0.0 else 1.0,
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
    )


def _max_new_tokens(msg: cascade_pb2.AnswerRequest) -> int:
    if not msg.HasField("generation"):
        return DEFAULT_MAX_NEW_TOKENS
    if msg.generation.max_new_tokens == 0:
        raise _invalid("generation.max_new_tokens must be >= 1 (omit generation for the default)")
    return msg.generation.max_new_tokens


def request_from_proto(
    msg: cascade_pb2.AnswerRequest, *, validate_image_present: bool = True
) -> CloudRequest:
    """Validate an ``AnswerRequest`` and convert it to a ``CloudRequest``.

    INVALID_ARGUMENT names the field: empty image (unless
    ``validate_image_present`` is False), empty or blank prompt, no layout or
    kept tokens, ``num_visual_tokens`` 0, retention outside (0, 1] or NaN, a
    malformed index payload (see ``codec.decode_indices``, which also answers
    OUT_OF_RANGE), or a count other than ``keep_count(R, |V|)``.
    FAILED_PRECONDITION when the layout's token count is not
    ``num_visual_tokens``: the indices would refer to another token grid.
    """
    if validate_image_present and not msg.image:
        raise _invalid("image is empty")
    if not msg.prompt.strip():
        raise _invalid("prompt is empty")
    if not msg.HasField("layout"):
        raise _invalid("layout is missing")
    n = msg.num_visual_tokens
    if n == 0:
        raise _invalid("num_visual_tokens must be >= 1")
    r = msg.retention
    if math.isnan(r) or not 0.0 < r <= 1.0:
        raise _invalid(f"retention must be in (0, 1], got {r}")
    if not msg.HasField("kept"):
        raise _invalid("kept is missing")
    max_new_tokens = _max_new_tokens(msg)
    sampling = sampling_from_proto(msg.generation)
    layout, fingerprint = layout_from_proto(msg.layout)
    # Checked before the indices: against the wrong grid their range errors would mislead.
    if layout.num_visual_tokens != n:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"layout has {layout.num_visual_tokens} visual tokens "
            f"({layout.grid_columns}x{layout.grid_rows} tiles"
            f"{' + thumbnail' if layout.thumbnail else ''} x {layout.tokens_per_tile}) "
            f"but num_visual_tokens is {n}",
        )
    kept = msg.kept
    indices = codec.decode_indices(kept.encoding, kept.data, kept.indices, kept.count, n)  # [k]
    k = keep_count(r, n)
    if indices.size != k:
        raise _invalid(f"kept: expected {k} indices for R={r!r} |V|={n}, got {indices.size}")
    return CloudRequest(
        image=msg.image,
        mime_type=msg.image_mime_type,
        prompt=msg.prompt,
        kept_indices=indices,
        num_visual_tokens=n,
        retention=r,
        layout=layout,
        layout_fingerprint=fingerprint,
        max_new_tokens=max_new_tokens,
        request_id=msg.request_id,
        model=msg.model,
        sampling=sampling,
    )


# ----------------------------------------------------------------------------- reply


def reply_to_proto(reply: CloudReply) -> cascade_pb2.AnswerReply:
    t = reply.timings
    return cascade_pb2.AnswerReply(
        request_id=reply.request_id,
        model=reply.model,
        text=reply.text,
        token_ids=list(reply.token_ids),
        prompt_tokens=reply.prompt_tokens,
        pruned_prompt_tokens=reply.pruned_prompt_tokens,
        num_visual_tokens=reply.num_visual_tokens,
        kept_visual_tokens=reply.kept_visual_tokens,
        prune_layer=reply.prune_layer,
        timings=cascade_pb2.Timings(
            queue_ms=t.queue_ms,
            vision_ms=t.vision_ms,
            prefill_ms=t.prefill_ms,
            decode_ms=t.decode_ms,
            total_ms=t.total_ms,
            first_token_ms=t.first_token_ms,
        ),
        finish_reason=reply.finish_reason,
    )


def reply_from_proto(msg: cascade_pb2.AnswerReply) -> CloudReply:
    """The reply as the edge uses it; a reply without timings gets all zeros."""
    t = msg.timings
    return CloudReply(
        request_id=msg.request_id,
        model=msg.model,
        text=msg.text,
        token_ids=tuple(int(i) for i in msg.token_ids),
        prompt_tokens=msg.prompt_tokens,
        pruned_prompt_tokens=msg.pruned_prompt_tokens,
        num_visual_tokens=msg.num_visual_tokens,
        kept_visual_tokens=msg.kept_visual_tokens,
        prune_layer=msg.prune_layer,
        timings=Timings(
            queue_ms=t.queue_ms,
            vision_ms=t.vision_ms,
            prefill_ms=t.prefill_ms,
            decode_ms=t.decode_ms,
            total_ms=t.total_ms,
            first_token_ms=t.first_token_ms,
        ),
        finish_reason=msg.finish_reason,
    )


# ----------------------------------------------------------------------------- streaming


def delta_to_proto(text: str, token_ids: list[int]) -> cascade_pb2.AnswerChunk:
    return cascade_pb2.AnswerChunk(delta=cascade_pb2.TextDelta(text=text, token_ids=token_ids))


def final_to_proto(reply: CloudReply) -> cascade_pb2.AnswerChunk:
    return cascade_pb2.AnswerChunk(final=reply_to_proto(reply))
