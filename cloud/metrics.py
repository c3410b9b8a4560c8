"""Prometheus metrics of one cloud server, in a registry of its own.

``CloudMetrics`` holds the series below in a dedicated ``CollectorRegistry``
(never prometheus-client's global one, so two servers in one process, or a
test, never share counters), and ``serve`` exposes them over HTTP at
``/metrics`` (``stitch-cloud serve --metrics-port``; off by default).

Series (every name starts with ``stitch_``):

- ``requests_total{status}``: requests that reached the servicer, by final gRPC
  status (every status pre-set to 0, so rates exist before the first error).
  Calls the bearer-token interceptor refuses never reach it and are not here.
- ``stage_seconds{stage}``: histogram of each successful request's time per
  stage: ``queue`` (waiting to join the batch), ``vision``, ``prefill``,
  ``decode``, ``first_token`` (receipt to the first generated token) and
  ``total`` (receipt to reply), from the reply's ``Timings``.
- ``batch_size``: histogram of the sequences each decode step advanced;
  ``decode_step_seconds``: histogram of each step's time;
  ``generated_tokens_total``: counter of tokens the decode steps generated
  (its rate is the server's tokens per second; prefill's first tokens are in
  ``first_token``).
- ``kept_visual_tokens`` / ``kept_visual_token_ratio``: histograms of k and
  k / |V| per successful request.
- ``request_bytes`` / ``reply_bytes``: histograms of serialized message sizes
  (requests of every status, replies of successful ones).
- ``queue_depth`` / ``in_flight``: gauges of admitted requests not yet in the
  batch and sequences in it.

This module records what the servicer hands it; it measures nothing itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from ..shared.types import CloudReply

STAGES = ("queue", "vision", "prefill", "decode", "first_token", "total")
# Sequences per decode step: powers of two up to the largest batch a GPU server runs.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Seconds: a tiny model on a CPU answers in milliseconds, a 78B one on a GPU queue in tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Visual tokens: one tile of a tiny model has 16, twelve InternVL tiles plus a thumbnail 3328.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# k / |V|: the paper's operating points (9%, 35%, 64%) fall inside buckets of their own.
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.99, 1.0)
# Bytes: a reply is a few hundred bytes, a request mostly its image (up to the 32 MiB limit).
BYTE_BUCKETS = tuple(float(2**p) for p in range(6, 26, 2))


@dataclass(frozen=True)
class MetricsServer:
    """The HTTP endpoint serving one registry."""

    httpd: WSGIServer
    port: int  # the bound port (the one asked for, or the OS's pick for 0)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class CloudMetrics:
    """The server's counters, histograms and gauges (prometheus-client's own locks make them thread-safe)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("stitch_requests", "Requests by final gRPC status", ["status"], registry=r)
        for code in grpc.StatusCode:
            self.requests.labels(status=code.name)
        self.stage_seconds = Histogram(
            "stitch_stage_seconds",
            "Time per stage of successful requests",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kept_tokens = Histogram(
            "stitch_kept_visual_tokens", "Visual tokens kept per request", buckets=TOKEN_BUCKETS, registry=r
        )
        self.kept_ratio = Histogram(
            "stitch_kept_visual_token_ratio", "Kept / all visual tokens", buckets=RATIO_BUCKETS, registry=r
        )
        self.request_bytes = Histogram(
            "stitch_request_bytes", "Serialized request size", buckets=BYTE_BUCKETS, registry=r
        )
        self.reply_bytes = Histogram(
            "stitch_reply_bytes", "Serialized reply size", buckets=BYTE_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("stitch_queue_depth", "Admitted requests not yet in the batch", registry=r)
        self.in_flight = Gauge("stitch_in_flight", "Sequences in the running batch", registry=r)
        self.batch_size = Histogram(
            "stitch_batch_size", "Sequences advanced per decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "stitch_decode_step_seconds",
            "Time of one batched decode step",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "stitch_generated_tokens", "Tokens generated by decode steps", registry=r
        )

    def observe(
        self,
        status: grpc.StatusCode,
        reply: CloudReply | None = None,
        request_bytes: int | None = None,
        reply_bytes: int | None = None,
    ) -> None:
        """Count one finished request; ``reply`` (status OK) adds its timings and kept tokens."""
        self.requests.labels(status=status.name).inc()
        if request_bytes is not None:
            self.request_bytes.observe(request_bytes)
        if reply is None:
            return
        t = reply.timings
        for stage, ms in zip(
            STAGES,
            (t.queue_ms, t.vision_ms, t.prefill_ms, t.decode_ms, t.first_token_ms, t.total_ms),
            strict=True,
        ):
            self.stage_seconds.labels(stage=stage).observe(ms / 1e3)
        self.kept_tokens.observe(reply.kept_visual_tokens)
        if reply.num_visual_tokens > 0:
            self.kept_ratio.observe(reply.kept_visual_tokens / reply.num_visual_tokens)
        if reply_bytes is not None:
            self.reply_bytes.observe(reply_bytes)

    def on_step(self, batch_size: int, new_tokens: int, seconds: float) -> None:
        """One decode step of the batching loop (``scheduler.StepObserver``)."""
        self.batch_size.observe(batch_size)
        self.step_seconds.observe(seconds)
        self.generated_tokens.inc(new_tokens)

    def track_admission(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Read the gauges from ``counts() -> (waiting, running)`` at every scrape."""
        self.queue_depth.set_function(lambda: counts()[0])
        self.in_flight.set_function(lambda: counts()[1])

    def render(self) -> bytes:
        """The text exposition format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(httpd=httpd, port=httpd.server_port)
