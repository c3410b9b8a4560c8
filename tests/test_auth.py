"""``stitchvlm.cloud.auth.BearerTokenInterceptor`` on a real ``grpc.aio`` server, without a model.

The server in this module carries the standard health service and a generic
``test.Echo`` service of every streaming kind, behind the interceptor; a
blocking client calls it with various ``authorization`` headers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stitchvlm.cloud.auth import BearerTokenInterceptor

TOKEN = "t0ken-under-test"
SERVICE = "test.Echo"


def _identity(data: bytes) -> bytes:
    return data


async def _unary(request: bytes, _context) -> bytes:
    return b"echo:" + request


async def _unary_stream(request: bytes, _context):
    for part in (b"a", b"b"):
        yield part + request


async def _stream_unary(requests, _context) -> bytes:
    return b"+".join([r async for r in requests])


async def _stream_stream(requests, _context):
    async for request in requests:
        yield request


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary, _identity, _identity),
    "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream, _identity, _identity),
    "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary, _identity, _identity),
    "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream, _identity, _identity),
}


def serve_in_thread(interceptor: grpc.aio.ServerInterceptor) -> Iterator[str]:
    """A grpc.aio server on its own event loop thread; yields its address, stops it afterwards."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def run() -> None:
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["stop"] = asyncio.Event()
        started.set()
        await state["stop"].wait()
        await server.stop(0)

    thread = threading.Thread(target=lambda: loop.run_until_complete(run()), daemon=True)
    thread.start()
    assert started.wait(30), "test server did not start"
    try:
        yield f"127.0.0.1:{state['port']}"
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        loop.close()


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    yield from serve_in_thread(BearerTokenInterceptor(TOKEN))


def call(address: str, method: str, metadata, request: bytes = b"x"):
    """Call ``test.Echo/<method>``; returns the reply (a list for streamed replies)."""
    with grpc.insecure_channel(address) as channel:
        path = f"/{SERVICE}/{method}"
        kwargs = {"request_serializer": _identity, "response_deserializer": _identity}
        if method == "Unary":
            return channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)
        if method == "UnaryStream":
            return list(channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=10))
        if method == "StreamUnary":
            return channel.stream_unary(path, **kwargs)(
                iter([request, request]), metadata=metadata, timeout=10
            )
        return list(channel.stream_stream(path, **kwargs)(iter([request]), metadata=metadata, timeout=10))


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


EXPECTED = {"Unary": b"echo:x", "UnaryStream": [b"ax", b"bx"], "StreamUnary": b"x+x", "StreamStream": [b"x"]}


@pytest.mark.parametrize("method", list(HANDLERS))
def test_right_token_passes_and_others_are_unauthenticated(address, method):
    """Guards against an auth check skipped for some streaming kind, one that accepts a wrong or
    bare (no "Bearer ") token, and one whose refusal is not UNAUTHENTICATED."""
    assert call(address, method, [bearer(TOKEN)]) == EXPECTED[method]
    refused = {
        "missing": [],
        "wrong": [bearer("nope")],
        "no scheme": [("authorization", TOKEN)],
        "prefix of the token": [bearer(TOKEN[:-1])],
        "token plus more": [bearer(TOKEN + "x")],
    }
    for name, metadata in refused.items():
        with pytest.raises(grpc.RpcError) as caught:
            call(address, method, metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert "bearer token" in caught.value.details(), name


@pytest.mark.parametrize(
    "headers",
    [[TOKEN, TOKEN], ["nope", TOKEN], [TOKEN, "nope"], [TOKEN, TOKEN, TOKEN]],
    ids=["right+right", "wrong+right", "right+wrong", "three"],
)
def test_two_authorization_headers_are_refused(address, headers):
    """Guards against judging a call by one of several authorization headers (the old interceptor
    took the last, via dict()): a proxy that checks the first would disagree (issue 13, defect 7)."""
    with pytest.raises(grpc.RpcError) as caught:
        call(address, "Unary", [bearer(token) for token in headers])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == f"{len(headers)} authorization headers; send exactly one bearer token"


def test_health_needs_no_token(address):
    """Guards against locking orchestrators' health probes out (they hold no secret)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for metadata in ([], [bearer("nope")], [bearer(TOKEN), bearer("nope")]):
            reply = stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_method_stays_unimplemented(address):
    """Guards against the interceptor answering UNAUTHENTICATED for methods that do not exist
    (a scanner then learns nothing; a client learns the real problem)."""
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(f"/{SERVICE}/Nope")(b"", metadata=[bearer(TOKEN)], timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_refusal_reasons():
    """The decision itself, header by header: pairs as grpc.aio hands them over, keys any case."""
    interceptor = BearerTokenInterceptor(TOKEN)
    assert interceptor.refusal([("authorization", f"Bearer {TOKEN}"), ("x-other", "1")]) is None
    assert interceptor.refusal([("Authorization", f"Bearer {TOKEN}")]) is None
    assert interceptor.refusal(None).startswith("missing")
    assert interceptor.refusal([("authorization", "Bearer x")]) == "wrong bearer token"
    assert interceptor.refusal([("authorization", f"Bearer {TOKEN}")] * 2).startswith("2 authorization")
    with pytest.raises(ValueError, match="empty"):
        BearerTokenInterceptor("")


def test_the_server_refuses_duplicate_authorization_headers():
    """The interceptor ``cloud/server.py`` installs refuses a wrong header followed by the right one.

    Guards against the server keeping an interceptor of its own that reads the
    headers through dict() and so judges the call by the last one.
    """
    pytest.importorskip("torch")  # cloud.server imports the engine
    from stitchvlm.cloud import auth, server

    assert server.BearerTokenInterceptor is auth.BearerTokenInterceptor
    for address in serve_in_thread(server.BearerTokenInterceptor(TOKEN)):
        try:
            call(address, "Unary", [bearer("nope"), bearer(TOKEN)])
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            pytest.fail("a wrong authorization header followed by the right one was let through")
