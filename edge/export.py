"""``stitch-export``: a Hugging Face InternVL checkpoint -> the edge's ONNX directory.

Writes, into ``--out``:

- ``vision.onnx``: pixel_values [tiles, 3, t, t] float32 -> image_embeds
  [tiles * tokens_per_tile, hidden] (``InternVLModel.get_image_features``);
- ``decoder.onnx``: one text-decoder pass with KV cache that also returns the
  pass's visual-token score, with logits for the last ``num_logits`` positions
  only (an input: 1 for generation, the answer length for the consistency
  pass). By default (``--graph lean``) the graph ``lean_decoder`` builds op by
  op from the weights (ORT's fused GroupQueryAttention, rotating q and k itself,
  SkipSimplifiedLayerNormalization; the score beside the fused attention for
  the scoring rows only; KV in buffers shared between past and present);
  ``--graph explicit`` traces ``export_modules.ScoringDecoder`` instead, the
  reference the lean graph is tested against. Same I/O names; the sidecar's
  ``graph`` tells the runtime how to bind its cache. ``--no-scores`` exports
  the same decoder without the score (``UnscoredDecoder`` when traced), for
  benchmarks only: the runtime refuses it. The lean export also builds
  ``vision.onnx`` op by op (``lean_vision``: fused MultiHeadAttention,
  SkipLayerNormalization, BiasGelu; same I/O), unless ``--vision-graph
  explicit`` keeps the traced one; the sidecar's ``vision_graph`` says which;
- ``embed_tokens.npy``: the token embedding matrix [vocab, hidden]. A plain
  array, not a third graph: the lookup is one numpy gather, the runtime needs
  single rows for each decode step and arbitrary rows for the consistency pass,
  and ``np.load(mmap_mode="r")`` keeps a large vocabulary out of memory until
  rows are read;
- the checkpoint's non-weight files (config, generation config, tokenizer,
  chat template, processor configs), so ``ModelFiles.load(out)`` works;
- ``stitch_edge.json`` (``sidecar.EdgeSidecar``).

Then it verifies the graphs against the PyTorch model on one sample (a
prefill with all logits, one with the last position's, and two decode steps)
and fails when a difference exceeds the dtype's tolerance (``verify.TOLERANCES``).
All of it is written to a hidden directory beside ``--out`` first and moved
into ``--out`` only when verification has passed.
A ``--no-scores`` export is not verified: the runtime that verification runs
refuses it (the tests compare it with the scored graph instead).

``--quant int4|int8`` (default ``none``: float weights) then quantizes the
verified decoder's MatMul weights, explicit or lean, to
``com.microsoft.MatMulNBits`` (``quantize``: block-wise, symmetric,
``--quant-block-size`` 32, ``--quant-accuracy-level`` 4: int8 activations) and
the vision graph's by ``--vision-quant`` (fp32 default ``dynamic-int8``:
MatMulInteger with activations quantized per pass; ``nbits``: as the decoder;
``none``; ``--decoder-quant dynamic-int8`` quantizes the decoder that way too), records
that in the sidecar's ``quant``, and compares the quantized
graphs with the float ones (logits max abs / relative deviation, greedy
agreement, the score's top-R overlap at 9/35/64% over a short greedy
generation). It reports those deviations and fails only for graphs that
are broken rather than quantized (``quantize.BROKEN_COSINE``).

Exporter: the TorchScript exporter (``torch.onnx.export(dynamo=False)``). The
dynamo exporter also produces working graphs with these dynamic axes but needs
``onnxscript`` (not a dependency of this project) and takes ~30x longer (11 s
against 0.35 s for the tiny decoder); the graphs have no data-dependent Python
control flow, so tracing loses nothing. Dynamic axes are tested with shapes
other than the traced ones.

fp16: the model is loaded in float16 and traced as such, rather than traced in
float32 and converted with ``onnxruntime.transformers.float16``. The converter
casts every edge between two nodes it keeps in float32 through float16 (and
writes an invalid graph where one tensor feeds a kept node twice, as RoPE's
``cat(freqs, freqs)`` does), so RoPE angles and RMSNorm statistics lose
precision: at position 3000 it moved a key by 0.1 where the direct fp16 trace
moves it by 2e-4. Traced in fp16, the graph keeps exactly the float32 islands
transformers' own fp16 forward has (RMSNorm statistics, RoPE angles, softmax),
and ``ScoringDecoder`` adds the score accumulation and fp32 logits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import InternVLForConditionalGeneration

from stitchvlm.shared.model_files import ModelFiles

from .export_modules import ScoringDecoder, UnscoredDecoder, VisionEncoder
from .lean_decoder import check_lean_supported, export_lean_decoder
from .lean_vision import check_lean_vision_supported, export_lean_vision
from .quantize import DEFAULT_BLOCK_SIZE, compare_quantized, open_with_graphs, quantize_export
from .runtime import CPU, EdgeModel
from .sidecar import (
    DECODER_QUANT_METHODS,
    DEFAULT_GRAPH,
    DTYPES,
    GRAPHS,
    QUANT_BITS,
    SIDECAR_NAME,
    VISION_GRAPHS,
    VISION_QUANT_METHODS,
    DecoderDims,
    EdgeSidecar,
    GraphIO,
    TokenIds,
)
from .verify import load_model, verify_export

DEFAULT_OPSET = 17  # LayerNormalization (the ViT's) needs 17
# Weight files and weight indexes are not copied; everything else at the top of the checkpoint is.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npy")  # fmt: skip


@dataclass(frozen=True)
class ExportConfig:
    """One export run (what ``stitch-export`` parses its arguments into)."""

    model_dir: Path  # Hugging Face InternVL checkpoint directory
    out_dir: Path  # export directory to write (created; existing graph files are replaced)
    dtype: str = "fp32"  # "fp32" or "fp16"
    opset: int = DEFAULT_OPSET  # ONNX opset of both graphs
    verify: bool = True  # compare ORT with PyTorch after exporting (skipped when with_scores is False)
    model_id: str | None = None  # name in the sidecar; the checkpoint directory's name when None
    # False: the decoder without the visual-score output, to measure what the score costs.
    # For benchmarks only: the runtime (and so the gate) cannot use such an export.
    with_scores: bool = True
    # torch device the model is traced on. The tracer runs the model once; CPUs without fp16
    # matmul run an fp16 ViT-300M trace at ~0.5 GFLOP/s (tens of minutes), a GPU in seconds.
    device: str = "cpu"
    # Decoder graph (sidecar.GRAPHS): "lean" (the default) builds lean_decoder's graph of fused ORT
    # ops with shared KV buffers; "explicit" traces ScoringDecoder (the reference, and the fallback
    # for a model the lean graphs refuse).
    graph: str = DEFAULT_GRAPH
    # Vision graph (sidecar.VISION_GRAPHS): "explicit" traces VisionEncoder (the reference), "lean"
    # builds lean_vision's graph of fused ORT ops. None: the same kind as ``graph``.
    vision_graph: str | None = None
    # Weight-only quantization (``quantize``): "none" or a key of sidecar.QUANT_BITS ("int4", "int8").
    # The float graphs are exported and verified first, then quantized and compared with them.
    quant: str = "none"
    quant_block_size: int = DEFAULT_BLOCK_SIZE  # MatMulNBits block along K: a power of two >= 16
    # MatMulNBits accuracy_level: 0 (unset: compute in the activation dtype) .. 4 (int8 activations);
    # None: quantize.DEFAULT_ACCURACY_LEVEL of the scheme (4 for both: the fast CPU kernels).
    quant_accuracy_level: int | None = None
    # With ``quant``, how the vision graph is quantized (the decoder always by MatMulNBits):
    # sidecar.VISION_QUANT_METHODS or "none" (float). None: "dynamic-int8" for fp32 exports, "nbits"
    # for fp16 ones (dynamic quantization takes float32). At the InternVL3-1B shape on a CPU,
    # MatMulNBits over 1025 rows a tile was no faster than fp32 GEMM (int4 14% slower); dynamic
    # int8 was 2.07x faster (quantize.py).
    vision_quant: str | None = None
    # With ``quant``, how the decoder is quantized: sidecar.DECODER_QUANT_METHODS. "nbits"
    # (MatMulNBits) by default; "dynamic-int8" (quant "int8", fp32) as the tower's dynamic int8,
    # 2x faster prefill on a VNNI CPU, activations scaled per tensor (quantize.py).
    decoder_quant: str = "nbits"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quant != "none" and self.quant not in QUANT_BITS:
            raise ValueError(f"quant must be 'none' or one of {sorted(QUANT_BITS)}, got {self.quant!r}")
        size = self.quant_block_size
        if size < 16 or size & (size - 1):
            raise ValueError(f"quant_block_size must be a power of two >= 16, got {size}")
        if self.quant_accuracy_level is not None and self.quant_accuracy_level not in range(5):
            raise ValueError(f"quant_accuracy_level must be 0..4, got {self.quant_accuracy_level}")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.vision_graph is None:
            object.__setattr__(self, "vision_graph", self.graph)  # frozen: derived once, here
        if self.vision_graph not in VISION_GRAPHS:
            raise ValueError(f"vision_graph must be one of {VISION_GRAPHS}, got {self.vision_graph!r}")
        if self.vision_quant is None:
            object.__setattr__(self, "vision_quant", "dynamic-int8" if self.dtype == "fp32" else "nbits")
        if self.vision_quant not in (*VISION_QUANT_METHODS, "none"):
            raise ValueError(
                f"vision_quant must be 'none' or one of {VISION_QUANT_METHODS}, got {self.vision_quant!r}"
            )
        if self.vision_quant == "dynamic-int8" and self.dtype != "fp32":
            raise ValueError("dynamic-int8 vision quantization takes a float32 export; use nbits for fp16")
        if self.decoder_quant not in DECODER_QUANT_METHODS:
            raise ValueError(f"decoder_quant must be one of {DECODER_QUANT_METHODS}, got {self.decoder_quant!r}")
        if self.decoder_quant == "dynamic-int8" and (self.dtype != "fp32" or self.quant != "int8"):
            raise ValueError(
                "dynamic-int8 decoder quantization takes --quant int8 and a float32 export "
                f"(got --quant {self.quant}, {self.dtype})"
            )
        if self.opset < DEFAULT_OPSET:
            raise ValueError(f"opset must be >= {DEFAULT_OPSET} (LayerNormalization), got {self.opset}")


def progress(message: str) -> None:
    print(f"[stitch-export] {message}", file=sys.stderr, flush=True)


def export_vision(model: InternVLForConditionalGeneration, path: Path, opset: int, io: GraphIO) -> None:
    """vision.onnx with a dynamic tile count."""
    tile = model.config.vision_config.image_size[0]
    # float32 in: the graph casts, as get_image_features does
    pixel_values = torch.randn(2, 3, tile, tile, device=model.device)
    _trace_to_onnx(
        VisionEncoder(model),
        (pixel_values,),
        path,
        opset,
        input_names=[io.pixel_values],
        output_names=[io.image_embeds],
        dynamic_axes={io.pixel_values: {0: "tiles"}, io.image_embeds: {0: "visual_tokens"}},
    )


def export_decoder(
    model: InternVLForConditionalGeneration, path: Path, opset: int, io: GraphIO, with_scores: bool = True
) -> None:
    """decoder.onnx with dynamic batch, sequence, past and logit-row counts."""
    dims = decoder_dims(model)
    dtype, device = model.dtype, model.device
    # Traced with batch 2 so that nothing specialises on a batch of one; seq != past, and
    # num_logits neither 1 nor seq, so no slice is frozen at either end.
    batch, seq, past, num_logits = 2, 3, 4, 2
    scored = (torch.ones(batch, seq, device=device),) if with_scores else ()  # score_query_mask
    example = (
        torch.randn(batch, seq, dims.hidden_size, dtype=dtype, device=device),  # inputs_embeds
        torch.arange(past, past + seq, device=device).expand(batch, seq),  # position_ids
        torch.ones(batch, past + seq, dtype=torch.int64, device=device),  # attention_mask
        *scored,
        torch.tensor(num_logits, dtype=torch.int64, device=device),  # num_logits: 0-d, a graph input
        *[
            torch.randn(batch, dims.num_kv_heads, past, dims.head_dim, dtype=dtype, device=device)
            for _ in range(2 * dims.num_layers)
        ],
    )
    axes = {
        io.inputs_embeds: {0: "batch", 1: "seq"},
        io.position_ids: {0: "batch", 1: "seq"},
        io.attention_mask: {0: "batch", 1: "total"},
        io.logits: {0: "batch", 1: "logit_rows"},
    }
    if with_scores:
        axes |= {io.score_query_mask: {0: "batch", 1: "seq"}, io.visual_scores: {0: "batch", 1: "total"}}
    axes |= {name: {0: "batch", 2: "past"} for name in io.past_names(dims.num_layers)}
    axes |= {name: {0: "batch", 2: "total"} for name in io.present_names(dims.num_layers)}
    _trace_to_onnx(
        ScoringDecoder(model) if with_scores else UnscoredDecoder(model),
        example,
        path,
        opset,
        input_names=io.decoder_inputs(dims.num_layers, with_scores),
        output_names=io.decoder_outputs(dims.num_layers, with_scores),
        dynamic_axes=axes,
    )


def _trace_to_onnx(module, example, path, opset, input_names, output_names, dynamic_axes) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer warnings about Python
        # ints: the traced graph is checked against other shapes by verification and tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    consolidate_external_data(Path(path))


def consolidate_external_data(path: Path) -> None:
    """Move a graph's external tensors into one ``<graph>.data`` file next to it.

    Past 2 GB (an fp32 decoder of a 1B model) the TorchScript exporter writes
    every initializer to its own file named after the tensor; one data file per
    graph keeps the export directory readable and copyable. Graphs without
    external data are left alone.
    """
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    data_name = f"{path.name}.data"
    if not locations or locations == {data_name}:
        return
    onnx.load_external_data_for_model(model, str(path.parent))
    (path.parent / data_name).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
    )
    for location in locations - {data_name}:
        (path.parent / location).unlink()


def decoder_dims(model: InternVLForConditionalGeneration) -> DecoderDims:
    text = model.config.text_config
    heads = text.num_attention_heads
    return DecoderDims(
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=text.num_key_value_heads or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
    )


def save_embeddings(model: InternVLForConditionalGeneration, path: Path) -> None:
    # weight: [vocab, hidden] in the model's dtype
    weight = model.get_input_embeddings().weight.detach().cpu().numpy()
    np.save(path, np.ascontiguousarray(weight))


def copy_checkpoint_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy every top-level file of the checkpoint except weights; return the names copied."""
    copied = []
    for source in sorted(Path(model_dir).iterdir()):
        is_weight = source.name.endswith(WEIGHT_SUFFIXES) or source.name.endswith(".index.json")
        if source.is_file() and not is_weight:
            shutil.copy2(source, out_dir / source.name)
            copied.append(source.name)
    return copied


