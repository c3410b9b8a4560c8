"""Scale-out: one ``GrpcCloudClient`` balancing over three real ``stitch-cloud serve`` replicas.

Guards against a client that pins one replica (gRPC's default ``pick_first``),
keeps sending to a replica that died or drains, or turns a replica's death into
a failed question instead of a retry on another replica. Which replica served
what is read from each server's request log (``request id=... status=OK``), not
from the client. The parsing of the address forms is checked without a network.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402
from servers import (  # noqa: E402
    SERVING,
    CloudProcess,
    cloud_request,
    make_endless_checkpoint,
    start_cloud,
    tiling_of,
)

from stitchvlm.edge.cloud_client import (  # noqa: E402
    CloudTarget,
    GrpcCloudClient,
    balancing_service_config,
    cloud_target,
    connect_cloud,
)

REPLICAS = 3
QUESTIONS = 30
CONCURRENCY = 6
MAX_NEW_TOKENS = 24  # long enough that questions are in flight when the replica dies
TIMEOUT_S = 30.0  # each question's deadline, retries included
LONG_TOKENS = 3000  # the draining replica's own generation: far longer than the test needs it
OK_LINE = re.compile(r"request id=(\S+) status=OK")
ANY_LINE = re.compile(r"request id=(\S+) status=")


def start_replicas(model_dir, *args: str) -> list[CloudProcess]:
    """Start ``REPLICAS`` servers at once (they load in parallel), then wait until each is SERVING."""
    replicas = []
    try:
        for _ in range(REPLICAS):
            replicas.append(start_cloud(model_dir, *args))
        for replica in replicas:
            replica.wait_for_health(SERVING, timeout=120)
    except BaseException:
        stop_all(replicas)
        raise
    return replicas


def stop_all(replicas: list[CloudProcess]) -> None:
    for replica in replicas:
        if replica.proc.poll() is None:
            replica.proc.kill()
            replica.proc.wait()


def served(replica: CloudProcess, pattern: re.Pattern = OK_LINE) -> list[str]:
    """Request ids the replica logged (answered OK with the default pattern)."""
    return pattern.findall(replica.log_text())


@pytest.fixture(scope="module")
def image():
    return make_test_image(96, 80, seed=3)


@pytest.fixture(scope="module")
def endless_checkpoint(tiny_checkpoint, tmp_path_factory):
    return make_endless_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("replicas") / "endless")


def test_a_killed_replica_fails_no_question(tiny_large_checkpoint, image, record_property):
    """30 questions, 6 at a time, over 3 replicas; one gets SIGKILL after a third: every question answered.

    Questions in flight on the killed replica fail UNAVAILABLE and are retried on
    another replica within their deadline; every replica served some, the two
    survivors everything after the kill. (Unary calls: a stream that has yielded
    text when its replica dies raises by contract, it is not retried.)
    """
    tiling = tiling_of(tiny_large_checkpoint)
    replicas = start_replicas(tiny_large_checkpoint)
    killed, survivors = replicas[0], replicas[1:]
    try:
        client = GrpcCloudClient([r.address for r in replicas], max_retries=4, backoff_s=0.05)
        assert client.balanced
        done = threading.Semaphore(0)

        def ask(i: int) -> str:
            request = cloud_request(tiling, image, request_id=f"q{i}", seed=i, max_new_tokens=MAX_NEW_TOKENS)
            reply = client.answer(request, TIMEOUT_S)
            done.release()
            return reply.request_id

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            futures = [pool.submit(ask, i) for i in range(QUESTIONS)]
            for _ in range(QUESTIONS // 3):
                assert done.acquire(timeout=60), "the replicas stopped answering before the kill"
            # the channel connects to the replicas one by one: kill only once this one has served too
            killed.wait_for_log(OK_LINE.pattern, timeout=30)
            killed.proc.send_signal(signal.SIGKILL)
            killed.proc.wait(timeout=10)
            answered = [future.result() for future in futures]  # raises on any failed question
        client.close()
    finally:
        stop_all(replicas)

    assert sorted(answered) == sorted(f"q{i}" for i in range(QUESTIONS))
    by_replica = {replica.address: served(replica) for replica in replicas}
    distribution = {address: len(ids) for address, ids in by_replica.items()}
    record_property("distribution", distribution)
    print(f"\nanswered per replica ({killed.address} killed): {distribution}")
    assert all(distribution.values()), f"a replica served nothing: {distribution}"
    every = Counter(i for ids in by_replica.values() for i in ids)
    assert set(every) == set(answered)  # each question logged OK somewhere (twice if its reply was lost)
    assert sum(len(served(s)) for s in survivors) >= QUESTIONS - len(by_replica[killed.address])


def test_a_draining_replica_gets_no_new_calls(endless_checkpoint, image):
    """SIGTERM with a long grace on one replica busy with a long generation: while it drains
    (health NOT_SERVING, process still up) no new call reaches it and the others take them all.
    Without ``healthCheckConfig`` round_robin keeps picking it and its refusals fail calls."""
    tiling = tiling_of(endless_checkpoint)
    replicas = start_replicas(endless_checkpoint, "--max-new-tokens", str(LONG_TOKENS), "--grace", "60")
    draining, others = replicas[0], replicas[1:]
    try:
        with (
            GrpcCloudClient([r.address for r in replicas], max_retries=0) as client,
            GrpcCloudClient(draining.address) as direct,
            ThreadPoolExecutor(1) as pool,
        ):
            for i in range(2 * REPLICAS):
                client.answer(cloud_request(tiling, image, request_id=f"w{i}"), TIMEOUT_S)
            assert served(draining), "round_robin never picked the first replica before the drain"
            # a long generation keeps the replica draining (up, NOT_SERVING) after SIGTERM
            long_request = cloud_request(tiling, image, max_new_tokens=LONG_TOKENS, request_id="long")
            long_call = pool.submit(direct.answer, long_request, 120.0)
            time.sleep(0.5)
            draining.proc.send_signal(signal.SIGTERM)
            draining.wait_for_log(r"shutdown health=NOT_SERVING")
            time.sleep(0.5)  # the health watch's NOT_SERVING reaches the client
            before = served(draining, ANY_LINE)
            # max_retries=0: a call the draining replica refused would fail here, not be hidden by a retry
            for i in range(12):
                client.answer(cloud_request(tiling, image, request_id=f"d{i}"), TIMEOUT_S)
            assert not long_call.done(), "the replica stopped draining too early for the test"
            assert served(draining, ANY_LINE) == before, "a draining replica got a new call"
            drained = [i for r in others for i in served(r) if i.startswith("d")]
            assert sorted(drained) == sorted(f"d{i}" for i in range(12))
            assert all(any(i.startswith("d") for i in served(r)) for r in others)
            stop_all(replicas)  # SIGKILL: the long generation has served its purpose
    finally:
        stop_all(replicas)


# ----------------------------------------------------------------------------- address forms, no network


def test_address_forms():
    """One "host:port" stays unbalanced (pick_first, as before); lists and multi-address targets balance."""
    assert cloud_target("127.0.0.1:50051") == cloud_target(["127.0.0.1:50051"])
    assert not cloud_target("127.0.0.1:50051").balanced
    assert cloud_target("127.0.0.1:50051").target == "127.0.0.1:50051"
    listed = cloud_target(["127.0.0.1:1", "127.0.0.1:2"])
    assert listed.balanced and listed.target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert cloud_target("127.0.0.1:1, 127.0.0.1:2") == listed  # stitch-edge --cloud a:1,b:2
    assert cloud_target(["[::1]:1", "[::1]:2"]).target == "ipv6:[::1]:1,[::1]:2"
    assert cloud_target(["localhost:7", "127.0.0.1:8"]).target.startswith("ipv")
    for target in ("dns:///stitch-cloud.default.svc.cluster.local:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"):
        assert cloud_target(target) == CloudTarget(target, balanced=True)
    for bad in ("", [], ["127.0.0.1:1", ""], ["127.0.0.1:1", "[::1]:2"], ["a", "b"], ["dns:///a:1", "b:2"]):
        with pytest.raises(ValueError):
            cloud_target(bad)


def test_balanced_channel_config():
    """The service config names round_robin and health-checks the Cascade service the server reports on."""
    import json

    from stitchvlm.cloud.server import CASCADE_SERVICE

    config = json.loads(balancing_service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": CASCADE_SERVICE}
    client = connect_cloud(["127.0.0.1:1", "127.0.0.1:2"])
    assert isinstance(client, GrpcCloudClient) and client.balanced
    client.close()
