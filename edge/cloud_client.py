"""How the edge asks the cloud: one client interface, two transports.

- ``CloudClient``: ``answer(request, timeout_s) -> CloudReply`` and its
  awaitable twin ``answer_async``; ``stream`` / ``stream_async`` yield the
  answer as ``CloudChunk``s while it is generated, the last one carrying the
  whole reply. Every failure is a ``CloudError`` carrying the gRPC status,
  whatever the transport.
- ``GrpcCloudClient``: the ``stitch.v1.Cascade`` stub over a gRPC channel
  (TLS and a bearer token optional). The whole call, retries included, runs
  within one deadline of ``timeout_s``; UNAVAILABLE (no server, server still
  loading) is retried with exponential backoff while the deadline allows.
  Given several replicas (a list, "a:1,b:2", or a ``dns:///`` / ``ipv4:``
  target) the channel balances per call with gRPC's ``round_robin`` and
  client-side health checking (``balancing_service_config``): a replica that
  is loading, draining or gone gets no new calls, and a retry lands on another.
- ``InProcessCloudClient``: a loaded ``CloudEngine`` (or anything with its
  ``answer(request, should_stop)``) called directly, through the same wire
  conversion the server applies, so the gate and SDK are tested without a
  network and both transports refuse a bad request alike.
- ``connect_cloud``: picks one from what the caller has ("host:port", a list of them, or an engine).

``CloudClient.check_tiling`` compares the edge's tiling with the one the cloud
publishes (``GetModelInfo``), so an edge and a cloud run with different
``--max-tiles`` fail with one message naming both instead of a refused layout.

``request_wire_size`` measures what a request costs on the wire (the
serialized ``AnswerRequest``), split into image, kept indices and the rest.

This module decides nothing (the SDK does) and imports no torch: the
in-process client only calls the engine it is handed.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import ipaddress
import json
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from stitchvlm.shared import wire
from stitchvlm.shared.errors import RequestError
from stitchvlm.shared.layout import TilingConfig
from stitchvlm.shared.pb import cascade_pb2, cascade_pb2_grpc
from stitchvlm.shared.types import CloudReply, CloudRequest

# Statuses worth another attempt: nothing was answered and the server may be back soon
# (no server listening, connection dropped, model still loading).
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # the server's default receive limit
# The service the cloud's health reports NOT_SERVING for while it loads or drains.
HEALTH_SERVICE_NAME = cascade_pb2.DESCRIPTOR.services_by_name["Cascade"].full_name  # "stitch.v1.Cascade"
# Target schemes whose resolver may return several addresses (a balanced channel).
_MULTI_ADDRESS_SCHEMES = ("dns:", "ipv4:", "ipv6:")


class CloudError(Exception):
    """The cloud did not answer: ``code`` is the gRPC status, ``message`` what it said."""

    def __init__(self, code: grpc.StatusCode, message: str, attempts: int = 1) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code  # grpc.StatusCode of the last attempt
        self.message = message  # the status details (or the client's own explanation)
        self.attempts = attempts  # calls made, retries included


@dataclass(frozen=True)
class WireSize:
    """Bytes of one serialized ``AnswerRequest`` and where they go."""

    total: int  # the whole message as sent
    image: int  # the encoded image payload
    indices: int  # the ``KeptTokens`` message (kept visual-token indices)
    other: int  # prompt, layout, parameters, field tags and lengths


def request_wire_size(request: CloudRequest, encoding: str = "auto") -> WireSize:
    """Size of ``request`` as ``wire.request_to_proto(request, encoding)`` serializes it."""
    return _wire_size(wire.request_to_proto(request, encoding))


def _wire_size(message: cascade_pb2.AnswerRequest) -> WireSize:
    total = message.ByteSize()
    image = len(message.image)
    indices = message.kept.ByteSize()
    return WireSize(total=total, image=image, indices=indices, other=total - image - indices)


@dataclass(frozen=True)
class CloudChunk:
    """One piece of a streamed answer: new text and its ids, or (last) the whole reply."""

    text: str  # new text; the texts of all chunks concatenated are the reply's text
    token_ids: tuple[int, ...]  # ids generated since the previous chunk
    reply: CloudReply | None = None  # set on the last chunk only


class _Cancellation:
    """Lets an abandoned ``answer_async`` stop the worker thread's call and its backoff sleeps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            if self._call is not None:
                self._call.cancel()

    def is_set(self) -> bool:
        return self._event.is_set()

    def attach(self, call: grpc.Future) -> None:
        """The call in flight; cancelled at once when cancellation came first."""
        with self._lock:
            self._call = call
            if self._event.is_set():
                call.cancel()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when cancelled meanwhile."""
        return self._event.wait(seconds)


class CloudClient(abc.ABC):
    """Asks the large model one question. Implementations are safe to share between threads."""

    index_encoding: str = "auto"  # KeptTokens encoding on the wire (codec.encode_indices)

    @abc.abstractmethod
    def answer(self, request: CloudRequest, timeout_s: float) -> CloudReply:
        """The cloud's reply within ``timeout_s`` seconds, or ``CloudError``."""

    async def answer_async(self, request: CloudRequest, timeout_s: float) -> CloudReply:
        """``answer`` on a worker thread. Transports that can stop a call override this."""
        return await asyncio.to_thread(self.answer, request, timeout_s)

    def stream(self, request: CloudRequest, timeout_s: float) -> Iterator[CloudChunk]:
        """The answer as it is generated; the last chunk holds the reply. ``CloudError`` on failure."""
        return self._stream(request, timeout_s, _Cancellation())

    async def stream_async(self, request: CloudRequest, timeout_s: float) -> AsyncIterator[CloudChunk]:
        """``stream`` for asyncio: the call runs on a worker thread and stops when the iteration does."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        cancellation = _Cancellation()

        def pump() -> None:
            def put(kind: str, value: object) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

            try:
                for chunk in self._stream(request, timeout_s, cancellation):
                    put("chunk", chunk)
                put("end", None)
            except BaseException as error:  # handed to the awaiting side, which raises it
                put("error", error)

        worker = asyncio.ensure_future(asyncio.to_thread(pump))
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            cancellation.cancel()
            worker.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _stream(
        self, request: CloudRequest, timeout_s: float, cancellation: _Cancellation
    ) -> Iterator[CloudChunk]:
        """Transports without streaming: the whole answer as one chunk, then the reply."""
        if cancellation.is_set():
            raise CloudError(grpc.StatusCode.CANCELLED, "cancelled by the caller")
        reply = self.answer(request, timeout_s)
        yield CloudChunk(reply.text, reply.token_ids)
        yield CloudChunk("", (), reply)

    def cloud_tiling(self, timeout_s: float) -> TilingConfig | None:
        """The tiling the cloud cuts images with (its ``--max-tiles`` applied); None when it cannot tell."""
        return None

    def check_tiling(self, tiling: TilingConfig, timeout_s: float) -> bool:
        """True when the cloud tiles as ``tiling`` does, False when it cannot tell.

        Raises ``CloudError(FAILED_PRECONDITION)`` naming both sides' ``max_tiles``
        when the tilings differ: the cloud would refuse every request's layout.
        """
        published = self.cloud_tiling(timeout_s)
        if published is None:
            return False
        mismatch = tiling_mismatch(tiling, published)
        if mismatch is not None:
            raise CloudError(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
        return True

    def wire_size(self, request: CloudRequest) -> WireSize:
        """What ``request`` costs on the wire with this client's index encoding."""
        return request_wire_size(request, self.index_encoding)

    def close(self) -> None:  # noqa: B027 - optional hook; clients without resources need nothing
        """Release connections; the client is unusable afterwards."""

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _run_cancellable(call, request: CloudRequest, timeout_s: float) -> CloudReply:
    """``call(request, timeout_s, cancellation)`` on a thread; a cancelled await cancels the call too."""
    cancellation = _Cancellation()
    task = asyncio.ensure_future(asyncio.to_thread(call, request, timeout_s, cancellation))
    # Once abandoned, the thread's CloudError(CANCELLED) has no reader; retrieve it so it is not logged.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancellation.cancel()
        raise


