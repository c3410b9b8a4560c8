"""The docker/ files, checked without a Docker engine: they parse, and they agree with the code.

No engine runs here, so these tests read the Dockerfiles with a small
instruction parser (continuations, comments, JSON and shell forms) and the
compose file with PyYAML, and check them against the command lines they run:
every CMD / compose command parses with the real CLI parser, ports and health
checks match the CLI defaults, model directories are mounted volumes, the
edge image installs ``.[edge]`` and nothing that brings torch, the images run
as a non-root user, and every COPY source exists and survives the
``.dockerignore``. The health probe the images run is executed against a real
gRPC health service.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import socket
import subprocess
import sys
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stitchvlm.edge.loadtest import build_parser as loadtest_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROBE = "/usr/local/bin/stitch-health-probe"
KEYWORDS = {
    "FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "VOLUME", "EXPOSE",
    "HEALTHCHECK", "CMD", "ENTRYPOINT", "LABEL", "SHELL",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where it starts


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Logical instructions: backslash continuations joined, comment lines (also inside one) dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        pending += (
            " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        )
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, f"{path.name}: continuation at end of file"
    return instructions


def exec_form(args: str) -> list[str]:
    """A JSON-array argument (CMD ["a", "b"]); fails for the shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), args
    return value


def cloud_parser() -> argparse.ArgumentParser:
    pytest.importorskip("torch")  # stitchvlm.cloud.cli imports the engine
    from stitchvlm.cloud.cli import build_parser

    return build_parser()


def cli_defaults() -> argparse.Namespace:
    """What ``stitch-cloud serve`` does when no flag says otherwise."""
    return cloud_parser().parse_args(["serve", "--model", "."])


def cloud_args(command: list[str]) -> argparse.Namespace:
    """A cloud command line through the real ``stitch-cloud`` parser."""
    assert command[:2] == ["stitch-cloud", "serve"], command
    return cloud_parser().parse_args(command[1:])


def loadtest_args(command: list[str]) -> argparse.Namespace:
    assert command[0] == "stitch-loadtest", command
    return loadtest_parser().parse_args(command[1:])


def by_keyword(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


@pytest.fixture(scope="module", params=["edge", "cloud"])
def image(request) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile(DOCKER / f"{request.param}.Dockerfile")


def test_dockerfiles_are_well_formed(image):
    """Guards against a typo'd instruction, a base image without a pinned tag, a shell-form CMD
    (signals would go to a shell, not the server), and a COPY of a path that is not in the repo."""
    name, instructions = image
    assert all(i.keyword in KEYWORDS for i in instructions), [
        i for i in instructions if i.keyword not in KEYWORDS
    ]
    first = next(i for i in instructions if i.keyword != "ARG")
    assert first.keyword == "FROM"
    args = dict(a.args.split("=", 1) for a in instructions[: instructions.index(first)])
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], first.args)
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), base
    assert len(by_keyword(instructions, "FROM")) == 1
    (cmd,) = by_keyword(instructions, "CMD")
    exec_form(cmd.args)
    for volume in by_keyword(instructions, "VOLUME"):
        assert exec_form(volume.args) == ["/models"]
    for env in by_keyword(instructions, "ENV"):
        assert all(re.fullmatch(r"\w+=\S+", pair) for pair in env.args.split()), env
    for copy in by_keyword(instructions, "COPY"):
        *sources, destination = copy.args.split()
        assert destination and not copy.args.startswith("--from")
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"


