"""The cloud gRPC service: ``stitch.v1.Cascade`` around the batching large VLM.

One ``grpc.aio`` server carries three services: ``Cascade`` (``Answer``,
``AnswerStream``, ``GetModelInfo``), the standard health service (NOT_SERVING
until the weights have loaded, and again while draining) and reflection;
optional TLS, and an optional bearer token (``auth``) that every call but
health must carry. One key=value log line per request goes to the
``stitchvlm.cloud.server`` logger, and every finished request is counted in
``CloudMetrics``. Starting, loading and draining the process are
``lifecycle``'s.

What the servicer does (STYLE 13: it only converts, admits, awaits): parse
the message (bytes that do not parse are INVALID_ARGUMENT, logged and counted),
convert it at the boundary (``wire.request_from_proto``), run the engine's
cheap checks, admit at most ``max_batch_size + max_queue`` requests, run
``CloudEngine.prepare`` (image decode, tiling, prompt) on a small thread pool
that bounds decoded-image memory, submit to the engine's batching loop and
relay its tokens (a stream of deltas, or one reply). Cancellation and
deadlines reach the loop through ``StopSignal``; the loop drops the row at its
next step. What it does not do: touch the model or its cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..shared import wire
from ..shared.errors import RequestError, clip_text
from ..shared.pb import cascade_pb2
from ..shared.preprocess import MIME_FORMATS
from ..shared.types import CloudReply, CloudRequest
from .auth import BearerTokenInterceptor
from .engine import CloudEngine, PreparedRequest
from .metrics import CloudMetrics
from .scheduler import SequenceResult
from .text import TextStream

logger = logging.getLogger("stitchvlm.cloud.server")

CASCADE_SERVICE = cascade_pb2.DESCRIPTOR.services_by_name["Cascade"].full_name  # "stitch.v1.Cascade"
HEALTH_SERVICE = health.SERVICE_NAME  # "grpc.health.v1.Health"
# Health reports the same status for the whole server ("") and for Cascade.
HEALTH_NAMES = ("", CASCADE_SERVICE)
# A client whose deadline expires cancels the call itself; the deadline travelled as a relative
# timeout, so that cancel can reach us slightly before our own copy of the deadline. A cancel
# this close to the deadline is reported as DEADLINE_EXCEEDED.
DEADLINE_SLACK_S = 0.1
# What a caller's request_id may be; anything else is refused (it is logged verbatim).
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
# Statuses of a request that ended early; their log line says whether the engine saw should_stop.
STOP_CODES = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
# Requests decoding their image at once: bounds decoded-image memory to this many full-size copies.
PREPARE_THREADS = 2
# How long a cancelled RPC waits for the loop to drop its sequence (one decode step, normally).
CANCEL_WAIT_S = 10.0
# How long a client connection lives before the server asks it to reconnect (and re-resolve).
MAX_CONNECTION_AGE_MS = 5 * 60 * 1000
MAX_CONNECTION_AGE_GRACE_MS = 10 * 60 * 1000  # calls in flight then get this long to finish
# Longest status message sent (gRPC carries it in a header; clients refuse large metadata).
MAX_STATUS_CHARS = 1024


@dataclass(frozen=True)
class ServerConfig:
    """How the cloud service listens and admits work (the model and batching are EngineConfig's)."""

    host: str = "127.0.0.1"  # interface to bind; "0.0.0.0" / "::" for all
    port: int = 50051  # TCP port; 0 lets the OS pick a free one (the ready line names it)
    max_queue: int = 8  # requests allowed to wait beyond a full batch; beyond -> RESOURCE_EXHAUSTED
    max_message_bytes: int = 32 * 1024 * 1024  # receive limit; grpc answers RESOURCE_EXHAUSTED beyond
    grace_seconds: float = 10.0  # on shutdown, how long running generations may take to finish
    tls_cert: Path | None = None  # PEM certificate chain; TLS when set (with tls_key)
    tls_key: Path | None = None  # PEM private key for tls_cert
    auth_token: str | None = None  # bearer token every call but health must carry; None = no auth
    metrics_port: int | None = None  # Prometheus /metrics HTTP port on ``host``; None = off, 0 = a free port

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.auth_token == "":
            raise ValueError("auth_token must not be empty (use None for no auth)")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")


class StopSignal:
    """``should_stop`` for one generation: True once the RPC is cancelled or past its deadline.

    Called from the batching loop between decode steps; ``cancel`` is called
    from the event loop. ``observed`` records that the loop saw it turn True,
    which the request log reports (the proof that cancellation stops work).
    """

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline  # time.monotonic() after which the caller has given up; None = no deadline
        self._cancelled = threading.Event()
        self.observed = False

    def cancel(self) -> None:
        self._cancelled.set()

    def deadline_passed(self, slack: float = 0.0) -> bool:
        """Whether the deadline is at most ``slack`` seconds away (or gone)."""
        return self.deadline is not None and time.monotonic() >= self.deadline - slack

    def __call__(self) -> bool:
        stop = self._cancelled.is_set() or self.deadline_passed()
        if stop:
            self.observed = True
        return stop

    def error(self) -> RequestError:
        """The status of a generation this signal stopped."""
        if self.deadline_passed(DEADLINE_SLACK_S):
            return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed during generation")
        return RequestError(grpc.StatusCode.CANCELLED, "generation cancelled")


class _Unparseable:
    """What the request deserializer hands on for bytes that are not an ``AnswerRequest``."""

    def __init__(self, data: bytes) -> None:
        self.size = len(data)

    def ByteSize(self) -> int:  # the protobuf name the servicer calls
        return self.size


def parse_answer_request(data: bytes) -> cascade_pb2.AnswerRequest | _Unparseable:
    try:
        return cascade_pb2.AnswerRequest.FromString(data)
    except DecodeError:
        return _Unparseable(data)


class SequenceEvents:
    """A SequenceSink that hands the loop's events to one RPC's coroutine (thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    def _post(self, kind: str, value: object) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed (shutdown): nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def tokens(self, token_ids: list[int]) -> None:
        self._post("tokens", token_ids)

    def finished(self, result: SequenceResult) -> None:
        self._post("finished", result)

    def failed(self, error: RequestError) -> None:
        self._post("failed", error)

    async def next(self) -> tuple[str, object]:
        return await self._queue.get()

    async def wait_end(self, timeout: float) -> None:
        """Until the loop reports the sequence's end (it left the batch), at most ``timeout`` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(timeout):
                while (await self._queue.get())[0] == "tokens":
                    pass


class CascadeService:
    """The ``stitch.v1.Cascade`` servicer: admission and status mapping around the engine."""

    def __init__(self, config: ServerConfig, metrics: CloudMetrics | None = None) -> None:
        self.config = config
        self.engine: CloudEngine | None = None  # set once the weights have loaded
        self.metrics = metrics if metrics is not None else CloudMetrics()
        self.draining = False  # set on SIGTERM: nothing new is admitted
        self._admitted = 0  # requests between admission and their final status
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="stitch-prepare")
        self.metrics.track_admission(self.admission_counts)

    def close(self) -> None:
        """Stop the engine's loop and the prepare threads."""
        if self.engine is not None:
            self.engine.close()
        self._prepare_pool.shutdown(wait=True, cancel_futures=True)

    def handler(self) -> grpc.GenericRpcHandler:
        """The Cascade methods, with a request parser that never raises (see ``_Unparseable``)."""
        serialize = cascade_pb2.AnswerReply.SerializeToString
        return grpc.method_handlers_generic_handler(
            CASCADE_SERVICE,
            {
                "Answer": grpc.unary_unary_rpc_method_handler(
                    self.Answer, request_deserializer=parse_answer_request, response_serializer=serialize
                ),
                "AnswerStream": grpc.unary_stream_rpc_method_handler(
                    self.AnswerStream,
                    request_deserializer=parse_answer_request,
                    response_serializer=cascade_pb2.AnswerChunk.SerializeToString,
                ),
                "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                    self.GetModelInfo,
                    request_deserializer=cascade_pb2.ModelInfoRequest.FromString,
                    response_serializer=cascade_pb2.ModelInfo.SerializeToString,
                ),
            },
        )

    # ------------------------------------------------------------------ RPCs

    async def Answer(self, message, context: grpc.aio.ServicerContext) -> cascade_pb2.AnswerReply:
        reply: cascade_pb2.AnswerReply | None = None
        async for chunk in self._serve(message, context, stream=False):
            reply = chunk.final
        return reply

    async def AnswerStream(
        self, message, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cascade_pb2.AnswerChunk]:
        async for chunk in self._serve(message, context, stream=True):
            yield chunk

    async def GetModelInfo(self, _request, context: grpc.aio.ServicerContext) -> cascade_pb2.ModelInfo:
        engine = self.engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model loading; retry when health is SERVING")
        return model_info(engine, self.config)

    # ------------------------------------------------------------------ one request

    async def _serve(self, message, context: grpc.aio.ServicerContext, stream: bool):
        """Admit, prepare, submit and relay one request; yields AnswerChunks (deltas when ``stream``)."""
        received = time.monotonic()
        request_bytes = message.ByteSize()
        if isinstance(message, _Unparseable):
            text = "request is not a valid stitch.v1.AnswerRequest message"
            await self._refuse(
                context,
                uuid.uuid4().hex,
                RequestError(grpc.StatusCode.INVALID_ARGUMENT, text),
                received,
                request_bytes,
            )
        request_id = message.request_id or uuid.uuid4().hex
        if not REQUEST_ID.fullmatch(request_id):
            # Never echo it into the log as is: it could forge log lines.
            text = "request_id must be 1-128 characters of A-Z a-z 0-9 . _ : / -"
            error = RequestError(grpc.StatusCode.INVALID_ARGUMENT, text)
            await self._refuse(
                context,
                uuid.uuid4().hex,
                error,
                received,
                request_bytes,
                f"{text}; got {clip_text(request_id)}",
            )
        remaining = context.time_remaining()  # seconds, None without a deadline
        stop = StopSignal(None if remaining is None else received + remaining)
        context.add_done_callback(lambda _: stop.cancel())  # whatever ends the RPC ends its generation
        admitted = False
        events: SequenceEvents | None = None  # set once the request is in the batching loop
        try:
            request = self._check(message, request_id, stop)
            self._admit()
            admitted = True
            sink = SequenceEvents(asyncio.get_running_loop())
            prepared = await self._prepare(request, sink, stop)
            self.engine.submit(prepared)
            events = sink
            async for chunk in self._relay(prepared, events, received, request_bytes, stream):
                yield chunk
        except RequestError as err:
            if err.code in STOP_CODES:
                err = stop.error() if err.code == grpc.StatusCode.CANCELLED else err
            stopped = stop.observed if err.code in STOP_CODES else None
            await self._refuse(
                context, request_id, err, received, request_bytes, should_stop_observed=stopped
            )
        except asyncio.CancelledError:
            stop.cancel()
            if events is not None:  # its place stays taken until the loop has really dropped it
                await events.wait_end(CANCEL_WAIT_S)
            status = (
                stop.error().code if stop.deadline_passed(DEADLINE_SLACK_S) else grpc.StatusCode.CANCELLED
            )
            self._record(request_id, status, received, request_bytes, should_stop_observed=stop.observed)
            raise
        except Exception:
            logger.exception("exception id=%s", request_id)
            self._record(request_id, grpc.StatusCode.INTERNAL, received, request_bytes)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
        finally:
            if admitted:
                self._admitted -= 1

    def _check(self, message: cascade_pb2.AnswerRequest, request_id: str, stop: StopSignal) -> CloudRequest:
        """Everything that needs no image decode or tokenizer, before the request takes a place."""
        engine = self.engine
        if engine is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "model loading; retry when health is SERVING")
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server shutting down; retry on another replica")
        if stop.deadline_passed():
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the request started"
            )
        request = dataclasses.replace(wire.request_from_proto(message), request_id=request_id)
        engine.check_limits(request)
        return request

    def _admit(self) -> None:
        batch = self.engine.config.max_batch_size
        if self._admitted >= batch + self.config.max_queue:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full ({batch} in the batch, {self.config.max_queue} waiting); retry later",
            )
        self._admitted += 1

    async def _prepare(
        self, request: CloudRequest, events: SequenceEvents, stop: StopSignal
    ) -> PreparedRequest:
        loop = asyncio.get_running_loop()
        work = partial(self.engine.prepare, request, events, should_stop=stop, stop_error=stop.error)
        return await loop.run_in_executor(self._prepare_pool, work)

    async def _relay(
        self,
        prepared: PreparedRequest,
        events: SequenceEvents,
        received: float,
        request_bytes: int,
        stream: bool,
    ):
        text = TextStream(prepared.sequence.rule) if stream else None
        while True:
            kind, value = await events.next()
            if kind == "failed":
                raise value
            if kind == "tokens":
                if text is not None:
                    yield wire.delta_to_proto(text.push(value), value)
                continue
            reply = self.engine.reply(prepared, value, received)
            if text is not None:
                rest = text.push([], final=True)
                if rest:
                    yield wire.delta_to_proto(rest, [])
            message = wire.reply_to_proto(reply)
            self._record(
                reply.request_id, grpc.StatusCode.OK, received, request_bytes, reply, message.ByteSize()
            )
            yield cascade_pb2.AnswerChunk(final=message)
            return

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        request_id: str,
        error: RequestError,
        received: float,
        request_bytes: int,
        log_message: str | None = None,
        **log_fields: object,
    ) -> None:
        """Log, count and end the call with ``error`` (its message cut to what metadata carries)."""
        message = clip_text(error.message, MAX_STATUS_CHARS, quote=False)
        self._record(
            request_id, error.code, received, request_bytes, message=log_message or message, **log_fields
        )
        await context.abort(error.code, message)  # raises: ends the call with this status

    def _record(
        self,
        request_id: str,
        status: grpc.StatusCode,
        received: float,
        request_bytes: int,
        reply: CloudReply | None = None,
        reply_bytes: int | None = None,
        **log_fields: object,
    ) -> None:
        """The request's log line and its metrics, once it has its final status."""
        log_request(
            request_id,
            status,
            received,
            reply=reply,
            request_bytes=request_bytes,
            reply_bytes=reply_bytes,
            **log_fields,
        )
        self.metrics.observe(status, reply, request_bytes, reply_bytes)

    def admission_counts(self) -> tuple[int, int]:
        """(admitted requests not yet in the batch, sequences in it), for the gauges."""
        running = self.engine.scheduler.counts[1] if self.engine is not None else 0
        return max(0, self._admitted - running), running


