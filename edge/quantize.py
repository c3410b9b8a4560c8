"""Quantization of an export's graphs (``stitch-export --quant int4|int8``).

After the float graphs of an export have verified against PyTorch, every
constant 2-D MatMul weight of ``decoder.onnx`` (explicit or lean) is replaced
by ORT's ``com.microsoft.MatMulNBits`` through ``onnxruntime.quantization``'s
``MatMulNBitsQuantizer`` (round to nearest, block-wise along K, symmetric by
default as onnxruntime-genai's builder does). That includes the fused q|k|v of
the lean graph and the LM head; it leaves the activations, KV cache, norms,
biases, RoPE and the embedding matrix (a numpy array, not a graph) as they
were.

The vision graph's MatMuls multiply ~1000 rows a tile (the decoder's, one row
a token), where MatMulNBits is no faster than float32 GEMM: by default
(``--vision-quant dynamic-int8``, float32 exports) they become int8 weights per
output channel and uint8 activations quantized on every pass
(``quantize_dynamic``: MatMulInteger, which ORT fuses into VNNI integer GEMMs on
the CPU). Measured on the InternViT-300M lean graph, one 448 px tile, 1
thread of this 2-core AVX512-VNNI CPU beside training jobs: 11.6 s float32, 5.6
s dynamic int8 with the 7-bit weights used (2.07x; token cosine >= 0.9994,
random weights), and 2.07x again for 7 tiles inside a whole question
(bench/edge_stages.py); MatMulNBits int8 and int4 (accuracy level 4) took 1.00x
and 1.14x the float time. ``nbits`` quantizes it as the decoder. The patch convolution stays float.

The decoder's prefill is the same kind of large-M MatMul (one row a prompt token), and
MatMulNBits gains nothing there either: at the InternVL3-1B shape (1809-token prefill,
2 threads, bench/edge_stages.py) it took 10.9 s at int8 and 11.3 s at int4 against 10.5 s
float32. ``--decoder-quant dynamic-int8`` (with ``--quant int8``, float32 exports)
quantizes the decoder as the tower: prefill 5.1 s, decode as fast as MatMulNBits int8.
Its activations get one scale per tensor and pass, where MatMulNBits at accuracy level
4 takes one per block of 32: a model with outlier activation channels (as large
language models have) loses more to it, so it is opt-in, and the export's comparison
below says how far it moved your checkpoint. The sidecar
records what was quantized (``sidecar.WeightQuant``); the runtime opens the
directory unchanged.

``compare_quantized`` then measures the quantized graphs against the float
ones they came from on one random-pixel sample: a short greedy generation of
the float graphs, the quantized graphs teacher-forced along the same tokens
(so every pass compares like with like), the logits' max abs / relative
deviation, the agreement of the greedy choice, and the overlap of the top-R
visual-token sets of the score ``A`` summed over the generation at the paper's
R = 9/35/64%. The export fails when the quantized graphs are broken (non-finite
outputs, or logits whose cosine similarity with the float ones falls under
``BROKEN_COSINE``), not for ordinary quantization error, which it reports.

Export time only; imports neither torch nor transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from stitchvlm.shared.prompt import build_prompt
from stitchvlm.shared.scoring import top_r_indices

from .runtime import EdgeModel
from .sidecar import DECODER_QUANT_METHODS, QUANT_BITS, VISION_QUANT_METHODS, EdgeSidecar, WeightQuant

DEFAULT_BLOCK_SIZE = 32  # onnxruntime-genai's int4 default; ORT's quantizer defaults to 128
# protobuf cannot hold a graph past 2 GB: larger graphs keep their weights in "<graph>.data"
EXTERNAL_DATA_BYTES = 1 << 30
# MatMulNBits accuracy_level by scheme when none is given: 4 (int8 activations, as
# onnxruntime-genai's builder sets for the CPU). Measured on the CPU EP, lean decoder, decode step:
# bench "quick" shape (256 x 8 layers, 1 thread): fp32 2.75 ms; int4 1.79 ms at level 0, 1.84 at 4;
# int8 12.2 ms at level 0 (no fast kernel without int8 activations), 1.99 at 4.
# Qwen2.5-0.5B shape (2 threads, 465-token prompt): fp32 101 ms; int4 46.7 ms at level 0, 32.8 at
# 4; int8 44.5 at 4. Deviations from float barely move with the level (bench/results/quant_quality.md).
DEFAULT_ACCURACY_LEVEL = {"int4": 4, "int8": 4}
OVERLAP_RETENTIONS = (0.09, 0.35, 0.64)  # the paper's three token ratios, as kept fractions R
COMPARE_TILES = 4  # random-pixel tiles of the comparison sample (|V| = 4 x tokens_per_tile)
COMPARE_STEPS = 8  # greedy tokens of the comparison generation (EOS ignored)
COMPARE_QUESTION = "What colour is the circle?"
# Cosine similarity of centred logits, quantized vs float, under which the graphs are broken: a
# graph computing something unrelated (wrong packing, transposed weights) gives ~0; int4 noise on
# the tiny random test model, whose weights have no redundancy, still gives 0.6.
BROKEN_COSINE = 0.25


def quantize_graph(
    source: Path,
    target: Path,
    bits: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    symmetric: bool = True,
    accuracy_level: int = 0,
    lm_head_shape: tuple[int, int] | None = None,
) -> tuple[int, bool]:
    """Write ``source`` with its constant 2-D MatMul weights as MatMulNBits to ``target``.

    Returns (weights quantized, whether one of them had ``lm_head_shape``
    [hidden, vocab]). Weights with a side under 16 (none in a transformer
    block; RoPE's frequency products have a constant side of 1) are left alone.
    """
    # The quantizer's module configures the root logger at INFO on import and logs every node.
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(source))  # with its external data, if any
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    chosen, lm_head = [], False
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = weights.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or min(weight.dims) < 16:
            continue
        node.name = node.name or f"MatMul_{index}"  # the quantizer selects nodes by name
        chosen.append(node.name)
        lm_head = lm_head or tuple(weight.dims) == lm_head_shape
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{source.name} has MatMul nodes sharing a name; cannot select them")
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level or None,
        nodes_to_include=chosen,
        op_types_to_quantize=(),  # only the nodes chosen above
    )
    quantizer.process()
    quantized = quantizer.model.model
    done = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    if done != len(chosen):
        raise ValueError(f"{source.name}: {done} of {len(chosen)} MatMul weights were quantized")
    save_graph(quantized, target)
    return done, lm_head


def quantize_graph_dynamic(source: Path, target: Path) -> int:
    """Write ``source`` (float32) with its constant 2-D MatMul weights as int8 per output channel
    (7-bit range) and their activations quantized to uint8 on each pass (MatMulInteger) to
    ``target``; returns the weights quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    weights = {t.name: t for t in model.graph.initializer}
    float_weights = [
        n for n in model.graph.node
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in weights
        and len(weights[n.input[1]].dims) == 2 and weights[n.input[1]].data_type == onnx.TensorProto.FLOAT
    ]  # fmt: skip
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in weights.values()):
        raise ValueError(f"{source.name} is float16: dynamic int8 quantizes float32 graphs (use nbits)")
    size = sum(t.ByteSize() for t in model.graph.initializer)
    Path(f"{target}.data").unlink(missing_ok=True)
    root = logging.getLogger()  # the quantizer logs a line per tensor to the root logger at INFO,
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # and a warning to "pre-process" the model
    try:
        quantize_dynamic(
            model,
            target,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            # 7-bit weights: x86 CPUs without VNNI multiply uint8 x int8 pairs into int16 with
            # saturation (vpmaddubsw), which 8-bit weights can reach; this CPU (VNNI) measured 2.07x
            # faster than float32 either way, token cosine >= 0.9994 instead of 0.9997
            reduce_range=True,
            use_external_data_format=size >= EXTERNAL_DATA_BYTES,
            # the built graphs' fused ops (SkipLayerNormalization, MultiHeadAttention) have no ONNX
            # shape inference: their outputs are float32, as every activation of a float32 export
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    done = sum(
        n.op_type == "MatMulInteger" for n in onnx.load(str(target), load_external_data=False).graph.node
    )
    if done != len(float_weights):
        raise ValueError(f"{source.name}: {done} of {len(float_weights)} MatMul weights were quantized")
    return done


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """One ``.onnx`` file, with its weights in ``<name>.data`` beside it past ``EXTERNAL_DATA_BYTES``
    (the lean builders save through this too)."""
    path = Path(path)
    data = path.parent / f"{path.name}.data"
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    size = sum(tensor.ByteSize() for tensor in model.graph.initializer)
    if size < EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name
        )


