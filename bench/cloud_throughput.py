"""Cloud throughput: the batching server vs the same server at batch 1 vs transformers' static batches.

The same N requests (mixed prompts, image shapes and R) go through real gRPC
(``AnswerStream``, so time to first token is the client's own reading) at each
concurrency, against ``stitch-cloud serve`` batching (``--max-batch-size``
16, or 64 on a GPU) and against it at ``--max-batch-size 1``, in one run. Beside
them the baseline a user would otherwise script: ``model.generate`` of
transformers on the UNPRUNED model, the same requests in padded static batches
of 16, in process (no gRPC; PNG decode and preprocessing on the clock as in the
server; its latency is from the start of the run to the end of the request's
batch, as if all N arrived at once; it has no time to first token).

Two workloads, because batching pays in decode:
- ``short``: the embedded synthetic-large (shared/models) on synthetic
  questions; answers are one token and EOS;
- ``long``: a random checkpoint whose EOS logit is pinned to 0, so every
  request generates ``--long-tokens`` tokens.

    python bench/cloud_throughput.py --quick               # CPU, a few minutes
    python bench/cloud_throughput.py --device cuda --dtype bfloat16 --long-preset internvl3-8b

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image, ImageDraw
from presets import PRESETS as BENCH_PRESETS
from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration

from stitchvlm.cloud.checkpoints import (
    TINY_PRESETS,
    TinyPreset,
    build_tokenizer,
    default_tiling,
    save_checkpoint,
    tiny_internvl_config,
)
from stitchvlm.edge.demo import running_cloud_server
from stitchvlm.shared import synthetic, wire
from stitchvlm.shared.layout import layout_fingerprint
from stitchvlm.shared.model_files import ModelFiles
from stitchvlm.shared.pb import cascade_pb2_grpc
from stitchvlm.shared.preprocess import compute_layout
from stitchvlm.shared.scoring import top_r_indices
from stitchvlm.shared.types import CloudRequest

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_LARGE = REPO / "shared" / "models" / "synthetic-large"
RETENTIONS = (1.0, 0.35, 0.09)
PROMPTS = ("What colour is the circle?", "Describe the image in a few words.", "How many shapes are there?")
SHAPES = ((448, 448), (672, 448), (448, 896), (896, 448), (224, 224), (672, 672))
STATIC_BATCH = 16


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- workloads


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Workload:
    name: str
    model_dir: Path
    requests: list[CloudRequest]


def make_requests(model_dir: Path, pictures, prompts, max_new_tokens: int) -> list[CloudRequest]:
    """Requests as an edge builds them; R cycles through 100/35/9% with seeded scores."""
    tiling = ModelFiles.load(model_dir).tiling
    out = []
    for i, (picture, prompt) in enumerate(zip(pictures, prompts, strict=True)):
        layout = compute_layout(picture.width, picture.height, tiling)
        scores = np.random.default_rng(i).random(layout.num_visual_tokens)
        retention = RETENTIONS[i % len(RETENTIONS)]
        out.append(
            CloudRequest(
                image=png(picture),
                mime_type="image/png",
                prompt=prompt,
                kept_indices=top_r_indices(scores, retention),
                num_visual_tokens=layout.num_visual_tokens,
                retention=retention,
                layout=layout,
                layout_fingerprint=layout_fingerprint(layout, tiling),
                max_new_tokens=max_new_tokens,
                request_id=f"bench-{i}",
            )
        )
    return out


def short_workload(n: int) -> Workload:
    examples = synthetic.dataset("test", n, seed=0)
    # every third scene stretched wide and every third tall, so the requests differ in tile grids
    stretch = ((1, 1), (2, 1), (1, 2))
    pictures = [
        e.image.resize((e.image.width * stretch[i % 3][0], e.image.height * stretch[i % 3][1]))
        for i, e in enumerate(examples)
    ]
    requests = make_requests(EMBEDDED_LARGE, pictures, [e.question for e in examples], max_new_tokens=4)
    return Workload("short", EMBEDDED_LARGE, requests)


def long_preset(preset_name: str) -> TinyPreset:
    """A bench preset's shape (bench/presets.py), or a tiny test preset (``tiny``) for smoke runs."""
    if preset_name in TINY_PRESETS:
        return dataclasses.replace(TINY_PRESETS[preset_name], initializer_range=0.02)
    shape = BENCH_PRESETS[preset_name]
    return TinyPreset(
        vision_hidden=shape.vision_hidden,
        vision_layers=shape.vision_layers,
        vision_heads=shape.vision_heads,
        image_size=shape.tile,
        patch_size=shape.patch,
        text_hidden=shape.text_hidden,
        text_layers=shape.text_layers,
        text_heads=shape.text_heads,
        text_kv_heads=shape.text_kv_heads,
        text_intermediate=shape.text_intermediate,
        initializer_range=0.02,
    )