def build_sidecar(
    model: InternVLForConditionalGeneration,
    files: ModelFiles,
    dtype: str,
    opset: int,
    model_id: str,
    with_scores: bool = True,
    graph: str = "explicit",
    vision_graph: str = "explicit",
) -> EdgeSidecar:
    if files.image_context_id != model.config.image_token_id:
        raise ValueError("tokenizer and config.json disagree on the image token id")
    return EdgeSidecar(
        model_id=model_id,
        dtype=dtype,
        dims=decoder_dims(model),
        tokens=TokenIds(
            image_token_id=files.image_context_id,
            eos_token_ids=tuple(files.eos_token_ids),
            pad_token_id=files.pad_token_id,
        ),
        tiling=files.tiling,
        tokens_per_tile=files.tiling.tokens_per_tile,
        opset=opset,
        with_scores=with_scores,
        graph=graph,
        vision_graph=vision_graph,
    )


def export_edge(config: ExportConfig) -> EdgeSidecar:
    """Run one export (and its verification unless disabled); return the sidecar written.

    Everything is written into a hidden directory beside ``out_dir`` and moved
    into place only after verification has passed (``publish_export``): a
    failed export leaves ``out_dir`` as it was, absent or the previous export,
    never a complete-looking directory of graphs that failed verification.
    """
    started = time.perf_counter()
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        sidecar = _export_unpublished(config, staging)
        publish_export(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"done in {time.perf_counter() - started:.1f} s -> {out}")
    return sidecar


