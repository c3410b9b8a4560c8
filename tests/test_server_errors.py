"""Bad requests against a real ``stitch-cloud serve``: each gets its own status and message, none hurts the next.

DESIGN invariant 4: malformed images, bad indices, wrong counts, layouts that
do not match, prompts past the context, unknown models, oversize messages and
expired deadlines each get a specific gRPC status, and a valid request on the
same server succeeds right after. Also here: the servicer's INTERNAL path
(in-process, with an engine that raises) and the CLI's argument errors.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import make_test_image
from servers import cloud_request, png_bytes, running_cloud, start_cloud, tiling_of

from stitchvlm.cloud.server import REQUEST_ID
from stitchvlm.shared import wire
from stitchvlm.shared.layout import Layout, layout_fingerprint
from stitchvlm.shared.pb import cascade_pb2, cascade_pb2_grpc
from stitchvlm.shared.scoring import keep_count

pytest.importorskip("torch")

MAX_NEW_TOKENS_LIMIT = 64  # the server's --max-new-tokens
MAX_MESSAGE_MB = 1  # the server's --max-message-mb
IMAGE = make_test_image(128, 64, seed=3)  # 2x1 grid + thumbnail: 48 visual tokens on the tiny tiling


@pytest.fixture(scope="module")
def cloud(tiny_checkpoint):
    args = ("--max-new-tokens", str(MAX_NEW_TOKENS_LIMIT), "--max-message-mb", str(MAX_MESSAGE_MB))
    with running_cloud(tiny_checkpoint, *args) as process:
        yield process


@pytest.fixture(scope="module")
def stub(cloud) -> cascade_pb2_grpc.CascadeStub:
    return cascade_pb2_grpc.CascadeStub(cloud.channel())


@pytest.fixture(scope="module")
def tiling(tiny_checkpoint):
    return tiling_of(tiny_checkpoint)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def plain(message: cascade_pb2.AnswerRequest, indices: list[int]) -> None:
    """Put ``indices`` into ``message`` as a PLAIN list, count matching, whatever they are."""
    message.kept.CopyFrom(
        cascade_pb2.KeptTokens(encoding=cascade_pb2.KeptTokens.PLAIN, indices=indices, count=len(indices))
    )


def with_layout(message: cascade_pb2.AnswerRequest, layout: Layout, tiling) -> None:
    """A self-consistent request for another grid: layout, |V|, fingerprint and a valid kept list."""
    n = layout.num_visual_tokens
    message.layout.CopyFrom(wire.layout_to_proto(layout, layout_fingerprint(layout, tiling)))
    message.num_visual_tokens = n
    plain(message, list(range(keep_count(message.retention, n))))


ONE_TILE = Layout(tile_size=64, grid_columns=1, grid_rows=1, thumbnail=False, tokens_per_tile=16)


@dataclass(frozen=True)
class Bad:
    """One malformed request: how to break a valid one, and what the server must answer."""

    name: str
    breaks: Callable[[cascade_pb2.AnswerRequest, object], None]  # (request, tiling) -> None, in place
    code: grpc.StatusCode
    message: str  # a substring of the status details


def _set(path: str, value) -> Callable[[cascade_pb2.AnswerRequest, object], None]:
    """Set one field, ``"prompt"`` or ``"kept.count"``, to ``value``."""

    def breaks(message: cascade_pb2.AnswerRequest, _tiling) -> None:
        *parents, name = path.split(".")
        for parent in parents:
            message = getattr(message, parent)
        setattr(message, name, value)

    return breaks


def _kept(indices: list[int]) -> Callable[[cascade_pb2.AnswerRequest, object], None]:
    return lambda message, _tiling: plain(message, indices)


def _clear(name: str) -> Callable[[cascade_pb2.AnswerRequest, object], None]:
    return lambda message, _tiling: message.ClearField(name)


def _flip_fingerprint(message: cascade_pb2.AnswerRequest, _tiling) -> None:
    message.layout.fingerprint ^= 1


def _one_tile_layout(message: cascade_pb2.AnswerRequest, tiling) -> None:
    with_layout(message, ONE_TILE, tiling)


INVALID, OUT_OF_RANGE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
FAILED_PRECONDITION, NOT_FOUND = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND
TOO_MANY = MAX_NEW_TOKENS_LIMIT + 1
# The valid request these break: IMAGE (48 visual tokens), R = 0.25 (12 kept), PLAIN indices.
BAD_REQUESTS = [
    Bad("undecodable image", _set("image", b"this is not an image at all"), INVALID, "not a PNG, JPEG"),
    Bad("zero-size image bytes", _set("image", b""), INVALID, "image is empty"),
    Bad("huge image header", _set("image", png_claiming(100_000, 100_000)), INVALID, "too large"),
    Bad("truncated image", _set("image", png_bytes(IMAGE)[:200]), INVALID, "corrupt or truncated"),
    Bad("mime type of another format", _set("image_mime_type", "image/jpeg"), INVALID, "does not match"),
    Bad("unsupported mime type", _set("image_mime_type", "text/plain"), INVALID, "unsupported mime_type"),
    Bad("empty prompt", _set("prompt", ""), INVALID, "prompt is empty"),
    Bad("blank prompt", _set("prompt", " \n\t "), INVALID, "prompt is empty"),
    Bad("prompt past the context", _set("prompt", "word " * 6000), OUT_OF_RANGE, "exceeds the context"),
    Bad("special token text in the prompt", _set("prompt", "look <img> here"), INVALID, "special token"),
    Bad("index out of range", _kept([*range(11), 48]), OUT_OF_RANGE, "out of range"),
    Bad("duplicate indices", _kept([0, *range(11)]), INVALID, "duplicate index"),
    Bad("unsorted indices", _kept([1, 0, *range(2, 12)]), INVALID, "not ascending"),
    Bad("count not matching R", _kept(list(range(11))), INVALID, "expected 12 indices"),
    Bad("kept.count not matching", _set("kept.count", 13), INVALID, "kept.count is 13"),
    Bad("retention above 1", _set("retention", 1.5), INVALID, "retention"),
    Bad("unspecified encoding", _set("kept.encoding", 0), INVALID, "ENCODING_UNSPECIFIED"),
    Bad("missing kept", _clear("kept"), INVALID, "kept is missing"),
    Bad("missing layout", _clear("layout"), INVALID, "layout is missing"),
    Bad("|V| not matching the layout", _set("num_visual_tokens", 47), FAILED_PRECONDITION, "is 47"),
    Bad("|V| not matching the image", _one_tile_layout, FAILED_PRECONDITION, "does not match the 48"),
    Bad("layout fingerprint mismatch", _flip_fingerprint, FAILED_PRECONDITION, "layout mismatch"),
    Bad("max_new_tokens 0", _set("generation.max_new_tokens", 0), INVALID, "max_new_tokens"),
    Bad("max_new_tokens too large", _set("generation.max_new_tokens", TOO_MANY), OUT_OF_RANGE, "1..64"),
    Bad("unknown model id", _set("model", "no-such-model"), NOT_FOUND, "unknown model"),
    Bad("log-forging request id", _set("request_id", "x\nrequest id=y"), INVALID, "request_id must be"),
]


def valid_message(tiling, **overrides) -> cascade_pb2.AnswerRequest:
    return wire.request_to_proto(
        cloud_request(tiling, IMAGE, max_new_tokens=2, **overrides), encoding="PLAIN"
    )


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=lambda bad: bad.name)
def test_bad_request_gets_its_status_and_the_next_request_is_served(cloud, stub, tiling, bad: Bad):
    """Each defect gets its specific status and message; a valid request right after still succeeds.

    Guards against validation gaps (a crash, INTERNAL, or the wrong tokens
    pruned) and against a bad request leaving state behind (a leaked slot, a
    poisoned cache) that breaks the next one.
    """
    message = valid_message(tiling, request_id="bad-" + re.sub(r"[^A-Za-z0-9]+", "-", bad.name))
    bad.breaks(message, tiling)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Answer(message, timeout=60)
    assert caught.value.code() == bad.code, caught.value.details()
    assert bad.message in caught.value.details()
    logged_id = re.escape(message.request_id) if REQUEST_ID.fullmatch(message.request_id) else "[0-9a-f]{32}"
    cloud.wait_for_log(rf"request id={logged_id} status={bad.code.name} ")
    reply = stub.Answer(valid_message(tiling), timeout=60)
    assert (len(reply.token_ids), reply.num_visual_tokens, reply.kept_visual_tokens) == (2, 48, 12)


def test_each_encoding_of_the_same_indices_gets_the_same_answer(stub, tiling):
    """BITMAP, DELTA_VARINT and PLAIN carry the same kept set to the engine; guards against a decoder mix-up."""
    request = cloud_request(tiling, IMAGE, max_new_tokens=6)
    encodings = ("BITMAP", "DELTA_VARINT", "PLAIN")
    replies = [stub.Answer(wire.request_to_proto(request, encoding=e), timeout=60) for e in encodings]
    assert len({tuple(r.token_ids) for r in replies}) == 1
    assert {r.pruned_prompt_tokens for r in replies} == {replies[0].prompt_tokens - 48 + 12}


def test_message_over_the_limit_is_resource_exhausted(stub, tiling):
    """A request bigger than --max-message-mb is refused by grpc itself; guards against an unbounded receive."""
    message = valid_message(tiling)
    message.image = b"\0" * (MAX_MESSAGE_MB * 1024 * 1024 + 1)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Answer(message, timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stub.Answer(valid_message(tiling), timeout=60).token_ids) == 2


def test_expired_deadline_is_deadline_exceeded(stub, tiling):
    """A call whose deadline is already gone ends DEADLINE_EXCEEDED and the server keeps serving."""
    for timeout in (1e-6, 1e-3):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Answer(valid_message(tiling), timeout=timeout)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(stub.Answer(valid_message(tiling), timeout=60).token_ids) == 2


# ----------------------------------------------------------------------------- servicer, in process


def flaky(method, error: Exception):
    """``method`` that raises ``error`` on its first call and works afterwards."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return method(*args, **kwargs)

    return wrapper


