"""Stitch's lean edge decoder against onnxruntime-genai on the same text model, and PyTorch.

One random-weight InternVL of a preset's shape (``presets.py``; default
"quick": a 256-wide, 8-layer Qwen2 text model) is saved twice: as the InternVL
checkpoint ``stitch-export`` reads, and as a Qwen2 checkpoint holding its text
model's weights (``model.language_model`` + ``lm_head``) for onnxruntime-genai's
own model builder. genai pulls the CPU ``onnxruntime`` wheel, which must never
sit beside ``onnxruntime-gpu`` in the project's venv, so this benchmark creates
a venv of its own (``--genai-venv``, default ``runs/genai-venv``: torch for
the builder, transformers, onnxruntime-genai), runs the builder there
(fp32 and int4, ``-e cpu``, ``prune_lm_head=true``: last-token logits only,
as Stitch's ``num_logits``), and drives genai's generate loop through
``genai_worker.py`` in that venv, one JSON line per request. Where the venv
cannot be made, or the builder fails, it says so and skips the genai columns.

Columns, in one run, interleaved (each repeat runs every column once, in
alternating order), medians over ``--repeats``; 16 greedy tokens by default,
EOS ignored on every side, batch 1, CPU:

- Stitch lean, scored (``stitch-export --graph lean``), fp32 and, where
  ``--quant`` exists, int4 (block 32, accuracy level 4: genai's CPU int4
  defaults): ``EdgeModel.generate`` on the image, the runtime's own timings;
- Stitch lean, scored and ``--no-scores``, as raw decoder sessions over the
  same inputs (``edge_speed.RawDecoder``): what the score costs;
- genai fp32 and int4: the same prompt's token ids (the 448 image-context ids
  stay ids, as genai has no image input here), generate loop;
- PyTorch (transformers' ``generate``, SDPA) on the image.

Every column gets ``--threads`` intra-op threads (genai through its
``genai_config.json``). Stitch's sessions do not spin between runs
(``edge_speed.session_options``); genai's config has no way to say so, so at
more than one thread its idle workers spin as ORT's default has them.

The text-model time of one generation is prefill (the prompt's pass and the
first token) + decode (``new_tokens - 1`` passes). The prompts have the same
length; Stitch's holds image embeddings where genai's holds the image-context
token's embedding, which costs the same. Before timing, the last-token
logits of genai fp32 and of the Qwen2 PyTorch model on the same ids must
agree (``LOGITS_ATOL``), else the genai columns are dropped.

JSON keys: ``stitch_vs_genai_total`` / ``_decode`` = Stitch scored fp32 text
time / genai fp32's (lower is better), ``stitch_int4_vs_genai_int4_decode``
likewise int4 (null when a side is missing), ``score_overhead`` = lean scored
/ lean unscored raw decoder time - 1, ``ort_vs_torch_speedup`` = PyTorch
generation / Stitch scored fp32 generation (both with vision and
preprocessing), ``consistency_fraction`` = the SEE consistency pass / that
generation.

    python bench/edge_peer.py                      # quick shape, 1 thread, a few minutes (venv: once)
    python bench/edge_peer.py --threads 2 --repeats 5
    python bench/edge_peer.py --text-from internvl3-1b --repeats 3   # Qwen2.5-0.5B text model, ~15 GB

Progress on stderr; a markdown table on stdout, then as the last line one
JSON object. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from edge_speed import (  # bench/edge_speed.py: shared builders and timers
    QUESTION,
    BenchConfig,
    RawDecoder,
    bench_image,
    build_checkpoint,
    equal_prefix,
    ort_generation,
    session_options,
    time_consistency,
    time_decoder,
    torch_generation,
)
from presets import BenchPreset
from transformers import InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from stitchvlm.edge.export import ExportConfig, export_edge
from stitchvlm.edge.runtime import CPU, EdgeModel
from stitchvlm.shared.preprocess import preprocess_image
from stitchvlm.shared.prompt import build_prompt

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "genai_worker.py"
# What the genai venv gets: pinned, so pip never resolves torch to a CUDA wheel.
GENAI_PACKAGES = ("torch==2.13.0", "transformers==5.23.0", "onnxruntime-genai", "onnx", "onnx_ir")
GENAI_PRECISIONS = ("fp32", "int4")
LOGITS_ATOL = 1e-4  # genai fp32 vs PyTorch, last-token logits (measured ~1e-6 at the quick shape)
QUANT_BLOCK = 32  # genai's int4 default block
QUANT_ACCURACY = 4  # genai's CPU int4 default: int8 activations


def log(message: str) -> None:
    print(f"[edge_peer] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- pure helpers (unit-tested)


def builder_command(
    python: Path, model_dir: Path, out_dir: Path, precision: str, cache_dir: Path
) -> list[str]:
    """onnxruntime-genai's model builder for a CPU graph of ``precision`` with last-token logits only."""
    return [
        str(python), "-m", "onnxruntime_genai.models.builder",
        "-i", str(model_dir), "-o", str(out_dir), "-p", precision, "-e", "cpu", "-c", str(cache_dir),
        "--extra_options", "prune_lm_head=true",
    ]  # fmt: skip


