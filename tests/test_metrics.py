"""The cloud's Prometheus metrics, scraped over HTTP from a real ``stitch-cloud serve --metrics-port 0``.

Each number on ``/metrics`` is checked against what the client saw: the
requests it sent and the statuses they got, the replies' kept-token counts
and timings, ``request_wire_size`` of every request. The gauges are watched
while a model that never emits EOS holds the one generation slot and a second
request waits behind it.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.request

import grpc
import pytest

pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from servers import cloud_request, make_endless_checkpoint, running_cloud, tiling_of  # noqa: E402

from stitchvlm.cloud.cli import build_parser  # noqa: E402
from stitchvlm.cloud.lifecycle import start_metrics  # noqa: E402
from stitchvlm.cloud.metrics import STAGES, CloudMetrics  # noqa: E402
from stitchvlm.cloud.server import ServerConfig  # noqa: E402
from stitchvlm.edge.cloud_client import CloudError, GrpcCloudClient, request_wire_size  # noqa: E402
from stitchvlm.shared import wire  # noqa: E402
from stitchvlm.shared.pb import cascade_pb2_grpc  # noqa: E402
from stitchvlm.shared.types import CloudReply, Timings  # noqa: E402

LONG = 3000  # decode steps of a request that must still be running when the test looks
METRICS_LINE = r"stitch-cloud metrics: http://127\.0\.0\.1:(\d+)/metrics"


@pytest.fixture(scope="module")
def endless_checkpoint(tiny_checkpoint, tmp_path_factory):
    return make_endless_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("endless") / "tiny-internvl")


@pytest.fixture(scope="module")
def cloud(endless_checkpoint):
    args = ("--metrics-port", "0", "--max-new-tokens", str(LONG), "--max-queue", "4", "--grace", "1")
    args += ("--max-batch-size", "1")  # one sequence at a time: a second request waits
    with running_cloud(endless_checkpoint, *args) as process:
        process.metrics_url = f"http://127.0.0.1:{process.wait_for_log(METRICS_LINE)[1]}/metrics"
        yield process


@pytest.fixture(scope="module")
def client(cloud):
    with GrpcCloudClient(cloud.address, max_retries=0) as grpc_client:
        yield grpc_client


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample on ``/metrics`` as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before.get(key, 0.0)


def test_counters_and_histograms_match_the_requests(cloud, client, endless_checkpoint):
    """Guards against statuses counted under the wrong label or not at all, histograms observed for
    failed requests, timings in the wrong unit, and byte or token counts of another message."""
    tiling = tiling_of(endless_checkpoint)
    image = make_test_image(150, 90, seed=4)
    good = [cloud_request(tiling, image, max_new_tokens=3, request_id=f"ok-{i}", seed=i) for i in range(3)]
    bad = {
        "INVALID_ARGUMENT": [
            dataclasses.replace(good[0], prompt="  ", request_id="blank"),
            dataclasses.replace(good[0], request_id="bad id with spaces"),
        ],
        "FAILED_PRECONDITION": [
            dataclasses.replace(good[0], layout_fingerprint=1, request_id="wrong-layout")
        ],
        "OUT_OF_RANGE": [dataclasses.replace(good[0], max_new_tokens=LONG + 1, request_id="too-long")],
    }
    before = scrape(cloud.metrics_url)
    replies: list[CloudReply] = [client.answer(request, timeout_s=60) for request in good]
    for code, requests in bad.items():
        for request in requests:
            with pytest.raises(CloudError) as failure:
                client.answer(request, timeout_s=60)
            assert failure.value.code.name == code
    after = scrape(cloud.metrics_url)

    expected = {"OK": len(good), **{code: len(requests) for code, requests in bad.items()}}
    for code in grpc.StatusCode:
        assert delta(after, before, "stitch_requests_total", status=code.name) == expected.get(code.name, 0)
    for stage in STAGES:
        assert delta(after, before, "stitch_stage_seconds_count", stage=stage) == len(good)
    total_s = sum(reply.timings.total_ms for reply in replies) / 1e3
    assert delta(after, before, "stitch_stage_seconds_sum", stage="total") == pytest.approx(total_s, rel=1e-9)
    kept = [reply.kept_visual_tokens for reply in replies]
    assert kept == [len(request.kept_indices) for request in good]
    assert delta(after, before, "stitch_kept_visual_tokens_count") == len(good)
    assert delta(after, before, "stitch_kept_visual_tokens_sum") == sum(kept)
    ratios = sum(reply.kept_visual_tokens / reply.num_visual_tokens for reply in replies)
    assert delta(after, before, "stitch_kept_visual_token_ratio_sum") == pytest.approx(ratios, rel=1e-12)
    sent = [request_wire_size(r).total for r in [*good, *(r for rs in bad.values() for r in rs)]]
    assert delta(after, before, "stitch_request_bytes_count") == len(sent)
    assert delta(after, before, "stitch_request_bytes_sum") == sum(sent)
    reply_bytes = sum(wire.reply_to_proto(reply).ByteSize() for reply in replies)
    assert delta(after, before, "stitch_reply_bytes_sum") == reply_bytes
    assert after[("stitch_queue_depth", ())] == 0 and after[("stitch_in_flight", ())] == 0
    # The request log carries the same sizes under the same id.
    for request, size in zip(good, sent, strict=False):
        cloud.wait_for_log(
            rf"request id={request.request_id} status=OK .* request_bytes={size} reply_bytes=\d+"
        )


def wait_for(url: str, condition, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            gauges = {k: v for k, v in samples.items() if k[0] in ("stitch_in_flight", "stitch_queue_depth")}
            raise TimeoutError(f"condition not met after {timeout}s: {gauges}")
        time.sleep(0.05)


def test_gauges_follow_a_running_and_a_queued_request(cloud, client, endless_checkpoint):
    """One slot: a long request runs (in_flight 1), a second waits (queue_depth 1); cancelled, both
    gauges return to 0 and the counter says CANCELLED twice. Guards against gauges that never move
    or that leak a count when a request ends early."""
    tiling = tiling_of(endless_checkpoint)
    image = make_test_image(64, 64, seed=5)
    before = scrape(cloud.metrics_url)
    channel = grpc.insecure_channel(cloud.address)
    answer = cascade_pb2_grpc.CascadeStub(channel).Answer
    long_request = wire.request_to_proto(cloud_request(tiling, image, max_new_tokens=LONG))
    first = answer.future(long_request, timeout=60)
    gauge = lambda name: lambda s: s[(name, ())] == 1  # noqa: E731
    running = wait_for(cloud.metrics_url, gauge("stitch_in_flight"))
    assert running[("stitch_queue_depth", ())] == 0
    second = answer.future(long_request, timeout=60)
    queued = wait_for(cloud.metrics_url, gauge("stitch_queue_depth"))
    assert queued[("stitch_in_flight", ())] == 1
    second.cancel()
    first.cancel()
    idle = wait_for(
        cloud.metrics_url,
        lambda s: (
            s[("stitch_in_flight", ())] == 0
            and s[("stitch_queue_depth", ())] == 0
            and delta(s, before, "stitch_requests_total", status="CANCELLED") == 2
        ),
    )
    assert delta(idle, before, "stitch_stage_seconds_count", stage="total") == 0
    channel.close()


def test_metrics_are_off_by_default_and_registries_are_separate():
    """Without --metrics-port no HTTP endpoint starts; two CloudMetrics never share a counter
    (a global registry would make the second raise 'Duplicated timeseries' or double-count)."""
    args = build_parser().parse_args(["serve", "--model", "."])
    assert args.metrics_port is None and ServerConfig().metrics_port is None
    assert start_metrics(ServerConfig(), CloudMetrics()) is None
    first, second = CloudMetrics(), CloudMetrics(CollectorRegistry())
    first.observe(grpc.StatusCode.OK, _reply(kept=3, visual=12), request_bytes=100, reply_bytes=20)
    assert first.registry.get_sample_value("stitch_requests_total", {"status": "OK"}) == 1
    assert second.registry.get_sample_value("stitch_requests_total", {"status": "OK"}) == 0
    assert first.registry.get_sample_value("stitch_kept_visual_token_ratio_sum") == pytest.approx(0.25)
    assert first.registry.get_sample_value("stitch_stage_seconds_sum", {"stage": "decode"}) == pytest.approx(
        0.004
    )


def _reply(kept: int, visual: int) -> CloudReply:
    timings = Timings(queue_ms=1.0, vision_ms=2.0, prefill_ms=3.0, decode_ms=4.0, total_ms=10.0)
    return CloudReply("r", "m", "text", (1, 2), 20, 11, visual, kept, 2, timings)
