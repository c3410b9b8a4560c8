"""``bench/edge_stages.py``: its memory measurement, its stage windows, and a run at the quick preset.

Guards against a memory figure that misses an allocation it should see (a
high-water mark not reset, RSS read in the wrong unit), per-stage windows that
overlap or leave gaps, and a benchmark whose question is not the preset's
image (tiles and visual tokens from the tiling rule, not from the run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import edge_stages  # noqa: E402

ALLOCATION_MB = 200


def touched(megabytes: int) -> np.ndarray:
    block = np.empty(megabytes * 2**20, dtype=np.uint8)
    block.fill(1)  # resident only once written
    return block


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_high_water_mark_sees_a_freed_allocation_and_keeps_the_lifetime_peak():
    marks = edge_stages.HighWaterMark()
    before = marks.start()
    block = touched(ALLOCATION_MB)
    del block  # freed before the mark is read: only a high-water mark still sees it
    extra = marks.peak() - before
    assert ALLOCATION_MB - 10 <= extra <= ALLOCATION_MB + 10
    marks.start()  # the next span starts low ...
    assert marks.peak() < before + ALLOCATION_MB / 2
    assert marks.lifetime >= before + ALLOCATION_MB - 10  # ... but the lifetime peak is kept


def test_rss_sampler_attributes_a_held_allocation_to_its_window():
    with edge_stages.RssSampler() as sampler:
        time.sleep(0.05)
        quiet_end = time.perf_counter()
        block = touched(ALLOCATION_MB)
        time.sleep(0.05)
        busy = (time.perf_counter() - 0.04, time.perf_counter())
        del block
    quiet = sampler.peak(sampler.samples[0][0], quiet_end)
    assert sampler.peak(*busy) - quiet >= ALLOCATION_MB - 10


def test_stage_windows_are_consecutive_and_end_with_the_consistency_pass():
    timings = {"preprocess_ms": 10.0, "vision_ms": 200.0, "prefill_ms": 50.0, "decode_ms": 40.0}
    windows = edge_stages.stage_windows(100.0, timings, (100.31, 100.35))
    assert list(windows) == list(edge_stages.STAGES)
    assert windows["preprocess"] == (100.0, pytest.approx(100.01))
    for earlier, later in zip(edge_stages.STAGES[:3], edge_stages.STAGES[1:4], strict=True):
        assert windows[earlier][1] == windows[later][0]
    assert windows["decode"][1] == pytest.approx(100.3)
    assert windows["consistency"] == (100.31, 100.35)


@pytest.mark.slow
def test_quick_preset_question_per_export(tmp_path):
    """The whole benchmark at the quick preset, explicit and lean int8: one child process per step."""
    pytest.importorskip("torch")
    from presets import BenchPreset

    from stitchvlm.shared.layout import TilingConfig
    from stitchvlm.shared.preprocess import compute_layout

    command = [
        sys.executable,
        str(BENCH / "edge_stages.py"),
        "--preset",
        "quick",
        "--exports",
        "explicit",
        "lean-int8",
    ]
    command += ["--threads", "1", "--new-tokens", "4", "--max-tiles", "4", "--work-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    preset = BenchPreset.from_name("quick")
    width, height = preset.image_size
    capped = TilingConfig(tile_size=preset.tile, max_tiles=4, tokens_per_tile=preset.tokens_per_tile)
    layout = compute_layout(width, height, capped)
    assert set(line["exports"]) == {"explicit", "lean-int8"}
    for r in line["exports"].values():
        assert (r["tiles"], r["visual_tokens"]) == (layout.num_tiles, layout.num_visual_tokens)
        stages = sum(r[f"{stage}_ms"] for stage in edge_stages.STAGES)
        assert r["question_ms"] == pytest.approx(stages, abs=0.5)
        assert len(r["tokens"]) == 4
        assert r["peak_process_mb"] >= max(r[f"peak_{stage}_mb"] for stage in edge_stages.STAGES) - 1
        assert r["prefill_extra_mb"] >= 0 and r["vision_extra_mb"] >= 0
    assert line["lean_int8_speedup_vs_explicit"] > 0
    assert line["genai_prefill_extra_mb"] is None  # --genai not asked
