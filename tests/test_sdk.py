"""The edge SDK (routing, request building, degradation, counters, async) without a network.

The cloud is ``CloudEngine`` of the tiny large checkpoint behind
``InProcessCloudClient``. The references are independent of the SDK: the
edge runtime and gate called directly, a ``CloudRequest`` the test builds
itself from the image and the edge's scores, and ``engine.answer`` on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402

from stitchvlm.cloud.engine import CloudEngine, EngineConfig  # noqa: E402
from stitchvlm.edge.cloud_client import (  # noqa: E402
    CloudClient,
    CloudError,
    GrpcCloudClient,
    InProcessCloudClient,
    connect_cloud,
)
from stitchvlm.edge.gate import GateConfig, see_gate  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeModel  # noqa: E402
from stitchvlm.edge.sdk import AsyncCascade, Cascade, CascadeConfig  # noqa: E402
from stitchvlm.shared import wire  # noqa: E402
from stitchvlm.shared.layout import layout_fingerprint  # noqa: E402
from stitchvlm.shared.preprocess import compute_layout  # noqa: E402
from stitchvlm.shared.scoring import keep_count, top_r_indices  # noqa: E402
from stitchvlm.shared.types import CloudRequest  # noqa: E402

QUESTION = "What colour is the circle?"
MAX_NEW_TOKENS = 6
RETENTION = 0.25


@pytest.fixture(scope="module")
def edge(tiny_edge_dir) -> EdgeModel:
    return EdgeModel.load(tiny_edge_dir, providers=[CPU])


@pytest.fixture(scope="module")
def engine(tiny_large_checkpoint) -> CloudEngine:
    return CloudEngine.load(EngineConfig(model_dir=tiny_large_checkpoint, prune_layer=2))


@pytest.fixture(scope="module")
def image():
    return make_test_image(150, 90, seed=3)


class CountingClient(CloudClient):
    """Records every request (and its timeout) and passes it on; fails while ``failing`` is set."""

    def __init__(self, inner: CloudClient) -> None:
        self.inner = inner
        self.calls: list[tuple[CloudRequest, float]] = []
        self.failing: grpc.StatusCode | None = None
        self._lock = threading.Lock()

    def _record(self, request: CloudRequest, timeout_s: float) -> None:
        with self._lock:
            self.calls.append((request, timeout_s))
        if self.failing is not None:
            raise CloudError(self.failing, "connection refused (test)")

    def answer(self, request, timeout_s):
        self._record(request, timeout_s)
        return self.inner.answer(request, timeout_s)

    async def answer_async(self, request, timeout_s):
        self._record(request, timeout_s)
        return await self.inner.answer_async(request, timeout_s)


@pytest.fixture
def client(engine) -> CountingClient:
    return CountingClient(InProcessCloudClient(engine))


def png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def expected_request(edge: EdgeModel, engine: CloudEngine, picture, data: bytes, mime: str) -> CloudRequest:
    """The request an edge must send, built from the runtime directly and the CLOUD's tiling."""
    gen = edge.generate(picture, QUESTION, MAX_NEW_TOKENS)
    layout = compute_layout(picture.width, picture.height, engine.files.tiling)
    return CloudRequest(
        image=data,
        mime_type=mime,
        prompt=QUESTION,
        kept_indices=top_r_indices(gen.visual_scores, RETENTION),
        num_visual_tokens=layout.num_visual_tokens,
        retention=RETENTION,
        layout=layout,
        layout_fingerprint=layout_fingerprint(layout, engine.files.tiling),
        max_new_tokens=MAX_NEW_TOKENS,
    )


def cascade(edge, cloud, **options) -> Cascade:
    return Cascade(edge, cloud, retention=RETENTION, max_new_tokens=MAX_NEW_TOKENS, **options)


def test_confident_question_stays_on_edge(edge, client, image):
    """tau = 0: the edge's own answer and scores, and the cloud is never called. Guards against
    escalating regardless of the gate, and against reporting bytes for a request never sent."""
    result = cascade(edge, client, tau=0.0).ask(image, QUESTION)
    gen = edge.generate(image, QUESTION, MAX_NEW_TOKENS)
    decision = see_gate(edge, gen, GateConfig(tau=0.0))
    assert client.calls == []
    assert (result.route, result.degraded, result.error, result.cloud_reply) == ("edge", False, None, None)
    assert result.answer == result.edge_answer == gen.text
    assert result.edge_token_ids == gen.token_ids
    assert (result.s_conf, result.s_cons, result.s) == (decision.s_conf, decision.s_cons, decision.s)
    np.testing.assert_array_equal(result.kept_indices, top_r_indices(gen.visual_scores, RETENTION))
    np.testing.assert_array_equal(result.visual_scores, gen.visual_scores)
    assert result.bytes_sent == 0 and result.wire is None and result.timings["cloud_ms"] == 0.0


