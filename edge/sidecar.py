"""``stitch_edge.json``: what the exporter tells the torch-free edge runtime.

The exporter writes one sidecar next to the ``.onnx`` files; the runtime reads
only that directory (sidecar, graphs, embedding matrix and the checkpoint's
copied tokenizer/config files). The sidecar names the graph files and their
I/O, the decoder's dimensions (to allocate an empty KV cache) and the dtype the
graphs take and give, and repeats the token ids and tiling the export saw so
the runtime can refuse a directory whose copied configs were changed since.

This module is plain dataclasses and JSON: no torch, no onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from stitchvlm.shared.layout import TilingConfig

SIDECAR_NAME = "stitch_edge.json"
# Bump when a field changes meaning; the runtime refuses other versions.
# 2: decoder input num_logits (logits of the last n positions only) and with_scores.
# 3: graph ("explicit" or "lean"); a version-2 sidecar reads as graph "explicit".
# 4: quant (weight-only quantization, or null); older sidecars read as quant null.
# 5: vision_graph ("explicit" or "lean"); older sidecars read as vision_graph "explicit".
# 6: quant.vision_method (how the vision graph was quantized, or null); in older sidecars a
#    quantized vision graph was MatMulNBits ("nbits").
# 7: quant.decoder_method ("nbits" or "dynamic-int8"); older sidecars read as "nbits".
FORMAT_VERSION = 7
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7)
# Export dtypes and the numpy dtype of the tensors the graphs exchange in that dtype.
DTYPES = {"fp32": "float32", "fp16": "float16"}
# Decoder graphs: "explicit" (traced ``ScoringDecoder``: written-out attention, KV grown by
# Concat, past/present [batch, kv_heads, past(+seq), head_dim]) and "lean" (``lean_decoder``:
# fused ops, KV in buffers of a fixed capacity shared between past and present).
GRAPHS = ("explicit", "lean")
DEFAULT_GRAPH = "lean"  # what stitch-export builds unless --graph says otherwise (decoder and vision)
# Vision graphs: "explicit" (traced ``VisionEncoder``) and "lean" (``lean_vision``: built op by op
# with fused ops). Same I/O; the runtime opens both alike, the field says what the file holds.
VISION_GRAPHS = ("explicit", "lean")
# Weight-only quantization (``stitch-export --quant``): name -> bits of the MatMul weights.
QUANT_BITS = {"int4": 4, "int8": 8}
# How ``--quant`` quantizes the vision graph (``--vision-quant``): "dynamic-int8" (int8 weights per
# output channel, activations quantized to uint8 on each pass, MatMulInteger: float32 graphs, CPU
# EP) or "nbits" (MatMulNBits of the decoder's scheme, as the decoder).
VISION_QUANT_METHODS = ("dynamic-int8", "nbits")
# How ``--quant`` quantizes the decoder (``--decoder-quant``): "nbits" (MatMulNBits, block-wise;
# any scheme, float32 or float16) or "dynamic-int8" (as the tower's dynamic int8: --quant int8,
# float32 exports, CPU EP).
DECODER_QUANT_METHODS = ("nbits", "dynamic-int8")


@dataclass(frozen=True)
class DecoderDims:
    """Sizes of the exported text decoder."""

    num_layers: int  # decoder layers, one past/present key and value pair each
    num_heads: int  # query heads per layer
    num_kv_heads: int  # key/value heads per layer (GQA: fewer than num_heads)
    head_dim: int  # width of one head
    hidden_size: int  # width of inputs_embeds and image_embeds
    vocab_size: int  # width of logits


@dataclass(frozen=True)
class TokenIds:
    """Special token ids as the exported checkpoint's configs give them."""

    image_token_id: int  # <IMG_CONTEXT>, one per visual token
    eos_token_ids: tuple[int, ...]  # generation stops on any of these
    pad_token_id: int | None = None  # padding id, if the checkpoint names one


@dataclass(frozen=True)
class GraphFiles:
    """File names inside the export directory."""

    vision: str = "vision.onnx"  # pixel_values -> image_embeds
    decoder: str = "decoder.onnx"  # one decoder pass with KV cache and visual scores
    # Token embedding matrix [vocab, hidden] in the export dtype, read with np.load(mmap_mode="r").
    embeddings: str = "embed_tokens.npy"


