"""The torch-free edge runtime against transformers' own generation, attention and forward.

References, all from ``InternVLForConditionalGeneration`` with eager attention:
``generate(do_sample=False, output_attentions=True, output_logits=True)`` for
tokens, per-token probabilities and the visual-token score (DESIGN's sum over
layers, heads and non-visual queries of every pass generation runs), and a
plain ``forward(inputs_embeds, position_ids)`` on the pruned sequence for the
consistency pass. The model is the sharpened tiny checkpoint of
``test_export`` (peaked attention, so the score really ranks tokens).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402
from transformers import InternVLForConditionalGeneration  # noqa: E402

from stitchvlm.edge.export import ExportConfig, export_edge  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeGeneration, EdgeModel  # noqa: E402
from stitchvlm.edge.sidecar import SIDECAR_NAME  # noqa: E402
from stitchvlm.shared.preprocess import preprocess_image  # noqa: E402
from stitchvlm.shared.scoring import top_r_indices  # noqa: E402

MAX_NEW_TOKENS = 8
RETENTIONS = (0.09, 0.35, 0.64)  # the paper's operating points
# (width, height, seed) of the test image and the question; different tile counts and lengths.
CASES = [((150, 90, 3), "What colour is the circle?"), ((128, 64, 7), "How many stars are there?")]


@pytest.fixture(scope="module")
def edge_dir(sharp_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "fp32"  # the explicit graph: the reference the lean one meets
    export_edge(ExportConfig(model_dir=sharp_checkpoint, out_dir=out, graph="explicit", verify=False))
    return out


@pytest.fixture(scope="module")
def edge(edge_dir) -> EdgeModel:
    return EdgeModel.load(edge_dir, providers=[CPU])


@pytest.fixture(scope="module")
def reference(sharp_checkpoint):
    return InternVLForConditionalGeneration.from_pretrained(
        sharp_checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@dataclass(frozen=True, eq=False)
class Case:
    ours: EdgeGeneration
    pixel_values: np.ndarray  # [tiles, 3, t, t]
    hf_tokens: list[int]  # transformers' greedy tokens
    hf_probs: np.ndarray  # [N_G] float64 softmax prob of each of them
    hf_scores: np.ndarray  # [|V|] float64 DESIGN score from transformers' attention probabilities


def _hf_case(reference, edge: EdgeModel, image, question) -> Case:
    ours = edge.generate(image, question, MAX_NEW_TOKENS)
    pixel_values, _ = preprocess_image(image, edge.files.tiling)
    ids = torch.tensor(np.array(ours.prompt.input_ids))[None]
    with torch.no_grad():
        out = reference.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.from_numpy(pixel_values),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            output_attentions=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    probs = np.array(
        [torch.softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)]
    )
    visual = slice(ours.prompt.visual_start, ours.prompt.visual_end)
    scores = np.zeros(ours.prompt.num_visual_tokens)
    for index, layers in enumerate(out.attentions):  # one entry per forward pass generate ran
        # prefill: queries after the image (non-visual; earlier text cannot see it); decode: the new token
        queries = slice(ours.prompt.visual_end, None) if index == 0 else slice(None)
        for attention in layers:  # [1, heads, queries, keys]
            scores += attention[0, :, queries, visual].double().sum(dim=(0, 1)).numpy()
    return Case(ours=ours, pixel_values=pixel_values, hf_tokens=tokens, hf_probs=probs, hf_scores=scores)


@pytest.fixture(scope="module", params=range(len(CASES)), ids=["7tiles", "3tiles"])
def case(request, reference, edge) -> Case:
    (width, height, seed), question = CASES[request.param]
    return _hf_case(reference, edge, make_test_image(width, height, seed), question)


def test_greedy_tokens_equal_transformers_generate(case, edge):
    """Guards against a wrong KV-cache hand-over, decode position ids, or EOS/max-token stopping."""
    assert list(case.ours.token_ids) == case.hf_tokens
    assert case.ours.text == edge.files.tokenizer.decode(case.hf_tokens, skip_special_tokens=True)
    assert case.ours.prompt.num_visual_tokens == case.ours.layout.num_visual_tokens


def test_token_probs_equal_softmax_of_transformers_logits(case):
    """Guards against probabilities taken from the wrong position, before/after the wrong token,
    or through a low-precision softmax."""
    assert case.ours.token_probs.shape == (len(case.hf_tokens),)
    np.testing.assert_allclose(case.ours.token_probs, case.hf_probs, rtol=1e-5, atol=1e-7)


def test_in_graph_score_equals_sum_of_transformers_attentions(case):
    """Guards against the in-graph score summing the wrong queries (visual or pre-image text), the
    wrong axis, one layer only, or missing decode passes; the top-R sets must be the same."""
    assert case.ours.visual_scores.shape == case.hf_scores.shape
    np.testing.assert_allclose(case.ours.visual_scores, case.hf_scores, rtol=1e-5, atol=1e-6)
    for retention in RETENTIONS:
        np.testing.assert_array_equal(
            top_r_indices(case.ours.visual_scores, retention), top_r_indices(case.hf_scores, retention)
        )


@pytest.mark.parametrize("retention", [0.05, 0.35])
def test_teacher_forced_probs_equal_transformers_on_pruned_sequence(case, edge, reference, retention):
    """Guards against the consistency pass renumbering positions after dropped visual tokens,
    keeping the wrong tokens, or reading p'_i off by one position."""
    prompt, answer = case.ours.prompt, np.array(case.ours.token_ids)
    kept = top_r_indices(case.ours.visual_scores, retention)
    ours = edge.teacher_forced_probs(prompt, case.ours.image_embeds, kept, answer)

    ids = torch.tensor(np.array(prompt.input_ids))
    with torch.no_grad():
        embeds = reference.get_input_embeddings()(ids)  # [S, D]
        image = reference.get_image_features(pixel_values=torch.from_numpy(case.pixel_values)).pooler_output
        embeds[prompt.visual_start : prompt.visual_end] = image.reshape(-1, embeds.shape[-1])
        keep = np.concatenate(
            [
                np.arange(prompt.visual_start),
                prompt.visual_start + kept,
                np.arange(prompt.visual_end, len(ids)),
            ]
        )
        answer_t = torch.from_numpy(answer)
        sequence = torch.cat([embeds[keep], reference.get_input_embeddings()(answer_t[:-1])])[None]
        positions = torch.from_numpy(np.concatenate([keep, len(ids) + np.arange(len(answer) - 1)]))[None]
        # An explicit mask keeps transformers from reading the position jumps as packed sequences.
        out = reference(
            inputs_embeds=sequence, position_ids=positions, attention_mask=torch.ones_like(positions)
        )
        probs = torch.softmax(out.logits[0, -len(answer) :].double(), -1)
        expected = probs[torch.arange(len(answer)), answer_t].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-8)


