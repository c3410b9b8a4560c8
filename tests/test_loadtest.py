"""``stitch-loadtest`` against a real ``stitch-cloud serve``: is every figure of its report true?

One server (tiny large checkpoint, ``--max-new-tokens 4``) and one edge export
(tiny checkpoint) serve the module; the questions are the synthetic test set.
The report's numbers are checked against what they must equal, measured
elsewhere: request / reply sizes against the server's own log of the
messages it parsed and built, image bytes against a PNG of the synthetic
image made here, socket bytes against the message bytes plus gRPC's framing,
routes against S and tau, counts against the per-request list and the SDK's
counters. tau for the mixed run is the median S of an all-cloud run, so both
routes occur.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from servers import png_bytes, running_cloud, tiling_of  # noqa: E402

from stitchvlm.edge.loadtest import main as loadtest_main  # noqa: E402
from stitchvlm.edge.loadtest import prepare_image, tile_grid_size  # noqa: E402
from stitchvlm.edge.relay import is_loopback, split_address  # noqa: E402
from stitchvlm.shared import synthetic  # noqa: E402
from stitchvlm.shared.layout import TilingConfig  # noqa: E402
from stitchvlm.shared.preprocess import compute_layout  # noqa: E402
from stitchvlm.shared.scoring import keep_count  # noqa: E402

N = 16
CONCURRENCY = 4
RETENTION = 0.25
MAX_NEW_TOKENS = 4  # also the server's limit: asking one more is OUT_OF_RANGE
GRPC_PREFIX = 5  # bytes gRPC puts before every message on the stream (flag + length)
FIELD = re.compile(r"(\w+)=(\S+)")


@pytest.fixture(scope="module")
def edge_dir(tiny_edge_dir) -> Path:
    return tiny_edge_dir


@pytest.fixture(scope="module")
def server(tiny_large_checkpoint):
    with running_cloud(tiny_large_checkpoint, "--max-new-tokens", str(MAX_NEW_TOKENS)) as process:
        yield process


def run(capsys, edge_dir: Path, server, *extra: str, n: int = N) -> dict:
    """One in-process ``stitch-loadtest`` run; the JSON report from its last stdout line."""
    argv = ["--edge", str(edge_dir), "--cloud", server.address, "-n", str(n), "-c", str(CONCURRENCY)]
    argv += ["--retention", str(RETENTION), "--max-new-tokens", str(MAX_NEW_TOKENS), "--cpu", *extra]
    assert loadtest_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| exit rate |" in stdout  # the markdown table comes first
    return json.loads(stdout.strip().splitlines()[-1])


def server_lines(server) -> dict[str, dict[str, str]]:
    """The server's request log lines by request id, as key -> value."""
    lines = [line for line in server.log_text().splitlines() if " request id=" in line]
    fields = [dict(FIELD.findall(line)) for line in lines]
    return {f["id"]: f for f in fields}


@pytest.fixture(scope="module")
def all_cloud(edge_dir, server, tmp_path_factory) -> dict:
    """tau above 1: every question escalates. Run once; its S values calibrate the mixed run."""
    out = tmp_path_factory.mktemp("report") / "all-cloud.json"
    argv = ["--edge", str(edge_dir), "--cloud", server.address, "-n", str(N), "-c", str(CONCURRENCY)]
    argv += ["--retention", str(RETENTION), "--max-new-tokens", str(MAX_NEW_TOKENS), "--cpu", "--tau", "1.01"]
    assert loadtest_main([*argv, "--json-out", str(out)]) == 0
    return json.loads(out.read_text())


