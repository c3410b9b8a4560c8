"""One whole edge question at a real shape, one export at a time: each stage's time and peak memory.

``edge_speed.py`` compares graphs side by side and so holds several sessions at
once; at the InternVL3-1B shape that does not fit a 24 GB machine. This
benchmark asks one question per export in a process of its own, so only one
export's sessions exist at a time:

1. a random-weight checkpoint of ``--preset`` (``presets.py``; default
   internvl3-1b: InternViT-300M + Qwen2.5-0.5B, a 1344 x 896 image = 3 x 2
   grid + thumbnail = 7 tiles, 1792 visual tokens), ``--max-tiles`` lowering
   the preset's tile cap as an operator would;
2. its exports (``--exports``), each by ``stitch-export`` in a child process:
   ``explicit`` (``--graph explicit``: the traced graphs, the reference), ``lean`` (the default
   export: fused ORT ops for the vision tower and the decoder, fp32) and
   ``lean-int8`` / ``lean-int4`` (``--quant``: the decoder's weights as
   MatMulNBits, the tower's dynamic int8), ``lean-int4-nbits-vision`` (the
   tower as MatMulNBits too) and ``lean-int4-decoder`` (tower float);
3. per export, in a fresh child process, ``EdgeModel.load`` and then, cold
   (the sessions' first runs, as on a device's first question), the vision
   graph on the image and one prefill pass with a KV cache sized as
   ``generate`` sizes it; each span's extra memory is exact: the process's
   high-water mark reset (``/proc/self/clear_refs``), then VmHWM - RSS
   before (``vision_extra_mb``, ``prefill_extra_mb``);
4. then, warm, one greedy question of ``--new-tokens`` tokens (EOS ignored)
   by ``EdgeModel.generate`` and the SEE consistency pass
   (``teacher_forced_probs``, r_c = 5%): times per stage from the runtime's
   own timings (preprocess, vision, prefill, decode) and the consistency
   pass's; RSS sampled every 2 ms in a thread gives each stage's peak over
   its window (``peak_<stage>_mb``); ``peak_process_mb`` is the child's
   high-water mark over its whole life (what the machine must hold);
5. with ``--genai``, onnxruntime-genai's fp32 graph of the same text model
   (``edge_peer.py``'s venv and builder) prefills a prompt of the same length
   in its own process, cold, measured the same way (its KV buffers sized at
   prompt + new tokens, as ours): ``<export>_prefill_extra_vs_genai`` = ours /
   its.

``question_ms`` = preprocess + vision + prefill + decode + consistency (what
one edge question costs before any cloud call); ``<export>_speedup_vs_explicit``
= the explicit export's question_ms / that export's.

    python bench/edge_stages.py --genai                    # internvl3-1b, all four exports, 2 threads
    python bench/edge_stages.py --exports lean lean-int4   # just those
    python bench/edge_stages.py --preset quick --exports explicit lean-int8 --threads 1   # seconds

Progress on stderr; a markdown table on stdout, then as the last line one JSON
object. Random weights: times and memory, never accuracy. Not run in CI at the
real shape (``tests/test_edge_stages.py`` runs the quick preset).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# Export name -> (stitch-export --graph, --quant, --vision-quant, --decoder-quant).
EXPORTS = {
    "explicit": ("explicit", "none", "none", "nbits"),
    "lean": ("lean", "none", "none", "nbits"),
    "lean-int8": ("lean", "int8", "dynamic-int8", "nbits"),
    "lean-int8-dynamic": ("lean", "int8", "dynamic-int8", "dynamic-int8"),
    "lean-int4": ("lean", "int4", "dynamic-int8", "nbits"),
    "lean-int4-nbits-vision": ("lean", "int4", "nbits", "nbits"),
    "lean-int4-decoder": ("lean", "int4", "none", "nbits"),
}
CONSISTENCY_RETENTION = 0.05  # r_c, DESIGN "SEE gate"
SAMPLE_SECONDS = 0.002  # RSS sampling interval of the per-stage peaks
STAGES = ("preprocess", "vision", "prefill", "decode", "consistency")


def log(message: str) -> None:
    print(f"[edge_stages] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- memory


def proc_status_mb(field: str, pid: str = "self") -> float:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_high_water_mark() -> None:
    """Sets VmHWM back to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