def test_images_run_as_a_non_root_user(image):
    """The last USER is a user the image creates, and nothing runs as root after it."""
    _, instructions = image
    users = by_keyword(instructions, "USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].args
    assert user not in ("root", "0") and not user.startswith("0:")
    assert any(re.search(rf"useradd\b.*\b{user}\b", i.args) for i in by_keyword(instructions, "RUN"))
    after = instructions[instructions.index(users[-1]) :]
    assert not by_keyword(after, "RUN") and not by_keyword(after, "USER")[1:]


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """The arguments of every ``pip install`` in the RUN lines."""
    found = []
    for run in by_keyword(instructions, "RUN"):
        for command in run.args.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                found.append(words[2:])
    return found


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extras_installed(instructions: list[Instruction]) -> set[str]:
    (install,) = pip_installs(instructions)
    projects = [w for w in install if w.startswith(".")]
    assert len(projects) == 1, install
    match = re.fullmatch(r"\.\[([\w,]+)\]", projects[0])
    return set(match[1].split(",")) if match else set()


def test_edge_image_installs_the_edge_extra_and_no_torch():
    """Guards against torch reaching the edge image (DESIGN invariant 5), through the pip command,
    the extras it names, or a dependency of them."""
    instructions = parse_dockerfile(DOCKER / "edge.Dockerfile")
    assert extras_installed(instructions) == {"edge"}
    (install,) = pip_installs(instructions)
    assert not any("torch" in word for word in install)
    project = pyproject()["project"]
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["edge"]]:
        assert not re.match(r"(torch|transformers|optimum)\b", requirement), requirement
    assert any("find_spec('torch') is not None" in run.args for run in by_keyword(instructions, "RUN"))


def test_cloud_image_installs_the_cloud_extra():
    instructions = parse_dockerfile(DOCKER / "cloud.Dockerfile")
    assert extras_installed(instructions) == {"cloud"}
    cloud = pyproject()["project"]["optional-dependencies"]["cloud"]
    assert any(r.startswith("prometheus-client") for r in cloud)  # cloud/metrics.py needs it


def test_cloud_image_ports_health_and_command_agree_with_the_cli():
    """EXPOSE, HEALTHCHECK and CMD name the port stitch-cloud listens on by default; the CMD parses
    with the real parser and binds all interfaces (127.0.0.1, the CLI default, is unreachable
    from outside a container)."""
    instructions = parse_dockerfile(DOCKER / "cloud.Dockerfile")
    default_port = cli_defaults().port
    exposed = {int(p) for e in by_keyword(instructions, "EXPOSE") for p in e.args.split()}
    args = cloud_args(exec_form(by_keyword(instructions, "CMD")[0].args))
    assert args.port == default_port == 50051 and args.host == "0.0.0.0"
    assert {default_port, args.metrics_port} <= exposed
    assert args.model.parent == Path("/models")
    (check,) = by_keyword(instructions, "HEALTHCHECK")
    options, _, command = check.args.partition("CMD ")
    for option in options.split():
        assert re.fullmatch(r"--(interval|timeout|start-period|start-interval|retries)=\d+[smh]?", option)
    probe = exec_form(command)
    assert (
        probe[:2] == ["python", PROBE] and probe[probe.index("--address") + 1] == f"127.0.0.1:{default_port}"
    )
    assert any(c.args.split()[-1] == PROBE for c in by_keyword(instructions, "COPY"))


def test_edge_image_command_targets_the_cloud_service():
    instructions = parse_dockerfile(DOCKER / "edge.Dockerfile")
    args = loadtest_args(exec_form(by_keyword(instructions, "CMD")[0].args))
    host, port = args.cloud.rsplit(":", 1)
    assert int(port) == cli_defaults().port and host in args.allow_remote
    assert args.edge.parent == Path("/models")
    assert [h.args for h in by_keyword(instructions, "HEALTHCHECK")] == ["NONE"]