def check_consistent(report: dict, n: int) -> None:
    """What holds for any report: counts add up, percentiles are ordered, routes follow S and tau."""
    counts, requests = report["counts"], report["requests"]
    ok = [r for r in requests if r["status"] == "OK"]
    errors = sum(counts["errors"].values())
    assert counts["answered"] + errors + counts["edge_errors"] + counts["not_started"] == n
    assert len(requests) == n - counts["not_started"]
    assert sorted(r["index"] for r in requests) == sorted(set(r["index"] for r in requests))
    edge = [r for r in ok if r["route"] == "edge"]
    assert counts["edge"] == len(edge) and counts["cloud"] == len(ok) - len(edge)
    assert report["exit_rate"] == pytest.approx(len(edge) / (len(ok) + errors))
    tau = report["settings"]["tau"]
    for r in ok:
        assert (r["route"] == "edge") == (r["s"] >= tau), r
    for route, row in report["latency_ms"].items():
        if row is not None:
            assert row["p50"] <= row["p95"] <= row["p99"], route
    assert report["latency_ms"]["all"]["count"] == len(ok)
    stats = report["sdk_stats"]
    assert stats["exited_on_edge"] == len(edge)
    assert stats["cloud_answered"] == counts["cloud"] and stats["failed"] == errors


def check_bytes(report: dict, server, images: list[bytes]) -> None:
    """Per request: sizes equal the server's log and the image sent; the socket carried at least that."""
    logged = server_lines(server)
    cloud = [r for r in report["requests"] if r["route"] == "cloud"]
    assert cloud
    for r in cloud:
        line = logged[r["request_id"]]
        assert line["status"] == "OK"
        assert r["request_bytes"]["total"] == int(line["request_bytes"])
        assert r["reply_bytes"] == int(line["reply_bytes"])
        parts = r["request_bytes"]
        assert parts["image"] == len(images[r["index"]])
        assert parts["image"] + parts["indices"] + parts["other"] == parts["total"]
        assert r["kept"] == keep_count(RETENTION, r["num_visual_tokens"])
        assert line["kept"] == f"{r['kept']}/{r['num_visual_tokens']}"
    sent = sum(r["request_bytes"]["total"] for r in cloud)
    received = sum(r["reply_bytes"] for r in cloud)
    socket = report["bytes"]["socket"]
    assert socket["upstream"] >= sent + GRPC_PREFIX * len(cloud)
    assert socket["downstream"] >= received + GRPC_PREFIX * len(cloud)
    assert report["bytes"]["request"]["total"]["sum"] == sent
    assert report["sdk_stats"]["bytes_sent"] == sent


def synthetic_pngs(n: int) -> list[bytes]:
    return [png_bytes(example.image) for example in synthetic.dataset("test", n, seed=0)]


def test_all_cloud_report_matches_the_server(all_cloud, server):
    """Guards against a report whose byte counts are not the messages really sent (wrong field,
    a re-encoded image, reply sizes of another message), a relay that miscounts, and counts or
    exit rates that do not add up."""
    check_consistent(all_cloud, N)
    assert all_cloud["counts"]["answered"] == N and all_cloud["exit_rate"] == 0.0
    check_bytes(all_cloud, server, synthetic_pngs(N))
    accuracy = all_cloud["accuracy"]
    correct = sum(r["correct"] for r in all_cloud["requests"])
    assert accuracy["labelled"] == N and accuracy["final"] == pytest.approx(correct / N)


def test_mixed_routes_at_the_median_score(all_cloud, edge_dir, server, capsys):
    """tau = median S of the all-cloud run: about half exit. Guards against an exit rate that is not
    the share of edge routes, a route that disagrees with S and tau, and scores that change with load."""
    scores = {r["index"]: r["s"] for r in all_cloud["requests"]}
    tau = float(np.median(list(scores.values())))
    report = run(capsys, edge_dir, server, "--tau", repr(tau))
    check_consistent(report, N)
    for r in report["requests"]:  # same question, same edge model: same S, whatever the concurrency
        assert r["s"] == pytest.approx(scores[r["index"]], rel=1e-5)
    assert 0 < report["counts"]["edge"] < N
    assert report["exit_rate"] == report["counts"]["edge"] / N
    check_bytes(report, server, synthetic_pngs(N))