def test_escalated_question_gets_the_engines_answer(edge, engine, client, image):
    """tau > 1: the request carries the image as PNG, the top-R of the edge's scores, the layout
    and fingerprint the cloud computes, and the answer is ``engine.answer`` of that request.
    Guards against sending the wrong indices/layout/budget and against returning the edge's text."""
    result = cascade(edge, client, tau=1.01, cloud_timeout_s=7.5).ask(image, QUESTION)
    expected = expected_request(edge, engine, image, png(image), "image/png")
    [(sent, timeout_s)] = client.calls
    assert timeout_s == 7.5
    assert sent.request_id == result.request_id and len(sent.request_id) == 32
    assert dataclasses.replace(sent, request_id="", kept_indices=None) == dataclasses.replace(
        expected, kept_indices=None
    )
    np.testing.assert_array_equal(sent.kept_indices, expected.kept_indices)
    np.testing.assert_array_equal(result.kept_indices, expected.kept_indices)
    assert len(result.kept_indices) == keep_count(RETENTION, expected.num_visual_tokens)

    reference = engine.answer(expected)
    assert (result.route, result.degraded, result.error) == ("cloud", False, None)
    assert result.answer == reference.text
    assert result.cloud_reply.token_ids == reference.token_ids
    assert result.cloud_reply.kept_visual_tokens == len(expected.kept_indices)
    size = wire.request_to_proto(sent).ByteSize()
    assert result.bytes_sent == size == result.wire.total
    assert result.wire.image == len(expected.image) and result.wire.indices > 0
    assert result.wire.other == size - result.wire.image - result.wire.indices > 0
    assert result.timings["cloud_ms"] > 0
    assert result.timings["total_ms"] >= result.timings["edge_ms"] + result.timings["cloud_ms"]