def test_teacher_forced_with_every_token_kept_reproduces_generation(case, edge):
    """Guards against the consistency pass and generation disagreeing on the unpruned prompt."""
    everything = np.arange(case.ours.prompt.num_visual_tokens)
    probs = edge.teacher_forced_probs(
        case.ours.prompt, case.ours.image_embeds, everything, case.ours.token_ids
    )
    np.testing.assert_allclose(probs, case.ours.token_probs, rtol=1e-5, atol=1e-8)


def test_teacher_forced_refuses_bad_indices(case, edge):
    """Guards against silently gathering wrong or duplicated visual tokens."""
    prompt, embeds, answer = case.ours.prompt, case.ours.image_embeds, case.ours.token_ids
    for bad in ([3, 1], [0, 0], [prompt.num_visual_tokens], [-1, 2], []):
        with pytest.raises(ValueError):
            edge.teacher_forced_probs(prompt, embeds, np.array(bad, dtype=np.int64), answer)
    assert edge.teacher_forced_probs(prompt, embeds, np.array([0]), []).shape == (0,)


def test_generate_accepts_encoded_bytes(edge):
    """Guards against the bytes path decoding differently from the PIL path."""
    image = make_test_image(90, 150, seed=11)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    from_bytes = edge.generate(buffer.getvalue(), "What colour is the circle?", 3)
    from_pil = edge.generate(image, "What colour is the circle?", 3)
    assert from_bytes.token_ids == from_pil.token_ids
    np.testing.assert_array_equal(from_bytes.visual_scores, from_pil.visual_scores)
    assert len(from_pil.token_ids) <= 3
    assert min(from_pil.timings.vision_ms, from_pil.timings.prefill_ms) > 0