@dataclass(frozen=True)
class GraphIO:
    """Input and output names of the two graphs; ``{i}`` in a template is the layer index."""

    pixel_values: str = "pixel_values"  # vision in: [tiles, 3, tile, tile] float32
    image_embeds: str = "image_embeds"  # vision out: [tiles * tokens_per_tile, hidden] export dtype
    inputs_embeds: str = "inputs_embeds"  # decoder in: [batch, seq, hidden] export dtype
    position_ids: str = "position_ids"  # decoder in: [batch, seq] int64 (RoPE positions)
    attention_mask: str = "attention_mask"  # decoder in: [batch, past + seq] int64, 1 = real token
    score_query_mask: str = (
        "score_query_mask"  # decoder in: [batch, seq] float32, 1 = query counts in the score
    )
    num_logits: str = "num_logits"  # decoder in: [] int64, logits for the last n positions only
    past_key: str = "past_key_{i}"  # decoder in: [batch, kv_heads, past, head_dim] export dtype
    past_value: str = "past_value_{i}"
    logits: str = "logits"  # decoder out: [batch, num_logits, vocab] float32, the last positions
    visual_scores: str = "visual_scores"  # decoder out: [batch, past + seq] float32, this pass's score
    present_key: str = "present_key_{i}"  # decoder out: [batch, kv_heads, past + seq, head_dim] export dtype
    present_value: str = "present_value_{i}"

    def past_names(self, num_layers: int) -> list[str]:
        """past_key_0, past_value_0, past_key_1, ... in the decoder's input order."""
        return [name.format(i=i) for i in range(num_layers) for name in (self.past_key, self.past_value)]

    def present_names(self, num_layers: int) -> list[str]:
        """present_key_0, present_value_0, ... in the decoder's output order."""
        return [
            name.format(i=i) for i in range(num_layers) for name in (self.present_key, self.present_value)
        ]

    def decoder_inputs(self, num_layers: int, with_scores: bool = True) -> list[str]:
        """The decoder's inputs in order; a graph without scores has no score_query_mask."""
        scored = [self.score_query_mask] if with_scores else []
        fixed = [self.inputs_embeds, self.position_ids, self.attention_mask, *scored, self.num_logits]
        return fixed + self.past_names(num_layers)

    def decoder_outputs(self, num_layers: int, with_scores: bool = True) -> list[str]:
        """The decoder's outputs in order; a graph without scores has no visual_scores."""
        scored = [self.visual_scores] if with_scores else []
        return [self.logits, *scored, *self.present_names(num_layers)]


@dataclass(frozen=True)
class WeightQuant:
    """What ``stitch-export --quant`` quantized: the decoder's MatMul weights as
    ``decoder_method`` says (``com.microsoft.MatMulNBits`` unless "dynamic-int8"), the
    vision graph's as ``vision_method`` says; ``block_size`` and ``accuracy_level``
    describe the MatMulNBits graphs among them.

    Only constant 2-D MatMul weights are quantized (for MatMulNBits block-wise
    along K, one scale per block; for "dynamic-int8" one scale per output
    channel, with the activations quantized to uint8 on every pass);
    activations, KV cache, norms, biases, the vision tower's patch convolution
    and the embedding matrix stay in the export dtype. The runtime needs
    nothing of this: ORT runs the quantized ops like any other. It is here so
    that a directory says what it holds.
    """

    scheme: str  # a key of QUANT_BITS
    bits: int  # bits per quantized weight (QUANT_BITS[scheme])
    block_size: int  # weights along K sharing one scale
    symmetric: bool  # True: no zero points (int4 range [-8, 7], int8 [-128, 127])
    # MatMulNBits accuracy_level: 0 = unset (computes in the activation dtype);
    # 4 = int8 activations on the CPU (faster, and a second source of error).
    accuracy_level: int
    graphs: dict[str, int]  # graph file -> MatMul weights quantized in it
    lm_head: bool  # whether the decoder's LM head is among them
    # VISION_QUANT_METHODS: how the vision graph was quantized; None when it stayed float.
    vision_method: str | None = None
    # DECODER_QUANT_METHODS: how the decoder was quantized.
    decoder_method: str = "nbits"

    def __post_init__(self) -> None:
        if QUANT_BITS.get(self.scheme) != self.bits:
            raise ValueError(f"quant scheme {self.scheme!r} with {self.bits} bits (known: {QUANT_BITS})")
        if self.decoder_method not in DECODER_QUANT_METHODS:
            raise ValueError(
                f"decoder_method must be one of {DECODER_QUANT_METHODS}, got {self.decoder_method!r}"
            )
        if self.decoder_method == "dynamic-int8" and self.bits != 8:
            raise ValueError(f"a dynamic-int8 decoder has 8-bit weights, not {self.bits}")
        if self.vision_method is not None and self.vision_method not in VISION_QUANT_METHODS:
            raise ValueError(
                f"vision_method must be one of {VISION_QUANT_METHODS} or null, got {self.vision_method!r}"
            )


