"""The edge against a real ``stitch-cloud serve`` subprocess, and the gRPC client's failure modes.

Streaming (``Cascade.stream``, ``AsyncCascade.stream``, ``stitch-edge ask --stream``) is at the end.

One server (tiny large checkpoint, bearer-token auth) serves the module. The
cloud's answers are checked against ``CloudEngine.answer`` in this process on
the same request; "the cloud was not called" against the server's request
log as well as the SDK counters. Retry, deadline and auth metadata are checked
against a scripted in-process gRPC servicer, a dead cloud against a free port
with nothing listening.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402
from servers import cloud_request, running_cloud, tiling_of  # noqa: E402

from stitchvlm.cloud.engine import CloudEngine, EngineConfig  # noqa: E402
from stitchvlm.edge.cli import main as edge_main  # noqa: E402
from stitchvlm.edge.cloud_client import CloudChunk, CloudClient, CloudError, GrpcCloudClient  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeModel  # noqa: E402
from stitchvlm.edge.sdk import AsyncCascade, Cascade  # noqa: E402
from stitchvlm.shared.pb import cascade_pb2, cascade_pb2_grpc  # noqa: E402
from stitchvlm.shared.preprocess import compute_layout  # noqa: E402
from stitchvlm.shared.scoring import keep_count, top_r_indices  # noqa: E402
from stitchvlm.shared.types import CloudRequest  # noqa: E402

TOKEN = "edge-e2e-secret"
QUESTION = "What colour is the circle?"
MAX_NEW_TOKENS = 6
RETENTION = 0.25
SLACK_S = 0.5  # scheduling slack on a shared 2-core machine when timing a deadline


@pytest.fixture(scope="module")
def edge_dir(tiny_edge_dir):
    return tiny_edge_dir


@pytest.fixture(scope="module")
def edge(edge_dir) -> EdgeModel:
    return EdgeModel.load(edge_dir, providers=[CPU])


@pytest.fixture(scope="module")
def server(tiny_large_checkpoint):
    with running_cloud(tiny_large_checkpoint, "--prune-layer", "2", "--auth-token", TOKEN) as process:
        yield process


@pytest.fixture(scope="module")
def engine(tiny_large_checkpoint) -> CloudEngine:
    """The same checkpoint in this process: what the server must answer."""
    return CloudEngine.load(EngineConfig(model_dir=tiny_large_checkpoint, prune_layer=2))


@pytest.fixture(scope="module")
def image():
    return make_test_image(150, 90, seed=3)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_request(tiling, picture, scores: np.ndarray) -> CloudRequest:
    """What the edge must send for ``picture``: the layout of ``tiling``, the top-R of ``scores``."""
    return cloud_request(
        tiling, picture, QUESTION, retention=RETENTION, max_new_tokens=MAX_NEW_TOKENS, scores=scores
    )


def request_lines(server) -> list[str]:
    return [line for line in server.log_text().splitlines() if "request id=" in line]


def cascade(edge, cloud, **options) -> Cascade:
    return Cascade(edge, cloud, retention=RETENTION, max_new_tokens=MAX_NEW_TOKENS, **options)


# ----------------------------------------------------------------------------- the real server


def test_escalated_question_returns_the_cloud_answer(server, edge, engine, image):
    """tau > 1 over gRPC: the reply is the engine's answer to the same request (same kept
    indices, layout and image), and the server logged the SDK's request id with k/|V| kept.
    Guards against anything lost or changed between the SDK and the engine on the wire."""
    with GrpcCloudClient(server.address, auth_token=TOKEN) as client:
        result = cascade(edge, client, tau=1.01).ask(image, QUESTION)
    expected = build_request(engine.files.tiling, image, result.visual_scores)
    np.testing.assert_array_equal(result.kept_indices, expected.kept_indices)
    reference = engine.answer(expected)
    assert (result.route, result.degraded, result.error) == ("cloud", False, None)
    assert result.answer == reference.text
    assert result.cloud_reply.token_ids == reference.token_ids
    assert result.cloud_reply.request_id == result.request_id
    k, n = len(expected.kept_indices), expected.num_visual_tokens
    [line] = [line for line in request_lines(server) if f"id={result.request_id}" in line]
    assert "status=OK" in line and f"kept={k}/{n}" in line


def test_confident_question_never_reaches_the_cloud(server, edge, image):
    """tau = 0: answered on the edge; the server logs no request and the counters show no
    escalation. Guards against a gate that calls the cloud anyway (e.g. to warm it)."""
    before = len(request_lines(server))
    with GrpcCloudClient(server.address, auth_token=TOKEN) as client:
        sdk = cascade(edge, client, tau=0.0)
        result = sdk.ask(image, QUESTION)
    assert (result.route, result.bytes_sent, result.cloud_reply) == ("edge", 0, None)
    stats = sdk.stats()
    assert (stats.asked, stats.exited_on_edge, stats.escalated, stats.bytes_sent) == (1, 1, 0, 0)
    time.sleep(0.2)  # a request in flight would have been logged by now
    assert len(request_lines(server)) == before


def test_missing_token_is_refused_without_retry(server, edge, image):
    """No bearer token: UNAUTHENTICATED at once (one attempt, not retried as UNAVAILABLE would
    be), and the SDK degrades to the local answer."""
    with GrpcCloudClient(server.address, max_retries=3) as client:
        request = build_request(
            edge.files.tiling, image, edge.generate(image, QUESTION, MAX_NEW_TOKENS).visual_scores
        )
        with pytest.raises(CloudError) as info:
            client.answer(request, timeout_s=5)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and info.value.attempts == 1
        result = cascade(edge, client, tau=1.01).ask(image, QUESTION)
    assert result.degraded and result.route == "edge" and result.error.startswith("UNAUTHENTICATED")


def test_dead_cloud_degrades_within_the_deadline(edge, image):
    """Nothing listening: UNAVAILABLE retried with backoff, then the local answer, degraded,
    well within the deadline. Guards against hanging past the timeout or raising in degrade mode."""
    timeout_s = 3.0
    with GrpcCloudClient(f"127.0.0.1:{free_port()}", max_retries=3, backoff_s=0.05) as client:
        sdk = cascade(edge, client, tau=1.01, cloud_timeout_s=timeout_s)
        started = time.monotonic()
        result = sdk.ask(image, QUESTION)
        wall = time.monotonic() - started
    assert (result.route, result.degraded, result.cloud_reply) == ("edge", True, None)
    assert result.error.startswith("UNAVAILABLE") and "after 4 attempts" in result.error
    assert result.timings["cloud_ms"] <= 1e3 * (timeout_s + SLACK_S)
    assert wall <= (result.timings["edge_ms"] + result.timings["gate_ms"]) / 1e3 + timeout_s + SLACK_S
    assert sdk.stats().degraded == 1


# ----------------------------------------------------------------------------- scripted servicer


class ScriptedCascade(cascade_pb2_grpc.CascadeServicer):
    """Answers UNAVAILABLE ``failures`` times, then after ``delay_s`` a fixed reply; records metadata."""

    def __init__(self, failures: int = 0, delay_s: float = 0.0) -> None:
        self.failures = failures
        self.delay_s = delay_s
        self.metadata: list[dict[str, str]] = []
        self.release = threading.Event()  # set at teardown so no handler thread outlives the test

    def Answer(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if len(self.metadata) <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        self.release.wait(self.delay_s)
        return cascade_pb2.AnswerReply(request_id=request.request_id, text="scripted", token_ids=[7, 8])


@pytest.fixture
def scripted():
    """``scripted(servicer) -> address`` of an in-process gRPC server running it."""
    servers = []

    def start(servicer: ScriptedCascade) -> str:
        server = grpc.server(ThreadPoolExecutor(2))
        cascade_pb2_grpc.add_CascadeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append((server, servicer))
        return f"127.0.0.1:{port}"

    yield start
    for server, servicer in servers:
        servicer.release.set()
        server.stop(0)


@pytest.fixture(scope="module")
def scripted_request(tiny_large_checkpoint) -> CloudRequest:
    return cloud_request(tiling_of(tiny_large_checkpoint), make_test_image(64, 64, seed=1), request_id="r1")


def test_unavailable_is_retried_until_an_answer(scripted, scripted_request):
    """Two UNAVAILABLE then an answer: three attempts, each carrying the bearer token. Guards
    against giving up on a cloud that is still loading and against dropping the auth metadata."""
    servicer = ScriptedCascade(failures=2)
    with GrpcCloudClient(scripted(servicer), auth_token="abc", max_retries=3, backoff_s=0.01) as client:
        reply = client.answer(scripted_request, timeout_s=5)
    assert (reply.text, reply.token_ids, reply.request_id) == ("scripted", (7, 8), "r1")
    assert len(servicer.metadata) == 3
    assert all(m.get("authorization") == "Bearer abc" for m in servicer.metadata)


def test_retries_stop_at_max_retries(scripted, scripted_request):
    """max_retries=1: two attempts, then the UNAVAILABLE status with the server's message. Guards
    against retrying forever (or until the deadline) and against losing the status details."""
    servicer = ScriptedCascade(failures=5)
    client = GrpcCloudClient(scripted(servicer), max_retries=1, backoff_s=0.01)
    with client, pytest.raises(CloudError) as info:
        client.answer(scripted_request, timeout_s=5)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 2
    assert "warming up" in info.value.message and len(servicer.metadata) == 2


def test_slow_cloud_hits_the_deadline(scripted, scripted_request):
    """A reply slower than the timeout: DEADLINE_EXCEEDED after about timeout_s, blocking and
    async alike. Guards against a call without a deadline waiting for the server's 30 s delay."""
    servicer = ScriptedCascade(delay_s=30.0)
    with GrpcCloudClient(scripted(servicer)) as client:
        for call in (
            lambda: client.answer(scripted_request, timeout_s=0.5),
            lambda: asyncio.run(client.answer_async(scripted_request, timeout_s=0.5)),
        ):
            started = time.monotonic()
            with pytest.raises(CloudError) as info:
                call()
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            # At the deadline, not at once (a lower bound a few ms short of it for clock granularity).
            assert 0.49 <= time.monotonic() - started <= 0.5 + SLACK_S


