"""``stitch demo``: its pieces, then the real thing (export subprocess, ``stitch-cloud`` subprocess,
gRPC, pictures) on the tiny checkpoints and on the embedded synthetic pair.

References: hand-computed token boxes and pixel values for the pictures; the
dataset's own answers and ``exact_match`` for accuracy; the printed table for
routes; ``shared/models/accuracy.json`` (the model card's numbers) for how well
the embedded pair must do.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stitchvlm.edge import demo
from stitchvlm.shared.layout import Layout
from stitchvlm.shared.scoring import keep_count
from stitchvlm.shared.synthetic import dataset, exact_match

# One printed table row: index, ..., route (+ "!" when degraded), S, kept/|V|, bytes, ms, " x" when wrong.
ROW = re.compile(
    r"^\s*(?P<index>\d+)\s+.*\s(?P<route>edge|cloud)!?\s+(?P<s>[\d.]+)\s+(?P<kept>\d+)/(?P<visual>\d+)"
    r"\s+(?P<bytes>\d+)\s+(?P<ms>\d+)(?P<wrong> x)?$"
)
EXIT_LINE = re.compile(r"^exit rate\s+(?P<rate>[\d.]+)\s+\((?P<edge>\d+)/(?P<n>\d+) answered on the edge")
ACCURACY_LINE = re.compile(r"^accuracy\s+(?P<acc>[\d.]+)\s+\((?P<hits>\d+)/(?P<n>\d+) exact matches")


def _row(index: int, route: str, correct: bool, bytes_sent: int, degraded: bool = False) -> demo.DemoRow:
    return demo.DemoRow(
        index=index,
        qtype="colour",
        question="What colour is the circle?",
        truth="red",
        answer="red" if correct else "blue",
        route=route,
        correct=correct,
        s=0.5,
        kept=4,
        num_visual_tokens=40,
        bytes_sent=bytes_sent,
        latency_ms=1.0,
        edge_answer="red",
        degraded=degraded,
        picture="",
    )


def test_summarize_counts_routes_matches_and_bytes():
    """Guards against an exit rate counted from cloud routes or from escalations that degraded to the
    edge's answer, accuracy over the wrong denominator, or bytes summed over questions never sent."""
    rows = [_row(0, "edge", True, 0), _row(1, "cloud", False, 900), _row(2, "cloud", True, 1100)]
    rows += [_row(3, "edge", False, 0), _row(4, "edge", True, 700, degraded=True)]
    summary = demo.summarize(rows)
    assert (summary.n, summary.exit_rate, summary.accuracy, summary.total_bytes) == (5, 0.4, 0.6, 2700)
    assert summary.degraded == 1
    with pytest.raises(ValueError):
        demo.summarize([])


# 2 x 1 grid of 2 x 2-token tiles plus a thumbnail over a 100 x 50 image: grid cells are 25 x 25 px,
# thumbnail cells 50 x 25 px.
LAYOUT = Layout(tile_size=64, grid_columns=2, grid_rows=1, thumbnail=True, tokens_per_tile=4)


def test_kept_masks_light_exactly_the_kept_tokens_boxes():
    """Guards against pictures that highlight other pixels than the kept tokens stand for: tile order,
    raster order within a tile, or thumbnail tokens drawn onto the grid."""
    grid, thumb = demo.kept_masks(LAYOUT, np.array([0, 5, 11]), 100, 50)
    expected_grid = np.zeros((50, 100), bool)
    expected_grid[0:25, 0:25] = True  # token 0: tile 0, cell (0, 0)
    expected_grid[0:25, 75:100] = True  # token 5: tile 1, cell (1, 0) -> raster column 3
    expected_thumb = np.zeros((50, 100), bool)
    expected_thumb[25:50, 50:100] = True  # token 11: thumbnail cell (1, 1)
    np.testing.assert_array_equal(grid, expected_grid)
    np.testing.assert_array_equal(thumb, expected_thumb)


