"""The lean decoder graph: built op by op from the weights with ONNX Runtime's fused ops.

``build_lean_decoder`` writes the same decoder pass as ``export_modules.ScoringDecoder``
(same input and output names and meanings, ``sidecar.GraphIO``) without tracing
anything, one small function per block as onnxruntime-genai's model builder does:

- ``SimplifiedLayerNormalization`` / ``com.microsoft.SkipSimplifiedLayerNormalization``
  for the RMSNorms and the residual adds;
- one fused q|k|v ``MatMul`` (+ the bias Qwen2 has, left out when it is all zeros)
  feeding ``com.microsoft.GroupQueryAttention`` packed, which rotates q and k itself
  (``do_rotary``) at the ``position_ids`` given (the consistency pass skips positions:
  ``rotary_slots``) and gives the attention output;
- the SiLU MLP; the final norm; the LM head on the last ``num_logits`` rows only.

The KV cache lives in buffers shared between past and present: ``past_key_i`` is
a ``[batch, kv_heads, capacity, head_dim]`` buffer holding ``past`` filled
positions, GroupQueryAttention writes the new ones into it in place, and
``present_key_i`` is that same buffer (the runtime binds both names to one
OrtValue). ``attention_mask`` ``[batch, past + seq]`` gives the filled length:
GroupQueryAttention reads it as ``seqlens_k = sum(mask) - 1`` and
``total_sequence_length = past + seq``, so its ones must come first (right
padding only); the runtime never pads and refuses a mask with zeros.

The visual-token score (DESIGN "Scores beside fused attention") is computed
beside the fused kernel for the scoring rows alone: the rows from the first
query with ``score_query_mask > 0`` (over the batch) to the end, which are
the text after the image in a prefill, the one new token in a decode step,
none in the consistency pass. For each layer ``softmax(q K^T / sqrt(d))`` of
those rows (their q rotated by ``RotaryEmbedding``, the keys as GroupQueryAttention
wrote them) with the causal mask is taken over the KV buffer itself (keys past
the filled length masked out, never copied), one GEMM per kv head for its
group of query heads (``[batch, kv_heads, groups * rows, capacity]``), and
added to a running sum over layers; after the layers that sum is summed over
heads and weighted by the rows' ``score_query_mask`` in one MatMul. Rows
before the first scored one have weight 0 for every batch row, so the sum is
the one ``ScoringDecoder`` computes; the full ``seq x total`` probabilities
are never formed.

Export time only (reads a torch model's weights); the runtime needs only the
``.onnx`` file. ``--no-scores`` builds the same graph without the score nodes.
float32 and float16 graphs are built; ORT's CUDA GroupQueryAttention takes
float16/bfloat16 only, so on CUDA the lean graph is exported in fp16 (the
runtime keeps a float32 one on the CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import InternVLForConditionalGeneration

from .export_modules import check_supported
from .quantize import save_graph
from .sidecar import GraphIO

MS_DOMAIN = "com.microsoft"
OPSET = 17
# ONNX Runtime 1.31 reads IR versions up to 13; onnx 1.23 would write 14.
IR_VERSION = 10
INT64_MAX = np.iinfo(np.int64).max
LEAN_TEXT_ACTIVATIONS = ("silu",)


class GraphBuilder:
    """Nodes, initializers and unique names of one graph under construction."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)  # weights, activations and KV cache
        self.onnx_dtype = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: set[str] = set()

    def unique(self, name: str) -> str:
        candidate, index = name, 1
        while candidate in self._used:
            candidate, index = f"{name}_{index}", index + 1
        self._used.add(candidate)
        return candidate

    def weight(self, name: str, array: np.ndarray, dtype: np.dtype | None = None) -> str:
        """An initializer (in the graph dtype unless ``dtype`` says otherwise); returns its name."""
        name = self.unique(name)
        # np.array(copy) rather than ascontiguousarray, which turns a 0-d array into 1-d
        value = np.array(array, dtype=dtype or self.dtype, order="C")
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def const(self, name: str, value, dtype) -> str:
        return self.weight(name, np.array(value), np.dtype(dtype))

    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        outputs: int | list[str] = 1,
        domain: str = "",
        **attrs,
    ):
        """Add one node; returns its output name (or names when ``outputs`` is a count > 1 or a list)."""
        node_name = self.unique(name)
        if isinstance(outputs, int):
            names = [node_name if outputs == 1 else f"{node_name}:{i}" for i in range(outputs)]
        else:
            names = [f"{node_name}:{out}" if out else "" for out in outputs]
        self._used.update(n for n in names if n)
        self.nodes.append(helper.make_node(op_type, inputs, names, name=node_name, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _linear_weight(layer: torch.nn.Linear) -> np.ndarray:
    """[in, out]: what MatMul takes (torch keeps [out, in])."""
    return _np(layer.weight).T


def check_lean_supported(model: InternVLForConditionalGeneration) -> None:
    """Refuse what the lean graph would compute wrongly (beyond ``check_supported``)."""
    check_supported(model)
    text = model.config.text_config
    act = getattr(text, "hidden_act", "silu")
    if act not in LEAN_TEXT_ACTIVATIONS:
        raise ValueError(f"the lean graph has a SiLU MLP; text model activation is {act!r}")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rotary = getattr(text, "partial_rotary_factor", 1.0)
    if rotary != 1.0 or head_dim % 2:
        raise ValueError(
            f"the lean graph rotates whole heads; partial_rotary_factor {rotary}, head_dim {head_dim}"
        )


def rotary_caches(model: InternVLForConditionalGeneration, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, head_dim / 2] from the model's own rotary embedding.

    Taken from ``rotary_emb`` itself (inv_freq, rope scaling and attention
    scaling included) rather than recomputed; HF's cos/sin repeat their first
    half (``cat(freqs, freqs)``), RotaryEmbedding takes that half.
    """
    text_model = model.model.language_model
    positions = torch.arange(model.config.text_config.max_position_embeddings)[None]  # [1, P]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = text_model.rotary_emb(probe, positions)  # [1, P, head_dim] float32
    half = cos.shape[-1] // 2
    if not torch.equal(cos[..., :half], cos[..., half:]):
        raise ValueError("rotary cos/sin are not of the rotate-half layout RotaryEmbedding implements")
    # RotaryEmbedding computes in the graph dtype, as transformers casts cos/sin to it.
    return _np(cos[0, :, :half]).astype(dtype), _np(sin[0, :, :half]).astype(dtype)


# --------------------------------------------------------------------- blocks


def attention_block(g: GraphBuilder, attn, x: str, layer: int, past_key: str, past_value: str, shared: dict):
    """Fused q|k|v projection, GroupQueryAttention rotating q and k itself, o_proj.

    x [B, S, D] -> (output [B, S, D], present_key, present_value [B, KV, capacity, hd],
    qkv [B, S, (H + 2 KV) * hd] before RoPE: ``score_rows`` rotates its own rows of q).
    """
    prefix = f"layers.{layer}.attn"
    heads, kv_heads = shared["heads"], shared["kv_heads"]
    weight = np.concatenate([_linear_weight(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], axis=1)
    qkv = g.op("MatMul", [x, g.weight(f"{prefix}.qkv.weight", weight)], f"{prefix}.qkv")
    qkv = _add_bias(g, qkv, [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], f"{prefix}.qkv")
    # Packed q|k|v, rotated inside the kernel at the slots of the gathered caches (``rotary_slots``).
    context, present_key, present_value = g.op(
        "GroupQueryAttention",
        [qkv, "", "", past_key, past_value, shared["seqlens_k"], shared["total_int32"],
         shared["cos_slots"], shared["sin_slots"]],
        f"{prefix}.gqa",
        outputs=["output", "present_key", "present_value"],
        domain=MS_DOMAIN,
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=float(attn.scaling),
        do_rotary=1,
        rotary_interleaved=0,
    )  # fmt: skip
    out = g.op(
        "MatMul",
        [context, g.weight(f"{prefix}.o_proj.weight", _linear_weight(attn.o_proj))],
        f"{prefix}.o_proj",
    )
    out = _add_bias(g, out, [attn.o_proj.bias], f"{prefix}.o_proj")
    return out, present_key, present_value, qkv


def _add_bias(g: GraphBuilder, x: str, biases: list, name: str) -> str:
    """x + the concatenated biases; x itself when there are none or all are zero (adding zeros
    changes no value, and onnxruntime-genai's builder leaves them out in the same way)."""
    if all(b is None for b in biases):
        return x
    bias = np.concatenate([_np(b) for b in biases])
    if not bias.any():
        return x
    return g.op("Add", [x, g.weight(f"{name}.bias", bias)], f"{name}_bias")


def rotary_slots(g: GraphBuilder, io: GraphIO, shared: dict) -> None:
    """cos and sin caches [past + seq, hd/2] whose row ``past + s`` is the rotation of position
    ``position_ids[0, s]``.

    GroupQueryAttention rotates a first prompt (no past) at positions 0..S-1 whatever
    ``position_ids`` says, and a later pass at its cache slots past..past+S-1; gathering the
    cache rows of the given positions into those slots makes it rotate at the given positions
    in both (the consistency pass skips positions). One Gather per cache per pass, not per
    layer. Every batch row takes row 0's positions: the runtime refuses a batch whose rows differ.
    """
    shared["past"] = g.op("Sub", [shared["total"], shared["seq"]], "past")
    earlier = g.op("Range", [shared["zero"], shared["past"], shared["one"]], "rotary.earlier_slots")  # [past]
    first_row = g.op("Gather", [io.position_ids, shared["zero"]], "rotary.first_row", axis=0)  # [S]
    rows = g.op("Concat", [earlier, first_row], "rotary.rows", axis=0)  # [past + S]
    shared["cos_slots"] = g.op("Gather", [shared["cos"], rows], "rotary.cos_slots", axis=0)
    shared["sin_slots"] = g.op("Gather", [shared["sin"], rows], "rotary.sin_slots", axis=0)


def score_rows(g: GraphBuilder, qkv: str, present_key: str, layer: int, shared: dict) -> str:
    """This layer's attention probabilities of the scoring rows.

    qkv [B, S, (H + 2 KV) * hd] (before RoPE), present_key [B, KV, C, hd] (the whole buffer, rotated
    by GroupQueryAttention; C = capacity) -> [B, KV, G*R, C] float32: row g*R + r of kv head kv is
    query head kv*G + g of scoring row r (``score_total`` sums heads and layers); R = the rows from
    the first scored query on, the only rows of q rotated here. Keys past the filled length
    are masked out by ``Where``, so they need no Slice (a copy of every key each pass) and may
    hold anything, NaN included (uninitialised device memory).
    """
    prefix = f"layers.{layer}.score"
    query = g.op(
        "Slice", [qkv, shared["q_rows_starts"], shared["q_rows_ends"], shared["axes_1_2"]], f"{prefix}.q_rows"
    )  # [B, R, H*hd]: q of the scoring rows
    query = g.op(
        "RotaryEmbedding", [query, shared["score_positions"], shared["cos"], shared["sin"]],
        f"{prefix}.q_rotary", domain=MS_DOMAIN,
        num_heads=shared["heads"], rotary_embedding_dim=shared["head_dim"], interleaved=0,
    )  # fmt: skip
    # [B, R, H*hd] -> [B, R*H, hd] (a view) -> [B, KV, G*R, hd]: one Gather picks query head
    # kv*G + g of row r for grouped row g*R + r (query head h reads kv head h // G, as
    # repeat_kv does), so one GEMM per kv head reads its keys once for all G heads
    flat = g.op("Reshape", [query, shared["flat_heads_shape"]], f"{prefix}.q_flat")
    rows = g.op("Gather", [flat, shared["grouped_rows_index"]], f"{prefix}.q_grouped", axis=1)
    keys = present_key
    if g.dtype != np.float32:
        rows = g.op("Cast", [rows], f"{prefix}.q_float", to=TensorProto.FLOAT)
        keys = g.op("Cast", [keys], f"{prefix}.k_float", to=TensorProto.FLOAT)
    # q K^T * scaling in one GEMM that reads K transposed in place (no Transpose copy, no Mul)
    logits = g.op(
        "FusedMatMul", [rows, keys], f"{prefix}.qk", domain=MS_DOMAIN, alpha=shared["scaling"], transB=1
    )  # [B, KV, G*R, C]
    logits = g.op("Where", [shared["score_allowed"], logits, shared["blocked"]], f"{prefix}.masked")
    return g.op("Softmax", [logits], f"{prefix}.probs", axis=-1)  # [B, KV, G*R, C]


def score_total(g: GraphBuilder, summed: str, shared: dict) -> str:
    """visual_scores [B, T] from the layers' summed [B, KV, G*R, C] probabilities: summed over
    heads (one ReduceSum for the whole pass), then weighted by row."""
    summed = g.op("Reshape", [summed, shared["sum_shape"]], "score.by_head", allowzero=1)  # [B, KV, G, R, C]
    axes = g.const("score.axes_heads", [1, 2], np.int64)
    summed = g.op("ReduceSum", [summed, axes], "score.head_sum", keepdims=0)  # [B, R, C]
    weighted = g.op("MatMul", [shared["row_weights"], summed], "score.weighted")  # [B, 1, C]
    filled = g.op(
        "Slice", [weighted, shared["zero_1d"], shared["total_1d"], shared["axis_2"]], "score.filled"
    )  # [B, 1, T]
    return g.op("Squeeze", [filled, shared["axis_1"]], "score.visual_scores")


def mlp_block(g: GraphBuilder, mlp, x: str, layer: int) -> str:
    """down(silu(gate(x)) * up(x)); x [B, S, D] -> [B, S, D]."""
    prefix = f"layers.{layer}.mlp"

    def linear(name: str, module, inp: str) -> str:
        out = g.op(
            "MatMul", [inp, g.weight(f"{prefix}.{name}.weight", _linear_weight(module))], f"{prefix}.{name}"
        )
        return _add_bias(g, out, [module.bias], f"{prefix}.{name}")

    gate = linear("gate_proj", mlp.gate_proj, x)
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{prefix}.sigmoid")], f"{prefix}.silu")
    up = linear("up_proj", mlp.up_proj, x)
    return linear("down_proj", mlp.down_proj, g.op("Mul", [act, up], f"{prefix}.gated"))


def skip_norm(g: GraphBuilder, x: str, residual: str, norm, name: str) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual) in one SkipSimplifiedLayerNormalization."""
    normed, _, _, total = g.op(
        "SkipSimplifiedLayerNormalization",
        [x, residual, g.weight(f"{name}.weight", _np(norm.weight))],
        name,
        outputs=["output", "", "", "sum"],
        domain=MS_DOMAIN,
        epsilon=float(norm.variance_epsilon),
    )
    return normed, total


def score_prelude(g: GraphBuilder, io: GraphIO, shared: dict) -> None:
    """What every layer's score shares: the first scored row, the rows' weights [B, 1, R], the
    mask [B, 1, G*R, C] (C = the KV buffers' capacity) and the shapes of the grouped rows."""
    seq, total, heads = shared["seq"], shared["total"], shared["heads"]
    groups = heads // shared["kv_heads"]
    shared["zero_1d"] = g.const("score.zero_1d", [0], np.int64)
    shared["int64_max_1d"] = g.const("score.int64_max_1d", [INT64_MAX], np.int64)
    shared["axis_2"] = g.const("score.axis_2", [2], np.int64)
    seq_index = g.op("Range", [shared["zero"], seq, shared["one"]], "score.seq_index")  # [S]
    scored = g.op("Greater", [io.score_query_mask, g.const("score.zero_f", 0.0, np.float32)], "score.scored")
    candidates = g.op("Where", [scored, seq_index, seq], "score.first_candidates")  # [B, S]
    first = g.op("ReduceMin", [candidates], "score.first_row", keepdims=0)  # [] = S when nothing is scored
    first_1d = g.op("Unsqueeze", [first, shared["axis_0"]], "score.first_row_1d")
    shared["first_row_1d"] = first_1d
    # q of the scoring rows: qkv[:, first:, :H*hd], rotated at their positions
    shared["q_rows_starts"] = g.op("Concat", [first_1d, shared["zero_1d"]], "score.q_rows_starts", axis=0)
    shared["q_rows_ends"] = g.const("score.q_rows_ends", [INT64_MAX, heads * shared["head_dim"]], np.int64)
    shared["axes_1_2"] = g.const("score.axes_1_2", [1, 2], np.int64)
    shared["score_positions"] = g.op(
        "Slice", [io.position_ids, first_1d, shared["int64_max_1d"], shared["axis_1"]], "score.positions"
    )  # [B, R]
    weights = g.op(
        "Slice",
        [io.score_query_mask, first_1d, shared["int64_max_1d"], shared["axis_1"]],
        "score.row_weights",
    )  # [B, R]
    shared["row_weights"] = g.op(
        "Unsqueeze", [weights, shared["axis_1"]], "score.row_weights_3d"
    )  # [B, 1, R]

    # Key k is open to row r (query index past + first + r, as attention_bias defines causality)
    # when k <= that index and k is filled in its batch row (k <= seqlens_k, as GQA reads it).
    capacity_1d = g.op("Shape", [io.past_names(1)[0]], "score.capacity_1d", start=2, end=3)
    capacity = g.op("Squeeze", [capacity_1d, shared["axis_0"]], "score.capacity")
    key_index = g.op("Range", [shared["zero"], capacity, shared["one"]], "score.key_index")  # [C]
    row_start = g.op("Add", [shared["past"], first], "score.row_start")
    query_index = g.op("Range", [row_start, total, shared["one"]], "score.query_index")  # [R]
    query_col = g.op("Unsqueeze", [query_index, shared["axis_1"]], "score.query_col")  # [R, 1]
    causal = g.op("LessOrEqual", [key_index, query_col], "score.causal")  # [R, C]
    lengths = g.op("Unsqueeze", [shared["seqlens_k_int64"], g.const("score.axes_1234", [1, 2, 3, 4], np.int64)], "score.lengths")  # fmt: skip
    filled = g.op("LessOrEqual", [key_index, lengths], "score.filled_keys")  # [B, 1, 1, 1, C]
    allowed = g.op("And", [causal, filled], "score.allowed")  # [B, 1, 1, R, C]

    # Grouped rows (g*R + r); their Reshapes take allowzero=1, as R is 0 in a pass scoring nothing.
    batch_1d = g.op("Shape", [io.score_query_mask], "score.batch_1d", start=0, end=1)
    rows_1d = g.op("Sub", [shared["seq_1d"], first_1d], "score.rows_1d")
    grouped_1d = g.op("Mul", [rows_1d, g.const("score.groups", [groups], np.int64)], "score.grouped_rows_1d")

    def shape(name: str, *dims) -> str:
        parts = [
            d if isinstance(d, str) else g.const(f"{name}.{i}", [d], np.int64) for i, d in enumerate(dims)
        ]
        return g.op("Concat", parts, name, axis=0)

    # Where grouped row g*R + r of kv head kv reads its query in [B, R*H, hd]: r*H + kv*G + g.
    shared["flat_heads_shape"] = g.const("score.flat_heads_shape", [0, -1, shared["head_dim"]], np.int64)
    rows = g.op("Range", [shared["zero"], g.op("Sub", [seq, first], "score.num_rows"), shared["one"]], "score.rows")  # [R]
    row_offsets = g.op("Mul", [rows, g.const("score.heads", heads, np.int64)], "score.row_offsets")
    head_of = g.const("score.head_of", np.arange(heads).reshape(shared["kv_heads"], groups, 1), np.int64)
    index = g.op("Add", [head_of, row_offsets], "score.query_heads")  # [KV, G, R]
    shared["grouped_rows_index"] = g.op(
        "Reshape", [index, shape("score.index_shape", shared["kv_heads"], grouped_1d)],
        "score.grouped_rows_index", allowzero=1,
    )  # fmt: skip
    shared["sum_shape"] = shape("score.sum_shape", batch_1d, shared["kv_heads"], groups, rows_1d, capacity_1d)
    allowed = g.op(
        "Expand",
        [allowed, shape("score.mask_g", batch_1d, 1, groups, rows_1d, capacity_1d)],
        "score.allowed_g",
    )
    shared["score_allowed"] = g.op(
        "Reshape", [allowed, shape("score.mask_shape", batch_1d, 1, grouped_1d, capacity_1d)],
        "score.grouped_allowed", allowzero=1,
    )  # fmt: skip
    shared["blocked"] = g.const("score.blocked", np.finfo(np.float32).min, np.float32)


def build_lean_decoder(
    model: InternVLForConditionalGeneration, io: GraphIO, with_scores: bool = True
) -> onnx.ModelProto:
    """The lean decoder of ``model`` (its dtype: float32 or float16) as an ONNX model."""
    check_lean_supported(model)
    text_model = model.model.language_model
    config = model.config.text_config
    dtype = np.dtype(np.float16 if model.dtype == torch.float16 else np.float32)
    g = GraphBuilder(dtype)
    layers = text_model.layers
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cos, sin = rotary_caches(model, dtype)
    shared = {
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "scaling": float(layers[0].self_attn.scaling),
        "cos": g.weight("rotary.cos_cache", cos),
        "sin": g.weight("rotary.sin_cache", sin),
        "zero": g.const("zero", 0, np.int64),
        "one": g.const("one", 1, np.int64),
        "axis_0": g.const("axis_0", [0], np.int64),
        "axis_1": g.const("axis_1", [1], np.int64),
    }
    # Lengths: seq from the embeddings, total = past + seq from the mask, filled length per row from its ones.
    shared["seq_1d"] = g.op("Shape", [io.inputs_embeds], "seq_1d", start=1, end=2)
    shared["seq"] = g.op(
        "Gather", [g.op("Shape", [io.inputs_embeds], "seq_shape"), shared["one"]], "seq", axis=0
    )
    total = g.op("Gather", [g.op("Shape", [io.attention_mask], "mask_shape"), shared["one"]], "total", axis=0)
    shared["total"] = total
    shared["total_1d"] = g.op("Unsqueeze", [total, shared["axis_0"]], "total_1d")
    shared["total_int32"] = g.op("Cast", [total], "total_int32", to=TensorProto.INT32)
    filled = g.op("ReduceSum", [io.attention_mask, shared["axis_1"]], "filled", keepdims=0)  # [B]
    shared["seqlens_k_int64"] = g.op("Sub", [filled, shared["one"]], "seqlens_k_int64")
    shared["seqlens_k"] = g.op("Cast", [shared["seqlens_k_int64"]], "seqlens_k", to=TensorProto.INT32)
    rotary_slots(g, io, shared)
    if with_scores:
        score_prelude(g, io, shared)

    first_norm = layers[0].input_layernorm
    hidden = io.inputs_embeds
    normed = g.op(
        "SimplifiedLayerNormalization",
        [hidden, g.weight("layers.0.input_layernorm.weight", _np(first_norm.weight))],
        "layers.0.input_layernorm",
        axis=-1,
        epsilon=float(first_norm.variance_epsilon),
        stash_type=1,
    )
    presents, layer_sum = [], None
    past_names = io.past_names(len(layers))
    for index, layer in enumerate(layers):
        attn_out, key, value, qkv = attention_block(
            g, layer.self_attn, normed, index, past_names[2 * index], past_names[2 * index + 1], shared
        )
        presents += [key, value]
        if with_scores:
            # a running sum (one tensor alive, however many layers) rather than one Sum at the end
            probs = score_rows(g, qkv, key, index, shared)
            layer_sum = (
                probs if layer_sum is None else g.op("Add", [layer_sum, probs], f"layers.{index}.score.sum")
            )
        normed, hidden = skip_norm(
            g, attn_out, hidden, layer.post_attention_layernorm, f"layers.{index}.post_norm"
        )
        mlp_out = mlp_block(g, layer.mlp, normed, index)
        last = index == len(layers) - 1
        next_norm = text_model.norm if last else layers[index + 1].input_layernorm
        norm_name = "final_norm" if last else f"layers.{index + 1}.input_layernorm"
        normed, hidden = skip_norm(g, mlp_out, hidden, next_norm, norm_name)

    # LM head on the last num_logits rows only (RMSNorm is per row: gathering after it is the same).
    start = g.op("Sub", [shared["seq"], io.num_logits], "logit_rows_start")
    rows = g.op("Range", [start, shared["seq"], shared["one"]], "logit_rows")
    normed = g.op("Gather", [normed, rows], "last_rows", axis=1)  # [B, n, D]
    logits = g.op("MatMul", [normed, g.weight("lm_head.weight", _linear_weight(model.lm_head))], "lm_head")
    if dtype != np.float32:
        logits = g.op("Cast", [logits], "logits_float", to=TensorProto.FLOAT)
    outputs_map = {io.logits: logits}
    if with_scores:
        outputs_map[io.visual_scores] = score_total(g, layer_sum, shared)
    outputs_map |= dict(zip(io.present_names(len(layers)), presents, strict=True))
    return _assemble(g, io, len(layers), kv_heads, head_dim, config, with_scores, outputs_map)


def _assemble(g, io, num_layers, kv_heads, head_dim, config, with_scores, outputs_map) -> onnx.ModelProto:
    """Graph inputs/outputs with the traced graph's names and dynamic axes; outputs renamed by Identity-free rewiring."""
    t = g.onnx_dtype
    info = helper.make_tensor_value_info
    inputs = [
        info(io.inputs_embeds, t, ["batch", "seq", config.hidden_size]),
        info(io.position_ids, TensorProto.INT64, ["batch", "seq"]),
        info(io.attention_mask, TensorProto.INT64, ["batch", "total"]),
    ]
    if with_scores:
        inputs.append(info(io.score_query_mask, TensorProto.FLOAT, ["batch", "seq"]))
    inputs.append(info(io.num_logits, TensorProto.INT64, []))
    inputs += [info(name, t, ["batch", kv_heads, "capacity", head_dim]) for name in io.past_names(num_layers)]
    outputs = [info(io.logits, TensorProto.FLOAT, ["batch", "logit_rows", config.vocab_size])]
    if with_scores:
        outputs.append(info(io.visual_scores, TensorProto.FLOAT, ["batch", "total"]))
    outputs += [
        info(name, t, ["batch", kv_heads, "capacity", head_dim]) for name in io.present_names(num_layers)
    ]
    # Name each graph output at the node that produces it (no Identity copies).
    renames = {produced: name for name, produced in outputs_map.items()}
    for node in g.nodes:
        node.output[:] = [renames.get(out, out) for out in node.output]
        node.input[:] = [renames.get(inp, inp) for inp in node.input]
    graph = helper.make_graph(g.nodes, "stitch_lean_decoder", inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="stitchvlm")


def export_lean_decoder(
    model: InternVLForConditionalGeneration, path: Path, io: GraphIO, with_scores: bool = True
) -> None:
    """Build and save the lean decoder of ``model`` at ``path``."""
    save_graph(build_lean_decoder(model, io, with_scores), path)