def long_checkpoint(out: Path, preset_name: str, device: str = "cpu", dtype: str = "float32") -> Path:
    """A random InternVL of ``long_preset(preset_name)`` whose EOS logit is exactly 0 (never the argmax).

    Built on ``device`` and saved in ``dtype``: an 8B model initialises in seconds on a GPU, and
    saved in bf16 it is half the bytes to write and load.
    """
    preset = long_preset(preset_name)
    tokenizer = build_tokenizer()
    config = tiny_internvl_config(preset, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config).eval().to(getattr(torch, dtype))
    with torch.no_grad():  # tied embeddings: the EOS row of the LM head is this row too
        model.model.language_model.embed_tokens.weight[config.text_config.eos_token_id] = 0.0
    return save_checkpoint(model, tokenizer, out, dataclasses.replace(default_tiling(preset), max_tiles=4))


def long_workload(n: int, out: Path, preset_name: str, tokens: int, device: str, dtype: str) -> Workload:
    model_dir = long_checkpoint(out, preset_name, device, dtype)
    tile = long_preset(preset_name).image_size
    pictures = [
        random_image(w * tile // 448, h * tile // 448, seed=i)
        for i, (w, h) in zip(range(n), SHAPES * n, strict=False)
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return Workload("long", model_dir, make_requests(model_dir, pictures, prompts, tokens))


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Point:
    """One (server, concurrency) run of the N requests."""

    system: str
    concurrency: int
    seconds: float
    latencies_ms: list[float]
    first_token_ms: list[float]
    output_tokens: int
    answers: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # request id -> token ids

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def row(self) -> dict:
        lat = sorted(self.latencies_ms)
        ttft = sorted(self.first_token_ms)
        pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "requests_per_s": round(self.requests_per_s, 2),
            "output_tokens_per_s": round(self.output_tokens / self.seconds, 1),
            "p50_ms": round(statistics.median(lat), 1),
            "p99_ms": round(pick(lat, 0.99), 1),
            "ttft_p50_ms": round(statistics.median(ttft), 1) if ttft else None,
        }


def drive(address: str, requests: list[CloudRequest], concurrency: int, system: str) -> Point:
    """Every request through AnswerStream with ``concurrency`` in flight; client-side timings."""
    messages = [wire.request_to_proto(r) for r in requests]
    latencies, firsts, tokens, answers = [], [], [0], {}
    lock = threading.Lock()
    with grpc.insecure_channel(address) as channel:
        stub = cascade_pb2_grpc.CascadeStub(channel)

        def one(message) -> None:
            t0 = time.perf_counter()
            first = None
            for chunk in stub.AnswerStream(message, timeout=600):
                if first is None and chunk.HasField("delta"):
                    first = time.perf_counter()
                if chunk.HasField("final"):
                    done = time.perf_counter()
                    with lock:
                        latencies.append((done - t0) * 1e3)
                        firsts.append(((first or done) - t0) * 1e3)
                        tokens[0] += len(chunk.final.token_ids)
                        answers[chunk.final.request_id] = tuple(chunk.final.token_ids)

        one(messages[0])  # warm-up, not timed
        latencies.clear(), firsts.clear()
        tokens[0] = 0
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, messages))
        seconds = time.perf_counter() - start
    return Point(system, concurrency, seconds, latencies, firsts, tokens[0], answers)