def with_threads(genai_config: dict, threads: int) -> dict:
    """genai_config.json with the decoder session on ``threads`` intra-op threads, one inter-op."""
    config = json.loads(json.dumps(genai_config))
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    return config


TEXT_FIELDS = ("text_hidden", "text_layers", "text_heads", "text_kv_heads", "text_intermediate", "vocab")


def peer_preset(name: str, text_from: str | None) -> BenchPreset:
    """Preset ``name``, its text model swapped for ``text_from``'s when given (vision and image stay).

    The genai peer runs the text model only, so "quick" with the text model of
    "internvl3-1b" (Qwen2.5-0.5B) times that text model at the quick prompt
    length without the real ViT's minutes per image.
    """
    preset = BenchPreset.from_name(name)
    if text_from is None:
        return preset
    text = BenchPreset.from_name(text_from)
    return replace(preset, **{field: getattr(text, field) for field in TEXT_FIELDS})


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 3 places; None when either side was skipped."""
    if numerator is None or denominator is None:
        return None
    return round(numerator / denominator, 3)


@dataclass(frozen=True)
class TextTime:
    """One generation's text-model time, ms."""

    prefill_ms: float  # the prompt's pass + the first token
    decode_ms: float  # the new_tokens - 1 passes after it


def median_time(runs: list[TextTime], new_tokens: int) -> dict:
    prefill = statistics.median(r.prefill_ms for r in runs)
    decode = statistics.median(r.decode_ms for r in runs)
    return {
        "prefill_ms": prefill,
        "decode_ms": decode,
        "total_ms": statistics.median(r.prefill_ms + r.decode_ms for r in runs),
        "decode_tok_s": (new_tokens - 1) / (decode / 1e3),
    }


# --------------------------------------------------------------------- genai side


def ensure_genai_venv(venv: Path) -> Path | None:
    """The genai venv's python, created and filled when missing; None (and why, logged) when it cannot be."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import onnxruntime_genai, onnx_ir, torch, transformers"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log(f"creating the onnxruntime-genai venv {venv} ({', '.join(GENAI_PACKAGES)})")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", *GENAI_PACKAGES]
        subprocess.run(pip, check=True, capture_output=True, text=True)
        subprocess.run(probe, check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as error:
        detail = (getattr(error, "stderr", None) or "").strip()[-600:]
        log(f"onnxruntime-genai cannot be installed ({error}) {detail}; the genai columns are skipped")
        return None
    return python


def save_text_checkpoint(model: InternVLForConditionalGeneration, checkpoint: Path, out: Path) -> Path:
    """A Qwen2ForCausalLM checkpoint holding ``model``'s text model and LM head, with its tokenizer."""
    config = Qwen2Config(**model.config.text_config.to_dict())
    config.tie_word_embeddings = False  # the InternVL's lm_head is its own matrix
    qwen = Qwen2ForCausalLM(config).eval()
    qwen.model.load_state_dict(model.model.language_model.state_dict())
    qwen.lm_head.load_state_dict(model.lm_head.state_dict())
    qwen.save_pretrained(out)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        if (checkpoint / name).exists():
            shutil.copy(checkpoint / name, out / name)
    return out


