"""Cloud speed: the large model unpruned vs SGP at R = 64%, 35%, 9%, in one run.

For one random-weight model and one image, times vision, prefill, a fixed
number of decode steps and the whole request (preprocessing included) at each
retention, and counts the LLM's prefill FLOPs to give the ideal speedup.
Decoding ignores EOS so every retention decodes the same number of tokens.

    python bench/cloud_speed.py --quick                   # CPU, small config, < 2 min
    python bench/cloud_speed.py --preset internvl3-8b --device cuda --dtype bfloat16

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
from presets import (  # bench/presets.py: the shapes every speed benchmark shares
    PRESETS,
    BenchPreset,
    internvl_config,
)
from transformers import InternVLForConditionalGeneration

from stitchvlm.cloud.checkpoints import build_tokenizer
from stitchvlm.cloud.sgp import SGPModel, kept_sequence_positions
from stitchvlm.shared.layout import TilingConfig
from stitchvlm.shared.preprocess import preprocess_image
from stitchvlm.shared.scoring import top_r_indices

RETENTIONS = (1.0, 0.64, 0.35, 0.09)


def build_model(preset: BenchPreset, image_token_id: int, device: str, dtype: torch.dtype):
    config = internvl_config(preset, image_token_id)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = InternVLForConditionalGeneration(config)
    return model.to(dtype).eval(), preset.tokens_per_tile


def prefill_flops(cfg, seq_len: int, pruned_len: int, k: int) -> float:
    """Matmul FLOPs of the LLM prefill: layers < k on seq_len tokens, the rest on pruned_len (causal)."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_width, kv_width = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_token = (
        2 * (cfg.hidden_size * q_width + 2 * cfg.hidden_size * kv_width + q_width * cfg.hidden_size)
        + 2 * 3 * cfg.hidden_size * cfg.intermediate_size
    )

    def layer(n: int) -> float:
        attention = 2 * 2 * q_width * n * (n + 1) / 2  # QK^T and AV over the causal triangle
        return n * per_token + attention

    layers = cfg.num_hidden_layers
    return k * layer(seq_len) + (layers - k) * layer(pruned_len)


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def run(args) -> dict:
    preset = BenchPreset.from_name(args.preset)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.token_to_id("<IMG_CONTEXT>")
    model, tokens_per_tile = build_model(preset, image_token_id, args.device, dtype)
    sgp = SGPModel(model, prune_layer=args.prune_layer)
    tiling = TilingConfig(tile_size=preset.tile, max_tiles=preset.max_tiles, tokens_per_tile=tokens_per_tile)

    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*preset.image_size[::-1], 3), dtype=np.uint8))
    pixel_values, layout = preprocess_image(image, tiling)
    n_visual = layout.num_visual_tokens
    text = tokenizer.encode("<|im_start|>user\n<img>").ids
    question = tokenizer.encode("</img>\nWhat colour is the triangle?<|im_end|>\n<|im_start|>assistant\n").ids
    input_ids = torch.tensor(text + [image_token_id] * n_visual + question)
    visual_start = len(text)
    # a score map for choosing tokens: the kept set's shape does not change the cost
    scores = rng.random(n_visual)

    def request(retention: float):
        pv, _ = preprocess_image(image, tiling)
        features = sgp.image_features(torch.from_numpy(pv))
        embeds = sgp.embed(input_ids, features)
        keep = torch.from_numpy(top_r_indices(scores, retention))
        positions = kept_sequence_positions(len(input_ids), visual_start, n_visual, keep)
        return sgp.generate(embeds, positions, args.new_tokens, eos_token_ids=())

    features = sgp.image_features(torch.from_numpy(pixel_values))
    embeds = sgp.embed(input_ids, features)
    rows = []
    for retention in RETENTIONS:
        keep = torch.from_numpy(top_r_indices(scores, retention))
        positions = kept_sequence_positions(len(input_ids), visual_start, n_visual, keep)
        request(retention)  # warm-up
        prefill_ms, request_ms, decode_ms = [], [], []
        for _ in range(args.repeats):
            (_, _, pruned_len), ms = timed(lambda p=positions: sgp.prefill(embeds, p), args.device)
            prefill_ms.append(ms)
            gen, ms = timed(lambda r=retention: request(r), args.device)
            request_ms.append(ms)
            decode_ms.append(gen.decode_ms)
        flops = prefill_flops(model.config.text_config, len(input_ids), pruned_len, sgp.prune_layer)
        rows.append(
            dict(
                retention=retention,
                kept=len(keep),
                pruned_len=pruned_len,
                prefill_ms=statistics.median(prefill_ms),
                decode_ms=statistics.median(decode_ms),
                request_ms=statistics.median(request_ms),
                gflops=flops / 1e9,
            )
        )
        print(f"  R={retention:.0%}: prefill {rows[-1]['prefill_ms']:.1f} ms", file=sys.stderr, flush=True)

    base = rows[0]
    print(
        f"\nmodel {args.preset} ({args.dtype}, {args.device}), image {preset.image_size[0]}x{preset.image_size[1]}: "
        f"{layout.grid_columns}x{layout.grid_rows} tiles + thumbnail, |V| = {n_visual}, "
        f"prompt {len(input_ids)} tokens, K = {sgp.prune_layer} of {sgp.num_layers} layers, "
        f"{args.new_tokens} decode tokens, median of {args.repeats}\n"
    )
    print(
        "| R | kept | tokens >= K | prefill ms | prefill speedup | ideal (FLOPs) | decode ms | request ms | request speedup |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['retention']:.0%} | {r['kept']} | {r['pruned_len']} | {r['prefill_ms']:.1f} | "
            f"{base['prefill_ms'] / r['prefill_ms']:.2f}x | {base['gflops'] / r['gflops']:.2f}x | "
            f"{r['decode_ms']:.1f} | {r['request_ms']:.1f} | {base['request_ms'] / r['request_ms']:.2f}x |"
        )
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    summary = {
        "device": device_name,
        "preset": args.preset,
        "dtype": args.dtype,
        "prune_layer": sgp.prune_layer,
        "num_visual_tokens": n_visual,
        "prompt_tokens": len(input_ids),
    }
    for r in rows[1:]:
        tag = f"r{round(r['retention'] * 100)}"
        summary[f"prefill_speedup_{tag}"] = round(base["prefill_ms"] / r["prefill_ms"], 3)
        summary[f"request_speedup_{tag}"] = round(base["request_ms"] / r["request_ms"], 3)
        summary[f"flop_ratio_{tag}"] = round(base["gflops"] / r["gflops"], 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU config (same as --preset quick)")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on GPU)")
    parser.add_argument("--prune-layer", type=float, default=2, help="K: layer index or fraction of depth")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps per request (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if float(args.prune_layer).is_integer():
        args.prune_layer = int(args.prune_layer)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