def model_info(engine: CloudEngine, config: ServerConfig) -> cascade_pb2.ModelInfo:
    """What a client needs to build requests for ``engine`` behind a server with ``config``."""
    return cascade_pb2.ModelInfo(
        models=[engine.model_id],
        tiling=wire.tiling_to_proto(engine.files.tiling),  # with the operator's --max-tiles applied
        prune_layer=engine.prune_layer,
        num_layers=engine.sgp.num_layers,
        max_new_tokens=engine.config.max_new_tokens_limit,
        max_image_pixels=engine.config.max_image_pixels,
        max_message_bytes=config.max_message_bytes,
        max_context=engine.max_context,
        index_encodings=[
            cascade_pb2.KeptTokens.BITMAP,
            cascade_pb2.KeptTokens.DELTA_VARINT,
            cascade_pb2.KeptTokens.PLAIN,
        ],
        image_mime_types=sorted(MIME_FORMATS),
        max_batch_size=engine.config.max_batch_size,
    )


def log_request(
    request_id: str,
    status: grpc.StatusCode,
    received: float,
    *,
    reply: CloudReply | None = None,
    message: str = "",
    should_stop_observed: bool | None = None,
    request_bytes: int | None = None,
    reply_bytes: int | None = None,
) -> None:
    """One key=value line per request: id, status, kept/|V| and timings or the error message,
    total_ms, and the serialized request / reply sizes when known."""
    fields: dict[str, object] = {"id": request_id, "status": status.name}
    if reply is not None:
        t = reply.timings
        fields.update(
            model=reply.model,
            kept=f"{reply.kept_visual_tokens}/{reply.num_visual_tokens}",
            prompt_tokens=reply.prompt_tokens,
            pruned_prompt_tokens=reply.pruned_prompt_tokens,
            new_tokens=len(reply.token_ids),
            queue_ms=round(t.queue_ms, 1),
            vision_ms=round(t.vision_ms, 1),
            prefill_ms=round(t.prefill_ms, 1),
            decode_ms=round(t.decode_ms, 1),
        )
    if should_stop_observed is not None:
        # True: the engine saw should_stop() and ended the generation early (cancellation works).
        fields["should_stop_observed"] = str(should_stop_observed).lower()
    if message:
        fields["message"] = json.dumps(message)
    fields["total_ms"] = round((time.monotonic() - received) * 1e3, 1)
    if request_bytes is not None:
        fields["request_bytes"] = request_bytes
    if reply_bytes is not None:
        fields["reply_bytes"] = reply_bytes
    logger.info("request %s", " ".join(f"{k}={v}" for k, v in fields.items()))


def build_server(
    config: ServerConfig, service: CascadeService, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """Create the server with Cascade, health and reflection; bind it. Returns (server, bound port)."""
    interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # grpc shares ports by default (SO_REUSEPORT): a second server on a busy port would
            # start and silently split the traffic instead of failing.
            ("grpc.so_reuseport", 0),
            # Clients balancing over a DNS name only re-resolve when a connection ends: ending each
            # after a while (GOAWAY, then a grace for calls in flight) lets them find new replicas.
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
        ],
    )
    server.add_generic_rpc_handlers((service.handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((CASCADE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    credentials = None
    if config.tls_cert is not None and config.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
        )
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpc's "Failed to bind to address ..."
        raise OSError(f"cannot listen on {address}: {error}") from error
    return server, port