class RssSampler:
    """RSS of this process every ``SAMPLE_SECONDS`` in a thread: (perf_counter, MB) pairs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        statm = Path("/proc/self/statm")
        page_mb = 4096 / 2**20
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), int(statm.read_text().split()[1]) * page_mb))
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> float:
        """Highest RSS sampled in [start, end] (the last sample before ``start`` when none fell inside)."""
        inside = [mb for t, mb in self.samples if start <= t <= end]
        if inside:
            return max(inside)
        before = [mb for t, mb in self.samples if t < start]
        return before[-1] if before else float("nan")


def stage_windows(started: float, timings: dict, consistency: tuple[float, float]) -> dict:
    """(start, end) perf_counter window of each stage, from the runtime's consecutive stage times."""
    windows, at = {}, started
    for stage in STAGES[:-1]:
        end = at + timings[f"{stage}_ms"] / 1e3
        windows[stage] = (at, end)
        at = end
    windows["consistency"] = consistency
    return windows


# --------------------------------------------------------------------- child steps


def build_step(preset_name: str, max_tiles: int | None, out: Path) -> None:
    """The random checkpoint of the preset (edge_speed.build_checkpoint), its tile cap lowered."""
    from edge_speed import build_checkpoint
    from presets import BenchPreset

    preset = BenchPreset.from_name(preset_name)
    if max_tiles is not None:
        if not 1 <= max_tiles <= preset.max_tiles:
            raise ValueError(f"--max-tiles must be 1..{preset.max_tiles} for {preset_name}, got {max_tiles}")
        preset = replace(preset, max_tiles=max_tiles)
    build_checkpoint(preset, out, "fp32")


def export_step(checkpoint: Path, out: Path, name: str) -> None:
    from stitchvlm.edge.export import ExportConfig, export_edge

    graph, quant, vision, decoder = EXPORTS[name]
    export_edge(
        ExportConfig(
            model_dir=checkpoint, out_dir=out, verify=False, graph=graph, quant=quant, vision_quant=vision,
            decoder_quant=decoder,
        )
    )  # fmt: skip


class HighWaterMark:
    """Exact peak RSS of spans of this process (VmHWM, reset per span) and over its whole life."""

    def __init__(self) -> None:
        self.lifetime = proc_status_mb("VmHWM")

    def start(self) -> float:
        """Resets VmHWM to the current RSS; returns that RSS."""
        self.lifetime = max(self.lifetime, proc_status_mb("VmHWM"))
        before = proc_status_mb("VmRSS")
        reset_high_water_mark()
        return before

    def peak(self) -> float:
        hwm = proc_status_mb("VmHWM")
        self.lifetime = max(self.lifetime, hwm)
        return hwm


