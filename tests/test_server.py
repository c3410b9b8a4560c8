"""End-to-end tests of ``stitch-cloud serve``: a real server subprocess and plain gRPC clients.

Three server processes: ``cloud`` (module-scoped, default configuration, its
weight loading held back at start to watch health), ``hardened`` (TLS, bearer
token, no queue) and one for the shutdown test. All serve a
``make_endless_checkpoint`` model, which never emits EOS, so a request runs
exactly ``max_new_tokens`` steps and a long request is really long. Malformed
requests are in ``test_server_errors``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import make_test_image
from servers import (
    NOT_SERVING,
    SERVING,
    CloudProcess,
    cloud_request,
    make_endless_checkpoint,
    running_cloud,
    start_cloud,
    tiling_of,
)

from stitchvlm.shared import wire
from stitchvlm.shared.pb import cascade_pb2, cascade_pb2_grpc

pytest.importorskip("torch")

MAX_NEW_TOKENS_LIMIT = 3500  # the servers' --max-new-tokens; the tiny model's context is 4096
LONG = MAX_NEW_TOKENS_LIMIT  # a request budget that takes seconds on the tiny model
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def endless_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    return make_endless_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("endless") / "tiny-internvl")


@pytest.fixture(scope="module")
def image():
    return make_test_image(128, 64, seed=0)  # 2x1 grid + thumbnail: 48 visual tokens on the tiny tiling


@dataclass
class Startup:
    """What a client saw between the port being bound and the weights being loaded."""

    health: dict[str, int]  # service name -> health status
    answer_error: grpc.RpcError | None  # what an Answer sent meanwhile got


# Runs the real CLI with CloudEngine.load held until a file exists: a deterministic
# NOT_SERVING window, where a tiny model would load in 0.1 s.
GATED_LAUNCHER = """
import sys, time
from pathlib import Path
from stitchvlm.cloud import cli, engine

gate = Path(sys.argv[1])
load = engine.CloudEngine.load.__func__

def gated_load(cls, config, **kwargs):
    while not gate.exists():
        time.sleep(0.01)
    return load(cls, config, **kwargs)

engine.CloudEngine.load = classmethod(gated_load)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def gated_cloud(endless_checkpoint, tmp_path_factory, image):
    """The default server, its weight loading held back until the startup checks are done."""
    work = tmp_path_factory.mktemp("gated")
    (work / "launcher.py").write_text(GATED_LAUNCHER)
    gate = work / "load-now"
    launcher = (sys.executable, str(work / "launcher.py"), str(gate))
    args = ("--max-new-tokens", str(MAX_NEW_TOKENS_LIMIT), "--grace", "5")
    process = start_cloud(endless_checkpoint, *args, launcher=launcher)
    try:
        health = {name: process.health(name) for name in ("", "stitch.v1.Cascade")}
        startup = Startup(health=health, answer_error=None)
        request = wire.request_to_proto(cloud_request(tiling_of(endless_checkpoint), image))
        with process.channel() as channel:
            try:
                cascade_pb2_grpc.CascadeStub(channel).Answer(request, timeout=10)
            except grpc.RpcError as err:
                startup.answer_error = err
        gate.touch()
        process.wait_for_health(SERVING)
        yield process, startup
    finally:
        process.stop()


@pytest.fixture(scope="module")
def cloud(gated_cloud) -> CloudProcess:
    return gated_cloud[0]


@pytest.fixture(scope="module")
def startup(gated_cloud) -> Startup:
    return gated_cloud[1]


@pytest.fixture(scope="module")
def stub(cloud) -> cascade_pb2_grpc.CascadeStub:
    return cascade_pb2_grpc.CascadeStub(cloud.channel())


@pytest.fixture(scope="module")
def tiling(endless_checkpoint):
    return tiling_of(endless_checkpoint)


def answer(stub, request, **kwargs) -> cascade_pb2.AnswerReply:
    return stub.Answer(wire.request_to_proto(request), timeout=60, **kwargs)


# ----------------------------------------------------------------------------- a plain client