def test_picture_keeps_kept_pixels_and_dims_the_rest():
    """Guards against a picture that dims the kept tokens instead of the others, or drops the
    thumbnail panel."""
    image = Image.new("RGB", (100, 50), (200, 100, 50))
    picture = demo.highlight_kept_tokens(image, LAYOUT, np.array([0, 11]), caption=("q", "a"))
    assert picture.size == (100 + 8 + 50, 50 + 6 + 16 * 2)
    pixels = np.asarray(picture)
    np.testing.assert_array_equal(pixels[10, 10], [200, 100, 50])  # token 0: kept
    np.testing.assert_array_equal(pixels[10, 60], [60, 30, 15])  # not kept: 0.3 of the value
    np.testing.assert_array_equal(pixels[20, 108 + 40], [200, 100, 50])  # thumbnail token 11, half size
    np.testing.assert_array_equal(pixels[5, 108 + 5], [60, 30, 15])


def test_ensure_export_reuses_an_up_to_date_export_and_redoes_a_stale_one(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """Guards against exporting on every run, reusing an export of another checkpoint version, or
    reusing a half-written export."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    calls = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        calls.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(demo.subprocess, "run", counting_run)
    first = demo.ensure_export(checkpoint, tmp_path / "cache", verify=False)
    assert len(calls) == 1 and (first / "stitch_edge.json").is_file()
    assert demo.ensure_export(checkpoint, tmp_path / "cache", verify=False) == first
    assert len(calls) == 1

    (first / "stitch_edge.json").unlink()  # an export the runtime cannot read
    assert demo.ensure_export(checkpoint, tmp_path / "cache", verify=False) == first
    assert len(calls) == 2 and (first / "stitch_edge.json").is_file()

    (checkpoint / "generation_config.json").write_text(
        (checkpoint / "generation_config.json").read_text().replace("{", '{\n  "_note": "changed",', 1)
    )
    changed = demo.ensure_export(checkpoint, tmp_path / "cache", verify=False)
    assert changed != first and len(calls) == 3
    assert json.loads((changed / demo.EXPORT_STAMP).read_text())["checkpoint_sha256"] == (
        demo.checkpoint_digest(checkpoint)
    )


# ----------------------------------------------------------------------------- the real thing


# ``python -m stitchvlm.edge.demo`` with torch and transformers unimportable in the demo's own process
# (its export and server subprocesses are fresh interpreters and may use them).
_NO_TORCH_DEMO = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked: the demo process must not need it")
            return None

    sys.meta_path.insert(0, NoTorch())
    from stitchvlm.edge.demo import main

    sys.exit(main(sys.argv[1:]))
    """
)


def run_demo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", _NO_TORCH_DEMO, "demo", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def check_demo_output(done: subprocess.CompletedProcess, out: Path, n: int, retention: float) -> dict:
    """Everything that must hold for any run: table, summary, pictures, stopped server."""
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    rows = [m for line in lines if (m := ROW.match(line))]
    summary = json.loads((out / demo.SUMMARY_NAME).read_text())
    assert len(rows) == n == summary["n"] == len(summary["rows"])
    assert summary["degraded"] == 0, "the local cloud failed a request; see cloud.log"
    examples = dataset("test", n, seed=0)
    edge_routes = 0
    for printed, row, example in zip(rows, summary["rows"], examples, strict=True):
        assert row["truth"] == example.answer and row["question"] == example.question
        assert row["correct"] == exact_match(row["answer"], example.answer)
        assert printed["route"] == row["route"] and bool(printed["wrong"]) == (not row["correct"])
        assert int(printed["kept"]) == keep_count(retention, int(printed["visual"]))
        if row["route"] == "edge":
            edge_routes += 1
            assert row["answer"] == row["edge_answer"] and row["bytes_sent"] == 0
        else:
            assert row["bytes_sent"] == int(printed["bytes"]) > 0
        picture = Image.open(row["picture"])
        assert picture.width > example.image.width and picture.height > example.image.height
    exit_line = next(m for line in lines if (m := EXIT_LINE.match(line)))
    accuracy_line = next(m for line in lines if (m := ACCURACY_LINE.match(line)))
    assert summary["exit_rate"] == pytest.approx(edge_routes / n)
    assert float(exit_line["rate"]) == pytest.approx(edge_routes / n, abs=5e-4)
    hits = sum(exact_match(r["answer"], e.answer) for r, e in zip(summary["rows"], examples, strict=True))
    assert summary["accuracy"] == pytest.approx(hits / n) and int(accuracy_line["hits"]) == hits
    assert summary["total_bytes"] == sum(r["bytes_sent"] for r in summary["rows"])
    assert len(list(out.glob("q*.png"))) == n
    assert "stitch-cloud stopped" in (out / "cloud.log").read_text()
    return summary