def question_step(edge_dir: Path, image_size: tuple[int, int], threads: int, new_tokens: int) -> dict:
    """One question on ``edge_dir`` in this process: cold vision and prefill memory, then stage times.

    First, cold (nothing has run on the sessions yet, as on a device's first question): the
    vision graph on the image and one prefill pass with a KV cache sized as ``generate`` sizes
    it, each span's extra memory exact (high-water mark - RSS before). Then a whole question,
    warm, with its stage times and sampled per-stage peaks, and the consistency pass.
    """
    import numpy as np
    from edge_inputs import QUESTION, bench_image, session_options  # torch-free, as the edge runtime

    from stitchvlm.edge.runtime import CPU, EdgeModel
    from stitchvlm.shared.preprocess import preprocess_image
    from stitchvlm.shared.prompt import build_prompt
    from stitchvlm.shared.scoring import top_r_indices

    image = bench_image(image_size)
    marks = HighWaterMark()
    rss_start = marks.start()
    loaded_at = time.perf_counter()
    edge = EdgeModel.load(edge_dir, providers=[CPU], session_options=session_options(threads))
    load_ms = 1e3 * (time.perf_counter() - loaded_at)
    load_peak = marks.peak()

    pixel_values, layout = preprocess_image(image, edge.files.tiling)
    prompt = build_prompt(edge.files, QUESTION, layout.num_visual_tokens)
    before = marks.start()
    image_embeds = edge.encode_image(pixel_values)  # [|V|, hidden]
    vision_extra = marks.peak() - before
    length = len(prompt.input_ids)
    embeds = edge.embed(prompt.input_ids)  # [S, hidden]
    embeds[prompt.visual_start : prompt.visual_end] = image_embeds
    query_mask = (np.arange(length) >= prompt.visual_end).astype(np.float32)  # [S]
    before = marks.start()
    cache = edge.empty_cache(capacity=length + new_tokens)
    edge.decode(embeds[None], np.arange(length)[None], query_mask[None], cache, num_logits=1)
    prefill_extra = marks.peak() - before
    del cache

    rss_warm = proc_status_mb("VmRSS")
    with RssSampler() as sampler:
        started = time.perf_counter()
        gen = edge.generate(image, QUESTION, new_tokens, ignore_eos=True)
        consistency_start = time.perf_counter()
        keep = top_r_indices(gen.visual_scores, CONSISTENCY_RETENTION)
        edge.teacher_forced_probs(gen.prompt, gen.image_embeds, keep, gen.token_ids)
        consistency_end = time.perf_counter()
    marks.peak()
    timings = {f"{stage}_ms": getattr(gen.timings, f"{stage}_ms") for stage in STAGES[:-1]}
    timings["consistency_ms"] = 1e3 * (consistency_end - consistency_start)
    windows = stage_windows(started, timings, (consistency_start, consistency_end))
    peaks = {f"peak_{stage}_mb": round(sampler.peak(*windows[stage]), 1) for stage in STAGES}
    return {
        "prompt_tokens": length,
        "visual_tokens": prompt.num_visual_tokens,
        "tiles": gen.layout.num_tiles,
        "load_ms": round(load_ms, 1),
        **{k: round(v, 1) for k, v in timings.items()},
        "question_ms": round(sum(timings.values()), 1),
        "rss_before_load_mb": round(rss_start, 1),
        "load_peak_mb": round(load_peak, 1),
        "vision_extra_mb": round(vision_extra, 1),
        "prefill_extra_mb": round(prefill_extra, 1),
        "rss_warm_mb": round(rss_warm, 1),
        **peaks,
        "peak_process_mb": round(marks.lifetime, 1),
        "tokens": list(gen.token_ids),
    }


def genai_text_step(checkpoint: Path, out: Path) -> None:
    """The checkpoint's text model and LM head as a Qwen2 checkpoint (edge_peer.save_text_checkpoint)."""
    from edge_peer import save_text_checkpoint
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(checkpoint)
    save_text_checkpoint(model, checkpoint, out)


# --------------------------------------------------------------------- orchestration


def child(*args: str) -> str:
    """Runs this script's ``--step`` in a fresh process; its last stdout line."""
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"step {' '.join(args)} failed (exit {result.returncode})")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def genai_prefill(
    checkpoint: Path, work: Path, prompt_tokens: int, new_tokens: int, threads: int
) -> dict | None:
    """genai fp32's prefill extra memory on ``prompt_tokens`` ids; None (logged) when genai is unavailable."""
    from edge_peer import GenaiWorker, build_genai, ensure_genai_venv

    python = ensure_genai_venv(BENCH.parent / "runs" / "genai-venv")
    if python is None:
        return None
    text_dir = work / "text-qwen2"
    if not (text_dir / "config.json").exists():
        log(f"saving the text model as a Qwen2 checkpoint -> {text_dir}")
        child("--step", "genai-text", str(checkpoint), str(text_dir))
    built = build_genai(python, text_dir, work, threads)
    if "fp32" not in built:
        return None
    worker = GenaiWorker(python)
    try:
        worker.ask(cmd="load", name="fp32", dir=str(built["fp32"]))
        ids = [1] * prompt_tokens  # any ids: the prefill's memory depends on the length only
        # cold, as Stitch's is measured: the session's first pass
        return worker.ask(cmd="prefill_memory", name="fp32", ids=ids, new_tokens=new_tokens)
    finally:
        worker.close()


