"""The lean vision graph (``edge.lean_vision``) against PyTorch and the traced vision graph.

References: transformers' own ``get_image_features`` (vision tower, feature
selection, pixel shuffle, projector) and the traced graph of
``export_modules.VisionEncoder``, which stays the reference the built graph is
tested against (STYLE 14). Tower variants are built in process from tiny
configs with every vision and projector parameter redrawn, 1-D ones included
(layer scales, norm weights and biases, q|k|v bias), so that a scale folded into
the wrong columns or a bias added in the wrong place shows; the end-to-end
tests use ``test_export``'s sharpened tiny checkpoint. fp32 unless named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import onnxruntime  # noqa: E402
from conftest import make_test_image  # noqa: E402
from test_runtime import MAX_NEW_TOKENS, assert_same_run_without_torch  # noqa: E402
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config  # noqa: E402

from stitchvlm.edge.export import ExportConfig, export_edge, export_vision  # noqa: E402
from stitchvlm.edge.lean_vision import build_lean_vision, check_lean_vision_supported  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeModel  # noqa: E402
from stitchvlm.edge.sidecar import SIDECAR_NAME, EdgeSidecar, GraphIO  # noqa: E402
from stitchvlm.edge.verify import TOLERANCES, verify_export  # noqa: E402

# fp32 bounds on image_embeds, |diff| <= REL * max|reference| (outputs up to ~14, so ~2e-5
# absolute). Measured on the variants below, 1 and 3 tiles: lean vs get_image_features up to
# 5.5e-7 of the largest magnitude, lean vs traced graph 3.8e-7, the traced graph itself 5.0e-7
# from get_image_features (reordered float32 sums only); a wrong layer scale, bias or shuffle
# order is off by tens of percent.
LEAN_VS_TORCH_REL = 2e-6
LEAN_VS_TRACED_REL = 2e-6
TILE, PATCH = 64, 8  # 8 x 8 patches, 16 visual tokens per tile after the 2 x 2 pixel shuffle

# InternViT variants: name -> (vision config overrides, InternVL config overrides).
VARIANTS = {
    # InternViT-300M (InternVL3-1B/2B/8B): LayerNorm, q|k|v bias, mean pooling, last layer
    "internvit-300m": ({}, {}),
    # InternViT-6B (InternVL3-38B/78B): RMSNorm, q/k norm, no q|k|v bias
    "internvit-6b": (dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False), {}),
    # the tower's final LayerNorm (no mean pooling), which only the last layer's features pass
    "final-norm": (dict(use_mean_pooling=False), {}),
    # an earlier hidden state: the layers after it must not run, nor the final norm
    "layer-minus-2": (dict(num_hidden_layers=3, use_mean_pooling=False), dict(vision_feature_layer=-2)),
}


def vision_variant(name: str, dtype: torch.dtype = torch.float32) -> InternVLForConditionalGeneration:
    """A tiny InternVL of ``VARIANTS[name]`` with every vision and projector parameter redrawn."""
    vision_overrides, overrides = VARIANTS[name]
    vision = InternVLVisionConfig(
        **{
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": TILE,
            "patch_size": PATCH,
            "attention_bias": True,
            **vision_overrides,
        }
    )
    text = Qwen2Config(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=63, **overrides)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, parameter in model.model.named_parameters():
            if key.startswith("language_model"):
                continue
            # matrices as the sharpened checkpoint; 1-D parameters around 1 (norm weights) or 0
            centre = 1.0 if key.endswith("weight") and parameter.ndim == 1 else 0.0
            std = 0.2 if parameter.ndim >= 2 else 0.5
            parameter.copy_(centre + std * torch.randn(parameter.shape, generator=generator))
    return model.to(dtype)


def _session(model_proto_or_path) -> onnxruntime.InferenceSession:
    source = model_proto_or_path
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(
        source if isinstance(source, bytes) else str(source), options, providers=[CPU]
    )


def _pixels(tiles: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tiles, 3, TILE, TILE)).astype(np.float32)


def _torch_features(model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.from_numpy(pixel_values)).pooler_output
    return features.reshape(-1, features.shape[-1]).float().numpy()


def _assert_close(ours: np.ndarray, reference: np.ndarray, rel: float) -> None:
    assert ours.shape == reference.shape
    bound = rel * float(np.abs(reference).max())
    diff = float(np.abs(ours.astype(np.float64) - reference).max())
    assert diff <= bound, f"max|diff| {diff:.3e} > {bound:.3e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lean_vision_equals_get_image_features_and_traced_graph(variant, tmp_path):
    """Guards against a wrong block in the built tower: q|k|v split or bias order, q/k norm over
    the wrong width or before the bias, a layer scale folded into the wrong columns, the residual
    sum taken from the wrong Skip norm output, LayerNorm where the config says RMSNorm, the wrong
    feature layer or a final norm where HF has none, CLS kept, a pixel shuffle in the transposed
    order; and against a tile axis frozen at one count (1 and 3 tiles through one graph)."""
    model = vision_variant(variant)
    lean = _session(build_lean_vision(model, GraphIO()))
    traced_path = tmp_path / "vision.onnx"
    export_vision(model, traced_path, 17, GraphIO())
    traced = _session(traced_path)
    for tiles in (1, 3):
        pixel_values = _pixels(tiles, seed=tiles)
        (ours,) = lean.run(None, {"pixel_values": pixel_values})
        assert ours.shape == (tiles * 16, model.config.text_config.hidden_size)
        _assert_close(ours, _torch_features(model, pixel_values), LEAN_VS_TORCH_REL)
        (theirs,) = traced.run(None, {"pixel_values": pixel_values})
        _assert_close(ours, theirs, LEAN_VS_TRACED_REL)


def test_lean_vision_fp16_within_documented_tolerance():
    """Guards against a float16 lean tower that loses its float32 input (the graph must cast, as
    get_image_features does), changes the output dtype the runtime binds, or drifts past the fp16
    export tolerance (norm statistics, attention softmax and GELU kept accurate by ORT's kernels)."""
    lean = _session(build_lean_vision(vision_variant("internvit-300m", torch.float16), GraphIO()))
    assert [i.type for i in lean.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in lean.get_outputs()] == ["tensor(float16)"]
    pixel_values = _pixels(2)
    (ours,) = lean.run(None, {"pixel_values": pixel_values})
    reference = _torch_features(vision_variant("internvit-300m"), pixel_values)
    bound = TOLERANCES["fp16"].image_embeds.bound(reference)
    diff = float(np.abs(ours.astype(np.float32) - reference).max())
    assert diff <= bound
    assert diff > TOLERANCES["fp32"].image_embeds.bound(reference)  # fp16 really ran


@pytest.mark.parametrize(
    ("vision_overrides", "overrides", "match"),
    [
        (dict(hidden_act="gelu_pytorch_tanh"), {}, "exact"),
        ({}, dict(projector_hidden_act="relu"), "exact"),
        ({}, dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
        ({}, dict(vision_feature_layer=0), "vision_feature_layer"),
        ({}, dict(vision_feature_layer=[-1, -2]), "vision_feature_layer"),
        (dict(image_size=[TILE, TILE // 2]), {}, "non-square"),
    ],
)
def test_unsupported_vision_configs_are_refused(vision_overrides, overrides, match):
    """Guards against silently building a tower HF computes otherwise: a tanh GELU where ORT's
    Gelu is erf, a CLS-keeping strategy, a feature layer HF reads differently, or tiles whose
    position embeddings HF interpolates."""
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    vision = InternVLVisionConfig(**{**sizes, "image_size": TILE, "patch_size": PATCH, **vision_overrides})
    text = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = InternVLForConditionalGeneration(
        InternVLConfig(vision_config=vision, text_config=text, image_token_id=63, **overrides)
    )
    with pytest.raises(ValueError, match=match):
        check_lean_vision_supported(model)


# ------------------------------------------------------------- exports of the sharpened checkpoint


@pytest.fixture(scope="module")
def lean_vision_dir(sharp_checkpoint, tmp_path_factory) -> Path:
    """The lean vision graph beside the traced (explicit) decoder: only the tower differs."""
    out = tmp_path_factory.mktemp("edge") / "lean-vision"
    export_edge(
        ExportConfig(model_dir=sharp_checkpoint, out_dir=out, graph="explicit", vision_graph="lean", verify=False)
    )
    return out


@pytest.fixture(scope="module")
def explicit_dir(sharp_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "explicit"
    export_edge(ExportConfig(model_dir=sharp_checkpoint, out_dir=out, graph="explicit", verify=False))
    return out


def test_lean_vision_graph_is_built_of_fused_ops(lean_dir, explicit_dir):
    """Guards against the lean export silently writing the traced tower (or growing its shape
    arithmetic and explicit softmax back), and against I/O that differs from the traced graph's
    (names, dtypes, fixed tile side, dynamic tile and token axes) the runtime binds alike."""
    sidecar = EdgeSidecar.load(lean_dir)
    assert sidecar.vision_graph == "lean" and EdgeSidecar.load(explicit_dir).vision_graph == "explicit"
    graph = onnx.load(str(lean_dir / sidecar.graphs.vision)).graph
    ops = Counter(node.op_type for node in graph.node)
    layers = ops["MultiHeadAttention"]
    assert layers == 2  # the tiny preset's ViT depth
    assert ops["SkipLayerNormalization"] == 2 * layers - 1  # every residual add but the last
    assert ops["LayerNormalization"] == 2  # the first layer's and the projector's
    assert ops["BiasGelu"] == layers + 1  # each MLP and the projector, exact GELU
    assert ops["Conv"] == 1
    for absent in ("Softmax", "Erf", "Shape", "Expand", "Concat", "Gather", "Resize", "Constant"):
        assert ops[absent] == 0, absent
    # per layer: q|k|v MatMul, Split, MHA, out MatMul, 2 norms, fc1, BiasGelu, fc2; 16 around them
    assert len(graph.node) <= 9 * layers + 16
    traced = onnx.load(str(explicit_dir / sidecar.graphs.vision)).graph

    def signature(values):
        return [
            (
                v.name,
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    assert signature(graph.input) == signature(traced.input)
    assert signature(graph.output) == [("image_embeds", onnx.TensorProto.FLOAT, ["visual_tokens", 64])]
    assert signature(traced.output)[0][:2] == ("image_embeds", onnx.TensorProto.FLOAT)


def test_sidecar_vision_graph_field_and_older_versions(lean_dir, sharp_checkpoint, tmp_path):
    """Guards against a directory that does not say which tower it holds: the field must
    round-trip, an unknown kind must be refused, sidecars written before it (version 4) must read
    as the traced tower they describe, and --vision-graph must override --graph's default."""
    data = json.loads((lean_dir / SIDECAR_NAME).read_text())
    assert data["vision_graph"] == "lean" and data["format_version"] == 7
    with pytest.raises(ValueError, match="vision_graph must be one of"):
        EdgeSidecar.from_json(json.dumps({**data, "vision_graph": "fused"}))
    older = {key: value for key, value in data.items() if key != "vision_graph"} | {"format_version": 4}
    assert EdgeSidecar.from_json(json.dumps(older)).vision_graph == "explicit"
    assert ExportConfig(model_dir=tmp_path, out_dir=tmp_path, graph="lean").vision_graph == "lean"
    assert ExportConfig(model_dir=tmp_path, out_dir=tmp_path, graph="lean", vision_graph="explicit").vision_graph == "explicit"  # fmt: skip
    with pytest.raises(ValueError, match="vision_graph must be one of"):
        ExportConfig(model_dir=tmp_path, out_dir=tmp_path, vision_graph="fused")


def test_export_verification_covers_the_lean_vision_graph(lean_vision_dir, sharp_checkpoint, tiny_checkpoint):
    """Guards against a verification step that checks the traced tower (or none) when the lean one
    was exported: its image_embeds check must name the lean graph, pass against the checkpoint it
    came from and fail against another checkpoint of the same shapes."""
    good = verify_export(sharp_checkpoint, lean_vision_dir, "fp32")
    vision = [check for check in good.checks if check.name.startswith("vision")]
    assert [check.name for check in vision] == ["vision image_embeds (lean graph)"]
    assert all(check.ok for check in good.checks)
    bad = verify_export(tiny_checkpoint, lean_vision_dir, "fp32")
    assert not next(check for check in bad.checks if check.name.startswith("vision")).ok


@pytest.mark.parametrize("export", ["lean_vision_dir", "lean_dir"])
def test_lean_vision_generation_equals_explicit_export(export, explicit_dir, request):
    """Guards against the lean tower feeding the decoder other visual tokens than the traced one
    (row order across tiles, token order within a tile): an EdgeModel generation on an image of
    7 tiles must give the explicit export's tokens, probabilities and visual scores, with the
    traced decoder (only the tower differs) and with both graphs lean."""
    lean = EdgeModel.load(request.getfixturevalue(export), providers=[CPU])
    explicit = EdgeModel.load(explicit_dir, providers=[CPU])
    image = make_test_image(150, 90, seed=3)  # 3 x 2 grid + thumbnail
    ours = lean.generate(image, "What colour is the circle?", MAX_NEW_TOKENS)
    theirs = explicit.generate(image, "What colour is the circle?", MAX_NEW_TOKENS)
    assert ours.image_embeds.shape[0] == 7 * lean.sidecar.tokens_per_tile
    assert ours.token_ids == theirs.token_ids
    np.testing.assert_allclose(ours.image_embeds, theirs.image_embeds, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.token_probs, theirs.token_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.visual_scores, theirs.visual_scores, rtol=1e-5, atol=1e-6)


def test_lean_vision_runtime_runs_with_torch_and_transformers_absent(lean_dir, tmp_path):
    """Guards against the lean tower's contrib ops (MultiHeadAttention, Skip norms, BiasGelu)
    needing anything beyond onnxruntime at run time (DESIGN invariant 5)."""
    assert_same_run_without_torch(lean_dir, EdgeModel.load(lean_dir, providers=[CPU]), tmp_path)


def test_vision_speed_bench_runs_at_the_quick_preset():
    """Guards against bench/vision_speed.py (the lean vs traced vision figure) breaking unnoticed,
    and against the two graphs it times computing different things at the quick shape."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "vision_speed.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--quick", "--repeats", "1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["preset"] == "quick" and result["tiles"] == 7 and result["visual_tokens"] == 7 * 64
    assert result["lean_vs_traced_vision"] > 0
    assert result["lean_vs_traced_max_abs_diff"] <= LEAN_VS_TRACED_REL * result["max_abs_output"]
