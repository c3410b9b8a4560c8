"""Edge speed: the small VLM on ONNX Runtime against PyTorch, the score's cost, the consistency pass.

One random-weight model of a preset's shape (``presets.py``), saved as a
checkpoint and exported four times into a temporary directory: the explicit
(traced) decoder with the in-graph visual score (what the edge serves by
default) and ``--no-scores`` (benchmarks only), and the lean decoder
(``--graph lean``: fused ORT ops, shared KV buffers) with and without the
score. In the same run, on one image and one question, with medians over
``--repeats`` interleaved repeats:

(a) greedy generation of exactly ``--new-tokens`` tokens (EOS ignored on all
    sides) by ``EdgeModel.generate`` on ONNX Runtime with the explicit and
    with the lean graph (CPU EP; CUDA EP with the KV cache kept on the GPU
    through IO binding when available) and by transformers'
    ``model.generate(do_sample=False)`` in eager PyTorch (SDPA attention
    unless ``--torch-attn``), all from the same preprocessing;
(b) the four decoders as raw ORT sessions: one prefill (logits of the last
    position) and ``new_tokens - 1`` decode passes over the same inputs; also
    the explicit prefill that returns every position's logits (what the
    decoder did before ``num_logits``);
(c) the SEE consistency pass (``teacher_forced_probs`` with the top r_c = 5%
    visual tokens) over the generated answer.

Definitions (times are medians over repeats, in ms):

- ``ttft``: time to first token = preprocess (tiles, prompt ids) + vision +
  prefill, up to the first token's logits;
- ``decode tok/s``: (new_tokens - 1) / time of the decode passes after it;
- generation time = ttft + decode time (the whole ``generate`` call);
- ``ort_vs_torch_speedup`` = torch generation time / ORT generation time;
- ``score_overhead`` = with-scores time / no-scores time - 1, time = one
  prefill + (new_tokens - 1) decode passes; ``score_overhead_prefill`` and
  ``score_overhead_decode`` split it (explicit graph); ``lean_score_overhead``
  (and its splits) is the same for the lean graph;
- ``lean_vs_explicit_*`` = lean time / explicit time, both scored (lower is
  better): ``_total``, ``_prefill``, ``_decode`` from (b), ``_generation``
  from (a); ``lean_unscored_vs_explicit_unscored_total`` likewise unscored;
- ``full_logits_overhead`` = prefill time with every position's logits /
  prefill time with the last position's - 1 (what ``num_logits`` saves);
- ``consistency_fraction`` = consistency pass time / ORT generation time.

    python bench/edge_speed.py --quick                    # CPU, small config, 1 thread, < 1 min
    python bench/edge_speed.py --preset internvl3-1b      # GPU: fp16, CUDA EP vs torch CUDA

Progress goes to stderr; the markdown table to stdout, then, as the last
line, one JSON object. It does not measure accuracy (random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from edge_inputs import QUESTION, bench_image, session_options  # bench/edge_inputs.py  # noqa: F401
from PIL import Image
from presets import PRESETS, BenchPreset, internvl_config  # bench/presets.py: shared speed-bench shapes
from transformers import InternVLForConditionalGeneration, LogitsProcessor, LogitsProcessorList

from stitchvlm.cloud.checkpoints import IMAGENET_MEAN, IMAGENET_STD, build_tokenizer, save_checkpoint
from stitchvlm.edge.export import ExportConfig, export_edge
from stitchvlm.edge.runtime import CPU, CUDA, EdgeGeneration, EdgeModel, KVBuffers, open_decoder
from stitchvlm.edge.sidecar import EdgeSidecar
from stitchvlm.shared.layout import TilingConfig
from stitchvlm.shared.preprocess import preprocess_image
from stitchvlm.shared.prompt import build_prompt
from stitchvlm.shared.scoring import top_r_indices

CONSISTENCY_RETENTION = 0.05  # r_c, DESIGN "SEE gate"


def log(message: str) -> None:
    print(f"[edge_speed] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run (what the arguments parse into)."""

    preset: str  # name in presets.PRESETS
    dtype: str  # export and torch dtype: "fp32" or "fp16"
    device: str  # "cpu" or "cuda": ORT provider and torch device
    new_tokens: int  # tokens each generation produces (EOS ignored)
    repeats: int  # timed repeats per measurement (after one warm-up)
    threads: int  # CPU threads for torch and for each ORT session
    torch_attn: str  # transformers attention implementation: "sdpa" or "eager"
    work_dir: Path  # checkpoint and the two exports are written here

    def __post_init__(self) -> None:
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2 (a prefill and at least one decode pass)")
        if self.device == "cuda" and not (
            CUDA in ort.get_available_providers() and torch.cuda.is_available()
        ):
            raise ValueError("--device cuda needs onnxruntime's CUDAExecutionProvider and a CUDA torch")
        if self.device == "cpu" and self.dtype == "fp16":
            # most CPUs have no fp16 matmul: torch would run at <1 GFLOP/s and the ORT graph falls back
            log("warning: fp16 on CPU measures fp16 emulation, not what an edge CPU would run")


