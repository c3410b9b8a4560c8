"""A Node.js client built from the .proto and proto/stitch/v1/LAYOUT.md alone, against the real server.

``tests/node/client.js`` implements the tiling rule, the SHA-256 layout
fingerprint and the top-R count from the spec, checks itself against every
entry of ``layout_vectors.json``, reads the tiling from the checkpoint's JSON
files and the image size from the PNG header, and sends a PLAIN-encoded
request at R = 100% with ``@grpc/grpc-js`` (installed from the npm registry
into ``tests/node/node_modules`` the first time, git-ignored). The server's
answer must be the one the Python edge path gets for the same image and
prompt: the same token ids, computed from the same layout and fingerprint.

Skipped, with the reason, when node or npm is missing or the packages cannot
be installed (no registry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_test_image
from servers import cloud_request, png_bytes, running_cloud, tiling_of

from stitchvlm.shared import wire
from stitchvlm.shared.layout import layout_fingerprint
from stitchvlm.shared.pb import cascade_pb2_grpc
from stitchvlm.shared.preprocess import compute_layout

pytest.importorskip("torch")

ROOT_DIR = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT_DIR / "tests" / "node"
PROTO = ROOT_DIR / "proto" / "stitch" / "v1" / "cascade.proto"
VECTORS = ROOT_DIR / "proto" / "stitch" / "v1" / "layout_vectors.json"
PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")
TOKEN = "node-client-secret"
PROMPT = "What colour is the circle?"
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with tests/node's packages installed (npm ci from the lock file)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js client test (not on PATH)")
    if not all((NODE_DIR / "node_modules" / package / "package.json").is_file() for package in PACKAGES):
        try:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=180,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci took over 180 s (no npm registry reachable?)")
        if done.returncode != 0:
            pytest.skip(f"npm ci failed (no npm registry reachable?): {done.stderr.strip()[-500:]}")
    return node


@pytest.fixture(scope="module")
def cloud(tiny_checkpoint, node):
    """One server for the module, the token from the environment (as the Node client sends it)."""
    with running_cloud(tiny_checkpoint, env={"STITCH_AUTH_TOKEN": TOKEN}) as process:
        yield process


def run_client(node: str, *args: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(
        [node, str(NODE_DIR / "client.js"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, f"client.js exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def test_node_client_reproduces_the_layout_vectors(node):
    """Guards against a spec that another language cannot follow to the published vectors
    (ambiguous candidate order, float formatting, byte order, 64-bit precision)."""
    checked = run_client(node, "--vectors", str(VECTORS))["vectors"]
    assert checked["failures"] == []
    assert checked["layouts"] == len(json.loads(VECTORS.read_text())["layouts"]) >= 25
    assert checked["keep_counts"] >= 7


@pytest.mark.parametrize(("width", "height"), [(150, 90), (40, 200)])
def test_node_client_gets_the_python_answer(node, cloud, tiny_checkpoint, tmp_path, width, height):
    """Guards against the wire contract working only for the Python client: a Node client from the
    .proto and LAYOUT.md alone must compute the layout and fingerprint the cloud accepts and get
    the answer the Python path gets (R = 100%, PLAIN indices, fixed64 as a decimal string)."""
    image = make_test_image(width, height, seed=width)
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(image))
    tiling = tiling_of(tiny_checkpoint)
    python_request = cloud_request(tiling, image, prompt=PROMPT, retention=1.0, max_new_tokens=MAX_NEW_TOKENS)
    with cloud.channel() as channel:
        expected = cascade_pb2_grpc.CascadeStub(channel).Answer(
            wire.request_to_proto(python_request), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=60
        )
    out = run_client(
        node,
        "--address", cloud.address, "--proto", str(PROTO), "--checkpoint", str(tiny_checkpoint),
        "--image", str(path), "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS),
        env={"STITCH_AUTH_TOKEN": TOKEN},
    )["answer"]  # fmt: skip
    assert "error" not in out, out
    computed, reply = out["computed"], out["reply"]
    layout = compute_layout(width, height, tiling)
    assert (computed["width"], computed["height"]) == (width, height)
    assert {
        k: computed["layout"][k] for k in ("grid_columns", "grid_rows", "thumbnail", "num_visual_tokens")
    } == {
        "grid_columns": layout.grid_columns,
        "grid_rows": layout.grid_rows,
        "thumbnail": layout.thumbnail,
        "num_visual_tokens": layout.num_visual_tokens,
    }
    assert layout.grid_columns * layout.grid_rows > 1  # a real grid, thumbnail included
    assert computed["fingerprint_decimal"] == str(layout_fingerprint(layout, tiling))
    assert computed["kept"] == reply["kept_visual_tokens"] == layout.num_visual_tokens
    assert [int(t) for t in reply["token_ids"]] == list(expected.token_ids)
    assert len(expected.token_ids) >= 1 and reply["text"] == expected.text
    assert reply["num_visual_tokens"] == expected.num_visual_tokens == layout.num_visual_tokens
