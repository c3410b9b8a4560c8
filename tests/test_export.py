"""ONNX export of the small VLM against the PyTorch model it came from (DESIGN invariant 2).

The reference is always ``InternVLForConditionalGeneration`` from the same
checkpoint, run by transformers itself (``forward``, ``get_image_features``,
its ``DynamicCache``), never the exporter's own wrapper modules.

The tiny checkpoint's random init (std 0.02) makes attention nearly uniform,
so a masking or RoPE bug would move the logits by less than the tolerance.
``sharpen_checkpoint`` redraws its weights with std 0.2: attention is peaked,
logits span several units, and such bugs show.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from tokenizers import Tokenizer  # noqa: E402
from transformers import InternVLForConditionalGeneration  # noqa: E402

from stitchvlm.cloud.checkpoints import default_tiling, save_checkpoint  # noqa: E402
from stitchvlm.edge.export import ExportConfig, export_edge, main  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeModel  # noqa: E402
from stitchvlm.edge.sidecar import SIDECAR_NAME, EdgeSidecar  # noqa: E402
from stitchvlm.edge.verify import TOLERANCES, verify_export  # noqa: E402
from stitchvlm.shared.model_files import ModelFiles  # noqa: E402
from stitchvlm.shared.preprocess import preprocess_image  # noqa: E402
from stitchvlm.shared.prompt import build_prompt  # noqa: E402

SHARP_STD = 0.2  # weight std of the sharpened test model (see module docstring)
FP32_LOGITS_ATOL = 1e-4  # the brief's bound for fp32 logits, absolute


def sharpen_checkpoint(source: Path, target: Path, std: float = SHARP_STD, seed: int = 0) -> Path:
    """Copy of a tiny checkpoint with every weight matrix and bias redrawn from N(0, std^2)
    (biases too: a fresh checkpoint's are zeros, which a graph may drop or misplace unseen)."""
    model = InternVLForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 or name.endswith(".bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    return save_checkpoint(model.eval(), tokenizer, target, default_tiling("tiny"))


@pytest.fixture(scope="module")
def edge_dir(sharp_checkpoint, tmp_path_factory) -> Path:
    """The explicit (traced, reference) fp32 export through the console-script entry point
    (verification is tested on its own; test_lean_decoder and test_lean_vision test the lean graphs)."""
    out = tmp_path_factory.mktemp("edge") / "fp32"
    assert main(["--model", str(sharp_checkpoint), "--out", str(out), "--graph", "explicit", "--no-verify"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(sharp_checkpoint):
    return InternVLForConditionalGeneration.from_pretrained(
        sharp_checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def edge(edge_dir) -> EdgeModel:
    return EdgeModel.load(edge_dir, providers=[CPU])


# Two samples of different prompt lengths and tile counts through the same graphs.
SAMPLES = [
    ((150, 90, 3), "What colour is the circle?"),  # 3x2 grid + thumbnail = 7 tiles
    ((64, 64, 5), "How many stars are there? Answer with a single word."),  # 1 tile
]


def _sample(edge: EdgeModel, size_seed, question, make_image):
    width, height, seed = size_seed
    pixel_values, layout = preprocess_image(make_image(width, height, seed), edge.files.tiling)
    return pixel_values, build_prompt(edge.files, question, layout.num_visual_tokens)


def _hf_passes(model, input_ids, pixel_values, decode_steps):
    """transformers' forward: prefill then greedy steps; logits and KV copied per pass."""
    ids = torch.tensor(np.array(input_ids))[None]
    passes, fed = [], []
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.from_numpy(pixel_values), use_cache=True)
        for step in range(decode_steps + 1):
            kv = [
                t[0].numpy().copy()
                for layer in out.past_key_values.layers
                for t in (layer.keys, layer.values)
            ]
            passes.append((out.logits[0].numpy(), kv))
            if step == decode_steps:
                break
            token = int(out.logits[0, -1].argmax())
            fed.append(token)
            out = model(
                input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )
    return passes, fed


@pytest.mark.parametrize(("size_seed", "question"), SAMPLES)
def test_decoder_matches_pytorch_on_prefill_and_decode(edge, reference, size_seed, question, image_factory):
    """Guards against wrong RoPE, causal mask, GQA head mapping, KV concatenation or final norm in
    the graph, and against sequence/past axes frozen at their traced sizes (two prompt lengths)."""
    pixel_values, prompt = _sample(edge, size_seed, question, image_factory)
    passes, fed = _hf_passes(reference, prompt.input_ids, pixel_values, decode_steps=2)

    embeds = edge.embed(prompt.input_ids)
    embeds[prompt.visual_start : prompt.visual_end] = edge.encode_image(pixel_values)
    length = len(prompt.input_ids)
    step = edge.decode(
        embeds[None], np.arange(length)[None], np.zeros((1, length), np.float32), edge.empty_cache()
    )
    steps = [step]
    for index, token in enumerate(fed):
        step = edge.decode(
            edge.embed([token])[None], np.array([[length + index]]), np.ones((1, 1), np.float32), step.cache
        )
        steps.append(step)

    kv_bound = TOLERANCES["fp32"].kv
    for ours, (logits, kv) in zip(steps, passes, strict=True):
        assert ours.logits.shape == (1, *logits.shape)
        np.testing.assert_allclose(ours.logits[0], logits, rtol=0, atol=FP32_LOGITS_ATOL)
        for value, expected in zip(ours.cache, kv, strict=True):
            np.testing.assert_allclose(value.numpy()[0], expected, rtol=0, atol=kv_bound.bound(expected))


def _prefill_inputs(edge: EdgeModel, size_seed, question, make_image):
    """(inputs_embeds [1, S, D], position_ids [1, S], score_query_mask [1, S]) of one sample."""
    pixel_values, prompt = _sample(edge, size_seed, question, make_image)
    embeds = edge.embed(prompt.input_ids)
    embeds[prompt.visual_start : prompt.visual_end] = edge.encode_image(pixel_values)
    length = len(prompt.input_ids)
    query_mask = (np.arange(length) >= prompt.visual_end).astype(np.float32)
    return embeds[None], np.arange(length)[None], query_mask[None]


def test_num_logits_gives_the_last_rows_of_the_full_logits(edge, image_factory):
    """Guards against the head running on the wrong rows (first instead of last, off by one), a row
    count frozen at its traced value, or num_logits changing the KV cache or the scores."""
    prefill = _prefill_inputs(edge, *SAMPLES[1], image_factory)
    length = prefill[1].shape[1]
    full = edge.decode(*prefill, edge.empty_cache())
    assert full.logits.shape[1] == length
    for rows in (1, 2, 7, length):
        part = edge.decode(*prefill, edge.empty_cache(), num_logits=rows)
        assert part.logits.shape == (1, rows, edge.sidecar.dims.vocab_size)
        np.testing.assert_allclose(part.logits, full.logits[:, -rows:], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(part.visual_scores, full.visual_scores)
        for ours, reference in zip(part.cache, full.cache, strict=True):
            np.testing.assert_array_equal(ours.numpy(), reference.numpy())
    # a decode step on the cache: one row
    token = edge.embed([int(full.logits[0, -1].argmax())])[None]
    step = edge.decode(token, np.array([[length]]), np.ones((1, 1), np.float32), full.cache, num_logits=1)
    assert step.logits.shape == (1, 1, edge.sidecar.dims.vocab_size)
    for bad in (0, length + 1):
        with pytest.raises(ValueError, match="num_logits"):
            edge.decode(*prefill, edge.empty_cache(), num_logits=bad)


def test_no_scores_export_is_the_same_decoder_without_the_score(
    edge, edge_dir, sharp_checkpoint, tmp_path, image_factory
):
    """Guards against the --no-scores benchmark graph being another model than the served one (its
    logits and KV must equal the scored graph's), still computing or exposing the score, or being
    accepted by the runtime, which needs the score."""
    import onnxruntime

    out = tmp_path / "no-scores"
    assert main(["--model", str(sharp_checkpoint), "--out", str(out), "--graph", "explicit", "--no-scores"]) == 0
    sidecar = EdgeSidecar.load(out)
    assert not sidecar.with_scores
    graph = onnx.load(str(out / sidecar.graphs.decoder))
    layers = sidecar.dims.num_layers
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]
    assert inputs == sidecar.io.decoder_inputs(layers, with_scores=False)
    assert outputs == sidecar.io.decoder_outputs(layers, with_scores=False)
    assert "score_query_mask" not in inputs and "visual_scores" not in outputs
    # the score's one sum over heads and queries per layer is gone, nothing else is
    scored_graph = onnx.load(str(edge_dir / sidecar.graphs.decoder))
    reduce_sums = [sum(n.op_type == "ReduceSum" for n in g.graph.node) for g in (scored_graph, graph)]
    assert reduce_sums[0] - reduce_sums[1] == layers
    with pytest.raises(ValueError, match="no visual scores"):
        EdgeModel.load(out, providers=[CPU])

    embeds, positions, query_mask = _prefill_inputs(edge, *SAMPLES[0], image_factory)
    scored = edge.decode(embeds, positions, query_mask, edge.empty_cache(), num_logits=3)
    session = onnxruntime.InferenceSession(str(out / sidecar.graphs.decoder), providers=[CPU])
    feed = {
        "inputs_embeds": embeds,
        "position_ids": positions,
        "attention_mask": np.ones_like(positions),
        "num_logits": np.array(3, dtype=np.int64),
    }
    empty = edge.empty_cache()
    feed |= {name: value.numpy() for name, value in zip(sidecar.io.past_names(layers), empty, strict=True)}
    logits, *presents = session.run(None, feed)
    np.testing.assert_allclose(logits, scored.logits, rtol=0, atol=1e-6)
    for ours, reference in zip(presents, scored.cache, strict=True):
        np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tiles", [1, 5])
def test_vision_graph_matches_get_image_features(edge, reference, tiles):
    """Guards against a wrong pixel shuffle / projector, a frozen tile axis, or a position-embedding
    interpolation that is not the identity at the native tile size."""
    rng = np.random.default_rng(tiles)
    pixel_values = rng.standard_normal((tiles, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=torch.from_numpy(pixel_values)).pooler_output
    expected = expected.reshape(-1, expected.shape[-1]).numpy()
    ours = edge.encode_image(pixel_values)
    assert ours.shape == (tiles * edge.sidecar.tokens_per_tile, edge.sidecar.dims.hidden_size)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCES["fp32"].image_embeds.bound(expected))


def test_batch_axis_is_dynamic(edge):
    """Guards against a batch axis frozen at trace time: a batch of two rows equals each row alone."""
    rng = np.random.default_rng(0)
    dims = edge.sidecar.dims
    embeds = rng.standard_normal((2, 5, dims.hidden_size)).astype(np.float32)
    positions = np.stack([np.arange(5), np.array([0, 1, 2, 7, 8])])  # second row skips positions
    scored = np.ones((2, 5), np.float32)
    both = edge.decode(embeds, positions, scored, edge.empty_cache(batch=2))
    for row in range(2):
        alone = edge.decode(
            embeds[row : row + 1], positions[row : row + 1], scored[row : row + 1], edge.empty_cache()
        )
        np.testing.assert_allclose(both.logits[row], alone.logits[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(both.visual_scores[row], alone.visual_scores[0], rtol=0, atol=1e-5)


def test_graphs_expose_only_logits_presents_and_scores(edge_dir):
    """Guards against per-layer attention maps (or any other tensor) leaking out as graph outputs,
    and against fixed sizes where the runtime needs dynamic axes."""
    sidecar = EdgeSidecar.load(edge_dir)
    layers = sidecar.dims.num_layers
    decoder = onnx.load(str(edge_dir / sidecar.graphs.decoder))
    outputs = [o.name for o in decoder.graph.output]
    expected = ["logits", "visual_scores"] + [
        f"present_{k}_{i}" for i in range(layers) for k in ("key", "value")
    ]
    assert outputs == expected
    inputs = [i.name for i in decoder.graph.input]
    assert inputs == ["inputs_embeds", "position_ids", "attention_mask", "score_query_mask", "num_logits"] + [
        f"past_{k}_{i}" for i in range(layers) for k in ("key", "value")
    ]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    by_name = {v.name: v for v in [*decoder.graph.input, *decoder.graph.output]}
    assert dims(by_name["inputs_embeds"]) == ["batch", "seq", sidecar.dims.hidden_size]
    assert dims(by_name["past_key_0"]) == ["batch", sidecar.dims.num_kv_heads, "past", sidecar.dims.head_dim]
    assert dims(by_name["visual_scores"]) == ["batch", "total"]
    assert dims(by_name["logits"]) == ["batch", "logit_rows", sidecar.dims.vocab_size]
    assert dims(by_name["num_logits"]) == []
    assert by_name["num_logits"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert by_name["logits"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    vision = onnx.load(str(edge_dir / sidecar.graphs.vision))
    assert [o.name for o in vision.graph.output] == ["image_embeds"]
    assert dims(vision.graph.input[0])[0] == "tiles"


def test_sidecar_describes_the_checkpoint(edge_dir, sharp_checkpoint, reference):
    """Guards against a sidecar whose dims, token ids or tiling disagree with the checkpoint, a
    directory ModelFiles cannot load, and weights copied next to the graphs."""
    sidecar = EdgeSidecar.load(edge_dir)
    text = reference.config.text_config
    checkpoint = ModelFiles.load(sharp_checkpoint)
    assert sidecar.model_id == sharp_checkpoint.name
    assert sidecar.dtype == "fp32"
    assert (sidecar.dims.num_layers, sidecar.dims.num_heads, sidecar.dims.num_kv_heads) == (
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    assert sidecar.dims.head_dim * text.num_attention_heads == text.hidden_size
    assert (sidecar.dims.hidden_size, sidecar.dims.vocab_size) == (text.hidden_size, text.vocab_size)
    assert sidecar.tokens.image_token_id == reference.config.image_token_id
    assert sidecar.tokens.eos_token_ids == checkpoint.eos_token_ids
    assert sidecar.tiling == checkpoint.tiling
    assert sidecar.tokens_per_tile == reference.config.image_seq_length
    for name in (sidecar.graphs.vision, sidecar.graphs.decoder, sidecar.graphs.embeddings):
        assert (edge_dir / name).is_file()
    embeddings = np.load(edge_dir / sidecar.graphs.embeddings)
    np.testing.assert_array_equal(embeddings, reference.get_input_embeddings().weight.detach().numpy())
    assert ModelFiles.load(edge_dir).chat_template == checkpoint.chat_template
    assert not list(edge_dir.glob("*.safetensors"))
    assert EdgeSidecar.from_json(sidecar.to_json()) == sidecar


def test_sidecar_refuses_other_versions_and_unknown_keys(edge_dir, tmp_path):
    """Guards against a runtime silently reading a sidecar written in another format."""
    data = json.loads((edge_dir / SIDECAR_NAME).read_text())
    with pytest.raises(ValueError, match="format_version"):
        EdgeSidecar.from_json(json.dumps({**data, "format_version": 99}))
    # version 1 decoders had no num_logits input
    with pytest.raises(ValueError, match="format_version"):
        EdgeSidecar.from_json(json.dumps({**data, "format_version": 1}))
    with pytest.raises(ValueError, match="with_scores"):
        EdgeSidecar.from_json(json.dumps({**data, "with_scores": "false"}))
    with pytest.raises(ValueError, match="unknown DecoderDims keys"):
        EdgeSidecar.from_json(json.dumps({**data, "dims": {**data["dims"], "num_layer": 3}}))
    with pytest.raises(FileNotFoundError):
        EdgeSidecar.load(tmp_path)


def test_verification_passes_and_catches_a_wrong_checkpoint(edge_dir, sharp_checkpoint, tiny_checkpoint):
    """Guards against a verification step that cannot fail: the same export checked against
    another checkpoint (same shapes, other weights) must be reported beyond tolerance."""
    good = verify_export(sharp_checkpoint, edge_dir, "fp32")
    assert good.checks and all(check.ok for check in good.checks)
    good.raise_if_failed()
    bad = verify_export(tiny_checkpoint, edge_dir, "fp32")
    assert not all(check.ok for check in bad.checks)
    with pytest.raises(ValueError, match="beyond tolerance"):
        bad.raise_if_failed()


def test_fp16_export_within_documented_tolerance(sharp_checkpoint, reference, tmp_path, image_factory):
    """Guards against fp16 graphs that lose the float32 islands (RoPE, RMSNorm, softmax, score sum)
    or change the I/O dtypes the runtime relies on."""
    out = tmp_path / "fp16"
    sidecar = export_edge(ExportConfig(model_dir=sharp_checkpoint, out_dir=out, dtype="fp16", graph="explicit", verify=False))
    assert sidecar.dtype == "fp16"
    edge16 = EdgeModel.load(out, providers=[CPU])
    types = {i.name: i.type for i in [*edge16.decoder.get_inputs(), *edge16.decoder.get_outputs()]}
    assert types["inputs_embeds"] == types["past_key_0"] == types["present_value_0"] == "tensor(float16)"
    assert types["logits"] == types["visual_scores"] == types["score_query_mask"] == "tensor(float)"

    pixel_values, prompt = _sample(edge16, *SAMPLES[0], image_factory)
    passes, _ = _hf_passes(reference, prompt.input_ids, pixel_values, decode_steps=0)
    logits, kv = passes[0]
    embeds = edge16.embed(prompt.input_ids)
    embeds[prompt.visual_start : prompt.visual_end] = edge16.encode_image(pixel_values)
    length = len(prompt.input_ids)
    step = edge16.decode(
        embeds[None], np.arange(length)[None], np.ones((1, length), np.float32), edge16.empty_cache()
    )
    tolerance = TOLERANCES["fp16"]
    diff = np.abs(step.logits[0] - logits).max()
    assert diff <= tolerance.logits.bound(logits)
    # fp16 really ran: float32 parity would be 100x tighter
    assert diff > TOLERANCES["fp32"].logits.bound(logits)
    for value, expected in zip(step.cache, kv, strict=True):
        assert np.abs(value.numpy()[0].astype(np.float32) - expected).max() <= tolerance.kv.bound(expected)


def test_unsupported_text_model_is_refused(tmp_path):
    """Guards against silently exporting sliding-window attention as full attention."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    from stitchvlm.edge.export_modules import check_supported

    text = Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
    )
    vision = InternVLVisionConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
    )
    model = InternVLForConditionalGeneration(
        InternVLConfig(vision_config=vision, text_config=text, image_token_id=31)
    )
    with pytest.raises(ValueError, match="full-attention"):
        check_supported(model)


def test_external_tensors_are_consolidated_into_one_file(edge_dir, tmp_path):
    """Guards against a >2 GB export leaving one file per tensor (the TorchScript exporter's
    layout) or changing the graph while moving its tensors."""
    from stitchvlm.edge.export import consolidate_external_data

    model = onnx.load(str(edge_dir / "vision.onnx"))
    scattered = tmp_path / "vision.onnx"
    onnx.save_model(
        model, str(scattered), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
    )
    assert len(list(tmp_path.iterdir())) > 3
    consolidate_external_data(scattered)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]

    import onnxruntime

    pixel_values = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    original = onnxruntime.InferenceSession(str(edge_dir / "vision.onnx"), providers=[CPU])
    moved = onnxruntime.InferenceSession(str(scattered), providers=[CPU])
    np.testing.assert_array_equal(
        moved.run(None, {"pixel_values": pixel_values})[0],
        original.run(None, {"pixel_values": pixel_values})[0],
    )


def _tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path -> its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_failed_verification_leaves_the_target_as_it_was(
    sharp_checkpoint, edge_dir, tmp_path, monkeypatch, capsys
):
    """Guards against a failed ``stitch-export`` (exit 1) leaving a normal-looking edge directory,
    sidecar included, that ``stitch-edge ask`` only fails on later (issue 13, defect 6): the target
    must stay absent, or hold the previous export byte for byte, with no staging directory left."""
    from stitchvlm.edge import verify

    impossible = verify.DtypeTolerances(*[verify.Tolerance(atol=-1.0, rtol=0.0)] * 4)  # every check fails
    monkeypatch.setitem(verify.TOLERANCES, "fp32", impossible)
    out = tmp_path / "fresh"
    assert main(["--model", str(sharp_checkpoint), "--out", str(out)]) == 1
    assert "beyond tolerance" in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    previous = tmp_path / "previous"
    shutil.copytree(edge_dir, previous)
    (previous / "notes.txt").write_text("not part of an export")
    before = _tree(previous)
    assert main(["--model", str(sharp_checkpoint), "--out", str(previous), "--model-id", "other"]) == 1
    assert _tree(previous) == before
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]

    # with the real tolerances the same export passes and replaces the previous one in place
    monkeypatch.undo()
    assert main(["--model", str(sharp_checkpoint), "--out", str(previous), "--model-id", "other"]) == 0
    assert EdgeSidecar.load(previous).model_id == "other"
    assert (previous / "notes.txt").read_text() == "not part of an export"
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]
    EdgeModel.load(previous, providers=[CPU])
