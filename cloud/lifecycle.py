"""The cloud process's lifecycle: bind, load in the background, serve, drain on a signal, stop.

``serve`` is what ``stitch-cloud serve`` runs: the port is bound first (health
NOT_SERVING) and the weights load on a daemon thread, so orchestrators can
probe health during a slow load; SERVING once loaded; on SIGTERM/SIGINT
NOT_SERVING and ``drain``. Lifecycle lines go to stdout (``announce``):
"stitch-cloud loading: listening on HOST:PORT", "stitch-cloud ready: ...",
"stitch-cloud metrics: ...", "stitch-cloud stopped ...". The servicer itself
is ``server``'s.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2

from ..shared.errors import RequestError
from .engine import CloudEngine, EngineConfig
from .metrics import CloudMetrics, MetricsServer
from .server import HEALTH_NAMES, CascadeService, ServerConfig, build_server

logger = logging.getLogger("stitchvlm.cloud.server")

# After the drain, how long handlers get to send the statuses of stopped generations.
STOP_GRACE_S = 0.5


async def load_engine_in_background(
    engine_config: EngineConfig, metrics: CloudMetrics | None = None
) -> CloudEngine:
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
            engine = CloudEngine.load(engine_config, observer=metrics)
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


async def drain(service: CascadeService, grace_seconds: float) -> None:
    """Refuse new work, let running generations finish for ``grace_seconds``, then stop them (UNAVAILABLE)."""
    service.draining = True
    engine = service.engine
    if engine is None:
        return
    engine.scheduler.stop_accepting()  # queued requests get UNAVAILABLE now: nothing new starts
    deadline = time.monotonic() + grace_seconds
    while engine.scheduler.counts != (0, 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    waiting, running = engine.scheduler.counts
    if running:
        logger.info("shutdown grace over: stopping %d running generations", running)
        engine.scheduler.abort_running(
            RequestError(
                grpc.StatusCode.UNAVAILABLE, "server shut down before the generation finished; retry"
            )
        )
        while engine.scheduler.counts[1] and time.monotonic() < deadline + STOP_GRACE_S:
            await asyncio.sleep(0.02)


async def serve(server_config: ServerConfig, engine_config: EngineConfig) -> int:
    """Run the service until SIGTERM/SIGINT; returns the process exit code (0 on a clean stop).

    Order: bind (health NOT_SERVING), load weights in the background, SERVING;
    on a signal NOT_SERVING and ``drain``: nothing new starts, running
    generations get ``grace_seconds`` to finish and are then stopped, so the
    process exits within the grace period and a fraction of a second.
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
    loading = asyncio.ensure_future(load_engine_in_background(engine_config, service.metrics))
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
        config = engine.config
        device = f"map:{config.device_map}" if config.device_map else config.device
        announce(
            f"stitch-cloud ready: listening on {host}:{port} model={engine.model_id} K={engine.prune_layer} "
            f"device={device} "
            f"dtype={config.dtype} batch={config.max_batch_size} "
            f"(loaded in {time.monotonic() - load_started:.2f}s)"
        )
        await stopping
    else:
        loading.cancel()  # the load thread is a daemon; it dies with the process

    logger.info("shutdown health=NOT_SERVING grace_s=%.1f", server_config.grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    await drain(service, server_config.grace_seconds)
    await server.stop(STOP_GRACE_S)  # the handlers of stopped generations send their statuses
    service.close()
    if metrics_server is not None:
        metrics_server.close()
    stopping.cancel()
    announce(f"stitch-cloud stopped (exit code {exit_code})")
    return exit_code