def publish_export(staging: Path, out: Path) -> None:
    """Move a verified export from ``staging`` to ``out``.

    A rename when ``out`` does not exist. Into an existing directory, file by
    file: its old sidecar is removed first and the new one moved last, so an
    interrupted move leaves a directory without ``stitch_edge.json``, which
    the runtime refuses, rather than one whose sidecar describes other graphs.
    Files of ``out`` the new export does not write are left alone.
    """
    if not out.exists():
        staging.rename(out)
        return
    (out / SIDECAR_NAME).unlink(missing_ok=True)
    for item in sorted(staging.iterdir()):
        if item.name != SIDECAR_NAME:
            os.replace(item, out / item.name)
    os.replace(staging / SIDECAR_NAME, out / SIDECAR_NAME)


def _export_unpublished(config: ExportConfig, out: Path) -> EdgeSidecar:
    """Export and verify into ``out`` (a fresh directory); ``ValueError`` when verification fails."""
    progress(f"loading {config.model_dir} ({config.dtype})")
    model = load_model(config.model_dir, config.dtype, config.device)
    io = GraphIO()

    progress("copying tokenizer and config files")
    copy_checkpoint_files(Path(config.model_dir), out)
    files = ModelFiles.load(out)
    model_id = config.model_id or Path(config.model_dir).resolve().name
    for kind, option, check in (
        (config.graph, "--graph", check_lean_supported),
        (config.vision_graph, "--vision-graph", check_lean_vision_supported),
    ):
        if kind == "lean":
            try:
                check(model)
            except ValueError as error:
                raise ValueError(f"{error}; {option} explicit exports the traced graph") from error
    sidecar = build_sidecar(
        model,
        files,
        config.dtype,
        config.opset,
        model_id,
        config.with_scores,
        config.graph,
        config.vision_graph,
    )
    if sidecar.tiling.tile_size != model.config.vision_config.image_size[0]:
        raise ValueError(
            f"preprocessor tile size {sidecar.tiling.tile_size} is not the ViT's "
            f"{model.config.vision_config.image_size[0]}"
        )

    progress(f"exporting {sidecar.graphs.vision} ({config.vision_graph} graph)")
    if config.vision_graph == "lean":
        export_lean_vision(model, out / sidecar.graphs.vision, io)
    else:
        export_vision(model, out / sidecar.graphs.vision, config.opset, io)
    progress(
        f"exporting {sidecar.graphs.decoder} ({config.graph} graph"
        + (")" if config.with_scores else ", without scores)")
    )
    if config.graph == "lean":
        export_lean_decoder(model, out / sidecar.graphs.decoder, io, config.with_scores)
    else:
        export_decoder(model, out / sidecar.graphs.decoder, config.opset, io, config.with_scores)
    progress(f"saving {sidecar.graphs.embeddings}")
    save_embeddings(model, out / sidecar.graphs.embeddings)
    sidecar.save(out)
    del model

    if config.verify and not config.with_scores:
        progress("not verified: the runtime cannot run an export without scores")
    elif config.verify:
        progress("verifying ONNX Runtime against PyTorch (2 prefills + 2 decode steps)")
        report = verify_export(config.model_dir, out, config.dtype)
        for line in report.lines():
            progress(f"  {line}")
        report.raise_if_failed()
    if config.quant != "none":
        sidecar = _quantize_verified(config, out, sidecar)
    return sidecar


