"""The cloud gRPC service: ``stitch.v1.Cascade`` around the pruned large VLM.

One ``grpc.aio`` server carries three services: ``Cascade`` (answers), the
standard health service (NOT_SERVING until the weights have loaded, and again
while shutting down) and reflection. The port is bound first and the weights
load in a background thread, so orchestrators can probe health during a slow
load. Optional TLS, and an optional bearer token that every call but health
must carry. Lifecycle lines ("stitch-cloud loading: listening on HOST:PORT",
"stitch-cloud ready: ...", "stitch-cloud metrics: ...", "stitch-cloud stopped ...")
go to stdout; one key=value log line per request (``request id=... status=...``,
then the reply's counts and timings or the error, ``total_ms`` and the
serialized message sizes) goes to the ``stitchvlm.cloud.server`` logger. Every
finished request is also counted in the server's ``CloudMetrics``, served at
``/metrics`` on ``ServerConfig.metrics_port`` when that is set.

What the servicer does: convert the wire message at the boundary
(``wire.request_from_proto``), admit at most ``max_concurrency`` generations
with at most ``max_queue`` waiting behind them, run ``CloudEngine.answer`` in a
worker thread with a ``should_stop`` that turns True once the RPC is cancelled
or past its deadline (the slot stays taken until the generation has really
stopped), and map ``RequestError`` to its status; anything else is INTERNAL
with the request id, traceback in the log. What it does not do: validation
that needs the model (image size, layout, context length, model id; the
engine raises ``RequestError`` for those), batching, or streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..shared import wire
from ..shared.errors import RequestError
from ..shared.pb import cascade_pb2, cascade_pb2_grpc
from ..shared.types import CloudReply, CloudRequest
from .engine import CloudEngine, EngineConfig
from .metrics import CloudMetrics, MetricsServer

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


@dataclass(frozen=True)
class ServerConfig:
    """How the cloud service listens and admits work (the model is EngineConfig's business)."""

    host: str = "127.0.0.1"  # interface to bind; "0.0.0.0" / "::" for all
    port: int = 50051  # TCP port; 0 lets the OS pick a free one (the ready line names it)
    max_concurrency: int = 1  # generations running at once (worker threads)
    max_queue: int = 8  # requests allowed to wait for a slot; beyond -> RESOURCE_EXHAUSTED
    max_message_bytes: int = 32 * 1024 * 1024  # receive limit; grpc answers RESOURCE_EXHAUSTED beyond
    grace_seconds: float = 10.0  # on shutdown, how long in-flight requests may take to finish
    tls_cert: Path | None = None  # PEM certificate chain; TLS when set (with tls_key)
    tls_key: Path | None = None  # PEM private key for tls_cert
    auth_token: str | None = None  # bearer token every call but health must carry; None = no auth
    metrics_port: int | None = None  # Prometheus /metrics HTTP port on ``host``; None = off, 0 = a free port

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.auth_token == "":
            raise ValueError("auth_token must not be empty (use None for no auth)")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")


class StopSignal:
    """``should_stop`` for one generation: True once the RPC is cancelled or past its deadline.

    Called from the worker thread between decode steps; ``cancel`` is called
    from the event loop. ``observed`` records that the engine saw it turn True,
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


class CascadeService(cascade_pb2_grpc.CascadeServicer):
    """The ``stitch.v1.Cascade`` servicer: admission, threading and status mapping around the engine."""

    def __init__(self, config: ServerConfig, metrics: CloudMetrics | None = None) -> None:
        self.config = config
        self.engine: CloudEngine | None = None  # set once the weights have loaded
        self.metrics = metrics if metrics is not None else CloudMetrics()
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._admitted = 0  # requests running or waiting for a slot
        self._running = 0  # requests holding a slot (their generation runs until it has really stopped)
        self._executor = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="stitch-generate")

    def close(self) -> None:
        """Wait for the worker threads (their RPCs are done, so their should_stop is True)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def Answer(
        self, request: cascade_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> cascade_pb2.AnswerReply:
        received = time.monotonic()
        request_bytes = request.ByteSize()
        request_id = request.request_id or uuid.uuid4().hex
        if not REQUEST_ID.fullmatch(request_id):
            # Never echo it into the log as is: it could forge log lines.
            fresh = uuid.uuid4().hex
            message = "request_id must be 1-128 characters of A-Z a-z 0-9 . _ : / -"
            self._record(
                fresh,
                grpc.StatusCode.INVALID_ARGUMENT,
                received,
                request_bytes,
                message=f"{message}; got {request_id!r}",
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        remaining = context.time_remaining()  # seconds, None without a deadline
        stop = StopSignal(None if remaining is None else received + remaining)
        # Whatever ends the RPC (cancel, deadline, abort) also ends its generation.
        context.add_done_callback(lambda _: stop.cancel())
        try:
            reply = await self._answer(request, request_id, received, stop)
        except RequestError as err:
            stopped = stop.observed if err.code in STOP_CODES else None
            self._record(
                request_id,
                err.code,
                received,
                request_bytes,
                message=err.message,
                should_stop_observed=stopped,
            )
            await context.abort(err.code, err.message)  # raises: ends the call with this status
        except asyncio.CancelledError:
            status = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if stop.deadline_passed(DEADLINE_SLACK_S)
                else grpc.StatusCode.CANCELLED
            )
            self._record(request_id, status, received, request_bytes, should_stop_observed=stop.observed)
            raise
        except Exception:
            logger.exception("exception id=%s", request_id)
            self._record(request_id, grpc.StatusCode.INTERNAL, received, request_bytes)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
        message = wire.reply_to_proto(reply)
        self._record(request_id, grpc.StatusCode.OK, received, request_bytes, reply, message.ByteSize())
        return message

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

    def _admission_changed(self) -> None:
        self.metrics.set_admission(waiting=self._admitted - self._running, running=self._running)

    async def _answer(
        self, message: cascade_pb2.AnswerRequest, request_id: str, received: float, stop: StopSignal
    ) -> CloudReply:
        engine = self.engine
        if engine is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "model loading; retry when health is SERVING")
        if stop.deadline_passed():
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the request started"
            )
        request = dataclasses.replace(wire.request_from_proto(message), request_id=request_id)
        if self._admitted >= self.config.max_concurrency + self.config.max_queue:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full ({self.config.max_concurrency} running, {self.config.max_queue} waiting); retry later",
            )
        self._admitted += 1
        self._admission_changed()
        try:
            async with self._slots:
                self._running += 1
                self._admission_changed()
                try:
                    started = time.monotonic()
                    if stop.deadline_passed():
                        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued")
                    reply = await self._generate(engine, request, stop)
                finally:
                    self._running -= 1
        finally:
            self._admitted -= 1
            self._admission_changed()
        timings = dataclasses.replace(
            reply.timings,
            queue_ms=(started - received) * 1e3,
            total_ms=(time.monotonic() - received) * 1e3,
        )
        return dataclasses.replace(reply, request_id=request_id, timings=timings)

    async def _generate(self, engine: CloudEngine, request: CloudRequest, stop: StopSignal) -> CloudReply:
        """Run ``engine.answer`` on a worker thread; keep the slot until that thread is really done."""
        work = asyncio.wrap_future(self._executor.submit(engine.answer, request, stop))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The client went away or the deadline passed: tell the generation to stop, and hold
            # the slot until it has, so the next request does not share the CPU/GPU with it.
            stop.cancel()
            with contextlib.suppress(BaseException):  # its outcome no longer matters, only that it ended
                await asyncio.shield(work)
            raise
        except RequestError as err:
            if err.code == grpc.StatusCode.CANCELLED and stop.deadline_passed(DEADLINE_SLACK_S):
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed during generation"
                ) from err
            raise


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


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED); health is exempt."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        presented = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(presented).encode(), self._expected):
            return handler
        return _refusing_handler(handler, "missing or wrong bearer token")