def interpolate(value):
    """Compose's ``${NAME:-default}`` / ``${NAME}`` with no variables set."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m[2] or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")  # PyYAML: installed here, not yet in the dev extra
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()))


def mounts(service: dict) -> dict[str, dict]:
    """Container path -> long-syntax volume entry."""
    return {v["target"]: v for v in service["volumes"]}


def test_compose_cloud_service(compose):
    """The compose cloud builds the cloud image, publishes and probes the CLI's default port, and
    serves a model directory that is a mounted volume (read-only)."""
    cloud = compose["services"]["cloud"]
    assert (
        DOCKER / cloud["build"]["context"] / cloud["build"]["dockerfile"]
    ).resolve() == DOCKER / "cloud.Dockerfile"
    args = cloud_args(cloud["command"])
    default_port = cli_defaults().port
    assert args.port == default_port and args.host == "0.0.0.0"
    assert f"{default_port}:{default_port}" in cloud["ports"]
    assert f"{args.metrics_port}:{args.metrics_port}" in cloud["ports"]
    volume = mounts(cloud)[str(args.model)]
    assert volume["type"] == "bind" and volume["read_only"] is True and volume["source"]
    test = cloud["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["python", PROBE]
    assert test[test.index("--address") + 1] == f"127.0.0.1:{default_port}"
    dockerfile_check = by_keyword(parse_dockerfile(DOCKER / "cloud.Dockerfile"), "HEALTHCHECK")[0].args
    assert exec_form(dockerfile_check.partition("CMD ")[2]) == test[1:]


def test_compose_edge_service(compose):
    """The compose edge waits for a healthy cloud, load-tests it by service name on the default
    port (allowed as remote by name), and reads its export from a mounted volume."""
    edge = compose["services"]["edge"]
    assert (
        DOCKER / edge["build"]["context"] / edge["build"]["dockerfile"]
    ).resolve() == DOCKER / "edge.Dockerfile"
    assert edge["depends_on"]["cloud"]["condition"] == "service_healthy"
    args = loadtest_args(edge["command"])
    assert args.cloud == f"cloud:{cli_defaults().port}" and "cloud" in args.allow_remote
    volumes = mounts(edge)
    assert volumes[str(args.edge)]["read_only"] is True and volumes[str(args.edge)]["type"] == "bind"
    assert str(args.json_out.parent) in volumes
    assert set(compose["volumes"]) == {v["source"] for v in volumes.values() if v["type"] == "volume"}


@pytest.mark.parametrize("name", ["edge", "cloud"])
def test_dockerignore_keeps_every_copied_path(name):
    """BuildKit reads ``<Dockerfile>.dockerignore``: a COPY source it excluded would fail the build."""
    rules = [
        line.strip()
        for line in (DOCKER / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate, pattern = rule.startswith("!"), rule.lstrip("!")
            parts = Path(path).parts
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatch(p, pattern) or pattern == "**" for p in prefixes):
                keep = negate
        return keep

    for copy in by_keyword(parse_dockerfile(DOCKER / f"{name}.Dockerfile"), "COPY"):
        for source in copy.args.split()[:-1]:
            files = [source] if (ROOT / source).is_file() else [
                str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py") if "__pycache__" not in p.parts
            ]  # fmt: skip
            assert files and all(included(f) for f in files), (name, source)
    assert not included("runs/x.json") and not included("shared/__pycache__/codec.cpython-311.pyc")
    # the embedded pair ships (the demo and --embedded serve it); the crowded family's pair does not
    assert included("shared/models/synthetic-large/model.safetensors")
    assert not included("shared/models/crowded/crowded-large/model.safetensors")


@pytest.fixture
def health_server():
    """A gRPC server with only the standard health service; the test sets its status."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def run_probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DOCKER / "health_probe.py"), *args], capture_output=True, text=True, timeout=60
    )


def test_health_probe_exit_codes(health_server):
    """The probe the HEALTHCHECKs run: 0 only for SERVING; 1 for NOT_SERVING, an unknown service
    and nothing listening. Guards against a probe that passes a loading or dead server."""
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = run_probe("--address", address)
    assert done.returncode == 0 and "SERVING" in done.stdout
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    done = run_probe("--address", address)
    assert done.returncode == 1 and "NOT_SERVING" in done.stdout
    assert run_probe("--address", address, "--service", "nope").returncode == 1  # NOT_FOUND
    with socket.socket() as probe_socket:  # a port that was free a moment ago: nothing listens
        probe_socket.bind(("127.0.0.1", 0))
        free_port = probe_socket.getsockname()[1]
    done = run_probe("--address", f"127.0.0.1:{free_port}", "--timeout", "1")
    assert done.returncode == 1 and "no answer (UNAVAILABLE)" in done.stdout