def tiling_mismatch(edge: TilingConfig, cloud: TilingConfig) -> str | None:
    """Why an edge tiling ``edge`` and a cloud tiling ``cloud`` give different layouts; None when equal."""
    if edge == cloud:
        return None
    names = [f.name for f in dataclasses.fields(TilingConfig) if f.name != "max_tiles"]
    others = [
        f"edge {name}={getattr(edge, name)}, cloud {name}={getattr(cloud, name)}"
        for name in names
        if getattr(edge, name) != getattr(cloud, name)
    ]
    hint = (
        "run stitch-edge and stitch-cloud with the same --max-tiles"
        if not others
        else "the edge export and the cloud checkpoint must share a preprocessing config"
    )
    return (
        f"tiling mismatch: edge max_tiles={edge.max_tiles}, cloud max_tiles={cloud.max_tiles}"
        + "".join(f"; {text}" for text in others)
        + f"; the cloud would refuse every layout, so {hint}"
    )


def _check_timeout(timeout_s: float) -> float:
    timeout = float(timeout_s)
    if not timeout > 0:  # also false for NaN
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return timeout


class GrpcCloudClient(CloudClient):
    """``stitch.v1.Cascade/Answer`` over one gRPC channel (HTTP/2, reused across calls)."""

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        tls_root_cert: bytes | None = None,
        auth_token: str | None = None,
        max_retries: int = 3,
        backoff_s: float = 0.1,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        index_encoding: str = "auto",
    ) -> None:
        """``address``: a gRPC target ("host:port"), or several replicas: a list of "host:port",
        "host:port,host:port", or a target whose resolver gives several (``dns:///name:port``,
        ``ipv4:a:p,b:p``); those balance per call (``cloud_target``). ``tls_root_cert``: PEM the
        client trusts, TLS when given, plaintext otherwise. ``auth_token``: sent as
        ``authorization: Bearer``. ``max_retries``: extra attempts after UNAVAILABLE, the n-th
        after about ``backoff_s * 2**(n-1)`` seconds (on another replica when balanced).
        ``max_message_bytes``: largest request or reply."""
        if max_retries < 0 or backoff_s < 0 or max_message_bytes < 1:
            raise ValueError("max_retries and backoff_s must be >= 0, max_message_bytes >= 1")
        target = cloud_target(address)  # ValueError for an empty or unusable address
        self.address = address  # as the caller gave it
        self.target = target.target  # what the channel dials
        self.balanced = target.balanced
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.index_encoding = index_encoding
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if target.balanced:
            options += [
                ("grpc.service_config", balancing_service_config()),
                # the config above, not one a DNS TXT record might carry
                ("grpc.service_config_disable_resolution", 1),
            ]
        if tls_root_cert is None:
            self._channel = grpc.insecure_channel(target.target, options=options)
        else:
            if target.authority is not None:  # certificates are checked against this name
                options.append(("grpc.default_authority", target.authority))
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            self._channel = grpc.secure_channel(target.target, credentials, options=options)
        self._stub = cascade_pb2_grpc.CascadeStub(self._channel)

    def answer(self, request: CloudRequest, timeout_s: float) -> CloudReply:
        return self._call(request, timeout_s, _Cancellation())

    async def answer_async(self, request: CloudRequest, timeout_s: float) -> CloudReply:
        return await _run_cancellable(self._call, request, timeout_s)

    def close(self) -> None:
        self._channel.close()

    def cloud_tiling(self, timeout_s: float) -> TilingConfig | None:
        """``GetModelInfo``'s tiling, one attempt; None when the call fails or the tiling is incomplete.

        A cloud that is down, loading, refusing the token or too old to answer
        is not this check's business: the ``Answer`` call that follows reports
        it (with its retries), and the cloud checks the layout of every request.
        """
        try:
            info = self._stub.GetModelInfo(
                cascade_pb2.ModelInfoRequest(), timeout=_check_timeout(timeout_s), metadata=self._metadata
            )
        except grpc.RpcError:
            return None
        if not info.HasField("tiling"):
            return None
        try:
            return wire.tiling_from_proto(info.tiling)
        except ValueError:
            return None

    def _stream(
        self, request: CloudRequest, timeout_s: float, cancellation: _Cancellation
    ) -> Iterator[CloudChunk]:
        """``AnswerStream``; UNAVAILABLE is retried as in ``answer`` until the first chunk has arrived."""
        deadline = time.monotonic() + _check_timeout(timeout_s)
        message = wire.request_to_proto(request, self.index_encoding)
        attempts = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout_s}s", attempts)
            attempts += 1
            call = self._stub.AnswerStream(message, timeout=remaining, metadata=self._metadata)
            cancellation.attach(call)
            received = False
            try:
                for chunk in call:
                    received = True
                    if chunk.HasField("final"):
                        yield CloudChunk("", (), wire.reply_from_proto(chunk.final))
                        return
                    yield CloudChunk(chunk.delta.text, tuple(int(i) for i in chunk.delta.token_ids))
                raise CloudError(grpc.StatusCode.INTERNAL, "the stream ended without a final reply", attempts)
            except grpc.RpcError as error:
                code, details = call.code(), call.details() or ""
                if code == grpc.StatusCode.CANCELLED and cancellation.is_set():
                    raise CloudError(code, "cancelled by the caller", attempts) from None
                if received or code not in RETRYABLE_CODES or attempts > self.max_retries:
                    raise CloudError(code, _with_attempts(details, attempts), attempts) from error
            self._pause_before_retry(code, details, attempts, deadline, cancellation)

    def _call(self, request: CloudRequest, timeout_s: float, cancellation: _Cancellation) -> CloudReply:
        deadline = time.monotonic() + _check_timeout(timeout_s)
        message = wire.request_to_proto(request, self.index_encoding)
        attempts = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout_s}s", attempts)
            attempts += 1
            # wait_for_ready stays False: with no server a call fails at once (UNAVAILABLE) and the
            # backoff below decides, instead of a dead cloud holding the edge's answer until the deadline.
            call = self._stub.Answer.future(message, timeout=remaining, metadata=self._metadata)
            cancellation.attach(call)
            try:
                return wire.reply_from_proto(call.result())
            except grpc.FutureCancelledError:
                raise CloudError(grpc.StatusCode.CANCELLED, "cancelled by the caller", attempts) from None
            except grpc.RpcError as error:
                code, details = call.code(), call.details() or ""
                if code not in RETRYABLE_CODES or attempts > self.max_retries:
                    raise CloudError(code, _with_attempts(details, attempts), attempts) from error
            self._pause_before_retry(code, details, attempts, deadline, cancellation)

    def _pause_before_retry(
        self, code: grpc.StatusCode, details: str, attempts: int, deadline: float, cancellation: _Cancellation
    ) -> None:
        """Back off before the next attempt, or raise when the deadline or the caller will not wait."""
        pause = _backoff(self.backoff_s, attempts)
        if pause >= deadline - time.monotonic():
            # Sleeping past the deadline would only turn UNAVAILABLE into DEADLINE_EXCEEDED later.
            raise CloudError(
                code, _with_attempts(details, attempts) + "; deadline too close to retry", attempts
            )
        if cancellation.sleep(pause):
            raise CloudError(grpc.StatusCode.CANCELLED, "cancelled by the caller", attempts)