def _refusing_handler(like: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``like`` that answers UNAUTHENTICATED."""

    async def refuse(_request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": like.request_deserializer,
        "response_serializer": like.response_serializer,
    }
    if like.request_streaming and like.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if like.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if like.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


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
        ],
    )
    cascade_pb2_grpc.add_CascadeServicer_to_server(service, server)
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


async def load_engine_in_background(engine_config: EngineConfig) -> CloudEngine:
    """``CloudEngine.load`` on a daemon thread, so a shutdown during a slow load need not wait for it."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[CloudEngine] = loop.create_future()

    def settle(value: CloudEngine | None, error: BaseException | None) -> None:
        if result.done():
            return
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(value)

    def load() -> None:
        try:
            engine = CloudEngine.load(engine_config)
        except BaseException as error:  # handed to the event loop, which reports it
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, engine, None)

    threading.Thread(target=load, name="stitch-load", daemon=True).start()
    return await result


def start_metrics(config: ServerConfig, metrics: CloudMetrics) -> MetricsServer | None:
    """Serve ``/metrics`` when ``config.metrics_port`` is set; ``OSError`` when the port is taken."""
    if config.metrics_port is None:
        return None
    try:
        return metrics.serve(config.host, config.metrics_port)
    except OSError as error:
        raise OSError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {error}") from error


def announce(line: str) -> None:
    """Lifecycle lines go to stdout whatever the log level: scripts and tests read the port from them."""
    print(line, flush=True)


async def serve(server_config: ServerConfig, engine_config: EngineConfig) -> int:
    """Run the service until SIGTERM/SIGINT; returns the process exit code (0 on a clean stop).

    Order: bind (health NOT_SERVING), load weights in the background, SERVING;
    on a signal NOT_SERVING, ``server.stop(grace)`` so in-flight requests
    finish, then join the worker threads.
    """
    health_servicer = health.aio.HealthServicer()
    for name in HEALTH_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    service = CascadeService(server_config)
    try:
        server, port = build_server(server_config, service, health_servicer)
        metrics_server = start_metrics(server_config, service.metrics)
    except OSError as error:
        logger.error("%s", error)
        return 1
    await server.start()
    host = server_config.host
    scheme = "tls" if server_config.tls_cert else "insecure"
    announce(
        f"stitch-cloud loading: listening on {host}:{port} ({scheme}); NOT_SERVING until the model has loaded"
    )
    if metrics_server is not None:
        announce(f"stitch-cloud metrics: http://{host}:{metrics_server.port}/metrics")

    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)

    exit_code = 0
    load_started = time.monotonic()
    loading = asyncio.ensure_future(load_engine_in_background(engine_config))
    stopping = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        logger.error("loading the model failed", exc_info=loading.exception())
        exit_code = 1
    elif loading.done():
        engine = loading.result()
        service.engine = engine
        for name in HEALTH_NAMES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        announce(
            f"stitch-cloud ready: listening on {host}:{port} model={engine.model_id} K={engine.prune_layer} "
            f"device={engine.config.device} dtype={engine.config.dtype} "
            f"(loaded in {time.monotonic() - load_started:.2f}s)"
        )
        await stopping
    else:
        loading.cancel()  # the load thread is a daemon; it dies with the process

    logger.info("shutdown health=NOT_SERVING grace_s=%.1f", server_config.grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(server_config.grace_seconds)
    service.close()
    if metrics_server is not None:
        metrics_server.close()
    stopping.cancel()
    announce(f"stitch-cloud stopped (exit code {exit_code})")
    return exit_code
