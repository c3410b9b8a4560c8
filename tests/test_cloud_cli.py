"""``stitch-cloud serve`` refusing what it cannot serve: checkpoints and auth token files.

End to end through the real CLI in a subprocess (``tests/servers.py``): a
checkpoint whose chat template cannot place the image must stop the server
before it ever reports SERVING, and ``--auth-token-file`` must be the token the
server enforces, with a missing or empty file a usage error (exit 2).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import make_test_image
from servers import SERVING, cloud_request, running_cloud, start_cloud, tiling_of

from stitchvlm.shared import wire
from stitchvlm.shared.pb import cascade_pb2_grpc

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def broken_template_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with a chat template whose image entry renders nothing."""
    from stitchvlm.cloud.checkpoints import INTERNVL_CHAT_TEMPLATE

    out = tmp_path_factory.mktemp("broken") / "no-image-template"
    shutil.copytree(tiny_checkpoint, out)
    (out / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE.replace("{{ '<IMG_CONTEXT>\\n' }}", ""))
    return out


def test_serve_refuses_a_checkpoint_whose_template_drops_the_image(broken_template_checkpoint, tmp_path):
    """Guards against the server going SERVING on a checkpoint it cannot serve and then answering
    every request INVALID_ARGUMENT "chat template placed 0 image placeholders" (issue 13, defect 5)."""
    process = start_cloud(broken_template_checkpoint, log_path=tmp_path / "cloud.log")
    statuses = []
    deadline = time.monotonic() + 120
    while process.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):  # not accepting yet, or gone already
            statuses.append(process.health(timeout=1.0))
        time.sleep(0.05)
    if process.proc.poll() is None:
        process.stop()
        pytest.fail(f"server still running after 120 s:\n{process.log_tail()}")
    log = process.log_text()
    assert process.proc.returncode == 1, log
    assert SERVING not in statuses
    assert "stitch-cloud ready" not in log
    assert "the chat template cannot be served" in log
    assert "0 image placeholders" in log and str(broken_template_checkpoint) in log


# ----------------------------------------------------------------------------- --auth-token-file


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stitchvlm.cloud.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_auth_token_file_missing_or_empty_is_a_usage_error(tiny_checkpoint, tmp_path, content):
    """Guards against a missing or empty token file starting an unauthenticated server
    (or one nobody can call) instead of a clear usage error (issue 13, defect 7)."""
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    result = _cli("--model", str(tiny_checkpoint), "--port", "0", "--auth-token-file", str(token_file))
    assert result.returncode == 2, result.stderr
    expected = "no such file" if content is None else "is empty"
    assert f"--auth-token-file {token_file}" in result.stderr and expected in result.stderr


def test_auth_token_file_and_auth_token_are_exclusive(tiny_checkpoint, tmp_path):
    """Guards against two token sources where one silently wins."""
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    result = _cli(
        "--model", str(tiny_checkpoint), "--auth-token", "x", "--auth-token-file", str(token_file)
    )  # fmt: skip
    assert result.returncode == 2 and "not allowed with argument" in result.stderr, result.stderr


def test_token_from_file_is_the_one_the_server_enforces(tiny_checkpoint, tmp_path):
    """Guards against --auth-token-file being parsed but not used: the file's token (trailing
    newline stripped) must be accepted and another token refused UNAUTHENTICATED."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-from-file\n")
    request = wire.request_to_proto(
        cloud_request(tiling_of(tiny_checkpoint), make_test_image(96, 64, seed=3), max_new_tokens=2)
    )
    # the environment variable is the fallback; the file must win over it
    env = {"STITCH_AUTH_TOKEN": "env-token"}
    with running_cloud(tiny_checkpoint, "--auth-token-file", str(token_file), env=env) as cloud:
        with cloud.channel() as channel:
            answer = cascade_pb2_grpc.CascadeStub(channel).Answer
            reply = answer(request, metadata=[("authorization", "Bearer s3cret-from-file")], timeout=60)
            assert reply.num_visual_tokens == request.num_visual_tokens and len(reply.token_ids) >= 1
            for metadata in ([("authorization", "Bearer env-token")], []):
                with pytest.raises(grpc.RpcError) as error:
                    answer(request, metadata=metadata, timeout=60)
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "s3cret-from-file" not in " ".join(cloud.proc.args)