# ----------------------------------------------------------------------------- the CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stitchvlm.edge.cli", "ask", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_json_is_one_consistent_object(server, edge_dir, engine, image, tmp_path):
    """``stitch-edge ask --json``: one JSON object whose fields agree with each other and with the
    cloud: |V| scores, kept = the top keep_count(R, |V|) of them, S = mean of the two scores, the
    route the threshold implies, and the cloud's answer when escalated."""
    path = tmp_path / "image.png"
    image.save(path)
    common = ["--model", str(edge_dir), "--image", str(path), "--prompt", QUESTION, "--cpu", "--json"]
    common += ["--retention", str(RETENTION), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    cloud = ["--cloud", server.address, "--auth-token", TOKEN]
    n_visual = compute_layout(image.width, image.height, engine.files.tiling).num_visual_tokens
    for tau, route in (("1.01", "cloud"), ("0", "edge")):
        done = run_cli(*common, *cloud, "--tau", tau)
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.strip().splitlines()) == 1
        out = json.loads(done.stdout)
        scores = np.array(out["visual_scores"])
        assert len(scores) == n_visual == out["num_visual_tokens"]
        assert out["kept_indices"] == top_r_indices(scores, RETENTION).tolist()
        assert len(out["kept_indices"]) == keep_count(RETENTION, n_visual)
        assert out["s"] == pytest.approx((out["s_conf"] + out["s_cons"]) / 2, rel=1e-12)
        assert len(out["token_probs"]) == len(out["edge_token_ids"]) >= 1
        assert out["s_conf"] == pytest.approx(float(np.exp(np.mean(np.log(out["token_probs"])))), rel=1e-12)
        assert out["route"] == route and out["degraded"] is False
        assert (out["s"] >= float(tau)) == (route == "edge")
        assert set(out["timings"]) == {"edge_ms", "gate_ms", "cloud_ms", "total_ms"}
        if route == "cloud":
            expected = engine.answer(build_request(engine.files.tiling, image, scores))
            assert out["answer"] == expected.text and out["cloud"]["token_ids"] == list(expected.token_ids)
            assert out["bytes_sent"] == out["wire"]["total"] > out["wire"]["image"] > 0
        else:
            assert out["answer"] == out["edge_answer"] and out["bytes_sent"] == 0 and out["cloud"] is None