def test_demo_end_to_end_on_tiny_checkpoints(tiny_checkpoint, tiny_large_checkpoint, tmp_path):
    """Guards against the demo's table, summary and pictures disagreeing with what the SDK returned,
    a server left running, and the demo process needing torch (DESIGN invariant 5). tau 2 sends
    every question to the cloud."""
    out = tmp_path / "demo"
    done = run_demo(
        *("--n", "3", "--tau", "2", "--retention", "0.35", "--out", str(out), "--cache", str(tmp_path)),
        *("--small", str(tiny_checkpoint), "--large", str(tiny_large_checkpoint)),
    )
    summary = check_demo_output(done, out, n=3, retention=0.35)
    assert summary["exit_rate"] == 0.0 and summary["total_bytes"] > 0


def test_demo_stops_the_server_on_sigterm(tiny_checkpoint, tiny_large_checkpoint, tmp_path):
    """Guards against an interrupted demo leaving ``stitch-cloud`` running (Ctrl-C and SIGTERM take the
    same way out)."""
    log = tmp_path / "stderr.log"
    command = [sys.executable, "-m", "stitchvlm.edge.demo", "demo", "--n", "500", "--out", str(tmp_path)]
    command += [
        "--cache",
        str(tmp_path),
        "--small",
        str(tiny_checkpoint),
        "--large",
        str(tiny_large_checkpoint),
    ]
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, text=True)
    try:
        deadline = time.monotonic() + 300
        while "1/500" not in log.read_text():  # serving, and one question answered
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        server_pid = int(re.search(r"stitch-cloud \(pid (\d+)\)", log.read_text())[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stitch-cloud stopped" in (tmp_path / "cloud.log").read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)  # reaped by the demo: gone


def test_demo_on_the_embedded_pair(tmp_path):
    """The demo as ``make demo`` runs it, on the embedded trained pair. Guards against the demo
    wiring the pair up wrongly (an accuracy far below the small model's own, which a wrong kept set,
    layout or tokenizer would give) on top of the checks of every run."""
    small, large = demo.embedded_model_dir(demo.EMBEDDED_SMALL), demo.embedded_model_dir(demo.EMBEDDED_LARGE)
    card = demo.MODELS_DIR / "accuracy.json"
    if demo.missing_model_message(small) or demo.missing_model_message(large) or not card.is_file():
        pytest.skip(f"the embedded pair is not in {demo.MODELS_DIR} (bench/train_pair.py writes it)")
    n = 16
    out = tmp_path / "demo"
    done = run_demo("--n", str(n), "--out", str(out), "--cache", str(tmp_path / "cache"))
    summary = check_demo_output(done, out, n=n, retention=0.09)
    small_accuracy = json.loads(card.read_text())["models"]["small"]["test"]["accuracy"]
    # Three binomial standard deviations at n, plus 5 points: generous, but far above a broken wiring.
    margin = 3 * math.sqrt(small_accuracy * (1 - small_accuracy) / n) + 0.05
    assert summary["accuracy"] >= small_accuracy - margin, (summary["accuracy"], small_accuracy, margin)