@dataclass(frozen=True)
class CloudTarget:
    """What a ``GrpcCloudClient`` channel dials for the address its caller gave."""

    target: str  # the gRPC target string
    balanced: bool  # several replicas: round_robin over the healthy ones
    authority: str | None = None  # for a list: its first "host:port", the name TLS checks certificates for


def balancing_service_config() -> str:
    """The service config (JSON) of a channel to several replicas.

    ``round_robin`` picks a replica per call among the READY ones, and
    ``healthCheckConfig`` makes the channel watch each replica's health
    (``grpc.health.v1.Health/Watch`` for "stitch.v1.Cascade"): one that
    reports NOT_SERVING (loading, draining) is skipped until it reports
    SERVING. gRPC's default ``pick_first`` would ignore health.
    """
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": HEALTH_SERVICE_NAME},
        }
    )


def cloud_target(address: str | Sequence[str]) -> CloudTarget:
    """The channel target for ``address``.

    - "host:port" (or any target without a comma): dialled as given, not balanced
      (the single-replica behaviour; ``pick_first``).
    - "dns:///name:port", "ipv4:a:p,b:p", "ipv6:[a]:p,[b]:p": as given, balanced
      (a DNS name follows the replicas its records list, e.g. a headless Service).
    - a list of "host:port", or one string of them joined by commas: balanced over
      an ``ipv4:`` / ``ipv6:`` target; host names are resolved once, here (give a
      ``dns:///`` target for a set that changes). ``ValueError`` when an entry is
      malformed, does not resolve, or IPv4 and IPv6 addresses are mixed.
    """
    if isinstance(address, str):
        text = address.strip()
        if text.startswith(_MULTI_ADDRESS_SCHEMES):
            return CloudTarget(text, balanced=True)
        if "," not in text:
            if not text:
                raise ValueError("address is empty")
            return CloudTarget(text, balanced=False)
        entries = text.split(",")
    else:
        entries = list(address)
    entries = [entry.strip() for entry in entries]
    if not entries or not all(entries):
        raise ValueError(f"empty entry in the cloud addresses {address!r}")
    if len(entries) == 1:
        return cloud_target(entries[0])
    families = set()
    resolved: list[str] = []
    for entry in entries:
        if "/" in entry or entry.startswith(_MULTI_ADDRESS_SCHEMES):
            raise ValueError(
                f"{entry!r}: a list holds host:port entries; give a dns:/// target alone instead"
            )
        for family, ip, port in _resolve(entry):
            families.add(family)
            text = f"[{ip}]:{port}" if family == 6 else f"{ip}:{port}"
            if text not in resolved:
                resolved.append(text)
    if len(families) > 1:
        raise ValueError(f"cloud addresses {entries} mix IPv4 and IPv6; give one family")
    scheme = "ipv6" if families == {6} else "ipv4"
    return CloudTarget(f"{scheme}:{','.join(resolved)}", balanced=True, authority=entries[0])