def test_cloud_errors_are_counted_by_status(all_cloud, edge_dir, server, capsys):
    """A budget above the server's limit: every escalation fails OUT_OF_RANGE, every exit succeeds.
    Guards against errors lost, counted as answers, or under another status."""
    tau = float(np.median([r["s"] for r in all_cloud["requests"]]))
    argv = ["--edge", str(edge_dir), "--cloud", server.address, "-n", str(N), "-c", str(CONCURRENCY)]
    argv += ["--max-new-tokens", str(MAX_NEW_TOKENS + 1), "--tau", repr(tau), "--cpu", "--no-progress"]
    assert loadtest_main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    check_consistent(report, N)
    escalated = sum(r["s"] < tau for r in all_cloud["requests"])
    assert report["counts"]["errors"] == {"OUT_OF_RANGE": escalated}
    assert report["counts"]["answered"] == N - escalated == report["counts"]["edge"]
    assert all(r["route"] is None for r in report["requests"] if r["status"] == "OUT_OF_RANGE")


def test_time_budget_stops_the_run(edge_dir, server, capsys, tmp_path):
    """--max-seconds ends the run early; the questions never started are reported, not lost.
    The questions come from a JSONL file (one labelled image, cycled to -n)."""
    example = synthetic.make_example(7, "test")
    (tmp_path / "q.png").write_bytes(png_bytes(example.image))
    row = {"image": "q.png", "question": example.question, "answer": example.answer}
    (tmp_path / "questions.jsonl").write_text(json.dumps(row) + "\n")
    extra = ("--questions", str(tmp_path / "questions.jsonl"), "--tau", "0", "--max-seconds", "0.3")
    report = run(capsys, edge_dir, server, *extra, "--no-progress", n=2000)
    check_consistent(report, 2000)
    assert report["counts"]["not_started"] > 0
    assert report["bytes"]["socket"]["upstream"] == 0  # tau 0: the cloud was never called
    answers = {r["correct"] for r in report["requests"]}
    assert len(answers) == 1 and report["accuracy"]["labelled"] == report["counts"]["answered"]


def test_tiles_and_jpeg_with_a_started_cloud(tiny_checkpoint, tiny_large_checkpoint, tmp_path):
    """--edge-model exports into the cache, --start-cloud runs and stops its own server, the image is
    resized to the tile grid and sent as JPEG; all in a process where importing torch fails.
    Guards against torch in the load test, a cloud left running, and a resized image with another layout."""
    out = tmp_path / "report.json"
    log = tmp_path / "cloud.log"
    argv = ["--edge-model", str(tiny_checkpoint), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--start-cloud", str(tiny_large_checkpoint), "--cloud-log", str(log), "-n", "6", "-c", "2"]
    argv += ["--tau", "1.01", "--max-new-tokens", "3", "--image-mode", "tiles", "--jpeg-quality", "70"]
    argv += ["--cpu", "--json-out", str(out), "--no-progress"]
    code = f"import sys; sys.modules['torch'] = None; from stitchvlm.edge.loadtest import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    assert "stitch-cloud stopped (exit code 0)" in log.read_text()
    check_consistent(report, 6)
    assert report["counts"]["cloud"] == 6 and report["image"]["resized"] == 6
    tiling = tiling_of(tiny_checkpoint)
    expected = []
    for example in synthetic.dataset("test", 6, seed=0):
        size = tile_grid_size(*example.image.size, tiling)
        assert compute_layout(*size, tiling) == compute_layout(*example.image.size, tiling)
        buffer = io.BytesIO()
        example.image.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=70)
        expected.append(buffer.getvalue())
    for r in report["requests"]:
        assert r["request_bytes"]["image"] == len(expected[r["index"]])
        assert r["num_visual_tokens"] == compute_layout(448, 448, tiling).num_visual_tokens
    assert report["bytes"]["socket"]["upstream"] >= report["bytes"]["request"]["total"]["sum"]