def quantize_export(
    float_dir: Path,
    out_dir: Path,
    sidecar: EdgeSidecar,
    scheme: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int | None = None,
    vision: str | None = "dynamic-int8",
    decoder_method: str = "nbits",
) -> WeightQuant:
    """Quantize the decoder graph (by ``decoder_method``, a DECODER_QUANT_METHODS entry) and the
    vision graph (by ``vision``, a VISION_QUANT_METHODS entry; None leaves it float) of
    ``float_dir`` into ``out_dir``.

    ``accuracy_level`` None: ``DEFAULT_ACCURACY_LEVEL[scheme]``. A graph left float is
    not written; the returned ``graphs`` names only the quantized ones.
    """
    if scheme not in QUANT_BITS:
        raise ValueError(f"quant must be one of {sorted(QUANT_BITS)}, got {scheme!r}")
    if vision is not None and vision not in VISION_QUANT_METHODS:
        raise ValueError(f"vision quantization must be one of {VISION_QUANT_METHODS} or None, got {vision!r}")
    if decoder_method not in DECODER_QUANT_METHODS:
        raise ValueError(f"decoder quantization must be one of {DECODER_QUANT_METHODS}, got {decoder_method!r}")
    if decoder_method == "dynamic-int8" and scheme != "int8":
        raise ValueError(f"a dynamic-int8 decoder is --quant int8, not {scheme}")
    if accuracy_level is None:
        accuracy_level = DEFAULT_ACCURACY_LEVEL[scheme]
    dims = sidecar.dims
    counts, lm_head = {}, False
    decoder = sidecar.graphs.decoder
    lm_head_shape = (dims.hidden_size, dims.vocab_size)
    if decoder_method == "dynamic-int8":
        counts[decoder] = quantize_graph_dynamic(float_dir / decoder, out_dir / decoder)
        lm_head = _has_int8_weight(out_dir / decoder, lm_head_shape)
    else:
        counts[decoder], lm_head = quantize_graph(
            float_dir / decoder, out_dir / decoder, QUANT_BITS[scheme], block_size, True, accuracy_level,
            lm_head_shape,
        )  # fmt: skip
    name = sidecar.graphs.vision
    if vision == "nbits":
        counts[name], _ = quantize_graph(
            float_dir / name, out_dir / name, QUANT_BITS[scheme], block_size, True, accuracy_level
        )
    elif vision == "dynamic-int8":
        counts[name] = quantize_graph_dynamic(float_dir / name, out_dir / name)
    return WeightQuant(
        scheme=scheme,
        bits=QUANT_BITS[scheme],
        block_size=block_size,
        symmetric=True,
        accuracy_level=accuracy_level,
        graphs=counts,
        lm_head=lm_head,
        vision_method=vision,
        decoder_method=decoder_method,
    )