def _resolve(entry: str) -> list[tuple[int, str, int]]:
    """("host:port" or "[v6]:port") -> [(IP version, address, port)]; IPv4 preferred for a name."""
    host, sep, port_text = entry.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{entry!r} is not host:port")
    port = int(port_text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass  # a name
    else:
        return [(ip.version, str(ip), port)]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve {host!r}: {error}") from None
    found = [(6 if info[0] == socket.AF_INET6 else 4, info[4][0], port) for info in infos]
    ipv4 = [item for item in found if item[0] == 4]
    return ipv4 or found


def _backoff(base_s: float, attempt: int) -> float:
    """Pause before retry ``attempt`` (1-based): ``base * 2**(attempt-1)``, the upper half jittered.

    The jitter keeps a fleet of devices that lost the cloud together from
    reconnecting in lockstep.
    """
    full = base_s * 2 ** (attempt - 1)
    return full / 2 + random.uniform(0.0, full / 2)


def _with_attempts(details: str, attempts: int) -> str:
    return details if attempts == 1 else f"{details} (after {attempts} attempts)"


class AnswersRequests(Protocol):
    """What the in-process client needs of an engine (``cloud.engine.CloudEngine`` has it)."""

    def answer(self, request: CloudRequest, should_stop=None) -> CloudReply: ...


class InProcessCloudClient(CloudClient):
    """The engine in this process, behind the same wire conversion and statuses as the server.

    The request goes through ``wire.request_to_proto`` / ``request_from_proto``
    (the server's validation) and the reply through ``reply_to_proto`` /
    ``reply_from_proto``; ``RequestError`` becomes ``CloudError`` with its code.
    Calls run one at a time (the engine batches, but one caller's turn is
    what an in-process test needs); the deadline covers the wait for that turn
    and stops the generation between decode steps. ``stream`` gives the whole
    answer as one chunk.
    """

    def __init__(self, engine: AnswersRequests, index_encoding: str = "auto") -> None:
        self.engine = engine
        self.index_encoding = index_encoding
        self._turn = threading.Lock()

    def answer(self, request: CloudRequest, timeout_s: float) -> CloudReply:
        return self._call(request, timeout_s, _Cancellation())

    async def answer_async(self, request: CloudRequest, timeout_s: float) -> CloudReply:
        return await _run_cancellable(self._call, request, timeout_s)

    def cloud_tiling(self, timeout_s: float) -> TilingConfig | None:
        """The engine's tiling (``engine.files.tiling``, a ``CloudEngine``'s); None for an engine without one."""
        tiling = getattr(getattr(self.engine, "files", None), "tiling", None)
        return tiling if isinstance(tiling, TilingConfig) else None

    def _call(self, request: CloudRequest, timeout_s: float, cancellation: _Cancellation) -> CloudReply:
        deadline = time.monotonic() + _check_timeout(timeout_s)

        def should_stop() -> bool:
            return cancellation.is_set() or time.monotonic() >= deadline

        try:
            received = wire.request_from_proto(wire.request_to_proto(request, self.index_encoding))
            if not self._turn.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed waiting for the engine"
                )
            try:
                if should_stop():
                    raise RequestError(grpc.StatusCode.CANCELLED, "stopped before generation")
                reply = self.engine.answer(received, should_stop)
            finally:
                self._turn.release()
        except RequestError as error:
            code = error.code
            if code == grpc.StatusCode.CANCELLED and not cancellation.is_set():
                code = grpc.StatusCode.DEADLINE_EXCEEDED  # stopped by the deadline, as the server says
            raise CloudError(code, error.message) from error
        return wire.reply_from_proto(wire.reply_to_proto(reply))


def connect_cloud(spec: object, **grpc_options: object) -> CloudClient | None:
    """A client for ``spec``: None -> None (edge only); a ``CloudClient`` -> itself;
    a string, or a list or tuple of "host:port" (replicas) -> ``GrpcCloudClient(spec,
    **grpc_options)``; an object with ``answer(request, should_stop)`` (a
    ``CloudEngine``) -> ``InProcessCloudClient``. Raises ``TypeError`` for anything else."""
    if spec is None or isinstance(spec, CloudClient):
        return spec
    if is_grpc_address(spec):
        return GrpcCloudClient(spec, **grpc_options)
    if callable(getattr(spec, "answer", None)):
        return InProcessCloudClient(spec)
    raise TypeError(f"cannot reach a cloud through {type(spec).__name__}; expected 'host:port' or an engine")


def is_grpc_address(spec: object) -> bool:
    """True for what ``GrpcCloudClient`` dials: a string, or a list or tuple of strings."""
    if isinstance(spec, str):
        return True
    return isinstance(spec, list | tuple) and bool(spec) and all(isinstance(item, str) for item in spec)