def hf_static(workload: Workload, device: str, dtype: torch.dtype) -> Point:
    """transformers' generate on the unpruned model, padded (left) batches of STATIC_BATCH, in process."""
    model = (
        InternVLForConditionalGeneration.from_pretrained(
            workload.model_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
        .to(device)
        .eval()
    )
    tokenizer = AutoTokenizer.from_pretrained(workload.model_dir)
    tokenizer.padding_side = "left"
    processor = GotOcr2ImageProcessorPil.from_pretrained(workload.model_dir)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def texts(batch):
        out = []
        for request, image in batch:
            pixels = processor(images=image, crop_to_patches=True, return_tensors="pt")
            n = int(pixels["num_patches"][0]) * model.config.image_seq_length
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.prompt}]}
            ]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            expanded = (
                tokenizer.start_image_token + tokenizer.context_image_token * n + tokenizer.end_image_token
            )
            out.append((text.replace(tokenizer.context_image_token, expanded, 1), pixels["pixel_values"]))
        return out

    requests = workload.requests
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i in range(0, len(requests), STATIC_BATCH):
        # the same PNG bytes the server gets, decoded and preprocessed on the clock as it is there
        decoded = [
            (r, Image.open(io.BytesIO(r.image)).convert("RGB")) for r in requests[i : i + STATIC_BATCH]
        ]
        batch = texts(decoded)
        inputs = tokenizer([t for t, _ in batch], return_tensors="pt", padding=True).to(device)
        pixel_values = torch.cat([p for _, p in batch]).to(device, dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                pixel_values=pixel_values,
                max_new_tokens=workload.requests[0].max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        done = (time.perf_counter() - start) * 1e3
        generated = out[:, inputs["input_ids"].shape[1] :]
        for row in generated.tolist():
            tokens += next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
            latencies.append(done)
    return Point(
        f"hf generate, static batches of {STATIC_BATCH} (unpruned, in process)",
        STATIC_BATCH,
        (time.perf_counter() - start),
        latencies,
        [],
        tokens,
    )


# ----------------------------------------------------------------------------- the run


def run_workload(workload: Workload, args, concurrencies) -> list[Point]:
    points = []
    big = str(64 if args.device.startswith("cuda") else 16)
    for system, batch in ((f"stitch batching (max batch {big})", big), ("stitch batch 1", "1")):
        extra = [
            "--max-batch-size",
            batch,
            "--max-queue",
            "256",
            "--dtype",
            args.dtype,
            "--max-new-tokens",
            str(max(r.max_new_tokens for r in workload.requests)),
        ]
        log = Path(tempfile.mkdtemp(prefix="stitch-bench-")) / "cloud.log"
        with running_cloud_server(
            workload.model_dir, str(args.prune_layer), log, args.device, extra_args=extra
        ) as cloud:
            for c in concurrencies:
                point = drive(cloud.address, workload.requests, c, system)
                progress(f"{workload.name}: {system} c={c}: {point.requests_per_s:.2f} req/s")
                points.append(point)
    points.append(hf_static(workload, args.device, getattr(torch, args.dtype)))
    progress(f"{workload.name}: hf static: {points[-1].requests_per_s:.2f} req/s")
    return points


def table(name: str, points: list[Point]) -> str:
    lines = [
        f"### {name}",
        "",
        "| system | concurrency | requests/s | output tokens/s | p50 ms | p99 ms | TTFT p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        r = p.row()
        ttft = "-" if r["ttft_p50_ms"] is None else r["ttft_p50_ms"]
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['requests_per_s']} | {r['output_tokens_per_s']} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {ttft} |"
        )
    return "\n".join(lines)


def same_answers(points: list[Point]) -> bool:
    """Whether every stitch run gave every request the same tokens (greedy: batching changes none)."""
    runs = [p.answers for p in points if p.system.startswith("stitch")]
    return all(run == runs[0] for run in runs) and len(runs[0]) > 0


def ratios(points: list[Point], c: int) -> dict:
    batched = next(p for p in points if p.system.startswith("stitch batching") and p.concurrency == c)
    single = next(p for p in points if p.system == "stitch batch 1" and p.concurrency == c)
    static = next(p for p in points if p.system.startswith("hf generate"))
    return {
        "batched_vs_b1": round(batched.requests_per_s / single.requests_per_s, 3),
        "batched_vs_hf_static": round(batched.requests_per_s / static.requests_per_s, 3),
        "p99_ms": batched.row()["p99_ms"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU sizes: n=32, long answers of 32 tokens")
    parser.add_argument("-n", type=int, default=64, help="requests per point")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prune-layer", default="2")
    parser.add_argument("--long-preset", default="quick", choices=sorted(BENCH_PRESETS) + ["tiny"])
    parser.add_argument("--concurrency", help="comma-separated (default 1,4,16; 1,4,16,64 on a GPU)")
    parser.add_argument("--long-tokens", type=int, default=48)
    parser.add_argument("--workloads", default="short,long")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads of each server and of the in-process baseline (default: torch's)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.long_tokens = 32, 32
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers inherit it
        torch.set_num_threads(args.threads)
    concurrencies = (1, 4, 16, 64) if args.device.startswith("cuda") else (1, 4, 16)
    if args.concurrency:
        concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    summary: dict = {"device": device_name, "n": args.n, "dtype": args.dtype}
    work = Path(tempfile.mkdtemp(prefix="stitch-throughput-"))
    for name in args.workloads.split(","):
        workload = (
            short_workload(args.n)
            if name == "short"
            else long_workload(
                args.n, work / "long-model", args.long_preset, args.long_tokens, args.device, args.dtype
            )
        )
        points = run_workload(workload, args, concurrencies)
        print(
            table(
                f"{name} answers ({workload.model_dir.name}, n={args.n}, {args.device}, {args.dtype})", points
            )
        )
        print()
        for c in concurrencies:
            for key, value in ratios(points, c).items():
                summary[f"{name}_{key}_c{c}"] = value
        summary[f"{name}_same_tokens_batched_and_b1"] = same_answers(points)
    # the headline: long answers (where batching pays) at concurrency 16
    headline = "long" if "long" in args.workloads else args.workloads.split(",")[0]
    summary["throughput_c16_batched_vs_b1"] = summary.get(f"{headline}_batched_vs_b1_c16")
    summary["throughput_c16_batched_vs_hf_static"] = summary.get(f"{headline}_batched_vs_hf_static_c16")
    summary["p99_ms_c16"] = summary.get(f"{headline}_p99_ms_c16")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
