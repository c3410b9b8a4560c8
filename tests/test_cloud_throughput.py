"""``bench/cloud_throughput.py`` at a tiny size: it runs end to end and its servers agree.

The benchmark's figures are not asserted (timed tests would be noise on a
shared CPU); what is asserted is that it produces its table and JSON, and that
the batching server and the batch-1 server gave every request the same greedy
tokens at every concurrency, which guards against a benchmark whose batched
side is fast because it computes something else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
def test_throughput_benchmark_runs_and_batching_changes_no_token():
    args = ["--workloads", "long,short", "-n", "3", "--long-tokens", "5", "--long-preset", "tiny"]
    out = subprocess.run(
        [sys.executable, "cloud_throughput.py", *args, "--concurrency", "1,3"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=400,
        check=True,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["long_same_tokens_batched_and_b1"] is True
    assert summary["short_same_tokens_batched_and_b1"] is True
    assert summary["device"].startswith("cpu")
    for key in ("long_batched_vs_b1_c3", "long_batched_vs_hf_static_c3", "short_p99_ms_c1"):
        assert summary[key] > 0
    assert out.count("| stitch batch 1 |") == 4 and "### long answers" in out and "### short answers" in out