def test_cli_summary_and_usage_errors(edge_dir, image, tmp_path, capsys):
    """Without --json a short summary; a missing image or a directory that is no export exits 2
    with a message naming the flag. Guards against tracebacks (exit 1) for a user's typo."""
    path = tmp_path / "image.png"
    image.save(path)
    done = run_cli("--model", str(edge_dir), "--image", str(path), "--prompt", QUESTION, "--cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("answer: ") and "route: edge" in done.stdout and "gate: S=" in done.stdout

    for args, words in (
        (["--model", str(edge_dir), "--image", str(tmp_path / "nope.png")], "--image"),
        (["--model", str(tmp_path), "--image", str(path)], "not a usable export directory"),
        (["--model", str(tmp_path / "nowhere"), "--image", str(path)], "no such directory"),
    ):
        with pytest.raises(SystemExit) as info:
            edge_main(["ask", *args, "--prompt", QUESTION, "--cpu"])
        assert info.value.code == 2
        assert words in capsys.readouterr().err


def test_cli_auth_token_file_reaches_the_cloud(server, edge_dir, image, tmp_path):
    """``--auth-token-file``: the file's token (newline stripped) is what the edge sends, so the
    cloud answers; a file with another token is refused (exit 1 under --on-cloud-failure raise).
    Guards against the flag being parsed but not used (issue 13, defect 7)."""
    path = tmp_path / "image.png"
    image.save(path)
    common = ["--model", str(edge_dir), "--image", str(path), "--prompt", QUESTION, "--cpu", "--json"]
    common += ["--cloud", server.address, "--tau", "1.01", "--on-cloud-failure", "raise"]
    good, wrong = tmp_path / "good", tmp_path / "wrong"
    good.write_text(TOKEN + "\n")
    wrong.write_text("not-the-token\n")
    done = run_cli(*common, "--auth-token-file", str(good))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["route"] == "cloud"
    refused = run_cli(*common, "--auth-token-file", str(wrong))
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr


@pytest.mark.parametrize(("content", "words"), [(None, "no such file"), ("\n", "is empty")])
def test_cli_auth_token_file_missing_or_empty_exits_2(edge_dir, image, tmp_path, capsys, content, words):
    """Guards against a missing or empty token file silently sending no token (the cloud would
    then refuse every escalation) instead of a usage error naming the flag."""
    path = tmp_path / "image.png"
    image.save(path)
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(SystemExit) as info:
        edge_main(["ask", "--model", str(edge_dir), "--image", str(path), "--prompt", QUESTION,
                   "--auth-token-file", str(token_file)])  # fmt: skip
    assert info.value.code == 2
    assert f"--auth-token-file {token_file}: {words}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- streaming
# Streamed chunks must concatenate to what ``ask`` answers (the cloud's text, checked against
# ``CloudEngine.answer``); an edge answer comes as one chunk; a cloud failing before its first
# chunk degrades to the edge's answer, one failing after raises.


def test_stream_concatenates_to_the_cloud_answer(server, edge, engine, image):
    """tau > 1: cloud chunks arrive one per token and join into the engine's answer; the last
    chunk's Result is what ``ask`` returns. Guards against lost or repeated deltas in the SDK."""
    with GrpcCloudClient(server.address, auth_token=TOKEN) as client:
        sdk = cascade(edge, client, tau=1.01)
        chunks = list(sdk.stream(image, QUESTION))
        asked = sdk.ask(image, QUESTION)
    result = chunks[-1].result
    reference = engine.answer(build_request(engine.files.tiling, image, result.visual_scores))
    assert all(c.route == "cloud" for c in chunks) and all(c.result is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == reference.text == result.answer == asked.answer
    assert tuple(i for c in chunks for i in c.token_ids) == reference.token_ids
    assert len(chunks) - 1 == len(reference.token_ids)
    assert (result.route, result.degraded) == ("cloud", False)


def test_async_stream_and_edge_answer_in_one_chunk(server, edge, image):
    """AsyncCascade.stream gives the same chunks; tau = 0 gives the edge's answer as one chunk."""

    async def collect(tau):
        async with AsyncCascade(
            edge,
            GrpcCloudClient(server.address, auth_token=TOKEN),
            tau=tau,
            retention=0.25,
            max_new_tokens=MAX_NEW_TOKENS,
        ) as sdk:
            return [c async for c in sdk.stream(image, QUESTION)]

    with GrpcCloudClient(server.address, auth_token=TOKEN) as client:
        sync = list(cascade(edge, client, tau=1.01).stream(image, QUESTION))
    streamed = asyncio.run(collect(1.01))
    assert [(c.text, c.token_ids) for c in streamed] == [(c.text, c.token_ids) for c in sync]
    [local] = asyncio.run(collect(0.0))
    assert local.route == "edge" and local.result.route == "edge"
    assert local.text == local.result.edge_answer and local.token_ids == local.result.edge_token_ids


class FailsAfterOneChunk(CloudClient):
    """A cloud that streams one delta and then drops the connection."""

    def answer(self, request, timeout_s):
        raise AssertionError("stream only")

    def _stream(self, request, timeout_s, cancellation):
        yield CloudChunk("par", (1,))
        raise CloudError(grpc.StatusCode.UNAVAILABLE, "connection reset")


def test_failures_degrade_before_the_first_chunk_and_raise_after(edge, image):
    """A dead cloud: one edge chunk, degraded. A cloud dying mid-answer: CloudError, since part of
    its text was already shown. Guards against the edge's answer glued onto half a cloud answer."""
    with GrpcCloudClient(f"127.0.0.1:{free_port()}", max_retries=0) as dead:
        [chunk] = list(cascade(edge, dead, tau=1.01).stream(image, QUESTION))
    assert chunk.route == "edge" and chunk.result.degraded and "UNAVAILABLE" in chunk.result.error
    sdk = cascade(edge, FailsAfterOneChunk(), tau=1.01)
    seen = []
    with pytest.raises(CloudError):
        for piece in sdk.stream(image, QUESTION):
            seen.append(piece.text)
    assert seen == ["par"]
    assert (sdk.stats().failed, sdk.stats().degraded) == (1, 0)


def test_cli_stream_prints_the_answer(server, edge_dir, image, tmp_path, capsys):
    """``stitch-edge ask --stream`` prints the streamed text, then the summary naming the same answer."""
    path = tmp_path / "q.png"
    image.save(path)
    code = edge_main(
        [
            "ask",
            "--model",
            str(edge_dir),
            "--image",
            str(path),
            "--prompt",
            QUESTION,
            "--cloud",
            server.address,
            "--auth-token",
            TOKEN,
            "--tau",
            "1.01",
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--retention",
            "0.25",
            "--cpu",
            "--stream",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    streamed, summary = out.split("\n", 1)
    assert summary.startswith(f"answer: {streamed}\n") and "route: cloud" in summary