@dataclass(frozen=True)
class EdgeSidecar:
    """Everything about an export directory that is not in the checkpoint's own files."""

    model_id: str  # name of the exported checkpoint
    dtype: str  # "fp32" or "fp16": weights, embeddings, KV cache; logits and scores stay float32
    dims: DecoderDims
    tokens: TokenIds
    tiling: TilingConfig  # the tiling the vision graph was exported for
    tokens_per_tile: int  # visual tokens one tile becomes (vision graph rows per tile)
    graphs: GraphFiles = field(default_factory=GraphFiles)
    io: GraphIO = field(default_factory=GraphIO)
    opset: int = 17  # ONNX opset of both graphs
    # False only for a ``--no-scores`` export (benchmarks): its decoder has no score I/O.
    with_scores: bool = True
    # Which decoder graph (GRAPHS): how the runtime must hold and bind its KV cache.
    graph: str = "explicit"
    # Which vision graph (VISION_GRAPHS): traced or built; informational, the runtime runs either alike.
    vision_graph: str = "explicit"
    # Weight-only quantization of the graphs, None for float weights (the default export).
    quant: WeightQuant | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.vision_graph not in VISION_GRAPHS:
            raise ValueError(f"vision_graph must be one of {VISION_GRAPHS}, got {self.vision_graph!r}")
        if not isinstance(self.with_scores, bool):
            raise ValueError(f"with_scores must be a JSON boolean, got {self.with_scores!r}")
        if self.tokens_per_tile != self.tiling.tokens_per_tile:
            raise ValueError(
                f"tokens_per_tile {self.tokens_per_tile} disagrees with tiling.tokens_per_tile "
                f"{self.tiling.tokens_per_tile}"
            )

    @property
    def numpy_dtype(self) -> str:
        """numpy name of the dtype of embeddings and KV cache."""
        return DTYPES[self.dtype]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EdgeSidecar:
        """Parse a sidecar; ``ValueError`` for another format version or a missing/unknown key."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("sidecar must hold a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"sidecar format_version {version!r} is not supported (expected one of {READABLE_VERSIONS})"
            )
        return cls(
            model_id=data["model_id"],
            dtype=data["dtype"],
            dims=_build(DecoderDims, data["dims"]),
            tokens=_build(
                TokenIds, {**data["tokens"], "eos_token_ids": tuple(data["tokens"]["eos_token_ids"])}
            ),
            tiling=_build(
                TilingConfig,
                {
                    **data["tiling"],
                    "image_mean": tuple(data["tiling"]["image_mean"]),
                    "image_std": tuple(data["tiling"]["image_std"]),
                },
            ),
            tokens_per_tile=data["tokens_per_tile"],
            graphs=_build(GraphFiles, data["graphs"]),
            io=_build(GraphIO, data["io"]),
            opset=data["opset"],
            with_scores=data["with_scores"],
            graph=data["graph"] if version >= 3 else "explicit",
            vision_graph=data["vision_graph"] if version >= 5 else "explicit",
            quant=_read_quant(data, version),
            format_version=FORMAT_VERSION,
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SIDECAR_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> EdgeSidecar:
        path = Path(directory) / SIDECAR_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not an edge export: it has no {SIDECAR_NAME}")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is malformed: {error!r}") from error


def _read_quant(data: dict[str, Any], version: int) -> WeightQuant | None:
    if version < 4 or data["quant"] is None:
        return None
    quant = dict(data["quant"])
    if version < 6:  # before vision_method, a quantized vision graph was MatMulNBits
        quant["vision_method"] = "nbits" if data["graphs"]["vision"] in quant["graphs"] else None
    if version < 7:  # before decoder_method, the decoder was always MatMulNBits
        quant["decoder_method"] = "nbits"
    return _build(WeightQuant, quant)


def _build(kind: type, data: dict[str, Any]) -> Any:
    """A dataclass from a dict, refusing keys it does not have (a typo must not pass as a default)."""
    known = {f.name for f in fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys in sidecar: {sorted(unknown)}")
    return kind(**data)
