"""``bench/edge_peer.py``'s pure helpers; the benchmark itself (genai venv, builder) never runs in CI.

Guards against a peer benchmark that asks the builder for full-sequence logits
(genai would then do more work than Stitch's ``num_logits`` graph), that lets
genai's session take every core while Stitch's gets ``--threads``, or that
divides by a skipped column instead of reporting null.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import edge_peer  # noqa: E402


def test_builder_command_builds_a_cpu_graph_with_last_token_logits():
    command = edge_peer.builder_command(Path("py"), Path("in"), Path("out"), "int4", Path("cache"))
    assert command[:3] == ["py", "-m", "onnxruntime_genai.models.builder"]
    assert command[command.index("-p") + 1] == "int4"
    assert command[command.index("-e") + 1] == "cpu"
    assert command[command.index("--extra_options") + 1 :] == ["prune_lm_head=true"]


def test_with_threads_sets_the_decoder_session_and_copies():
    original = {"model": {"decoder": {"session_options": {"log_id": "x"}, "filename": "model.onnx"}}}
    patched = edge_peer.with_threads(original, 2)
    options = patched["model"]["decoder"]["session_options"]
    assert options == {"log_id": "x", "intra_op_num_threads": 2, "inter_op_num_threads": 1}
    assert original["model"]["decoder"]["session_options"] == {"log_id": "x"}


def test_ratio_is_null_for_a_skipped_side():
    assert edge_peer.ratio(3.0, 2.0) == 1.5
    assert edge_peer.ratio(None, 2.0) is None
    assert edge_peer.ratio(3.0, None) is None


def test_median_time_counts_decode_steps_after_the_first_token():
    runs = [edge_peer.TextTime(10.0, 30.0), edge_peer.TextTime(12.0, 15.0), edge_peer.TextTime(11.0, 20.0)]
    summary = edge_peer.median_time(runs, new_tokens=16)
    assert summary["prefill_ms"] == 11.0 and summary["decode_ms"] == 20.0
    assert summary["total_ms"] == 31.0  # median of 40, 27, 31
    assert summary["decode_tok_s"] == pytest.approx(15 / 0.020)


def test_tokens_equal_compares_only_columns_that_ran():
    tokens = {"stitch_lean": (1, 2, 3), "torch": (1, 2, 4), "genai_fp32": (5,)}
    assert edge_peer.tokens_equal(tokens) == {"stitch_lean_vs_torch": 2}


def test_peer_preset_swaps_the_text_model_only():
    quick, one_b = edge_peer.BenchPreset.from_name("quick"), edge_peer.BenchPreset.from_name("internvl3-1b")
    assert edge_peer.peer_preset("quick", None) == quick
    mixed = edge_peer.peer_preset("quick", "internvl3-1b")
    assert (mixed.text_hidden, mixed.text_layers, mixed.vocab) == (
        one_b.text_hidden,
        one_b.text_layers,
        one_b.vocab,
    )
    assert (mixed.vision_hidden, mixed.tile, mixed.image_size) == (
        quick.vision_hidden,
        quick.tile,
        quick.image_size,
    )
