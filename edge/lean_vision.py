"""The lean vision graph: the vision tower, pixel shuffle and projector built op by op.

``build_lean_vision`` writes the same vision graph as the traced
``export_modules.VisionEncoder`` (``InternVLModel.get_image_features``; same
input and output names and meanings, ``sidecar.GraphIO``): pixel_values
[tiles, 3, t, t] float32 -> image_embeds [tiles * tokens_per_tile, text_hidden]
in the export dtype, built from the weights without tracing, one small
function per block as onnxruntime-genai's model builder does:

- patch embedding: one strided ``Conv``; the CLS token goes in by a ``Pad`` of
  one zero row, and one ``Add`` of a [patches + 1, D] table whose first row is
  CLS + its position embedding (no Expand/Concat shape arithmetic);
- per layer: one fused q|k|v ``MatMul``, ``com.microsoft.MultiHeadAttention``
  (its ``bias`` input adds the q|k|v bias; with ``use_qk_norm`` the bias is
  added first and q, k go through ``SimplifiedLayerNormalization`` over the
  whole width, as HF's ``q_norm``/``k_norm`` do), the output projection, the
  exact (erf) GELU MLP with ``com.microsoft.BiasGelu``, and the norms
  (``LayerNormalization`` or RMSNorm by ``norm_type``) fused with the residual
  adds as ``com.microsoft.SkipLayerNormalization`` /
  ``SkipSimplifiedLayerNormalization``;
- the layer scales ``lambda_1``/``lambda_2`` folded into the columns of the
  attention output projection and of ``fc2`` (and their biases): ``lambda *
  (x W + b) = x (W lambda) + b lambda`` saves a Mul per block and lets the
  residual add join the next norm;
- the features HF selects (``vision_feature_layer``: the last layer through the
  tower's final norm, or an earlier hidden state without it; CLS dropped, the
  ``default`` strategy), pixel shuffle (one Reshape, Transpose, Reshape) and the
  projector (LayerNorm, Linear, exact GELU, Linear).

Position embeddings are added as stored: HF interpolates them only for tiles of
another size (or non-square ones), which this graph, whose input has the
checkpoint's fixed tile side, never sees; ``check_lean_vision_supported``
refuses a checkpoint whose table does not fit its own patch grid.

Export time only (reads a torch model's weights); the runtime needs only the
``.onnx`` file, which it opens like the traced one. float32 and float16 graphs
are built (the model's dtype); the input stays float32 and is cast, as
``get_image_features`` casts it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from transformers import InternVLForConditionalGeneration

from .lean_decoder import IR_VERSION, MS_DOMAIN, OPSET, GraphBuilder, _linear_weight, _np
from .quantize import save_graph
from .sidecar import GraphIO

# ACT2FN names of the exact (erf) GELU, which com.microsoft.Gelu / BiasGelu compute.
EXACT_GELU = ("gelu", "gelu_python")
VISION_NORMS = ("layer_norm", "rms_norm")


def check_lean_vision_supported(model: InternVLForConditionalGeneration) -> None:
    """Refuse a vision tower or projector the lean graph would compute wrongly."""
    config = model.config
    vision = config.vision_config
    for what, act in (
        ("vision hidden_act", vision.hidden_act),
        ("projector_hidden_act", config.projector_hidden_act),
    ):
        if act not in EXACT_GELU:
            raise ValueError(f"the lean vision graph has exact (erf) GELUs; {what} is {act!r}")
    if vision.norm_type not in VISION_NORMS:
        raise ValueError(f"vision norm_type {vision.norm_type!r} is not one of {VISION_NORMS}")
    height, width = vision.image_size
    if height != width:
        raise ValueError(
            f"HF interpolates position embeddings for non-square tiles; image_size is {height}x{width}"
        )
    patches = (height // vision.patch_size[0]) * (width // vision.patch_size[1])
    positions = model.model.vision_tower.embeddings.position_embeddings
    if positions is not None and positions.shape[1] != patches + 1:
        raise ValueError(
            f"position embeddings hold {positions.shape[1] - 1} patches, the {height}px tile has {patches}: "
            "HF would interpolate them, the lean graph does not"
        )
    layer = config.vision_feature_layer
    depth = vision.num_hidden_layers
    # 0 would be the embeddings, but get_image_features reads it as output_hidden_states=False and fails
    if not isinstance(layer, int) or layer == 0 or not -(depth + 1) <= layer <= depth:
        raise ValueError(
            f"vision_feature_layer must be one nonzero layer index in -{depth + 1}..{depth}, got {layer!r}"
        )
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}: only 'default' "
            "(CLS dropped) makes the square grid pixel shuffle needs"
        )
    shuffle_factor(model)


def shuffle_factor(model: InternVLForConditionalGeneration) -> int:
    """k of the k x k pixel shuffle (``downsample_ratio`` 1 / k) that divides the patch grid."""
    vision = model.config.vision_config
    ratio = model.config.downsample_ratio
    factor = round(1 / ratio)
    side = vision.image_size[0] // vision.patch_size[0]
    if factor < 1 or abs(factor * ratio - 1) > 1e-9 or side % factor:
        raise ValueError(f"downsample_ratio {ratio} is not 1/k for a k dividing the {side}-patch grid")
    return factor


def feature_layers(model: InternVLForConditionalGeneration) -> tuple[int, bool]:
    """(layers to run, whether the tower's final norm follows) for ``vision_feature_layer``.

    -1 is ``last_hidden_state`` (every layer, then ``vision_tower.layernorm``,
    an identity with mean pooling); any other index k is ``hidden_states[k]``
    (the output of layer k - 1; negative k counts from the end) without the
    final norm, as ``get_image_features`` reads them.
    """
    layers = model.config.vision_config.num_hidden_layers
    index = model.config.vision_feature_layer
    if index == -1:
        return layers, not isinstance(model.model.vision_tower.layernorm, nn.Identity)
    return index % (layers + 1), False


# --------------------------------------------------------------------- blocks


def patch_embedding(g: GraphBuilder, embeddings, pixels: str) -> str:
    """Conv patches, CLS row and position embeddings: pixels [N, 3, t, t] -> [N, P + 1, D]."""
    conv = embeddings.patch_embeddings.projection
    patches = g.op(
        "Conv",
        [
            pixels,
            g.weight("vision.patch.weight", _np(conv.weight)),
            g.weight("vision.patch.bias", _np(conv.bias)),
        ],
        "vision.patch",
        kernel_shape=list(conv.kernel_size),
        strides=list(conv.stride),
    )  # [N, D, t/p, t/p]
    patches = g.op(
        "Reshape", [patches, g.const("vision.patch.flat", [0, 0, -1], np.int64)], "vision.patch_rows"
    )
    patches = g.op("Transpose", [patches], "vision.patch_tokens", perm=[0, 2, 1])  # [N, P, D]
    # One zero row in front, then [P + 1, D] = [cls + pos_0; pos_1..P]: HF's cat(cls, patches) + pos.
    pads = g.const("vision.cls_pads", [0, 1, 0, 0, 0, 0], np.int64)
    tokens = g.op("Pad", [patches, pads], "vision.cls_slot")  # [N, P + 1, D]
    cls = _np(embeddings.cls_token)[0, 0]  # [D]
    table = np.zeros((embeddings.patch_embeddings.num_patches + 1, cls.shape[0]), np.float32)
    if embeddings.position_embeddings is not None:  # use_absolute_position_embeddings
        table += _np(embeddings.position_embeddings)[0]  # [P + 1, D]
    table[0] += cls
    return g.op("Add", [tokens, g.weight("vision.cls_positions", table)], "vision.embeddings")


def norm(g: GraphBuilder, module, x: str, name: str) -> str:
    """LayerNormalization (nn.LayerNorm) or SimplifiedLayerNormalization (the vision RMSNorm) of x."""
    if isinstance(module, nn.LayerNorm):
        inputs = [
            x,
            g.weight(f"{name}.weight", _np(module.weight)),
            g.weight(f"{name}.bias", _np(module.bias)),
        ]
        return g.op("LayerNormalization", inputs, name, axis=-1, epsilon=float(module.eps), stash_type=1)
    weight = g.weight(f"{name}.weight", _np(module.weight))
    return g.op(
        "SimplifiedLayerNormalization",
        [x, weight],
        name,
        axis=-1,
        epsilon=float(module.variance_epsilon),
        stash_type=1,
    )


def skip_norm(g: GraphBuilder, x: str, residual: str, bias: np.ndarray, module, name: str) -> tuple[str, str]:
    """(norm(x + bias + residual), x + bias + residual) in one Skip(Simplified)LayerNormalization."""
    gamma = g.weight(f"{name}.weight", _np(module.weight))
    bias_name = g.weight(f"{name}.skip_bias", bias)
    if isinstance(module, nn.LayerNorm):
        op, inputs, eps = "SkipLayerNormalization", [x, residual, gamma, g.weight(f"{name}.bias", _np(module.bias)), bias_name], module.eps  # fmt: skip
    else:
        op, inputs, eps = (
            "SkipSimplifiedLayerNormalization",
            [x, residual, gamma, bias_name],
            module.variance_epsilon,
        )
    normed, _, _, total = g.op(
        op, inputs, name, outputs=["output", "", "", "sum"], domain=MS_DOMAIN, epsilon=float(eps)
    )
    return normed, total


def residual_add(g: GraphBuilder, x: str, residual: str, bias: np.ndarray, name: str) -> str:
    """x + bias + residual where no norm follows (the features are a hidden state)."""
    x = g.op("Add", [x, g.weight(f"{name}.bias", bias)], f"{name}.bias_add")
    return g.op("Add", [x, residual], name)


def attention_block(
    g: GraphBuilder, attention, x: str, scale: np.ndarray, layer: int
) -> tuple[str, np.ndarray]:
    """Fused q|k|v MatMul, (q/k norm), MultiHeadAttention, output projection scaled by ``lambda_1``.

    x [N, S, D] -> (output [N, S, D] without its bias, that bias [D] * lambda_1 for the next Add).
    """
    prefix = f"vision.layers.{layer}.attn"
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    weight = np.concatenate([_linear_weight(p) for p in projections], axis=1)  # [D, 3D]
    qkv = g.op("MatMul", [x, g.weight(f"{prefix}.qkv.weight", weight)], f"{prefix}.qkv")
    bias = None
    if attention.q_proj.bias is not None:
        bias = np.concatenate([_np(p.bias) for p in projections])  # [3D]
    width = attention.embed_dim
    sizes = g.const(f"{prefix}.split", [width] * 3, np.int64)
    if isinstance(attention.q_norm, nn.Identity):
        query, key, value = g.op("Split", [qkv, sizes], f"{prefix}.split_qkv", outputs=3, axis=-1)
        mha_inputs = [query, key, value] + (
            [g.weight(f"{prefix}.qkv.bias", bias)] if bias is not None else []
        )
    else:
        # q_norm / k_norm act on the biased projections, over all heads at once
        if bias is not None:
            qkv = g.op("Add", [qkv, g.weight(f"{prefix}.qkv.bias", bias)], f"{prefix}.qkv_bias")
        query, key, value = g.op("Split", [qkv, sizes], f"{prefix}.split_qkv", outputs=3, axis=-1)
        query = norm(g, attention.q_norm, query, f"{prefix}.q_norm")
        key = norm(g, attention.k_norm, key, f"{prefix}.k_norm")
        mha_inputs = [query, key, value]
    context = g.op(
        "MultiHeadAttention", mha_inputs, f"{prefix}.mha", domain=MS_DOMAIN,
        num_heads=attention.num_heads, scale=float(attention.scale),
    )  # fmt: skip
    out_proj = attention.projection_layer
    out = g.op(
        "MatMul",
        [context, g.weight(f"{prefix}.out.weight", _linear_weight(out_proj) * scale)],
        f"{prefix}.out",
    )
    return out, _np(out_proj.bias) * scale


def mlp_block(g: GraphBuilder, mlp, x: str, scale: np.ndarray, layer: int) -> tuple[str, np.ndarray]:
    """fc2(gelu(fc1(x))) scaled by ``lambda_2``: x [N, S, D] -> (output without fc2's bias, that bias * lambda_2)."""
    prefix = f"vision.layers.{layer}.mlp"
    hidden = g.op("MatMul", [x, g.weight(f"{prefix}.fc1.weight", _linear_weight(mlp.fc1))], f"{prefix}.fc1")
    hidden = g.op(
        "BiasGelu",
        [hidden, g.weight(f"{prefix}.fc1.bias", _np(mlp.fc1.bias))],
        f"{prefix}.gelu",
        domain=MS_DOMAIN,
    )
    out = g.op(
        "MatMul", [hidden, g.weight(f"{prefix}.fc2.weight", _linear_weight(mlp.fc2) * scale)], f"{prefix}.fc2"
    )
    return out, _np(mlp.fc2.bias) * scale


def encoder(g: GraphBuilder, tower, hidden: str, num_layers: int, final_norm) -> str:
    """The first ``num_layers`` layers (then ``final_norm`` if given): [N, S, D] -> [N, S, D].

    Each residual add is the sum output of the norm after it, the next layer's
    ``layernorm_before`` included, so no layer ends in a separate Add.
    """
    layers = tower.encoder.layer
    if num_layers == 0:
        return hidden
    normed = norm(g, layers[0].layernorm_before, hidden, "vision.layers.0.norm_before")
    for index in range(num_layers):
        layer = layers[index]
        attn_out, attn_bias = attention_block(g, layer.attention, normed, _np(layer.lambda_1), index)
        normed, hidden = skip_norm(
            g, attn_out, hidden, attn_bias, layer.layernorm_after, f"vision.layers.{index}.norm_after"
        )
        mlp_out, mlp_bias = mlp_block(g, layer.mlp, normed, _np(layer.lambda_2), index)
        following = layers[index + 1].layernorm_before if index + 1 < num_layers else final_norm
        if following is None:
            return residual_add(g, mlp_out, hidden, mlp_bias, f"vision.layers.{index}.residual")
        name = f"vision.layers.{index + 1}.norm_before" if index + 1 < num_layers else "vision.final_norm"
        normed, hidden = skip_norm(g, mlp_out, hidden, mlp_bias, following, name)
    return normed  # final_norm's output


def pixel_shuffle(g: GraphBuilder, features: str, side: int, factor: int, width: int) -> str:
    """HF's pixel shuffle, flattened: features [N, side^2, C] -> [N * (side/k)^2, k^2 C].

    Output token (i, j) holds, channel by channel, patches (k i + a, k j + b)
    for a, then b, in 0..k-1: the order of ``InternVLModel.pixel_shuffle``.
    """
    cells = side // factor
    grid = g.const("vision.shuffle.grid", [0, cells, factor, cells, factor, width], np.int64)
    features = g.op("Reshape", [features, grid], "vision.shuffle.split")  # [N, i, a, j, b, C]
    features = g.op(
        "Transpose", [features], "vision.shuffle.swap", perm=[0, 1, 3, 2, 4, 5]
    )  # [N, i, j, a, b, C]
    rows = g.const("vision.shuffle.rows", [-1, factor * factor * width], np.int64)
    return g.op("Reshape", [features, rows], "vision.shuffle")


def projector(g: GraphBuilder, module, x: str) -> str:
    """linear_2(gelu(linear_1(layer_norm(x)))): [T, k^2 C] -> [T, text_hidden]."""
    x = norm(g, module.layer_norm, x, "projector.layer_norm")
    x = g.op(
        "MatMul",
        [x, g.weight("projector.linear_1.weight", _linear_weight(module.linear_1))],
        "projector.linear_1",
    )
    x = g.op(
        "BiasGelu",
        [x, g.weight("projector.linear_1.bias", _np(module.linear_1.bias))],
        "projector.gelu",
        domain=MS_DOMAIN,
    )
    x = g.op(
        "MatMul",
        [x, g.weight("projector.linear_2.weight", _linear_weight(module.linear_2))],
        "projector.linear_2",
    )
    return g.op(
        "Add", [x, g.weight("projector.linear_2.bias", _np(module.linear_2.bias))], "projector.linear_2_bias"
    )


def build_lean_vision(model: InternVLForConditionalGeneration, io: GraphIO) -> onnx.ModelProto:
    """The lean vision graph of ``model`` (its dtype: float32 or float16) as an ONNX model."""
    check_lean_vision_supported(model)
    config = model.config
    vision = config.vision_config
    tower = model.model.vision_tower
    dtype = np.dtype(np.float16 if model.dtype == torch.float16 else np.float32)
    g = GraphBuilder(dtype)
    pixels = io.pixel_values
    if dtype != np.float32:
        pixels = g.op("Cast", [pixels], "vision.pixels_cast", to=g.onnx_dtype)
    hidden = patch_embedding(g, tower.embeddings, pixels)  # [N, P + 1, D]
    num_layers, with_final_norm = feature_layers(model)
    hidden = encoder(g, tower, hidden, num_layers, tower.layernorm if with_final_norm else None)
    starts, ends, axes = (g.const(f"vision.drop_cls.{n}", [v], np.int64) for n, v in (("start", 1), ("end", np.iinfo(np.int64).max), ("axis", 1)))  # fmt: skip
    patches = g.op("Slice", [hidden, starts, ends, axes], "vision.drop_cls")  # [N, P, D]
    side = vision.image_size[0] // vision.patch_size[0]
    tokens = pixel_shuffle(g, patches, side, shuffle_factor(model), vision.hidden_size)  # [N * T, k^2 D]
    embeds = projector(g, model.model.multi_modal_projector, tokens)  # [N * T, text_hidden]
    return _assemble(g, io, vision, config.text_config.hidden_size, embeds)


def _assemble(g: GraphBuilder, io: GraphIO, vision, text_hidden: int, embeds: str) -> onnx.ModelProto:
    """The traced graph's input and output (names, dtypes, dynamic axes); the last node writes the output."""
    for node in g.nodes:
        node.output[:] = [io.image_embeds if out == embeds else out for out in node.output]
    tile = vision.image_size[0]
    inputs = [helper.make_tensor_value_info(io.pixel_values, TensorProto.FLOAT, ["tiles", vision.num_channels, tile, tile])]  # fmt: skip
    outputs = [helper.make_tensor_value_info(io.image_embeds, g.onnx_dtype, ["visual_tokens", text_hidden])]
    graph = helper.make_graph(g.nodes, "stitch_lean_vision", inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="stitchvlm")


def export_lean_vision(model: InternVLForConditionalGeneration, path: Path, io: GraphIO) -> None:
    """Build and save the lean vision graph of ``model`` at ``path``."""
    save_graph(build_lean_vision(model, io), path)