def run(args: argparse.Namespace, work: Path) -> dict:
    from presets import BenchPreset  # transformers, not torch: the parent only orchestrates

    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").exists():
        log(f"building a random {args.preset} checkpoint -> {checkpoint}")
        child("--step", "build", args.preset, str(args.max_tiles or 0), str(checkpoint))
    results = {}
    for name in args.exports:
        out = work / f"edge-{name}"
        if not (out / "stitch_edge.json").exists():
            graph, quant, vision, decoder = EXPORTS[name]
            flags = "" if quant == "none" else f" --vision-quant {vision} --decoder-quant {decoder}"
            log(f"stitch-export --graph {graph} --quant {quant}{flags} -> {out}")
            child("--step", "export", str(checkpoint), str(out), name)
        log(f"one question on {out.name} ({args.threads} threads)")
        size = [str(side) for side in BenchPreset.from_name(args.preset).image_size]
        line = child("--step", "question", str(out), *size, str(args.threads), str(args.new_tokens))
        results[name] = r = json.loads(line)
        log(f"{name}: {r['question_ms'] / 1e3:.1f} s a question, process peak {r['peak_process_mb']:.0f} MB")
    genai = None
    if args.genai:
        first = next(iter(results.values()))
        genai = genai_prefill(checkpoint, work, first["prompt_tokens"], args.new_tokens, args.threads)
    return summary(args, results, genai)


def summary(args: argparse.Namespace, results: dict, genai: dict | None) -> dict:
    import platform

    explicit = results.get("explicit")
    line = {
        "device": f"cpu ({args.threads} threads, {platform.processor() or platform.machine()})",
        "preset": args.preset,
        "max_tiles": args.max_tiles,
        "new_tokens": args.new_tokens,
        "exports": results,
        "genai_prefill_extra_mb": None if genai is None else round(genai["extra_mb"], 1),
    }
    for name, r in results.items():
        key = name.replace("-", "_")
        if explicit is not None and name != "explicit":
            line[f"{key}_speedup_vs_explicit"] = round(explicit["question_ms"] / r["question_ms"], 3)
        if genai is not None:
            line[f"{key}_prefill_extra_vs_genai"] = round(r["prefill_extra_mb"] / genai["extra_mb"], 3)
    return line


def print_table(line: dict) -> None:
    print(f"Edge question at {line['preset']}, {line['device']}, {line['new_tokens']} tokens (EOS ignored)\n")
    header = ["export", "tiles", "prompt", *[f"{s} ms" for s in STAGES], "question s", "load s"]
    header += ["RSS warm MB", "vision extra MB", "prefill extra MB", "process peak MB"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for name, r in line["exports"].items():
        cells = [name, r["tiles"], r["prompt_tokens"]]
        cells += [f"{r[f'{s}_ms']:.0f}" for s in STAGES]
        cells += [f"{r['question_ms'] / 1e3:.1f}", f"{r['load_ms'] / 1e3:.1f}", f"{r['rss_warm_mb']:.0f}"]
        cells += [
            f"{r['vision_extra_mb']:.0f}",
            f"{r['prefill_extra_mb']:.0f}",
            f"{r['peak_process_mb']:.0f}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if line["genai_prefill_extra_mb"] is not None:
        print(
            f"\nonnxruntime-genai fp32, same prompt length: prefill extra {line['genai_prefill_extra_mb']:.0f} MB"
        )
    print()


def step_main(argv: list[str]) -> int:
    """``--step NAME ARGS``: one child process's work (see ``run``)."""
    name, rest = argv[0], argv[1:]
    if name == "build":
        build_step(rest[0], int(rest[1]) or None, Path(rest[2]))
    elif name == "export":
        export_step(Path(rest[0]), Path(rest[1]), rest[2])
    elif name == "question":
        size = (int(rest[1]), int(rest[2]))
        print(json.dumps(question_step(Path(rest[0]), size, int(rest[3]), int(rest[4]))), flush=True)
    elif name == "genai-text":
        genai_text_step(Path(rest[0]), Path(rest[1]))
    else:
        raise SystemExit(f"unknown step {name!r}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="internvl3-1b", help="bench/presets.py shape")
    parser.add_argument(
        "--exports", nargs="+", choices=list(EXPORTS), default=list(EXPORTS), help="what to time"
    )
    parser.add_argument("--max-tiles", type=int, default=None, help="lower the preset's tile cap")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--genai", action="store_true", help="also onnxruntime-genai's prefill memory")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep checkpoint and exports here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--step"]:
        return step_main(argv[1:])
    args = parse_args(argv)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        line = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory() as work:
            line = run(args, Path(work))
    print_table(line)
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
