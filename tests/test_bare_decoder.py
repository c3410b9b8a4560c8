"""``bench/bare_decoder.py``: the bare session's passes against the runtime's own decoder passes.

The reference is ``EdgeModel.decode`` on the same export and the same inputs
(its buffers, bindings and masks are what the exactness tests check against
transformers): a prefill and a decode step through the bare session, with its
past/present buffer pairing, must give the runtime's logits and scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bare_decoder  # noqa: E402

from stitchvlm.edge.runtime import CPU, EdgeModel  # noqa: E402


def test_bare_passes_equal_the_runtime_passes(lean_dir):
    """Guards against a bare timing of another computation: a past buffer written back through
    the wrong present, positions or scored rows off by one, or a decode step that does not see
    the prefill's keys."""
    prompt, rows = 12, 5
    path = lean_dir / "decoder.onnx"
    bare = bare_decoder.BareDecoder(path, capacity=prompt + 1, seed=3)
    model = EdgeModel.load(lean_dir, providers=[CPU])
    io = model.sidecar.io
    assert [bare_decoder.present_name(n) for n in bare.buffers] == io.present_names(
        model.sidecar.dims.num_layers
    )

    rng = np.random.default_rng(3)  # the bare decoder's draws, in its order
    hidden = bare.inputs["inputs_embeds"].shape[2]
    prefill_embeds = (rng.standard_normal((1, prompt, hidden)) * 0.02).astype(np.float32)
    step_embeds = (rng.standard_normal((1, 1, hidden)) * 0.02).astype(np.float32)
    got_prefill = bare.run(bare.bind(prompt, prompt, rows))
    got_step = bare.run(bare.bind(1, prompt + 1, 1))

    mask = (np.arange(prompt) >= prompt - rows).astype(np.float32)[None]
    cache = model.empty_cache(capacity=prompt + 1)
    prefill = model.decode(prefill_embeds, np.arange(prompt)[None], mask, cache, num_logits=1)
    step = model.decode(
        step_embeds, np.array([[prompt]]), np.ones((1, 1), np.float32), prefill.cache, num_logits=1
    )
    np.testing.assert_array_equal(got_prefill[io.logits], prefill.logits)
    np.testing.assert_array_equal(got_prefill[io.visual_scores], prefill.visual_scores)
    np.testing.assert_array_equal(got_step[io.logits], step.logits)
    np.testing.assert_array_equal(got_step[io.visual_scores], step.visual_scores)


def test_the_command_prints_one_json_object_and_refuses_a_missing_file(lean_dir, capsys, tmp_path):
    path = lean_dir / "decoder.onnx"
    assert bare_decoder.main([str(path), "--prompt", "16", "--repeats", "1", "--steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == 16 and result["prefill_ms"] > 0 and result["decode_step_ms"] > 0
    with pytest.raises(SystemExit):
        bare_decoder.main([str(tmp_path / "none.onnx")])
    assert "no such file" in capsys.readouterr().err
