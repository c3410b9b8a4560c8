"""The one error type that crosses the edge/cloud boundary.

Validation anywhere (preprocessing, index decoding, the engine) raises
``RequestError`` with the gRPC status the caller should see; the servicer turns
it into that status and message, and the in-process client re-raises it, so
both transports fail the same way.
"""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request the service refuses; ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def clip_text(value: str, limit: int = 64, quote: bool = True) -> str:
    """A client-supplied string cut to ``limit`` characters for a status message or a log line.

    ``quote`` gives its ``repr`` (control characters escaped); a cut value says
    how long it was, so a 1 MB model id costs a few dozen bytes to report.
    """
    shown = value if len(value) <= limit else value[:limit]
    text = repr(shown) if quote else shown
    return text if len(value) <= limit else f"{text}... ({len(value)} characters)"