def _quantize_verified(config: ExportConfig, out: Path, sidecar: EdgeSidecar) -> EdgeSidecar:
    """Replace the float graphs in ``out`` by quantized ones and compare the two (``quantize``)."""
    float_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.float-", dir=out.parent))
    try:
        for name in (sidecar.graphs.vision, sidecar.graphs.decoder):
            for path in (out / name, out / f"{name}.data"):
                if not path.exists():
                    continue
                if name == sidecar.graphs.vision and config.vision_quant == "none":
                    _link_or_copy(path, float_dir / path.name)  # stays float in out; compared from here
                else:
                    os.replace(path, float_dir / path.name)
        quant = quantize_export(
            float_dir,
            out,
            sidecar,
            config.quant,
            config.quant_block_size,
            config.quant_accuracy_level,
            vision=None if config.vision_quant == "none" else config.vision_quant,
            decoder_method=config.decoder_quant,
        )
        how = (
            "dynamic-int8"
            if quant.decoder_method == "dynamic-int8"
            else f"block {quant.block_size}, accuracy_level {quant.accuracy_level}"
        )
        progress(
            f"quantized the decoder's MatMul weights to {quant.scheme} ({how}); "
            f"vision: {quant.vision_method or 'float'}"
        )
        progress("  " + ", ".join(f"{name}: {count} MatMul weights" for name, count in quant.graphs.items()))
        sidecar = replace(sidecar, quant=quant)
        sidecar.save(out)
        if config.verify and config.with_scores:  # the runtime cannot run a --no-scores export
            progress(f"comparing the {config.quant} graphs with the {config.dtype} ones")
            report = compare_quantized(
                open_with_graphs(out, float_dir), EdgeModel.load(out, providers=[CPU]), config.quant
            )
            for line in report.lines():
                progress(f"  {line}")
            report.raise_if_broken()
    finally:
        shutil.rmtree(float_dir, ignore_errors=True)
    return sidecar


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stitch-export", description="Export an InternVL checkpoint to the edge's ONNX directory."
    )
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="export directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--device", default="cpu", help="torch device to trace on (cuda: fast fp16 exports)")
    parser.add_argument("--model-id", default=None, help="name in the sidecar (default: checkpoint dir name)")
    parser.add_argument("--no-verify", action="store_true", help="skip the ORT vs PyTorch check")
    parser.add_argument(
        "--graph",
        choices=GRAPHS,
        default=DEFAULT_GRAPH,
        help="decoder graph: lean (fused ORT ops, shared KV buffers; the default) or explicit "
        "(traced, the reference)",
    )
    parser.add_argument(
        "--vision-graph",
        choices=VISION_GRAPHS,
        default=None,
        help="vision graph: explicit (traced) or lean (fused ORT ops); default: the kind --graph names",
    )
    parser.add_argument(
        "--no-scores",
        action="store_true",
        help="benchmarking only: a decoder without the visual-score output (the runtime refuses it)",
    )
    parser.add_argument(
        "--quant",
        choices=["none", *sorted(QUANT_BITS)],
        default="none",
        help="quantize the graphs' MatMul weights after verification: the decoder's as MatMulNBits, the "
        "tower's as --vision-quant says",
    )
    parser.add_argument(
        "--vision-quant",
        choices=(*VISION_QUANT_METHODS, "none"),
        default=None,
        help="with --quant, the vision graph: dynamic-int8 (int8 weights, uint8 activations per pass; "
        "the default for fp32, 2.1x faster on a VNNI CPU), nbits (as the decoder; the fp16 default) or none",
    )
    parser.add_argument(
        "--decoder-quant",
        choices=DECODER_QUANT_METHODS,
        default="nbits",
        help="with --quant, the decoder: nbits (MatMulNBits, the default) or dynamic-int8 (--quant int8, "
        "fp32: int8 weights, uint8 activations per pass and tensor; 2x faster prefill on a VNNI CPU, "
        "more error on models with outlier activations)",
    )
    parser.add_argument(
        "--no-quant-vision",
        action="store_true",
        help="with --quant: keep the vision graph float (= --vision-quant none)",
    )
    parser.add_argument("--quant-block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="weights per scale")
    parser.add_argument(
        "--quant-accuracy-level",
        type=int,
        default=None,
        help="MatMulNBits accuracy_level: 0 computes in the activation dtype, 4 with int8 activations "
        "(default 4: ORT's fast CPU kernels; 8-bit at 0 is slower than float)",
    )
    args = parser.parse_args(argv)
    if args.no_quant_vision and args.vision_quant not in (None, "none"):
        parser.error(f"--no-quant-vision and --vision-quant {args.vision_quant} contradict each other")
    try:
        config = ExportConfig(
            model_dir=args.model,
            out_dir=args.out,
            dtype=args.dtype,
            opset=args.opset,
            verify=not args.no_verify,
            model_id=args.model_id,
            with_scores=not args.no_scores,
            device=args.device,
            graph=args.graph,
            vision_graph=args.vision_graph,
            quant=args.quant,
            quant_block_size=args.quant_block_size,
            quant_accuracy_level=args.quant_accuracy_level,
            vision_quant="none" if args.no_quant_vision else args.vision_quant,
            decoder_quant=args.decoder_quant,
        )
        export_edge(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"stitch-export: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