def _has_int8_weight(path: Path, shape: tuple[int, int]) -> bool:
    """Whether a MatMulInteger of ``path`` multiplies by an int8 weight of ``shape`` ([K, N])."""
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    return any(n.op_type == "MatMulInteger" and shapes.get(n.input[1]) == shape for n in graph.node)


# ---------------------------------------------------------------------------
# Quantized against float: deviations and top-R overlap
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantReport:
    """How far quantized graphs are from the float graphs on one sample."""

    scheme: str
    image_embeds_rel: float  # max|q - f| / max|f| of the vision graph's output
    logits_max_abs: float  # max |q - f| over every pass's last-position logits
    logits_rel: float  # logits_max_abs / max |f|
    # the worst pass's cosine similarity of (logits - their mean), quantized vs float: near 1 for
    # quantization noise, near 0 for a graph computing something else
    logits_cosine: float
    token_agreement: float  # fraction of passes whose argmax equals the float graphs' token
    scores_rel: float  # max|A_q - A_f| / max|A_f|, A summed over the generation
    overlap: dict[float, float]  # R -> |top_R(A_q) & top_R(A_f)| / k
    num_visual: int  # |V| of the sample
    steps: int  # passes compared (the prefill and the decode steps)

    @property
    def broken(self) -> bool:
        finite = np.isfinite([self.logits_max_abs, self.scores_rel, self.image_embeds_rel]).all()
        return not finite or self.logits_cosine < BROKEN_COSINE

    def lines(self) -> list[str]:
        overlap = ", ".join(f"{100 * r:g}%: {value:.3f}" for r, value in self.overlap.items())
        return [
            f"{self.scheme} vs float, |V| = {self.num_visual}, {self.steps} passes:",
            f"  image_embeds max|diff| / max|ref| {self.image_embeds_rel:.3e}",
            f"  logits max|diff| {self.logits_max_abs:.3e} ({self.logits_rel:.3e} of max|ref|), "
            f"cosine >= {self.logits_cosine:.4f}, greedy token agreement {self.token_agreement:.3f}",
            f"  visual scores max|diff| / max|ref| {self.scores_rel:.3e}; top-R overlap {overlap}",
        ]

    def raise_if_broken(self) -> None:
        if self.broken:
            raise ValueError(
                f"{self.scheme} graphs are broken, not just quantized: logits cosine {self.logits_cosine:.3g} "
                f"with the float graphs (bound {BROKEN_COSINE}), off by {self.logits_rel:.3g} of their range"
            )


