"""docker/k8s/: the manifests parse and agree with the code they run, without a cluster.

As tests/test_docker.py does for compose: the Deployment's command parses with
the real ``stitch-cloud`` parser, its ports are the ones the flags bind, the
probes are gRPC health probes on that port for the services the server
reports, one GPU is requested, the model and the token come from read-only
volumes mounted where the flags point, the pod runs as the image's non-root
user, and the headless Service selects those pods on the same ports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_docker import DOCKER, by_keyword, cli_defaults, cloud_args, parse_dockerfile

from stitchvlm.shared.pb import cascade_pb2

K8S = DOCKER / "k8s"
CASCADE_SERVICE = cascade_pb2.DESCRIPTOR.services_by_name["Cascade"].full_name  # "stitch.v1.Cascade"


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    """Every object of every YAML file under docker/k8s, by kind (one object of each kind)."""
    yaml = pytest.importorskip("yaml")
    objects: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict) and "kind" in document, path.name
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
    return objects


@pytest.fixture(scope="module")
def pod(manifests) -> dict:
    return manifests["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (cloud,) = pod["containers"]
    return cloud


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_kustomization_lists_every_manifest(manifests):
    """Guards against a manifest that `kubectl apply -k` would silently leave out."""
    listed = set(manifests["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_command_parses_and_binds_the_declared_ports(container):
    """Guards against a command the CLI refuses (CrashLoopBackOff) or one that binds 127.0.0.1
    (unreachable from other pods) or a port other than the one declared and probed."""
    args = cloud_args(container["command"])
    assert args.host == "0.0.0.0" and args.port == cli_defaults().port == 50051
    assert ports(container) == {"grpc": args.port, "metrics": args.metrics_port}
    assert args.device.startswith("cuda") and args.auth_token is None  # the token is a file, not an argument
    assert "args" not in container  # the image's CMD would otherwise be appended


def test_probes_are_grpc_health_checks_on_the_served_port(container):
    """Guards against probes on another port or service name (never ready), a liveness probe
    without a startup probe (killed while the weights load) or a startup budget that a large
    checkpoint cannot load in."""
    port = cloud_args(container["command"]).port
    startup, ready, live = (container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness"))
    for probe in (startup, ready, live):
        assert set(probe["grpc"]) <= {"port", "service"} and probe["grpc"]["port"] == port
    assert startup["grpc"]["service"] == ready["grpc"]["service"] == CASCADE_SERVICE
    assert live["grpc"].get("service", "") in ("", CASCADE_SERVICE)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the Dockerfile's start period


def test_one_gpu_and_read_only_model_and_token(pod, container):
    """Guards against a pod scheduled without a GPU, a model volume the server could write to,
    and a token file path that is not the mounted Secret."""
    args = cloud_args(container["command"])
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    model = mounts[str(args.model)]
    assert model["readOnly"] is True and volumes[model["name"]]["persistentVolumeClaim"]["readOnly"] is True
    token_dir = mounts[str(args.auth_token_file.parent)]
    secret = volumes[token_dir["name"]]["secret"]
    assert token_dir["readOnly"] is True
    assert [item["path"] for item in secret["items"]] == [args.auth_token_file.name]


def test_runs_as_the_image_user_and_outlives_the_grace_period(pod, container):
    """Guards against a root container and a pod killed before the server's drain (--grace) ends."""
    useradd = next(
        i.args
        for i in by_keyword(parse_dockerfile(DOCKER / "cloud.Dockerfile"), "RUN")
        if "useradd" in i.args
    )
    uid = int(useradd.split("--uid", 1)[1].split()[0])
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}  # HF_HOME of the image
    assert pod["terminationGracePeriodSeconds"] > cloud_args(container["command"]).grace + 5


def test_headless_service_selects_the_pods_on_the_grpc_port(manifests, container):
    """Guards against a ClusterIP service (one connection pins every call to one replica), a
    selector that matches no pod, and a service port that is not the one the server binds."""
    service = manifests["Service"]["spec"]
    deployment = manifests["Deployment"]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert service["clusterIP"] == "None" and service.get("publishNotReadyAddresses", False) is False
    assert service["selector"].items() <= labels.items()
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    by_name = {p["name"]: p for p in service["ports"]}
    declared = ports(container)
    assert by_name["grpc"]["port"] == declared[by_name["grpc"]["targetPort"]] == cli_defaults().port
    assert by_name["grpc"]["appProtocol"] == "grpc"
    assert declared[by_name["metrics"]["targetPort"]] == by_name["metrics"]["port"]


def test_image_is_the_one_compose_builds(container):
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert container["image"] == compose["services"]["cloud"]["image"]
    assert Path(container["command"][0]).name == "stitch-cloud"
