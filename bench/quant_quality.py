"""The embedded small model quantized: accuracy, SEE exit rate and score overlap against float.

Exports ``--model`` (default: the embedded synthetic small model) once per
scheme (float, int8, int8 with ``--decoder-quant dynamic-int8``, int4;
``stitch-export --quant``, same ``--graph``) and runs
each export through the edge runtime on the first ``--n`` synthetic test
examples (greedy, exact match): the small model's accuracy, the SEE gate's
exit rate at ``--tau`` (and the accuracy of the answers that exit), the
agreement of each quantized answer with the float one, and the per-example
top-R overlap of the score ``A`` with the float export's at R = 9/35/64%
(the share of the float top-R set the quantized one keeps). Timings are the
runtime's own (vision, prefill, decode per token), on whatever CPU this is.

No large model and no cloud: the exit rate is the gate's alone. Last stdout
line: one JSON object; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stitchvlm.edge.export import ExportConfig, export_edge
from stitchvlm.edge.gate import DEFAULT_CONSISTENCY_RETENTION, DEFAULT_TAU, consistency_probs
from stitchvlm.edge.quantize import DEFAULT_BLOCK_SIZE, OVERLAP_RETENTIONS
from stitchvlm.edge.runtime import CPU, EdgeModel
from stitchvlm.edge.sidecar import VISION_QUANT_METHODS
from stitchvlm.shared.scoring import confidence_score, consistency_score, top_r_indices
from stitchvlm.shared.synthetic import exact_match, iter_dataset

# Row -> (stitch-export --quant, --decoder-quant).
SCHEMES = {
    "none": ("none", "nbits"),
    "int8": ("int8", "nbits"),
    "int8-dynamic": ("int8", "dynamic-int8"),
    "int4": ("int4", "nbits"),
}
MAX_NEW_TOKENS = 4


def progress(message: str) -> None:
    print(f"[quant_quality] {message}", file=sys.stderr, flush=True)


def run_scheme(edge: EdgeModel, n: int, seed: int, tau: float) -> list[dict]:
    records = []
    for example in iter_dataset("test", n, seed):
        gen = edge.generate(example.image, example.question, MAX_NEW_TOKENS)
        s_conf = confidence_score(gen.token_probs)
        s_cons = consistency_score(consistency_probs(edge, gen, DEFAULT_CONSISTENCY_RETENTION))
        timings = gen.timings
        records.append(
            {
                "answer": gen.text,
                "correct": bool(exact_match(gen.text, example.answer)),
                "gate": (s_conf + s_cons) / 2,
                "scores": gen.visual_scores,
                "vision_ms": timings.vision_ms,
                "prefill_ms": timings.prefill_ms,
                "decode_ms_per_token": timings.decode_ms / max(len(gen.token_ids) - 1, 1),
            }
        )
    return records


def summarize(records: list[dict], reference: list[dict], tau: float) -> dict:
    correct = np.array([r["correct"] for r in records])
    exits = np.array([r["gate"] >= tau for r in records])
    out = {
        "accuracy": float(correct.mean()),
        "exit_rate": float(exits.mean()),
        "exit_accuracy": float(correct[exits].mean()) if exits.any() else None,
        "answer_agreement": float(
            np.mean([r["answer"] == f["answer"] for r, f in zip(records, reference, strict=True)])
        ),
        "gate_max_abs_diff": float(
            max(abs(r["gate"] - f["gate"]) for r, f in zip(records, reference, strict=True))
        ),
    }
    for retention in OVERLAP_RETENTIONS:
        overlaps = []
        for ours, theirs in zip(records, reference, strict=True):
            kept, wanted = (
                top_r_indices(ours["scores"], retention),
                top_r_indices(theirs["scores"], retention),
            )
            overlaps.append(len(np.intersect1d(kept, wanted)) / len(wanted))
        out[f"overlap_{round(100 * retention)}"] = float(np.mean(overlaps))
        out[f"overlap_{round(100 * retention)}_min"] = float(np.min(overlaps))
    for key in ("vision_ms", "prefill_ms", "decode_ms_per_token"):
        out[key] = float(np.median([r[key] for r in records]))
    return out


def markdown(results: dict, args: argparse.Namespace) -> str:
    keys = list(next(iter(results.values())))
    lines = [
        f"Embedded small model, {args.n} synthetic test examples, graph {args.graph}, "
        f"block {args.block_size}, vision {args.vision_quant or 'dynamic-int8 (the fp32 default)'}, tau {args.tau}, "
        f"{args.threads} thread(s); timings are medians.",
        "",
        "| scheme | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for scheme, row in results.items():
        cells = ["-" if row[k] is None else f"{row[k]:.3f}" for k in keys]
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from stitchvlm.edge.demo import EMBEDDED_SMALL, embedded_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: embedded small)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU)
    parser.add_argument("--graph", choices=("explicit", "lean"), default="lean")
    parser.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="stitch-export --quant-block-size"
    )
    parser.add_argument(
        "--vision-quant",
        choices=(*VISION_QUANT_METHODS, "none"),
        default=None,
        help="stitch-export --vision-quant (default: the export's, dynamic-int8 for fp32)",
    )
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    args = parser.parse_args(argv)
    model = args.model or embedded_model_dir(EMBEDDED_SMALL)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    results, reference = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, (quant, decoder) in SCHEMES.items():
            out = Path(tmp) / scheme
            config = ExportConfig(
                model_dir=model,
                out_dir=out,
                graph=args.graph,
                quant=quant,
                quant_block_size=args.block_size,
                vision_quant=args.vision_quant,
                decoder_quant=decoder,
            )
            export_edge(config)
            edge = EdgeModel.load(out, providers=[CPU], session_options=options)
            started = time.perf_counter()
            records = run_scheme(edge, args.n, args.seed, args.tau)
            progress(f"{scheme}: {args.n} examples in {time.perf_counter() - started:.1f} s")
            reference = reference or records
            results["fp32" if scheme == "none" else scheme] = summarize(records, reference, args.tau)
    table = markdown(results, args)
    print(table, file=sys.stderr)
    if args.out:
        args.out.write_text(table)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