# --------------------------------------------------------------------- building


def build_checkpoint(preset: BenchPreset, out: Path, dtype: str) -> Path:
    """A seeded random InternVL of the preset's shape, saved with a tokenizer in the -hf layout."""
    tokenizer = build_tokenizer()
    config = internvl_config(
        preset,
        image_token_id=tokenizer.token_to_id("<IMG_CONTEXT>"),
        eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        bos_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    tiling = TilingConfig(
        tile_size=preset.tile,
        max_tiles=preset.max_tiles,
        tokens_per_tile=preset.tokens_per_tile,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    model = model.to(torch.float16 if dtype == "fp16" else torch.float32)
    return save_checkpoint(model, tokenizer, out, tiling)


def providers(device: str) -> list[str]:
    return [CUDA, CPU] if device == "cuda" else [CPU]


# --------------------------------------------------------------------- (a) ORT vs torch


@dataclass(frozen=True)
class GenerationTime:
    """One timed generation."""

    ttft_ms: float  # preprocess + vision + prefill
    decode_ms: float  # the new_tokens - 1 decode passes
    tokens: tuple[int, ...]  # what it generated

    @property
    def total_ms(self) -> float:
        return self.ttft_ms + self.decode_ms


def ort_generation(
    edge: EdgeModel, image: Image.Image, new_tokens: int
) -> tuple[GenerationTime, EdgeGeneration]:
    gen = edge.generate(image, QUESTION, new_tokens, ignore_eos=True)
    t = gen.timings
    return GenerationTime(t.preprocess_ms + t.vision_ms + t.prefill_ms, t.decode_ms, gen.token_ids), gen


class StepClock(LogitsProcessor):
    """Records the time each of generate's forward passes has produced its logits."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # generate reads the logits back every step anyway, so this sync costs ~nothing
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def torch_generation(
    model: InternVLForConditionalGeneration, edge: EdgeModel, image: Image.Image, config: BenchConfig
) -> GenerationTime:
    """transformers' greedy generate from the same preprocessing and prompt ids as the edge runtime."""
    sync = torch.cuda.synchronize if config.device == "cuda" else (lambda: None)
    clock = StepClock(sync)
    started = time.perf_counter()
    pixel_values, layout = preprocess_image(image, edge.files.tiling)
    prompt = build_prompt(edge.files, QUESTION, layout.num_visual_tokens)
    ids = torch.tensor(np.asarray(prompt.input_ids, dtype=np.int64), device=config.device)[None]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.from_numpy(pixel_values).to(config.device, model.dtype),
            max_new_tokens=config.new_tokens,
            do_sample=False,
            eos_token_id=[],  # no stop token: exactly new_tokens tokens, as ignore_eos on the edge
            pad_token_id=edge.files.pad_token_id,
            logits_processor=LogitsProcessorList([clock]),
        )
    tokens = tuple(out[0, ids.shape[1] :].tolist())
    if len(tokens) != config.new_tokens or len(clock.times) != config.new_tokens:
        raise RuntimeError(f"torch generated {len(tokens)} tokens, expected {config.new_tokens}")
    return GenerationTime(1e3 * (clock.times[0] - started), 1e3 * (clock.times[-1] - clock.times[0]), tokens)


def compare_generation(edge, lean, model, image, config: BenchConfig) -> dict:
    """(a): interleaved repeats of the three generations (explicit, lean, torch); medians."""
    ort_runs, lean_runs, torch_runs = [], [], []
    ort_generation(edge, image, config.new_tokens)  # warm-up (ORT allocates its arenas here)
    ort_generation(lean, image, config.new_tokens)
    torch_generation(model, edge, image, config)
    for repeat in range(config.repeats):
        ort_runs.append(ort_generation(edge, image, config.new_tokens)[0])
        lean_runs.append(ort_generation(lean, image, config.new_tokens)[0])
        torch_runs.append(torch_generation(model, edge, image, config))
        log(
            f"(a) repeat {repeat + 1}/{config.repeats}: ORT {ort_runs[-1].total_ms:.0f} ms, "
            f"ORT lean {lean_runs[-1].total_ms:.0f} ms, torch {torch_runs[-1].total_ms:.0f} ms"
        )
    return {
        "ort": summarise(ort_runs, config.new_tokens),
        "ort_lean": summarise(lean_runs, config.new_tokens),
        "torch": summarise(torch_runs, config.new_tokens),
        "tokens_equal": equal_prefix(ort_runs[0].tokens, torch_runs[0].tokens),
        "lean_tokens_equal": equal_prefix(lean_runs[0].tokens, ort_runs[0].tokens),
    }


def equal_prefix(ours: tuple[int, ...], theirs: tuple[int, ...]) -> int:
    """How many leading tokens two generations share."""
    same = 0
    for mine, other in zip(ours, theirs, strict=True):
        if mine != other:
            break
        same += 1
    return same


def summarise(runs: list[GenerationTime], new_tokens: int) -> dict:
    decode_ms = statistics.median(r.decode_ms for r in runs)
    return {
        "ttft_ms": statistics.median(r.ttft_ms for r in runs),
        "decode_ms": decode_ms,
        "decode_tok_s": (new_tokens - 1) / (decode_ms / 1e3),
        "total_ms": statistics.median(r.total_ms for r in runs),
    }


# --------------------------------------------------------------------- (b) the score's cost


class RawDecoder:
    """decoder.onnx as a bare ORT session (the runtime refuses the no-scores export).

    Binds the cache as the runtime does: the explicit graph's presents are new
    device tensors each pass; the lean graph's are the past buffers themselves.
    """

    def __init__(self, edge_dir: Path, config: BenchConfig) -> None:
        self.sidecar = EdgeSidecar.load(edge_dir)
        self.session = open_decoder(
            edge_dir / self.sidecar.graphs.decoder,
            self.sidecar,
            session_options(config.threads),
            providers(config.device),
        )
        self.device = "cuda" if self.session.get_providers()[0] == CUDA else "cpu"
        self.layers = self.sidecar.dims.num_layers
        self.shared_kv = self.sidecar.graph == "lean"

    def empty_cache(self, capacity: int) -> list[ort.OrtValue] | KVBuffers:
        """An empty cache; the lean graph's holds ``capacity`` positions, as ``generate`` sizes it."""
        dims = self.sidecar.dims
        length = capacity if self.shared_kv else 0
        empty = np.zeros((1, dims.num_kv_heads, length, dims.head_dim), dtype=self.sidecar.numpy_dtype)
        values = [
            ort.OrtValue.ortvalue_from_numpy(empty.copy(), self.device, 0) for _ in range(2 * self.layers)
        ]
        return KVBuffers.of(values) if self.shared_kv else values

    def run(self, embeds, positions, query_mask, cache, num_logits: int) -> list[ort.OrtValue]:
        """One pass as the runtime binds it (logits and scores to the host, KV on the device)."""
        io, with_scores = self.sidecar.io, self.sidecar.with_scores
        names = io.past_names(self.layers), io.present_names(self.layers)
        host = [io.logits, io.visual_scores] if with_scores else [io.logits]
        # the lean graph's buffers stay bound between passes
        binding = (
            cache.storage.binding(self.session, host, *names) if self.shared_kv else self.session.io_binding()
        )
        binding.bind_cpu_input(io.inputs_embeds, np.ascontiguousarray(embeds))
        binding.bind_cpu_input(io.position_ids, np.ascontiguousarray(positions, dtype=np.int64))
        past = cache.length if self.shared_kv else cache[0].shape()[2]
        total = past + positions.shape[1]
        binding.bind_cpu_input(io.attention_mask, np.ones((1, total), dtype=np.int64))
        if with_scores:
            binding.bind_cpu_input(io.score_query_mask, np.ascontiguousarray(query_mask, dtype=np.float32))
        binding.bind_cpu_input(io.num_logits, np.array(num_logits, dtype=np.int64))
        for name in host:  # before any present, so that get_outputs() lists them first
            binding.bind_output(name, "cpu")
        if not self.shared_kv:
            for past_name, present_name, value in zip(*names, cache, strict=True):
                binding.bind_ortvalue_input(past_name, value)
                binding.bind_output(present_name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        outputs[0].numpy()  # the logits reach numpy, as the runtime's argmax needs them
        if self.shared_kv:
            cache.storage.filled = total
            return KVBuffers(cache.storage, total)
        return outputs[len(host) :]


def time_decoder(
    decoder: RawDecoder, edge: EdgeModel, gen: EdgeGeneration, num_logits: int
) -> tuple[float, float]:
    """(prefill ms, decode ms over the answer's tokens but the last) on the generation's own inputs."""
    prompt = gen.prompt
    length = len(prompt.input_ids)
    embeds = edge.embed(prompt.input_ids)
    embeds[prompt.visual_start : prompt.visual_end] = gen.image_embeds
    query_mask = (np.arange(length) >= prompt.visual_end).astype(np.float32)[None]
    started = time.perf_counter()
    empty = decoder.empty_cache(length + len(gen.token_ids))
    cache = decoder.run(embeds[None], np.arange(length)[None], query_mask, empty, num_logits)
    prefilled = time.perf_counter()
    one = np.ones((1, 1), dtype=np.float32)
    for index, token in enumerate(gen.token_ids[:-1]):
        cache = decoder.run(edge.embed([token])[None], np.array([[length + index]]), one, cache, 1)
    finished = time.perf_counter()
    return 1e3 * (prefilled - started), 1e3 * (finished - prefilled)


def compare_scores(edge: EdgeModel, gen: EdgeGeneration, dirs: dict[str, Path], config: BenchConfig) -> dict:
    """(b): the four decoders, and all-position logits, interleaved in alternating order."""
    decoders = {name: RawDecoder(path, config) for name, path in dirs.items()}
    length = len(gen.prompt.input_ids)
    variants = {name: (name, 1) for name in dirs} | {"all_logits": ("scores", length)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for graph, rows in variants.values():  # warm-up
        time_decoder(decoders[graph], edge, gen, rows)
    for repeat in range(config.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            graph, rows = variants[name]
            times[name].append(time_decoder(decoders[graph], edge, gen, rows))
        log(f"(b) repeat {repeat + 1}/{config.repeats}")
    return {
        name: {
            "prefill_ms": statistics.median(t[0] for t in runs),
            "decode_ms": statistics.median(t[1] for t in runs),
            "total_ms": statistics.median(t[0] + t[1] for t in runs),
        }
        for name, runs in times.items()
    }


# --------------------------------------------------------------------- (c) consistency pass


def time_consistency(edge: EdgeModel, gen: EdgeGeneration, repeats: int) -> float:
    keep = top_r_indices(gen.visual_scores, CONSISTENCY_RETENTION)
    edge.teacher_forced_probs(gen.prompt, gen.image_embeds, keep, gen.token_ids)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        edge.teacher_forced_probs(gen.prompt, gen.image_embeds, keep, gen.token_ids)
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


# --------------------------------------------------------------------- run and report


# export name -> (decoder graph, with scores)
EXPORTS = {
    "scores": ("explicit", True),
    "no_scores": ("explicit", False),
    "lean_scores": ("lean", True),
    "lean_no_scores": ("lean", False),
}


def export_all(checkpoint: Path, config: BenchConfig) -> dict[str, Path]:
    """The four exports of ``EXPORTS``, traced (explicit) on the benchmark's device (fast fp16)."""
    dirs = {name: config.work_dir / f"edge-{name.replace('_', '-')}" for name in EXPORTS}
    for name, out in dirs.items():
        graph, with_scores = EXPORTS[name]
        log(f"exporting {name} ({config.dtype}) -> {out}")
        export = ExportConfig(
            model_dir=checkpoint,
            out_dir=out,
            dtype=config.dtype,
            verify=False,
            with_scores=with_scores,
            device=config.device,
            graph=graph,
        )
        export_edge(export)
    return dirs


def run(config: BenchConfig) -> dict:
    preset = BenchPreset.from_name(config.preset)
    torch.set_num_threads(config.threads)
    log(f"building a random {config.preset} checkpoint")
    checkpoint = build_checkpoint(preset, config.work_dir / "checkpoint", config.dtype)
    dirs = export_all(checkpoint, config)

    edge, lean = (
        EdgeModel.load(
            dirs[name], providers=providers(config.device), session_options=session_options(config.threads)
        )
        for name in ("scores", "lean_scores")
    )
    if edge.device != config.device or lean.device != config.device:
        raise RuntimeError(f"ORT runs on {edge.device}/{lean.device}, not {config.device}")
    model = InternVLForConditionalGeneration.from_pretrained(
        checkpoint,
        dtype=torch.float16 if config.dtype == "fp16" else torch.float32,
        attn_implementation=config.torch_attn,
    )
    model = model.to(config.device).eval()
    image = bench_image(preset.image_size)

    log("(a) ORT vs PyTorch generation")
    generation = compare_generation(edge, lean, model, image, config)
    del model  # (b) and (c) are ORT only
    if config.device == "cuda":
        torch.cuda.empty_cache()
    _, gen = ort_generation(edge, image, config.new_tokens)
    log("(b) explicit and lean decoders, with and without scores")
    scores = compare_scores(edge, gen, dirs, config)
    log("(c) consistency pass")
    consistency_ms = time_consistency(edge, gen, config.repeats)
    return summary(config, gen, generation, scores, consistency_ms)


def summary(
    config: BenchConfig, gen: EdgeGeneration, generation: dict, scores: dict, consistency_ms: float
) -> dict:
    ort_, torch_, lean_gen = generation["ort"], generation["torch"], generation["ort_lean"]
    with_, without = scores["scores"], scores["no_scores"]
    lean, lean_without = scores["lean_scores"], scores["lean_no_scores"]
    device = (
        torch.cuda.get_device_name()
        if config.device == "cuda"
        else f"cpu ({os.cpu_count()} cores, {config.threads} threads)"
    )
    return {
        "device": device,
        "preset": config.preset,
        "dtype": config.dtype,
        "torch_attn": config.torch_attn,
        "num_visual_tokens": gen.prompt.num_visual_tokens,
        "prompt_tokens": len(gen.prompt.input_ids),
        "new_tokens": config.new_tokens,
        "repeats": config.repeats,
        "tokens_equal": generation["tokens_equal"],
        "ort_ttft_ms": round(ort_["ttft_ms"], 2),
        "torch_ttft_ms": round(torch_["ttft_ms"], 2),
        "ort_decode_tok_s": round(ort_["decode_tok_s"], 1),
        "torch_decode_tok_s": round(torch_["decode_tok_s"], 1),
        "ort_generation_ms": round(ort_["total_ms"], 2),
        "torch_generation_ms": round(torch_["total_ms"], 2),
        "ort_vs_torch_speedup": round(torch_["total_ms"] / ort_["total_ms"], 3),
        "ttft_speedup": round(torch_["ttft_ms"] / ort_["ttft_ms"], 3),
        "decode_speedup": round(torch_["decode_ms"] / ort_["decode_ms"], 3),
        "score_overhead": round(with_["total_ms"] / without["total_ms"] - 1, 4),
        "score_overhead_prefill": round(with_["prefill_ms"] / without["prefill_ms"] - 1, 4),
        "score_overhead_decode": round(with_["decode_ms"] / without["decode_ms"] - 1, 4),
        "full_logits_overhead": round(scores["all_logits"]["prefill_ms"] / with_["prefill_ms"] - 1, 4),
        "lean_tokens_equal": generation["lean_tokens_equal"],
        "ort_lean_ttft_ms": round(lean_gen["ttft_ms"], 2),
        "ort_lean_decode_tok_s": round(lean_gen["decode_tok_s"], 1),
        "ort_lean_generation_ms": round(lean_gen["total_ms"], 2),
        "lean_vs_torch_speedup": round(torch_["total_ms"] / lean_gen["total_ms"], 3),
        "lean_vs_explicit_generation": round(lean_gen["total_ms"] / ort_["total_ms"], 3),
        "lean_vs_explicit_total": round(lean["total_ms"] / with_["total_ms"], 3),
        "lean_vs_explicit_prefill": round(lean["prefill_ms"] / with_["prefill_ms"], 3),
        "lean_vs_explicit_decode": round(lean["decode_ms"] / with_["decode_ms"], 3),
        "lean_unscored_vs_explicit_unscored_total": round(lean_without["total_ms"] / without["total_ms"], 3),
        "lean_score_overhead": round(lean["total_ms"] / lean_without["total_ms"] - 1, 4),
        "lean_score_overhead_prefill": round(lean["prefill_ms"] / lean_without["prefill_ms"] - 1, 4),
        "lean_score_overhead_decode": round(lean["decode_ms"] / lean_without["decode_ms"] - 1, 4),
        "consistency_ms": round(consistency_ms, 2),
        "consistency_fraction": round(consistency_ms / ort_["total_ms"], 4),
        "detail": {"generation": generation, "decoder": scores},
    }


def print_tables(result: dict) -> None:
    gen, dec = result["detail"]["generation"], result["detail"]["decoder"]
    ort_, lean_, torch_ = gen["ort"], gen["ort_lean"], gen["torch"]
    steps = result["new_tokens"] - 1
    print(
        f"\nmodel {result['preset']} ({result['dtype']}) on {result['device']}: |V| = "
        f"{result['num_visual_tokens']}, prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new "
        f"tokens (EOS ignored), median of {result['repeats']}; first {result['tokens_equal']} tokens equal "
        f"(explicit vs torch), {result['lean_tokens_equal']} (lean vs explicit)\n"
    )
    print(
        f"| (a) greedy generation | ORT explicit | ORT lean | PyTorch ({result['torch_attn']}) "
        "| lean / explicit | PyTorch / lean |"
    )
    print("|---|---|---|---|---|---|")
    for label, key in (
        ("time to first token, ms", "ttft_ms"),
        ("decode, ms", "decode_ms"),
        ("generation, ms", "total_ms"),
    ):
        print(
            f"| {label} | {ort_[key]:.1f} | {lean_[key]:.1f} | {torch_[key]:.1f} | "
            f"{lean_[key] / ort_[key]:.2f}x | {torch_[key] / lean_[key]:.2f}x |"
        )
    print(
        f"| decode, tok/s | {ort_['decode_tok_s']:.1f} | {lean_['decode_tok_s']:.1f} | "
        f"{torch_['decode_tok_s']:.1f} | {lean_['decode_tok_s'] / ort_['decode_tok_s']:.2f}x | "
        f"{lean_['decode_tok_s'] / torch_['decode_tok_s']:.2f}x |\n"
    )

    print(
        "| (b) decoder.onnx (raw ORT) | explicit, scores | explicit, none | lean, scores | lean, none "
        "| score overhead explicit / lean | lean / explicit (scored) |"
    )
    print("|---|---|---|---|---|---|---|")
    with_, without = dec["scores"], dec["no_scores"]
    lean, lean_without = dec["lean_scores"], dec["lean_no_scores"]
    rows = (
        ("prefill (last logits), ms", "prefill_ms", 1),
        ("decode, ms per token", "decode_ms", steps),
        (f"prefill + {steps} decode, ms", "total_ms", 1),
    )
    for label, key, per in rows:
        print(
            f"| {label} | {with_[key] / per:.2f} | {without[key] / per:.2f} | {lean[key] / per:.2f} | "
            f"{lean_without[key] / per:.2f} | {100 * (with_[key] / without[key] - 1):+.1f}% / "
            f"{100 * (lean[key] / lean_without[key] - 1):+.1f}% | {lean[key] / with_[key]:.2f}x |"
        )
    all_rows = dec["all_logits"]["prefill_ms"]
    print(
        f"| prefill, logits of all {result['prompt_tokens']} positions, ms | {all_rows:.2f} | | | | "
        f"{100 * result['full_logits_overhead']:+.1f}% vs last logits | |\n"
    )

    print(f"| (c) consistency pass (r_c = {CONSISTENCY_RETENTION:.0%}) | ms | of ORT generation |")
    print("|---|---|---|")
    print(
        f"| teacher_forced_probs | {result['consistency_ms']:.1f} | {100 * result['consistency_fraction']:.1f}% |"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, preset quick, fp32; 16 tokens, 3 repeats")
    parser.add_argument("--preset", default="internvl3-1b", choices=sorted(PRESETS))
    cuda = CUDA in ort.get_available_providers() and torch.cuda.is_available()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default=None, help="default: fp16 on cuda")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (--quick: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of torch and of ORT (default: all; --quick: 1)"
    )
    parser.add_argument("--torch-attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the exports here (default: temp)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.device = "quick", "cpu"
    args.new_tokens = args.new_tokens or (16 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 5)
    # --quick: one thread each. On a small shared CPU, torch's OpenMP threads stall whenever
    # one is descheduled (2 threads on 2 busy cores made torch 5-15x slower, ORT ~1.5x).
    args.threads = args.threads or (1 if args.quick else os.cpu_count())
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge_speed_") as temp:
        config = BenchConfig(
            preset=args.preset,
            dtype=args.dtype,
            device=args.device,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            threads=args.threads,
            torch_attn=args.torch_attn,
            work_dir=args.work_dir or Path(temp),
        )
        result = run(config)
    log(f"done in {time.perf_counter() - started:.0f} s")
    print_tables(result)
    print(json.dumps({key: value for key, value in result.items() if key != "detail"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
