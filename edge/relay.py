"""What the load test runs against: a counting TCP relay, a local cloud, a cached edge export.

``CountingRelay(target_host, target_port)`` listens on loopback, and for each
accepted connection opens one to the target and copies bytes both ways,
counting them. The load test puts it between the SDK's gRPC channel and the
cloud, so the report can set the serialized message sizes beside what HTTP/2
really moved (frame headers, HPACK headers, trailers, settings, pings).

It does not parse what it copies: gRPC multiplexes every call of a channel
over one connection, so bytes are counted per direction, not per request.
TLS passes through untouched. The relay runs in the caller's asyncio loop.

Also here: ``split_address`` / ``is_loopback`` (the load test refuses a
non-loopback cloud it was not told to load), and ``LocalCloud``: it starts
``stitch-cloud serve`` as a subprocess on a free loopback port
(``start_local_cloud``), waits for the health service to say SERVING and stops
it with SIGTERM afterwards; and ``cached_export``, which runs ``stitch-export``
once per checkpoint into a cache directory. Both are subprocesses: no torch in
this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .sidecar import DEFAULT_GRAPH, SIDECAR_NAME

CHUNK_BYTES = 64 * 1024  # one read from a socket
# Printed by stitch-cloud once its port is bound (before the weights load).
LISTENING_LINE = re.compile(r"stitch-cloud loading: listening on \S+:(?P<port>\d+)")


@dataclass(frozen=True)
class RelayCounts:
    """Bytes copied since the relay started."""

    upstream_bytes: int  # client -> target (requests)
    downstream_bytes: int  # target -> client (replies)
    connections: int  # client connections accepted


class CountingRelay:
    """Loopback listener that forwards to ``target_host:target_port`` and counts bytes."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target_host = target_host  # where the bytes go
        self.target_port = target_port
        self.listen_host = listen_host  # loopback: only this machine may use the relay
        self.port = 0  # the bound port, once started
        self._upstream = 0
        self._downstream = 0
        self._connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        """``host:port`` a gRPC client dials to go through the relay."""
        return f"{self.listen_host}:{self.port}"

    def counts(self) -> RelayCounts:
        return RelayCounts(self._upstream, self._downstream, self._connections)

    async def start(self) -> int:
        """Bind a free port on ``listen_host``; returns it."""
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> CountingRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- connections

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._connections += 1
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            # Nothing listening: close the client's side, which gRPC reports as UNAVAILABLE.
            await _close(client_writer)
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pump(client_reader, target_writer, upstream=True),
                self._pump(target_reader, client_writer, upstream=False),
            )
        except asyncio.CancelledError:
            pass  # close() ends the connection; asyncio's stream callback would log a cancelled task
        finally:
            await _close(target_writer)
            await _close(client_writer)
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        """Copy until EOF, then half-close the other side so it sees the EOF too."""
        try:
            while data := await reader.read(CHUNK_BYTES):
                if upstream:
                    self._upstream += len(data)
                else:
                    self._downstream += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()  # the peer went away: end the other direction as well


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
        await writer.wait_closed()


# ----------------------------------------------------------------------------- addresses and a local cloud


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ``ValueError`` when malformed."""
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]]+):(?P<port2>\d+)", address)
    if match is None:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    host = match["v6"] or match["host"]
    port = int(match["port"] or match["port2"])
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {address!r}")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost
        return False


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class LocalCloud:
    """A ``stitch-cloud serve`` this process started (``start_local_cloud``)."""

    process: subprocess.Popen
    log: Path  # its stdout + stderr
    port: int = 0  # the port it bound on 127.0.0.1, once ``wait_serving`` has read it

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float) -> None:
        """Read the bound port from the log, then poll health until SERVING; ``RuntimeError``
        when the process exits or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        while (match := LISTENING_LINE.search(self.log.read_text(errors="replace"))) is None:
            self._check_alive(deadline)
            time.sleep(0.05)
        self.port = int(match["port"])
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(deadline)
                with contextlib.suppress(grpc.RpcError):  # not answering yet
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(
                f"stitch-cloud did not become SERVING (exit code {self.process.poll()}):\n{tail}"
            )


def start_local_cloud(model_dir: Path, extra_args: Sequence[str], log: Path) -> LocalCloud:
    """Start ``stitch-cloud serve --host 127.0.0.1 --port 0`` (plus ``extra_args``), output to ``log``.

    Returns at once: the weights load while the caller does other work; call
    ``wait_serving`` before sending requests and ``stop`` in every case. Health
    is probed in plaintext, so a TLS cloud is for ``--cloud``, not this.
    """
    command = [sys.executable, "-m", "stitchvlm.cloud.cli", "serve", "--model", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", "0", *extra_args]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    return LocalCloud(process, log)


# ----------------------------------------------------------------------------- an edge export


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stitch" / "edge"


def cached_export(checkpoint: Path, cache_dir: Path, verify: bool = False) -> Path:
    """The ONNX export of ``checkpoint`` under ``cache_dir``, made by ``stitch-export`` when missing.

    The key hashes the checkpoint's file names, sizes and modification times,
    so a changed checkpoint gets a fresh export. Written to a temporary
    directory first and renamed, so an interrupted export is never reused.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        info = path.stat()
        digest.update(f"{path.relative_to(checkpoint)}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    target = cache_dir / f"{checkpoint.resolve().name}-{digest.hexdigest()[:16]}-{DEFAULT_GRAPH}"
    if (target / SIDECAR_NAME).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=cache_dir))
    command = [
        sys.executable,
        "-m",
        "stitchvlm.edge.export",
        "--model",
        str(checkpoint),
        "--out",
        str(scratch / "x"),
    ]
    # Its progress goes to our stderr (fd 2), keeping stdout for the report.
    subprocess.run([*command, *([] if verify else ["--no-verify"])], check=True, stdout=2)
    with contextlib.suppress(OSError):  # another run finished first: use its export
        (scratch / "x").rename(target)
    return target