def test_generation_stops_on_eos_and_keeps_it(edge_dir, edge, tmp_path):
    """Guards against generating past an EOS or dropping it from token_ids (S_conf counts it), and
    against ignore_eos (benchmarks) stopping anyway; also, a directory whose copied configs
    disagree with the sidecar must be refused."""
    image = make_test_image(150, 90, seed=3)
    first = edge.generate(image, "What colour is the circle?", 4).token_ids
    stop = first[1]  # make the second generated token the EOS
    eos_dir = tmp_path / "eos"
    shutil.copytree(edge_dir, eos_dir)
    generation = json.loads((eos_dir / "generation_config.json").read_text())
    (eos_dir / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [stop]}))
    with pytest.raises(ValueError, match="eos ids"):
        EdgeModel.load(eos_dir, providers=[CPU])

    sidecar = json.loads((eos_dir / SIDECAR_NAME).read_text())
    sidecar["tokens"]["eos_token_ids"] = [stop]
    (eos_dir / SIDECAR_NAME).write_text(json.dumps(sidecar))
    stopping = EdgeModel.load(eos_dir, providers=[CPU])
    stopped = stopping.generate(image, "What colour is the circle?", 4)
    expected = first[: first.index(stop) + 1]
    assert stopped.token_ids == expected
    assert len(stopped.token_probs) == len(expected)
    # benchmarks generate a fixed count: past the EOS, the same tokens as a model without that EOS
    past_eos = stopping.generate(image, "What colour is the circle?", 4, ignore_eos=True)
    assert past_eos.token_ids == first


# The subprocess makes torch and transformers unimportable before anything else is imported.
_NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked: the edge runtime must not need it")
            return None

    sys.meta_path.insert(0, NoTorch())
    from stitchvlm.edge.runtime import CPU, EdgeModel

    edge_dir, image_path, question = sys.argv[1:4]
    model = EdgeModel.load(edge_dir, providers=[CPU])
    with open(image_path, "rb") as handle:
        result = model.generate(handle.read(), question, 4)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    print(json.dumps({"tokens": list(result.token_ids), "scores": result.visual_scores.tolist(), "leaked": leaked}))
    """
)


def assert_same_run_without_torch(export_dir, model, tmp_path):
    """Generate in a subprocess where torch and transformers cannot be imported; the tokens and
    scores must equal ``model.generate`` in this process. Returns that generation."""
    image_path = tmp_path / "image.png"
    make_test_image(150, 90, seed=3).save(image_path)
    question = "What colour is the circle?"
    run = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SCRIPT, str(export_dir), str(image_path), question],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    in_process = model.generate(image_path.read_bytes(), question, 4)
    assert result["tokens"] == list(in_process.token_ids)
    np.testing.assert_array_equal(np.array(result["scores"]), in_process.visual_scores)
    return in_process


def test_runtime_runs_with_torch_and_transformers_absent(edge_dir, edge, tmp_path):
    """Guards against the edge runtime (or anything it imports) needing torch or transformers
    (DESIGN invariant 5), and against results that depend on them being loaded."""
    assert_same_run_without_torch(edge_dir, edge, tmp_path)


@pytest.mark.gpu
def test_cuda_matches_cpu(edge_dir, edge):
    """Guards against the IO-binding path (KV kept on the GPU between passes) diverging from CPU."""
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider")
    gpu = EdgeModel.load(edge_dir)
    if gpu.device != "cuda":
        pytest.skip("CUDA provider could not start (no GPU or CUDA libraries)")
    image = make_test_image(150, 90, seed=3)
    on_gpu = gpu.generate(image, "What colour is the circle?", MAX_NEW_TOKENS)
    on_cpu = edge.generate(image, "What colour is the circle?", MAX_NEW_TOKENS)
    assert on_gpu.token_ids == on_cpu.token_ids
    np.testing.assert_allclose(on_gpu.token_probs, on_cpu.token_probs, rtol=1e-4)
    np.testing.assert_allclose(on_gpu.visual_scores, on_cpu.visual_scores, rtol=1e-4, atol=1e-4)