def _rel(ours: np.ndarray, reference: np.ndarray) -> float:
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64)).max(initial=0.0)
    return float(diff / max(float(np.abs(reference).max(initial=0.0)), 1e-30))


def _worst_cosine(ours: np.ndarray, reference: np.ndarray) -> float:
    # ours, reference: [passes, vocab]
    a = ours.astype(np.float64) - ours.mean(axis=-1, keepdims=True)
    b = reference.astype(np.float64) - reference.mean(axis=-1, keepdims=True)
    norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return float(((a * b).sum(axis=-1) / norms).min())


def _teacher_forced(edge: EdgeModel, prompt, image_embeds, tokens: list[int] | None, steps: int):
    """Prefill and decode passes; feeds ``tokens`` (or its own greedy choice when None).

    Returns (last-position logits per pass [steps, vocab], A over the visual tokens, tokens fed).
    """
    length = len(prompt.input_ids)
    embeds = edge.embed(prompt.input_ids)
    embeds[prompt.visual_start : prompt.visual_end] = image_embeds
    query_mask = (np.arange(length) >= prompt.visual_end).astype(np.float32)
    cache = edge.empty_cache(capacity=length + steps)
    step = edge.decode(embeds[None], np.arange(length)[None], query_mask[None], cache, num_logits=1)
    visual = slice(prompt.visual_start, prompt.visual_end)
    logits, scores, fed = [step.logits[0, -1]], step.visual_scores[0, visual].astype(np.float64), []
    for index in range(steps - 1):
        token = int(np.argmax(logits[-1])) if tokens is None else tokens[index]
        fed.append(token)
        step = edge.decode(
            edge.embed(np.array([token]))[None],
            np.array([[length + index]]),
            np.ones((1, 1), np.float32),
            step.cache,
            num_logits=1,
        )
        logits.append(step.logits[0, -1])
        scores += step.visual_scores[0, visual]
    return np.stack(logits), scores, fed


def compare_quantized(
    reference: EdgeModel,
    quantized: EdgeModel,
    scheme: str,
    tiles: int = COMPARE_TILES,
    steps: int = COMPARE_STEPS,
    seed: int = 0,
) -> QuantReport:
    """Quantized against float graphs on one random-pixel sample (see the module docstring)."""
    tiling = reference.files.tiling
    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((tiles, 3, tiling.tile_size, tiling.tile_size)).astype(np.float32)
    prompt = build_prompt(reference.files, COMPARE_QUESTION, tiles * tiling.tokens_per_tile)
    float_embeds = reference.encode_image(pixel_values)
    quant_embeds = quantized.encode_image(pixel_values)
    float_logits, float_scores, fed = _teacher_forced(reference, prompt, float_embeds, None, steps)
    # the float generation's tokens, so each quantized pass sees the same prefix
    quant_logits, quant_scores, _ = _teacher_forced(quantized, prompt, quant_embeds, fed, steps)
    float_choice = float_logits.argmax(axis=-1)
    overlap = {}
    for retention in OVERLAP_RETENTIONS:
        ours, theirs = top_r_indices(quant_scores, retention), top_r_indices(float_scores, retention)
        overlap[retention] = len(np.intersect1d(ours, theirs)) / len(theirs)
    max_abs = float(np.abs(quant_logits.astype(np.float64) - float_logits).max())
    return QuantReport(
        scheme=scheme,
        image_embeds_rel=_rel(quant_embeds, float_embeds),
        logits_max_abs=max_abs,
        logits_rel=max_abs / max(float(np.abs(float_logits).max()), 1e-30),
        logits_cosine=_worst_cosine(quant_logits, float_logits),
        token_agreement=float(np.mean(quant_logits.argmax(axis=-1) == float_choice)),
        scores_rel=_rel(quant_scores, float_scores),
        overlap=overlap,
        num_visual=prompt.num_visual_tokens,
        steps=steps,
    )


def open_with_graphs(edge_dir: Path, graphs_dir: Path) -> EdgeModel:
    """``edge_dir``'s model (sidecar, embeddings, tokenizer) with the graph files of ``graphs_dir``, on the CPU."""
    import onnxruntime as ort

    from stitchvlm.shared.model_files import ModelFiles

    from .runtime import CPU, open_decoder

    sidecar = EdgeSidecar.load(edge_dir)
    embeddings = np.load(Path(edge_dir) / sidecar.graphs.embeddings, mmap_mode="r")
    decoder = open_decoder(Path(graphs_dir) / sidecar.graphs.decoder, sidecar, None, [CPU])
    vision = ort.InferenceSession(str(Path(graphs_dir) / sidecar.graphs.vision), providers=[CPU])
    return EdgeModel(sidecar, ModelFiles.load(edge_dir), embeddings, vision, decoder)
