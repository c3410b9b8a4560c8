"""Start a real ``stitch-cloud serve`` as a subprocess for end-to-end tests.

``running_cloud(model_dir, *extra_args)`` starts the server on a free port
(``--port 0``; the port is read from the server's "listening on" line), waits
until health says SERVING, yields a ``CloudProcess`` and stops it with SIGTERM
afterwards. The server's stdout and stderr go to one log file that tests read
(``CloudProcess.log_text`` / ``wait_for_log``) and that is kept for post-mortems.

Also here, for every end-to-end test: ``cloud_request`` (a valid request as an
edge builds it) and ``make_endless_checkpoint`` (a tiny model that never emits
EOS, for requests that must take a while). Nothing here asserts anything.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from stitchvlm.shared.layout import TilingConfig, layout_fingerprint
from stitchvlm.shared.preprocess import compute_layout, tiling_config_from_files
from stitchvlm.shared.scoring import top_r_indices
from stitchvlm.shared.types import CloudRequest

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Printed by the server once the port is bound, before the weights load.
LISTENING_LINE = re.compile(r"stitch-cloud loading: listening on (?P<host>\S+):(?P<port>\d+)")


@dataclass
class CloudProcess:
    """One running server process."""

    address: str  # "127.0.0.1:PORT", what a client dials
    port: int  # the port the server bound
    proc: subprocess.Popen  # the server process
    log: Path  # its stdout + stderr
    root_certificate: bytes | None = None  # PEM the client trusts when the server uses TLS

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """The first match of ``pattern`` in the log, waiting up to ``timeout`` seconds for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in the server log after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def channel(self, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        """A blocking channel to the server, TLS when it has a certificate."""
        if self.root_certificate is None:
            return grpc.insecure_channel(self.address, options=list(options))
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificate)
        return grpc.secure_channel(self.address, credentials, options=list(options))

    def health(self, service: str = "", timeout: float = 5.0) -> int:
        """The health status the server reports for ``service`` ("" = the whole server)."""
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def wait_for_health(self, expected: int = SERVING, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.health(timeout=2.0) == expected:
                    return
            except grpc.RpcError:
                pass  # not accepting yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not {expected} after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code; kill after ``timeout`` seconds and raise."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise TimeoutError(
                    f"server ignored signal {sig} for {timeout}s:\n{self.log_tail()}"
                ) from None
        return self.proc.returncode


def start_cloud(
    model_dir: Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
    root_certificate: bytes | None = None,
    log_path: Path | None = None,
    bind_timeout: float = 60.0,
    launcher: Sequence[str] = (),
) -> CloudProcess:
    """Start ``python -m stitchvlm.cloud.cli serve --model DIR --port 0 ...`` and wait for the bound port.

    Returns as soon as the port is known (health may still be NOT_SERVING).
    ``extra_args`` come last, so they override the defaults given here.
    ``launcher`` replaces ``python -m stitchvlm.cloud.cli``: a command that
    takes the CLI's arguments after its own (a test's instrumented wrapper).
    """
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="stitch-cloud-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.setdefault("OMP_NUM_THREADS", "1")  # the test machine's cores are shared
    command = [
        *(launcher or (sys.executable, "-m", "stitchvlm.cloud.cli")),
        "serve",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *extra_args,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    process = CloudProcess(address="", port=0, proc=proc, log=log_path, root_certificate=root_certificate)
    deadline = time.monotonic() + bind_timeout
    while (match := LISTENING_LINE.search(process.log_text())) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RuntimeError(f"server did not bind (exit code {proc.returncode}):\n{process.log_tail()}")
        time.sleep(0.05)
    process.port = int(match["port"])
    process.address = f"127.0.0.1:{process.port}"
    return process


@contextmanager
def running_cloud(
    model_dir: Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
    root_certificate: bytes | None = None,
    log_path: Path | None = None,
    wait_serving: bool = True,
    startup_timeout: float = 120.0,
) -> Iterator[CloudProcess]:
    """A server for the ``with`` block: started, SERVING (unless ``wait_serving`` is False), then stopped.

    On exit the process gets SIGTERM (a test may have stopped it already); a
    server that does not exit within 30 s is killed.
    """
    process = start_cloud(
        model_dir, *extra_args, env=env, root_certificate=root_certificate, log_path=log_path
    )
    try:
        if wait_serving:
            process.wait_for_health(SERVING, timeout=startup_timeout)
        yield process
    finally:
        with suppress(TimeoutError):  # killed then; the test's own outcome is what matters here
            process.stop()


# ----------------------------------------------------------------------------- checkpoints and requests


def make_endless_checkpoint(source: Path, target: Path) -> Path:
    """Copy a tiny checkpoint with the EOS rows of its tied word embedding set to zero.

    The EOS logit is then exactly 0 while some of the hundreds of other random
    logits is positive, so greedy generation never stops before
    ``max_new_tokens``: requests take as long as their budget says, which the
    cancellation, deadline and shutdown tests need (a random tiny model
    otherwise emits EOS after a few hundred tokens). Needs ``safetensors`` only.
    """
    from safetensors import safe_open
    from safetensors.numpy import save_file

    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    with safe_open(str(weights), "np") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
    generation = json.loads((target / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    embedding = next(name for name in tensors if name.endswith("embed_tokens.weight"))  # [vocab, hidden]
    tensors[embedding][eos if isinstance(eos, list) else [eos]] = 0.0
    save_file(tensors, str(weights), metadata=metadata)
    return target


def tiling_of(model_dir: Path) -> TilingConfig:
    """The checkpoint's tiling, read from its JSON configs as the edge reads it."""
    return tiling_config_from_files(
        json.loads((model_dir / "preprocessor_config.json").read_text()),
        json.loads((model_dir / "config.json").read_text()),
    )


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cloud_request(
    tiling: TilingConfig,
    image: Image.Image,
    prompt: str = "What is in the picture?",
    retention: float = 0.25,
    max_new_tokens: int = 4,
    request_id: str = "",
    model: str = "",
    seed: int = 0,
    scores: np.ndarray | None = None,
) -> CloudRequest:
    """A valid request as an edge would build it: the image's layout and the top-R of ``scores``
    (seeded random scores when none are given)."""
    layout = compute_layout(image.width, image.height, tiling)
    if scores is None:
        scores = np.random.default_rng(seed).random(layout.num_visual_tokens)  # [n_visual]
    return CloudRequest(
        image=png_bytes(image),
        mime_type="image/png",
        prompt=prompt,
        kept_indices=top_r_indices(scores, retention),
        num_visual_tokens=layout.num_visual_tokens,
        retention=retention,
        layout=layout,
        layout_fingerprint=layout_fingerprint(layout, tiling),
        max_new_tokens=max_new_tokens,
        request_id=request_id,
        model=model,
    )
