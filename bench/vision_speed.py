"""Vision speed: the lean vision graph (``edge.lean_vision``) against the traced one, and PyTorch.

One random-weight InternVL of a preset's shape (``presets.py``; speed depends
on the shape, not on the weights), its vision graph exported twice into a
temporary directory: traced (``export_modules.VisionEncoder``, the default
export) and built op by op with ORT's fused ops (``--graph lean``). Both run
as plain ORT sessions on the same random pixel tiles (the preset image's grid
plus a thumbnail: 7 tiles for every preset), interleaved with
``get_image_features`` in eager PyTorch; medians over ``--repeats`` after one
warm-up. It also reports how far the two graphs' outputs are apart.

- ``traced_ms`` / ``lean_ms`` / ``torch_ms``: one call on all tiles;
- ``lean_vs_traced_vision`` = lean_ms / traced_ms (lower is better);
- ``lean_vs_torch_vision`` = lean_ms / torch_ms.

    python bench/vision_speed.py --quick                 # CPU, preset quick, 1 thread, seconds
    python bench/vision_speed.py --preset internvl3-1b   # InternViT-300M at 448 px (GB of RAM)

Progress goes to stderr; a markdown table to stdout, then, as the last line,
one JSON object. It does not measure accuracy (random weights).
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
from presets import PRESETS, BenchPreset, internvl_config  # bench/presets.py: shared speed-bench shapes
from transformers import InternVLForConditionalGeneration

from stitchvlm.edge.export import DEFAULT_OPSET, export_vision
from stitchvlm.edge.lean_vision import export_lean_vision
from stitchvlm.edge.runtime import CPU, CUDA
from stitchvlm.edge.sidecar import GraphIO

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def log(message: str) -> None:
    print(f"[vision_speed] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run (what the arguments parse into)."""

    preset: str  # name in presets.PRESETS
    dtype: str  # graph and torch dtype: "fp32" or "fp16"
    device: str  # "cpu" or "cuda": ORT provider and torch device
    repeats: int  # timed repeats per measurement (after one warm-up)
    threads: int  # CPU threads for torch and for each ORT session

    def __post_init__(self) -> None:
        if self.device == "cuda" and CUDA not in ort.get_available_providers():
            raise ValueError("--device cuda needs onnxruntime's CUDAExecutionProvider")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")


def tile_count(preset: BenchPreset) -> int:
    """The preset image's grid of tiles plus the thumbnail (3 x 2 + 1 = 7 for every preset)."""
    width, height = preset.image_size
    grid = (width // preset.tile) * (height // preset.tile)
    return grid + (1 if grid > 1 else 0)


def build_model(preset: BenchPreset, config: BenchConfig) -> InternVLForConditionalGeneration:
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(internvl_config(preset, image_token_id=preset.vocab - 1)).eval()
    return model.to(TORCH_DTYPES[config.dtype]).to(config.device)


def open_session(path: Path, config: BenchConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    providers = [CUDA, CPU] if config.device == "cuda" else [CPU]
    return ort.InferenceSession(str(path), options, providers=providers)


def median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each call in ms; the calls are interleaved, one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(1e3 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}


def run(config: BenchConfig) -> dict:
    preset = PRESETS[config.preset]
    torch.set_num_threads(config.threads)
    io = GraphIO()
    log(f"building a random {config.preset} model ({config.dtype}, {config.device})")
    model = build_model(preset, config)
    with tempfile.TemporaryDirectory(prefix="vision-speed-") as work:
        traced_path, lean_path = Path(work) / "traced.onnx", Path(work) / "lean.onnx"
        log("exporting the traced vision graph")
        export_vision(model, traced_path, DEFAULT_OPSET, io)
        log("building the lean vision graph")
        export_lean_vision(model, lean_path, io)
        traced, lean = open_session(traced_path, config), open_session(lean_path, config)
        tiles = tile_count(preset)
        pixel_values = np.random.default_rng(0).standard_normal((tiles, 3, preset.tile, preset.tile))
        pixel_values = pixel_values.astype(np.float32)
        feed = {io.pixel_values: pixel_values}
        pixels_torch = torch.from_numpy(pixel_values).to(config.device)

        def torch_call() -> None:
            with torch.no_grad():
                model.get_image_features(pixel_values=pixels_torch)
            if config.device == "cuda":
                torch.cuda.synchronize()

        (traced_out,) = traced.run(None, feed)
        (lean_out,) = lean.run(None, feed)
        log(f"timing {tiles} tiles, {config.repeats} repeats, {config.threads} thread(s)")
        times = median_ms(
            {
                "traced": lambda: traced.run(None, feed),
                "lean": lambda: lean.run(None, feed),
                "torch": torch_call,
            },
            config.repeats,
        )
    diff = float(np.abs(lean_out.astype(np.float64) - traced_out).max())
    return {
        "preset": config.preset,
        "dtype": config.dtype,
        "device": config.device,
        "threads": config.threads,
        "repeats": config.repeats,
        "tiles": tiles,
        "visual_tokens": int(lean_out.shape[0]),
        "traced_ms": round(times["traced"], 3),
        "lean_ms": round(times["lean"], 3),
        "torch_ms": round(times["torch"], 3),
        "lean_vs_traced_vision": round(times["lean"] / times["traced"], 4),
        "lean_vs_torch_vision": round(times["lean"] / times["torch"], 4),
        "lean_vs_traced_max_abs_diff": diff,
        "max_abs_output": float(np.abs(traced_out).max()),
    }


def print_table(result: dict) -> None:
    print(
        f"Vision graph, preset {result['preset']} ({result['dtype']}, {result['device']}, "
        f"{result['threads']} thread(s)), {result['tiles']} tiles -> {result['visual_tokens']} visual tokens, "
        f"median of {result['repeats']}\n"
    )
    print("| graph | ms | vs traced |")
    print("| --- | ---: | ---: |")
    for name in ("traced", "lean", "torch"):
        ms = result[f"{name}_ms"]
        print(f"| {name} | {ms:.1f} | {ms / result['traced_ms']:.2f}x |")
    print(f"\nlean vs traced output: max|diff| {result['lean_vs_traced_max_abs_diff']:.2e}\n")


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, preset quick, fp32, 1 thread, 5 repeats")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="internvl3-1b")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default 5")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all; --quick: 1)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.device, args.dtype = "quick", "cpu", "fp32"
    return BenchConfig(
        preset=args.preset,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats or 5,
        threads=args.threads or (1 if args.quick else os.cpu_count()),
    )


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