def test_unexpected_engine_error_is_internal_and_the_server_keeps_serving(tiny_checkpoint, tiling, caplog):
    """A bug in the engine becomes INTERNAL naming the request id (traceback logged), not a dead server;
    a failing decode step fails its batch with INTERNAL and the loop serves the next request.

    Guards against exceptions escaping the servicer (grpc would answer UNKNOWN
    with the exception text, leaking internals), a lost admission place, and a
    batching loop that dies with its step.
    """
    from grpc_health.v1 import health

    from stitchvlm.cloud.engine import CloudEngine, EngineConfig
    from stitchvlm.cloud.server import CascadeService, ServerConfig, build_server

    engine = CloudEngine.load(EngineConfig(model_dir=tiny_checkpoint, max_batch_size=1))
    engine.prepare = flaky(engine.prepare, RuntimeError("boom: a bug, not a bad request"))
    engine.sgp.decode_batch = flaky(engine.sgp.decode_batch, RuntimeError("kaboom in a decode step"))

    async def scenario():
        config = ServerConfig(host="127.0.0.1", port=0, max_queue=0)
        service = CascadeService(config)
        service.engine = engine
        server, port = build_server(config, service, health.aio.HealthServicer())
        await server.start()
        errors = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = cascade_pb2_grpc.CascadeStub(channel)
                for request_id in ("buggy", "step"):
                    try:
                        await stub.Answer(valid_message(tiling, request_id=request_id), timeout=30)
                        raise AssertionError("the call should fail")
                    except grpc.aio.AioRpcError as err:
                        errors.append(err)
                reply = await stub.Answer(valid_message(tiling, request_id="fine"), timeout=30)
        finally:
            await server.stop(None)
            service.close()
        return errors, reply

    with caplog.at_level("INFO", logger="stitchvlm.cloud.server"):
        (error, step_error), reply = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id buggy)"
    assert "boom" not in error.details()
    assert any("boom" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert step_error.code() == grpc.StatusCode.INTERNAL
    assert step_error.details() == "decode step failed"
    assert reply.request_id == "fine" and 1 <= len(reply.token_ids) <= 2
    assert reply.timings.total_ms > 0  # the servicer fills what the engine does not


# ----------------------------------------------------------------------------- startup failures


def test_unloadable_checkpoint_exits_1(tmp_path):
    """A model directory without a checkpoint in it: the server binds, fails to load and exits 1.

    Guards against a server that stays up NOT_SERVING forever (an orchestrator
    would wait on it instead of restarting it) or exits 0 as if all was well.
    """
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    process = start_cloud(empty)
    assert process.proc.wait(timeout=60) == 1
    assert "loading the model failed" in process.log_text()


def test_busy_port_exits_1(tiny_checkpoint):
    """A port another process listens on: exit 1 with "cannot listen", not two servers sharing it.

    Guards against grpc's default SO_REUSEPORT, which lets a second server
    bind the same port and silently take half of the traffic. Runs the
    installed ``stitch-cloud`` console script, so its wiring is tested too.
    """
    script = shutil.which("stitch-cloud")
    cli = [script] if script else [sys.executable, "-m", "stitchvlm.cloud.cli"]
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [*cli, "serve", "--model", str(tiny_checkpoint)]
        done = subprocess.run([*command, "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


# ----------------------------------------------------------------------------- CLI


def test_cli_refuses_a_missing_model_directory(tmp_path, capsys):
    """``serve --model`` of a directory that does not exist exits 2 with a clear message, before binding."""
    from stitchvlm.cloud.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"])
    assert caught.value.code == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"), [("2", 2), ("0", 0), ("12", 12), ("0.1", 0.1), ("0.5", 0.5), ("3.0", 3)]
)
def test_prune_layer_flag_takes_a_layer_or_a_fraction(text, expected):
    """'2' is layer 2 (an int), '0.1' a fraction of depth; guards against 1 and 1.0 meaning different things."""
    from stitchvlm.cloud.cli import prune_layer

    value = prune_layer(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["-1", "1.5", "abc", "nan", ""])
def test_prune_layer_flag_refuses_nonsense(text):
    import argparse

    from stitchvlm.cloud.cli import prune_layer

    with pytest.raises(argparse.ArgumentTypeError):
        prune_layer(text)


def test_cli_builds_the_configs_from_flags(tmp_path, monkeypatch):
    """Flags and $STITCH_AUTH_TOKEN land in ServerConfig / EngineConfig with the right units."""
    from stitchvlm.cloud.cli import build_parser, configs_from_args

    monkeypatch.setenv("STITCH_AUTH_TOKEN", "from-env")
    parser = build_parser()
    argv = [
        "serve",
        "--model",
        str(tmp_path),
        "--prune-layer",
        "0.25",
        "--max-message-mb",
        "2",
        "--dtype",
        "bfloat16",
    ]
    server, engine = configs_from_args(parser, parser.parse_args(argv))
    assert server.max_message_bytes == 2 * 1024 * 1024
    assert server.auth_token == "from-env"
    assert (engine.model_dir, engine.prune_layer, engine.dtype) == (Path(tmp_path), 0.25, "bfloat16")