def test_encoded_image_is_sent_as_given(edge, engine, client, image, tmp_path):
    """Bytes or a file go to the cloud byte for byte with their own mime type (no re-encoding),
    and the edge decodes them as the cloud does, so the layouts agree and the cloud answers."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    jpeg = buffer.getvalue()
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg)
    sdk = cascade(edge, client, tau=1.01)
    from_bytes, from_path = sdk.ask(jpeg, QUESTION), sdk.ask(path, QUESTION)
    for (sent, _), result in zip(client.calls, (from_bytes, from_path), strict=True):
        assert sent.image == jpeg and sent.mime_type == "image/jpeg"
        assert result.route == "cloud"
    assert from_bytes.answer == from_path.answer
    with pytest.raises(ValueError, match="unreadable image"):
        sdk.ask(b"not an image", QUESTION)
    with pytest.raises(FileNotFoundError):
        sdk.ask(tmp_path / "missing.png", QUESTION)


def test_without_cloud_every_answer_is_local(edge, image):
    """cloud=None: an unconfident answer stays local and is not reported as degraded."""
    sdk = cascade(edge, None, tau=1.01)
    result = sdk.ask(image, QUESTION)
    assert (result.route, result.degraded, result.error, result.bytes_sent) == ("edge", False, None, 0)
    assert result.s < result.tau
    stats = sdk.stats()
    assert (stats.asked, stats.no_cloud, stats.escalated, stats.exited_on_edge) == (1, 1, 0, 0)


def test_cloud_failure_degrades_to_the_edge_answer(edge, client, image):
    """UNAVAILABLE from the cloud: the local answer, degraded, with the status in ``error``.
    Guards against an exception escaping in degrade mode or a degraded answer passing as normal."""
    client.failing = grpc.StatusCode.UNAVAILABLE
    sdk = cascade(edge, client, tau=1.01)
    result = sdk.ask(image, QUESTION)
    assert len(client.calls) == 1
    assert (result.route, result.degraded, result.cloud_reply) == ("edge", True, None)
    assert result.answer == result.edge_answer == edge.generate(image, QUESTION, MAX_NEW_TOKENS).text
    assert result.error.startswith("UNAVAILABLE") and "connection refused" in result.error
    assert result.bytes_sent == result.wire.total > 0  # the request was sent (attempted)
    stats = sdk.stats()
    assert (stats.escalated, stats.degraded, stats.cloud_answered, stats.failed) == (1, 1, 0, 0)


def test_raise_mode_raises_the_cloud_error(edge, client, image):
    """on_cloud_failure="raise": CloudError with the status, counted as failed, not degraded."""
    client.failing = grpc.StatusCode.UNAVAILABLE
    sdk = cascade(edge, client, tau=1.01, on_cloud_failure="raise")
    with pytest.raises(CloudError) as info:
        sdk.ask(image, QUESTION)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    stats = sdk.stats()
    assert (stats.asked, stats.escalated, stats.failed, stats.degraded) == (1, 1, 1, 0)


def test_counters_add_up_across_threads(edge, client):
    """Counters from concurrent asks: every question counted once, in exactly one bucket, and
    bytes_sent the sum over escalations. Guards against lost updates and double counting."""
    confident, doubtful = make_test_image(64, 64, seed=5), make_test_image(150, 90, seed=3)
    s_of = {
        name: see_gate(edge, edge.generate(img, QUESTION, MAX_NEW_TOKENS)).s
        for name, img in (("confident", confident), ("doubtful", doubtful))
    }
    if s_of["confident"] < s_of["doubtful"]:
        confident, doubtful = doubtful, confident
    tau = (s_of["confident"] + s_of["doubtful"]) / 2
    assert min(s_of.values()) < tau < max(s_of.values())

    sdk = cascade(edge, client, tau=tau)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda img: sdk.ask(img, QUESTION), [confident, doubtful] * 3))
    client.failing = grpc.StatusCode.UNAVAILABLE
    results.append(sdk.ask(doubtful, QUESTION))

    stats = sdk.stats()
    assert stats.asked == 7 == stats.exited_on_edge + stats.no_cloud + stats.escalated
    assert (stats.exited_on_edge, stats.escalated, stats.cloud_answered, stats.degraded) == (3, 4, 3, 1)
    assert stats.escalated == stats.cloud_answered + stats.degraded + stats.failed
    assert stats.bytes_sent == sum(r.bytes_sent for r in results) > 0
    assert [r.route for r in results] == ["edge", "cloud"] * 3 + ["edge"]
    assert len(client.calls) == 4


def test_async_gives_the_blocking_result(edge, client, image):
    """ask_async / AsyncCascade route and answer as the blocking ask, also with two questions in
    flight at once. Guards against the async path skipping the gate or the cloud."""
    blocking = {tau: cascade(edge, client, tau=tau).ask(image, QUESTION) for tau in (0.0, 1.01)}

    async def both() -> list:
        sdk = AsyncCascade(edge, client, retention=RETENTION, max_new_tokens=MAX_NEW_TOKENS, tau=1.01)
        async with sdk:
            escalated = await sdk.ask(image, QUESTION)
        local = cascade(edge, client, tau=0.0)
        return [
            escalated,
            *await asyncio.gather(local.ask_async(image, QUESTION), local.ask_async(image, QUESTION)),
        ]

    escalated, local, again = asyncio.run(both())
    for result, reference in ((escalated, blocking[1.01]), (local, blocking[0.0]), (again, blocking[0.0])):
        assert (result.route, result.answer, result.s, result.degraded) == (
            reference.route,
            reference.answer,
            reference.s,
            reference.degraded,
        )
        np.testing.assert_array_equal(result.kept_indices, reference.kept_indices)
    assert escalated.cloud_reply.token_ids == blocking[1.01].cloud_reply.token_ids
    assert escalated.bytes_sent == blocking[1.01].bytes_sent
    assert len(client.calls) == 2  # one blocking and one async escalation


def test_in_process_client_fails_like_the_server(engine, edge, image):
    """InProcessCloudClient turns RequestError into CloudError with the same status, validates as
    the wire does, and honours its deadline. Guards against in-process tests passing requests
    the real server would refuse."""
    client = InProcessCloudClient(engine)
    good = expected_request(edge, engine, image, png(image), "image/png")
    cases = [
        (dict(layout_fingerprint=good.layout_fingerprint ^ 1), grpc.StatusCode.FAILED_PRECONDITION),
        (dict(kept_indices=good.kept_indices[:-1]), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(image=b"junk"), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(model="other"), grpc.StatusCode.NOT_FOUND),
    ]
    for override, code in cases:
        with pytest.raises(CloudError) as info:
            client.answer(dataclasses.replace(good, **override), timeout_s=10)
        assert info.value.code == code, override
    with pytest.raises(CloudError) as info:
        client.answer(good, timeout_s=1e-9)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.answer(good, timeout_s=10).token_ids == engine.answer(good).token_ids


def test_connect_cloud_picks_the_transport(engine):
    """ "host:port" -> gRPC (lazily, nothing dialled yet), an engine -> in process, a client -> itself."""
    grpc_client = connect_cloud("127.0.0.1:1")
    assert isinstance(grpc_client, GrpcCloudClient)
    grpc_client.close()
    in_process = connect_cloud(engine)
    assert isinstance(in_process, InProcessCloudClient) and in_process.engine is engine
    assert connect_cloud(in_process) is in_process and connect_cloud(None) is None
    with pytest.raises(TypeError):
        connect_cloud(42)


def test_config_refuses_bad_values(edge):
    """Bad settings fail when the Cascade is made, not on the first escalation."""
    for options in (
        {"retention": 0.0},
        {"retention": 1.5},
        {"max_new_tokens": 0},
        {"cloud_timeout_s": 0.0},
        {"on_cloud_failure": "ignore"},
        {"tau": float("nan")},
        {"consistency_retention": 2.0},
    ):
        with pytest.raises(ValueError):
            Cascade(edge, None, **options)
    assert CascadeConfig().retention == 0.09 and CascadeConfig().consistency_retention == 0.05


def test_edge_modules_import_without_torch():
    """DESIGN invariant 5: the gate, client, SDK and CLI load without torch or transformers."""
    code = (
        "import sys\n"
        "import stitchvlm.edge.gate, stitchvlm.edge.cloud_client, stitchvlm.edge.sdk, stitchvlm.edge.cli\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