PLAIN_CLIENT = """
import json, sys
import grpc
from google.protobuf import json_format
sys.path.insert(0, sys.argv[1])
from stitch.v1 import cascade_pb2, cascade_pb2_grpc  # compiled from the .proto by the test

spec = json.load(open(sys.argv[2]))
request = cascade_pb2.AnswerRequest(
    request_id=spec["request_id"],
    image=open(spec["image_path"], "rb").read(),
    image_mime_type="image/png",
    prompt=spec["prompt"],
    num_visual_tokens=spec["num_visual_tokens"],
    retention=spec["retention"],
    kept=cascade_pb2.KeptTokens(
        encoding=cascade_pb2.KeptTokens.PLAIN, indices=spec["indices"], count=len(spec["indices"])
    ),
    layout=cascade_pb2.Layout(**spec["layout"]),
    generation=cascade_pb2.GenerationParams(max_new_tokens=spec["max_new_tokens"]),
)
with grpc.insecure_channel(spec["address"]) as channel:
    reply = cascade_pb2_grpc.CascadeStub(channel).Answer(request, timeout=60)
print(json_format.MessageToJson(reply, preserving_proto_field_name=True))
"""


def reference_prompt_length(model_dir: Path, prompt: str, num_visual: int) -> int:
    """Prompt length by transformers' path: chat template, InternVLProcessor's image expansion, tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expanded = (
        tokenizer.start_image_token + tokenizer.context_image_token * num_visual + tokenizer.end_image_token
    )
    return len(tokenizer(text.replace(tokenizer.context_image_token, expanded, 1))["input_ids"])


def test_plain_client_compiled_from_the_proto_gets_the_engines_answer(
    cloud, endless_checkpoint, tiling, image, tmp_path
):
    """A client with stubs protoc made from cascade.proto (no stitchvlm import) gets a full, correct reply.

    Guards against a server that only works with the project's own stubs or
    SDK, against indices / layout mangled between wire and engine (the reply
    must equal the in-process engine's answer token for token) and against
    reply fields left unset (counts, timings, model id, echoed request id).
    """
    from grpc_tools import protoc

    from stitchvlm.cloud.engine import CloudEngine, EngineConfig

    proto_root = Path(__file__).resolve().parent.parent / "proto"
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    args = ["protoc", f"-I{proto_root}", f"--python_out={stubs}", f"--grpc_python_out={stubs}"]
    assert protoc.main([*args, "stitch/v1/cascade.proto"]) == 0

    request = cloud_request(tiling, image, prompt="Which shape is red?", retention=0.25, max_new_tokens=6)
    (tmp_path / "image.png").write_bytes(request.image)
    layout = request.layout
    spec = {
        "address": cloud.address,
        "request_id": "plain-client-1",
        "image_path": str(tmp_path / "image.png"),
        "prompt": request.prompt,
        "num_visual_tokens": request.num_visual_tokens,
        "retention": request.retention,
        "indices": [int(i) for i in request.kept_indices],
        "layout": {
            "tile_size": layout.tile_size,
            "grid_columns": layout.grid_columns,
            "grid_rows": layout.grid_rows,
            "thumbnail": layout.thumbnail,
            "tokens_per_tile": layout.tokens_per_tile,
            "fingerprint": request.layout_fingerprint,
        },
        "max_new_tokens": request.max_new_tokens,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "client.py").write_text(PLAIN_CLIENT)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "client.py"), str(stubs), str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # away from the repository, so nothing of it is importable by accident
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)

    engine = CloudEngine.load(EngineConfig(model_dir=endless_checkpoint))
    expected = engine.answer(request)
    n, k = request.num_visual_tokens, len(request.kept_indices)
    prompt_tokens = reference_prompt_length(endless_checkpoint, request.prompt, n)
    assert reply["request_id"] == "plain-client-1"
    assert reply["model"] == "tiny-internvl" == expected.model
    assert [int(t) for t in reply["token_ids"]] == list(expected.token_ids)
    assert len(expected.token_ids) == request.max_new_tokens  # the endless model ran its full budget
    assert reply["text"] == expected.text and reply["text"].strip()
    assert reply["prompt_tokens"] == prompt_tokens == expected.prompt_tokens
    assert reply["pruned_prompt_tokens"] == prompt_tokens - n + k  # K = 2 > 0: only kept tokens go on
    assert (reply["num_visual_tokens"], reply["kept_visual_tokens"], reply["prune_layer"]) == (n, k, 2)
    timings = reply["timings"]
    for name in ("vision_ms", "prefill_ms", "decode_ms", "total_ms"):
        assert timings[name] > 0, name
    assert timings["total_ms"] >= timings["vision_ms"] + timings["prefill_ms"] + timings["decode_ms"]


def test_server_generates_a_request_id_when_the_client_sends_none(cloud, stub, tiling, image):
    """An empty request_id gets a fresh uuid4 hex, echoed in the reply and logged; guards against '' ids in logs."""
    reply = answer(stub, cloud_request(tiling, image, max_new_tokens=2))
    assert len(reply.request_id) == 32 and int(reply.request_id, 16) >= 0
    other = answer(stub, cloud_request(tiling, image, max_new_tokens=2))
    assert other.request_id != reply.request_id
    cloud.wait_for_log(rf"request id={reply.request_id} status=OK model=tiny-internvl kept=12/48 ")


# ----------------------------------------------------------------------------- health, reflection


def test_health_is_not_serving_until_the_model_has_loaded(cloud, startup):
    """Health says NOT_SERVING (server and Cascade) and Answer says UNAVAILABLE while weights load, SERVING after.

    Guards against a server that reports SERVING before it can answer (an
    orchestrator would route traffic to it) or crashes on early requests.
    """
    assert startup.health == {"": NOT_SERVING, "stitch.v1.Cascade": NOT_SERVING}
    assert startup.answer_error is not None
    assert startup.answer_error.code() == grpc.StatusCode.UNAVAILABLE
    assert "model loading" in startup.answer_error.details()
    assert cloud.health("") == SERVING
    assert cloud.health("stitch.v1.Cascade") == SERVING
    assert "stitch-cloud ready: listening on " + cloud.address in cloud.log_text()


def test_reflection_lists_cascade_and_health(cloud):
    """Reflection names stitch.v1.Cascade and health and describes Answer; guards against reflection left off."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with cloud.channel() as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"stitch.v1.Cascade", "grpc.health.v1.Health"} <= services
        cascade_file = database.FindFileContainingSymbol("stitch.v1.Cascade")
        methods = [m.name for s in cascade_file.service if s.name == "Cascade" for m in s.method]
        assert methods == ["Answer", "AnswerStream", "GetModelInfo"]


# ----------------------------------------------------------------------------- cancellation, deadlines


def test_client_cancel_stops_the_generation(cloud, stub, tiling, image):
    """A cancelled long request stops generating (the engine saw should_stop) and the next request is served.

    Guards against a generation that keeps burning the only slot for its full
    budget after the client went away.
    """
    request = cloud_request(tiling, image, max_new_tokens=LONG, request_id="to-cancel")
    call = stub.Answer.future(wire.request_to_proto(request), timeout=120)
    time.sleep(0.5)
    assert call.cancel()
    line = cloud.wait_for_log(
        r"request id=to-cancel status=CANCELLED should_stop_observed=(\w+) total_ms=(\S+)"
    )
    assert line[1] == "true"
    # The slot was held until the generation ended; the next request gets it right after.
    reply = answer(stub, cloud_request(tiling, image, max_new_tokens=2, request_id="after-cancel"))
    assert len(reply.token_ids) == 2


def test_deadline_passing_mid_generation_stops_it(cloud, stub, tiling, image):
    """A request whose deadline passes mid-generation ends DEADLINE_EXCEEDED and its generation stops.

    Guards against deadlines that only the client observes while the server
    keeps generating for nobody.
    """
    request = cloud_request(tiling, image, max_new_tokens=LONG, request_id="short-deadline")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Answer(wire.request_to_proto(request), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    line = cloud.wait_for_log(
        r"request id=short-deadline status=DEADLINE_EXCEEDED should_stop_observed=(\w+)"
    )
    assert line[1] == "true"
    assert len(answer(stub, cloud_request(tiling, image, max_new_tokens=2)).token_ids) == 2


# ----------------------------------------------------------------------------- shutdown


def test_sigterm_lets_the_request_in_flight_finish(endless_checkpoint, tiling, image):
    """SIGTERM during a request: the request completes OK with its full answer, the process exits 0 in grace.

    Guards against shutdowns that drop in-flight work or hang on the worker threads.
    """
    grace = 30.0
    with running_cloud(endless_checkpoint, "--max-new-tokens", "1500", "--grace", str(grace)) as cloud:
        stub = cascade_pb2_grpc.CascadeStub(cloud.channel())
        request = cloud_request(tiling, image, max_new_tokens=1500, request_id="in-flight")
        call = stub.Answer.future(wire.request_to_proto(request), timeout=120)
        time.sleep(0.5)
        assert not call.done()
        cloud.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        reply = call.result(timeout=120)
        assert len(reply.token_ids) == 1500
        exit_code = cloud.proc.wait(timeout=grace + 10)
        assert exit_code == 0
        assert time.monotonic() - signalled < grace
        log = cloud.log_text()
        assert "request id=in-flight status=OK" in log
        assert "stitch-cloud stopped (exit code 0)" in log


# ----------------------------------------------------------------------------- TLS, auth, admission


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A P-256 certificate for 127.0.0.1 / localhost and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def hardened(endless_checkpoint, tmp_path_factory):
    """TLS, a bearer token from $STITCH_AUTH_TOKEN, one generation at a time and no queue."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--max-batch-size", "1", "--max-queue", "0")
    with running_cloud(
        endless_checkpoint, *args, env={"STITCH_AUTH_TOKEN": TOKEN}, root_certificate=cert.read_bytes()
    ) as process:
        yield process


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_tls_and_bearer_token(hardened: CloudProcess, tiling, image):
    """Over TLS, the right token is served; a missing or wrong one is UNAUTHENTICATED; health needs none.

    Guards against an auth check that is skipped, that compares the wrong
    header, or that also locks out orchestrators' health probes.
    """
    request = wire.request_to_proto(cloud_request(tiling, image, max_new_tokens=2))
    with hardened.channel() as channel:
        stub = cascade_pb2_grpc.CascadeStub(channel)
        assert len(stub.Answer(request, timeout=60, metadata=bearer(TOKEN)).token_ids) == 2
        for metadata in ((), bearer("wrong"), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Answer(request, timeout=60, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "bearer token" in caught.value.details()
    assert hardened.health() == SERVING  # no token
    with grpc.insecure_channel(hardened.address) as plain:  # a plaintext client cannot talk to it at all
        with pytest.raises(grpc.RpcError) as caught:
            cascade_pb2_grpc.CascadeStub(plain).Answer(request, timeout=5, metadata=bearer(TOKEN))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_full_queue_answers_resource_exhausted(hardened: CloudProcess, tiling, image):
    """With one slot and no queue, a burst of 16 gets RESOURCE_EXHAUSTED for some and OK for the rest.

    Guards against unbounded queues (latency grows without limit) and against
    admission bookkeeping that leaks a slot (the server would refuse forever after).
    """
    request = wire.request_to_proto(cloud_request(tiling, image, max_new_tokens=200))
    with hardened.channel() as channel:
        stub = cascade_pb2_grpc.CascadeStub(channel)
        start = threading.Barrier(16)

        def call(_: int) -> grpc.StatusCode:
            start.wait()
            try:
                stub.Answer(request, timeout=120, metadata=bearer(TOKEN))
            except grpc.RpcError as err:
                assert "queue full" in err.details()
                return err.code()
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(call, range(16)))
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
        assert codes.count(grpc.StatusCode.OK) >= 1
        small = wire.request_to_proto(cloud_request(tiling, image, max_new_tokens=2))
        assert len(stub.Answer(small, timeout=60, metadata=bearer(TOKEN)).token_ids) == 2
