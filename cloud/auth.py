"""Bearer-token authentication for the cloud's ``grpc.aio`` server.

``BearerTokenInterceptor(token)`` lets a call through only when it carries
exactly one ``authorization`` header equal to ``Bearer <token>`` (compared in
constant time); everything else gets UNAUTHENTICATED with a message that says
which of missing, wrong or duplicated it was. The standard health service is
exempt, so orchestrators can probe without the secret. A call with two or more
``authorization`` headers is refused rather than judged by one of them:
proxies and servers disagree on which one counts (first, last, joined), and a
check that reads another header than the backend would is a bypass.

It does not read the token from anywhere (the CLI does), does no TLS and has
no notion of users or scopes.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health

HEALTH_SERVICE = health.SERVICE_NAME  # "grpc.health.v1.Health": exempt from auth
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case on the wire


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED); health is exempt."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        refusal = self.refusal(details.invocation_metadata)
        return handler if refusal is None else refusing_handler(handler, refusal)

    def refusal(self, metadata) -> str | None:
        """Why a call with ``metadata`` (key, value pairs) is refused; None when it may pass."""
        presented = [value for key, value in metadata or () if str(key).lower() == AUTHORIZATION]
        if not presented:
            return "missing bearer token (authorization: Bearer <token>)"
        if len(presented) > 1:
            return f"{len(presented)} authorization headers; send exactly one bearer token"
        value = presented[0]
        value = value if isinstance(value, bytes) else str(value).encode()
        if hmac.compare_digest(value, self._expected):
            return None
        return "wrong bearer token"


def refusing_handler(like: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``like`` that answers UNAUTHENTICATED ``message``."""

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