def build_genai(python: Path, text_dir: Path, work: Path, threads: int) -> dict[str, Path]:
    """The builder's output per precision that built (a failing precision is logged and left out)."""
    built = {}
    for precision in GENAI_PRECISIONS:
        out = work / f"genai-{precision}"
        log(f"building genai {precision} -> {out}")
        command = builder_command(python, text_dir, out, precision, work / "genai-cache")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not (out / "genai_config.json").exists():
            log(f"genai builder failed for {precision}: {result.stderr.strip()[-800:]}")
            continue
        config_path = out / "genai_config.json"
        config_path.write_text(
            json.dumps(with_threads(json.loads(config_path.read_text()), threads), indent=2)
        )
        built[precision] = out
    return built


class GenaiWorker:
    """``genai_worker.py`` in the genai venv, one JSON request and reply per line."""

    def __init__(self, python: Path) -> None:
        self.process = subprocess.Popen(
            [str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the genai worker exited")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"genai worker: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=30)


def check_genai_logits(worker: GenaiWorker, qwen: Qwen2ForCausalLM, ids: list[int]) -> float:
    """max |genai fp32 - PyTorch| over the last position's logits on the same ids."""
    theirs = np.asarray(worker.ask(cmd="logits", name="fp32", ids=ids)["logits"], dtype=np.float64)
    with torch.no_grad():
        ours = qwen(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
    return float(np.abs(theirs - ours).max())


# --------------------------------------------------------------------- Stitch side


def export_stitch(checkpoint: Path, work: Path, quant: bool) -> dict[str, Path]:
    """Lean exports: scored fp32, unscored fp32, and scored int4 when ``quant``."""
    variants = {"lean": (True, "none"), "lean_no_scores": (False, "none")}
    if quant:
        variants["lean_int4"] = (True, "int4")
    dirs = {}
    for name, (with_scores, scheme) in variants.items():
        out = work / f"edge-{name.replace('_', '-')}"
        log(
            f"stitch-export --graph lean {'--no-scores ' if not with_scores else ''}--quant {scheme} -> {out}"
        )
        export_edge(
            ExportConfig(
                model_dir=checkpoint,
                out_dir=out,
                verify=False,
                with_scores=with_scores,
                graph="lean",
                quant=scheme,
                quant_block_size=QUANT_BLOCK,
                quant_accuracy_level=QUANT_ACCURACY if scheme != "none" else 0,
            )
        )
        dirs[name] = out
    return dirs


def quant_available() -> bool:
    """Whether this tree's ``stitch-export`` has ``--quant`` (another change adds it)."""
    return "quant" in ExportConfig.__dataclass_fields__


# --------------------------------------------------------------------- the run


def run(args: argparse.Namespace, work: Path) -> dict:
    preset = peer_preset(args.preset, args.text_from)
    torch.set_num_threads(args.threads)
    bench = BenchConfig(
        preset=args.preset, dtype="fp32", device="cpu", new_tokens=args.new_tokens, repeats=args.repeats,
        threads=args.threads, torch_attn="sdpa", work_dir=work,
    )  # fmt: skip
    log(f"building a random {args.preset} checkpoint (text model: {args.text_from or args.preset})")
    checkpoint = build_checkpoint(preset, work / "checkpoint", "fp32")
    model = InternVLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    text_dir = save_text_checkpoint(model, checkpoint, work / "qwen2")
    qwen = Qwen2ForCausalLM.from_pretrained(text_dir, dtype=torch.float32).eval()

    notes: list[str] = []
    quant = quant_available()
    if not quant:
        notes.append("stitch-export has no --quant in this tree: Stitch int4 skipped")
    dirs = export_stitch(checkpoint, work, quant)
    options = session_options(args.threads)
    edges = {
        name: EdgeModel.load(dirs[name], providers=[CPU], session_options=options)
        for name in dirs
        if name != "lean_no_scores"
    }
    raws = {name: RawDecoder(dirs[name], bench) for name in ("lean", "lean_no_scores")}

    image = bench_image(preset.image_size)
    pixel_values, layout = preprocess_image(image, edges["lean"].files.tiling)
    ids = [int(i) for i in build_prompt(edges["lean"].files, QUESTION, layout.num_visual_tokens).input_ids]
    log(f"prompt: {len(ids)} tokens, {layout.num_visual_tokens} visual")

    worker, genai, version, logits_diff = None, [], None, None
    python = ensure_genai_venv(args.genai_venv)
    if python is None:
        notes.append("onnxruntime-genai could not be installed: genai columns skipped")
    else:
        built = build_genai(python, text_dir, work, args.threads)
        notes += [f"genai builder failed for {p}: column skipped" for p in GENAI_PRECISIONS if p not in built]
        if built:
            worker = GenaiWorker(python)
            for precision, path in built.items():
                version = worker.ask(cmd="load", name=precision, dir=str(path))["version"]
            genai = list(built)
            if "fp32" in built:
                logits_diff = check_genai_logits(worker, qwen, ids)
                log(f"genai fp32 vs PyTorch, last-token logits: max |diff| = {logits_diff:.2e}")
                if logits_diff > LOGITS_ATOL:
                    notes.append(f"genai logits differ by {logits_diff:.1e} > {LOGITS_ATOL}: genai skipped")
                    genai = []
    del qwen
    try:
        result = time_all(args, bench, model, edges, raws, worker, genai, ids)
    finally:
        if worker is not None:
            worker.close()
    result.update(genai_version=version, genai_logits_max_diff=logits_diff, notes=notes)
    return result


def time_all(args, bench, model, edges, raws, worker, genai, ids) -> dict:
    """Interleaved repeats of every column; medians."""
    image = bench_image(BenchPreset.from_name(args.preset).image_size)
    columns: list[str] = [f"stitch_{name}" for name in edges] + [f"raw_{name}" for name in raws]
    columns += [f"genai_{p}" for p in genai] + ["torch"]
    _, gen = ort_generation(edges["lean"], image, args.new_tokens)

    def once(column: str) -> tuple[TextTime, float, tuple[int, ...]]:
        """(text-model time, preprocess + vision ms outside it, generated tokens) of one run."""
        if column.startswith("stitch_"):
            g = edges[column.removeprefix("stitch_")].generate(
                image, QUESTION, args.new_tokens, ignore_eos=True
            )
            t = g.timings
            return TextTime(t.prefill_ms, t.decode_ms), t.preprocess_ms + t.vision_ms, g.token_ids
        if column.startswith("raw_"):
            return TextTime(*time_decoder(raws[column.removeprefix("raw_")], edges["lean"], gen, 1)), 0.0, ()
        if column.startswith("genai_"):
            reply = worker.ask(
                cmd="generate", name=column.removeprefix("genai_"), ids=ids, new_tokens=args.new_tokens
            )
            return TextTime(reply["prefill_ms"], reply["decode_ms"]), 0.0, tuple(reply["tokens"])
        g = torch_generation(model, edges["lean"], image, bench)
        return TextTime(g.ttft_ms, g.decode_ms), 0.0, g.tokens  # ttft holds preprocess + vision

    times: dict[str, list[TextTime]] = {c: [] for c in columns}
    extra: dict[str, list[float]] = {c: [] for c in columns}
    tokens: dict[str, tuple] = {}
    for column in columns:  # warm-up
        once(column)
    for repeat in range(args.repeats):
        for column in columns if repeat % 2 == 0 else reversed(columns):
            text, other, toks = once(column)
            times[column].append(text)
            extra[column].append(other)
            tokens[column] = toks
        log(
            f"repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{c} {times[c][-1].prefill_ms + times[c][-1].decode_ms:.0f} ms" for c in columns)
        )
    consistency_ms = time_consistency(edges["lean"], gen, args.repeats)
    medians = {c: median_time(times[c], args.new_tokens) for c in columns}
    for column in columns:
        medians[column]["generation_ms"] = statistics.median(
            t.prefill_ms + t.decode_ms + e for t, e in zip(times[column], extra[column], strict=True)
        )
    return {"columns": medians, "tokens": tokens, "consistency_ms": consistency_ms, "prompt_tokens": len(ids)}


def summary(args: argparse.Namespace, result: dict) -> dict:
    cols = result["columns"]

    def get(column: str, key: str) -> float | None:
        return cols[column][key] if column in cols else None

    stitch_gen = get("stitch_lean", "generation_ms")
    return {
        "device": f"cpu ({os.cpu_count()} cores, {args.threads} threads; {args.machine})",
        "preset": args.preset,
        "text_model": args.text_from or args.preset,
        "prompt_tokens": result["prompt_tokens"],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "genai_version": result["genai_version"],
        "genai_logits_max_diff": result["genai_logits_max_diff"],
        "stitch_vs_genai_total": ratio(get("stitch_lean", "total_ms"), get("genai_fp32", "total_ms")),
        "stitch_vs_genai_decode": ratio(get("stitch_lean", "decode_ms"), get("genai_fp32", "decode_ms")),
        "stitch_int4_vs_genai_int4_decode": ratio(
            get("stitch_lean_int4", "decode_ms"), get("genai_int4", "decode_ms")
        ),
        "stitch_int4_vs_genai_int4_total": ratio(
            get("stitch_lean_int4", "total_ms"), get("genai_int4", "total_ms")
        ),
        "score_overhead": round(cols["raw_lean"]["total_ms"] / cols["raw_lean_no_scores"]["total_ms"] - 1, 4),
        "ort_vs_torch_speedup": ratio(get("torch", "generation_ms"), stitch_gen),
        "consistency_fraction": round(result["consistency_ms"] / stitch_gen, 4),
        "tokens_equal": tokens_equal(result["tokens"]),
        "stitch_decode_tok_s": round(get("stitch_lean", "decode_tok_s"), 1),
        "genai_decode_tok_s": round(get("genai_fp32", "decode_tok_s"), 1) if "genai_fp32" in cols else None,
        "genai_int4_decode_tok_s": round(get("genai_int4", "decode_tok_s"), 1)
        if "genai_int4" in cols
        else None,
        "notes": result["notes"],
    }


# (column, column): generations that should agree token for token (the first n equal)
SAME_INPUTS = (("stitch_lean", "torch"), ("stitch_lean", "stitch_lean_int4"), ("genai_fp32", "genai_int4"))


def tokens_equal(tokens: dict[str, tuple]) -> dict[str, int]:
    """For each pair of ``SAME_INPUTS`` that ran, how many leading tokens their last generations share."""
    return {
        f"{a}_vs_{b}": equal_prefix(tokens[a], tokens[b])
        for a, b in SAME_INPUTS
        if a in tokens and b in tokens
    }


LABELS = {
    "stitch_lean": "Stitch lean scored fp32 (generate)",
    "stitch_lean_int4": "Stitch lean scored int4 (generate)",
    "raw_lean": "Stitch lean scored fp32 (raw decoder)",
    "raw_lean_no_scores": "Stitch lean unscored fp32 (raw decoder)",
    "genai_fp32": "onnxruntime-genai fp32",
    "genai_int4": "onnxruntime-genai int4",
    "torch": "PyTorch fp32 (SDPA)",
}


def print_table(args: argparse.Namespace, result: dict, line: dict) -> None:
    cols = result["columns"]
    base = cols.get("genai_fp32")
    print(
        f"\n{args.preset} (text model {args.text_from or args.preset}): prompt {result['prompt_tokens']} tokens, {args.new_tokens} greedy tokens (EOS ignored), "
        f"batch 1, median of {args.repeats} interleaved repeats, {line['device']}\n"
    )
    print("| column | prefill ms | decode ms | text total ms | decode tok/s | total / genai fp32 |")
    print("|---|---|---|---|---|---|")
    for column, row in cols.items():
        versus = f"{row['total_ms'] / base['total_ms']:.2f}x" if base else "-"
        print(
            f"| {LABELS[column]} | {row['prefill_ms']:.1f} | {row['decode_ms']:.1f} | {row['total_ms']:.1f} | "
            f"{row['decode_tok_s']:.0f} | {versus} |"
        )
    print("\nPyTorch's prefill includes preprocessing and vision; the other rows' do not.")
    for note in line["notes"]:
        print(f"- {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", help="bench/presets.py shape (default quick)")
    parser.add_argument(
        "--text-from", default=None, help="preset whose text model replaces --preset's (e.g. internvl3-1b)"
    )
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every column (default 1)")
    parser.add_argument("--genai-venv", type=Path, default=ROOT / "runs" / "genai-venv")
    parser.add_argument("--machine", default="unnamed machine", help="what to call the machine in the JSON")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep checkpoints and exports here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge_peer_") as temp:
        work = args.work_dir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    log(f"done in {time.perf_counter() - started:.0f} s")
    line = summary(args, result)
    print_table(args, result, line)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