def test_prepare_image_resizes_to_the_tile_grid():
    """Guards against a resize to another size than the tiler's canvas, an upscale that costs bytes,
    and a re-encode when nothing was asked for."""
    tiling = TilingConfig(tile_size=64, min_tiles=1, max_tiles=6, tokens_per_tile=16)
    wide = png_bytes(Image.new("RGB", (3000, 30), (200, 30, 30)))  # a 6 x 1 grid: canvas 384 x 64
    prepared = prepare_image(wide, tiling, "tiles", None)
    assert prepared.resized and not prepared.layout_fallback
    assert Image.open(io.BytesIO(prepared.data)).size == (384, 64)
    small = png_bytes(
        Image.new("RGB", (100, 100), (30, 30, 200))
    )  # 2 x 2 grid: its 128 x 128 canvas is larger
    assert prepare_image(small, tiling, "tiles", None).data == small
    assert prepare_image(small, tiling, "original", None).data == small
    jpeg = prepare_image(small, tiling, "original", 50)
    assert Image.open(io.BytesIO(jpeg.data)).format == "JPEG" and not jpeg.resized


def test_tile_grid_canvas_keeps_the_layout_of_any_size():
    """The InternVL tiling gives the grid canvas the layout of the image it came from, for every size
    tried (ties between 1 x 1 and 2 x 2 grids included): a tiles-mode request never needs the fallback."""
    rng = np.random.default_rng(0)
    for max_tiles in (4, 6, 12):
        tiling = TilingConfig(tile_size=64, min_tiles=1, max_tiles=max_tiles, tokens_per_tile=16)
        sizes = [tuple(int(v) for v in rng.integers(8, 1200, size=2)) for _ in range(400)]
        sizes += [(90, 90), (91, 91), (128, 64), (127, 64), (900, 450)]  # around the area ties
        for width, height in sizes:
            canvas = tile_grid_size(width, height, tiling)
            assert compute_layout(*canvas, tiling) == compute_layout(width, height, tiling), (width, height)


def test_prepare_image_falls_back_when_the_layout_would_change(monkeypatch):
    """A tiling policy under which the canvas had another layout: the original bytes are sent and
    the fallback counted, never a resized image whose kept indices would name other tokens."""
    import stitchvlm.edge.loadtest as loadtest

    tiling = TilingConfig(tile_size=64, min_tiles=1, max_tiles=6, tokens_per_tile=16)
    real = loadtest.compute_layout

    def other_layout_for_canvases(width, height, config):  # the canvas (a multiple of 64) gets 1 x 1
        return real(64, 64, config) if width % 64 == 0 and height % 64 == 0 else real(width, height, config)

    monkeypatch.setattr(loadtest, "compute_layout", other_layout_for_canvases)
    data = png_bytes(Image.new("RGB", (3000, 30), (200, 30, 30)))
    prepared = prepare_image(data, tiling, "tiles", None)
    assert prepared.layout_fallback and not prepared.resized and prepared.data == data
    assert Image.open(io.BytesIO(prepare_image(data, tiling, "tiles", 60).data)).size == (3000, 30)


def test_loopback_rule():
    """The load test refuses to load a remote cloud it was not told about; addresses parse exactly."""
    assert split_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_address("[::1]:8080") == ("::1", 8080)
    assert is_loopback("localhost") and is_loopback("127.3.2.1") and is_loopback("::1")
    assert not is_loopback("10.0.0.1") and not is_loopback("cloud")
    with pytest.raises(SystemExit) as refused:
        loadtest_main(["--edge", "/", "--cloud", "10.1.2.3:50051"])
    assert refused.value.code == 2
    for bad in ("cloud", "cloud:", "cloud:99999", "[::1:50051"):
        with pytest.raises(ValueError):
            split_address(bad)
