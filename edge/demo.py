"""``stitch demo``: the whole cascade on this machine, on the embedded synthetic pair.

    stitch demo [--n 8] [--tau 0.5] [--retention 0.09] [--out runs/demo]
                [--small DIR --large DIR] [--cache DIR] [--prune-layer 2]

What one run does:

1. exports the small checkpoint to ONNX once (a ``python -m stitchvlm.edge.export``
   subprocess, i.e. ``stitch-export``) into a cache directory keyed by a digest
   of the checkpoint's files, and reuses that export while the checkpoint is
   unchanged and the runtime can still read it;
2. starts a real ``stitch-cloud serve`` subprocess on the large checkpoint on a
   free loopback port and waits until its health service says SERVING;
3. asks the first ``--n`` questions of the synthetic test split through the
   client SDK (``sdk.Cascade`` over gRPC) and prints one table row per question
   (question, truth, answer, route, S, kept tokens, request bytes, latency),
   then the exit rate, accuracy and bytes sent;
4. saves one PNG per question: the image with the regions of the kept visual
   tokens lit and the rest dimmed, the answer's region outlined, and the
   thumbnail tile's kept tokens in an inset; plus ``summary.json``;
5. stops the server, also on Ctrl-C, SIGTERM or an error.

The default checkpoints are the embedded pair ``stitchvlm/shared/models/
synthetic-{small,large}`` (the ``shared/models`` folder of the source tree);
``--small`` / ``--large`` run other ones (tests use tiny random checkpoints).
No network but loopback, no torch in this process: torch runs only in the
export and server subprocesses. It does not train, tune tau or benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw

import stitchvlm.shared
from stitchvlm.shared.layout import Layout
from stitchvlm.shared.preprocess import compute_layout, token_regions
from stitchvlm.shared.synthetic import Example, dataset, exact_match

from .gate import DEFAULT_TAU
from .runtime import CPU, CUDA, EdgeModel
from .sdk import ROUTE_EDGE, Cascade, CascadeConfig
from .sidecar import DEFAULT_GRAPH, EdgeSidecar

MODELS_DIR = Path(stitchvlm.shared.__file__).resolve().parent / "models"  # the embedded checkpoints
EMBEDDED_SMALL = "synthetic-small"
EMBEDDED_LARGE = "synthetic-large"
CACHE_ENV = "STITCH_CACHE_DIR"
EXPORT_STAMP = "stitch_source.json"  # written into an export: which checkpoint digest it came from
SUMMARY_NAME = "summary.json"
# The server prints this once its port is bound, before the weights load (cloud/server.py).
_LISTENING = re.compile(r"stitch-cloud loading: listening on (?P<host>\S+):(?P<port>\d+)")
_SERVING = health_pb2.HealthCheckResponse.SERVING
# --device -> (ORT providers of the edge, torch device of the server). CPU by default: asking ORT
# for CUDA where its libraries are missing logs errors before it falls back.
DEVICES = {"cpu": ([CPU], "cpu"), "cuda": ([CUDA, CPU], "cuda:0")}


def progress(message: str) -> None:
    print(f"[stitch demo] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DemoConfig:
    """One demo run (what ``stitch demo`` parses its arguments into)."""

    n: int = 8  # questions: the first n of the synthetic test split
    seed: int = 0  # dataset seed of the test split
    tau: float = DEFAULT_TAU  # SEE threshold: S >= tau answers on the edge
    retention: float = 0.09  # R: share of visual tokens the cloud keeps
    prune_layer: str = "2"  # K of the cloud server (layer index or fraction), passed to stitch-cloud
    max_new_tokens: int = 4  # generation budget; answers are one word or digit plus EOS
    out_dir: Path = Path("runs/demo")  # pictures, summary.json and the server's log
    small_dir: Path | None = None  # small checkpoint; None: the embedded synthetic-small
    large_dir: Path | None = None  # large checkpoint; None: the embedded synthetic-large
    cache_dir: Path | None = None  # where exports are cached; None: default_cache_dir()
    device: str = "cpu"  # "cpu", or "cuda": the edge on ORT's CUDA EP and the server on cuda:0
    cloud_timeout_s: float = 60.0  # deadline of one cloud call (a CPU shared with other work is slow)
    startup_timeout_s: float = 300.0  # how long the server may take to become SERVING

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {sorted(DEVICES)}, got {self.device!r}")
        # the cascade's own checks of tau, R and the budget
        CascadeConfig(tau=self.tau, retention=self.retention, max_new_tokens=self.max_new_tokens)
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "small_dir", Path(self.small_dir or embedded_model_dir(EMBEDDED_SMALL)))
        object.__setattr__(self, "large_dir", Path(self.large_dir or embedded_model_dir(EMBEDDED_LARGE)))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir or default_cache_dir()))


def embedded_model_dir(name: str) -> Path:
    """Directory of an embedded checkpoint (it may not exist: see ``missing_model_message``)."""
    return MODELS_DIR / name


def default_cache_dir() -> Path:
    """``$STITCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/stitch``, else ``~/.cache/stitch``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stitch"


def missing_model_message(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a checkpoint, or None when it looks like one."""
    if not model_dir.is_dir():
        return f"no checkpoint directory {model_dir}"
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        return f"{model_dir} holds no config.json / *.safetensors"
    return None


# ----------------------------------------------------------------------------- the cached export


def checkpoint_digest(model_dir: Path) -> str:
    """sha256 over the names and bytes of the files at the top of a checkpoint directory."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def export_is_current(edge_dir: Path, digest: str) -> bool:
    """The export came from a checkpoint with ``digest`` and the runtime can still read its sidecar."""
    try:
        stamp = json.loads((edge_dir / EXPORT_STAMP).read_text())
        EdgeSidecar.load(edge_dir)  # refuses another format version
    except (OSError, ValueError):
        return False
    return stamp.get("checkpoint_sha256") == digest


def ensure_export(model_dir: Path, cache_dir: Path, dtype: str = "fp32", verify: bool = True) -> Path:
    """An up-to-date ONNX export of ``model_dir`` under ``cache_dir/edge``, exporting when needed.

    The export runs as a ``python -m stitchvlm.edge.export`` subprocess (torch
    stays out of this process; ``verify``: its ORT-vs-PyTorch check) into a
    temporary directory that is renamed into place only once complete, so an
    interrupted export is never reused. Raises ``RuntimeError`` when the exporter fails.
    """
    model_dir = Path(model_dir).resolve()
    digest = checkpoint_digest(model_dir)
    # the graph kind in the name: an export cached under an older default is not reused as this one
    target = Path(cache_dir) / "edge" / f"{model_dir.name}-{digest[:16]}-{dtype}-{DEFAULT_GRAPH}"
    if export_is_current(target, digest):
        progress(f"reusing the ONNX export {target}")
        return target
    progress(f"exporting {model_dir} to ONNX ({dtype}) -> {target}")
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, "-m", "stitchvlm.edge.export"]  # stitch-export, same interpreter
    command += ["--model", str(model_dir), "--out", str(partial), "--dtype", dtype]
    command += [] if verify else ["--no-verify"]
    try:
        done = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"stitch-export failed with exit code {done.returncode}")
        stamp = {"checkpoint_sha256": digest, "model_dir": str(model_dir)}
        (partial / EXPORT_STAMP).write_text(json.dumps(stamp))
    except BaseException:  # also Ctrl-C: leave no half-written export behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    try:
        partial.rename(target)
    except OSError:  # another run put a finished export there meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- the cloud subprocess


@dataclass
class CloudServer:
    """A running ``stitch-cloud serve`` subprocess."""

    proc: subprocess.Popen  # the server process
    address: str  # "127.0.0.1:PORT"
    log: Path  # its stdout and stderr


def _failed(what: str, log: Path, lines: int = 15) -> RuntimeError:
    """An error naming what went wrong, with the end of the server's log."""
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return RuntimeError(f"stitch-cloud {what}; the end of {log}:\n{tail}")


def _wait_for_port(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (match := _LISTENING.search(log.read_text(errors="replace"))) is None:
        if proc.poll() is not None:
            raise _failed(f"exited with {proc.returncode} before binding", log)
        if time.monotonic() > deadline:
            raise _failed(f"did not bind within {timeout_s:.0f} s", log)
        time.sleep(0.1)
    return f"127.0.0.1:{match['port']}"


def _wait_for_serving(proc: subprocess.Popen, address: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise _failed(f"exited with {proc.returncode} while loading", log)
            with suppress(grpc.RpcError):  # not answering yet
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2.0).status == _SERVING:
                    return
            if time.monotonic() > deadline:
                raise _failed(f"not SERVING after {timeout_s:.0f} s", log)
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM (the server's graceful stop), SIGKILL after ``timeout_s``; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def running_cloud_server(
    large_dir: Path,
    prune_layer: str,
    log: Path,
    device: str = "cpu",
    startup_timeout_s: float = 300.0,
    extra_args: Sequence[str] = (),
) -> Iterator[CloudServer]:
    """``stitch-cloud serve`` on a free loopback port, SERVING inside the block, stopped after it.

    ``extra_args`` go last on the ``serve`` command line (e.g. ``--max-batch-size 1``)."""
    command = [sys.executable, "-m", "stitchvlm.cloud.cli", "serve", "--model", str(large_dir)]
    command += ["--host", "127.0.0.1", "--port", "0", "--prune-layer", str(prune_layer), "--device", device]
    command += list(extra_args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        address = _wait_for_port(proc, log, startup_timeout_s)
        progress(f"stitch-cloud (pid {proc.pid}) listening on {address}; loading {large_dir.name}")
        _wait_for_serving(proc, address, log, startup_timeout_s)
        progress("stitch-cloud is SERVING")
        yield CloudServer(proc=proc, address=address, log=log)
    finally:
        code = stop_server(proc)
        progress(f"stitch-cloud stopped (exit code {code})")


# ----------------------------------------------------------------------------- one question


@dataclass(frozen=True)
class DemoRow:
    """One asked question and what the cascade did with it."""

    index: int  # example index in the test split
    qtype: str  # question type (shared.synthetic.QTYPES)
    question: str
    truth: str  # the dataset's answer
    answer: str  # the cascade's answer
    route: str  # "edge" or "cloud"
    correct: bool  # exact_match(answer, truth)
    s: float  # SEE score S
    kept: int  # visual tokens kept (sent when escalated)
    num_visual_tokens: int  # |V|
    bytes_sent: int  # serialized request bytes (0 on the edge)
    latency_ms: float  # the whole ask, edge + gate + cloud
    edge_answer: str  # the small model's own answer
    degraded: bool  # the cloud failed and the edge answered
    picture: str  # PNG path


@dataclass(frozen=True)
class DemoSummary:
    """Totals over the rows."""

    n: int
    exit_rate: float  # share of questions the gate kept on the edge (degraded ones not counted)
    accuracy: float  # share of exact matches
    total_bytes: int  # request bytes of all escalations
    degraded: int  # escalations the cloud did not answer
    rows: list[DemoRow] = field(default_factory=list)


def summarize(rows: Sequence[DemoRow]) -> DemoSummary:
    """Exit rate, accuracy and bytes of ``rows`` (one or more)."""
    n = len(rows)
    if n == 0:
        raise ValueError("no rows to summarize")
    return DemoSummary(
        n=n,
        exit_rate=sum(r.route == ROUTE_EDGE and not r.degraded for r in rows) / n,
        accuracy=sum(r.correct for r in rows) / n,
        total_bytes=sum(r.bytes_sent for r in rows),
        degraded=sum(r.degraded for r in rows),
        rows=list(rows),
    )


def ask_one(cascade: Cascade, example: Example, index: int, out_dir: Path) -> DemoRow:
    """Ask one example through the SDK and save its picture."""
    result = cascade.ask(example.image, example.question)
    picture = out_dir / f"q{index:03d}-{result.route}.png"
    layout = compute_layout(example.image.width, example.image.height, cascade.model.files.tiling)
    sent = "sent to the cloud" if result.route != ROUTE_EDGE else "not sent: answered on the edge"
    caption = (
        example.question,
        f"truth {example.answer} | answer {result.answer} | route {result.route} | S {result.s:.3f}",
        f"kept {len(result.kept_indices)}/{result.num_visual_tokens} tokens ({sent}); green: answer region",
    )
    highlight_kept_tokens(example.image, layout, result.kept_indices, example.region, caption).save(picture)
    return DemoRow(
        index=index,
        qtype=example.qtype,
        question=example.question,
        truth=example.answer,
        answer=result.answer,
        route=result.route,
        correct=exact_match(result.answer, example.answer),
        s=result.s,
        kept=len(result.kept_indices),
        num_visual_tokens=result.num_visual_tokens,
        bytes_sent=result.bytes_sent,
        latency_ms=result.timings["total_ms"],
        edge_answer=result.edge_answer,
        degraded=result.degraded,
        picture=str(picture),
    )


# ----------------------------------------------------------------------------- pictures


def kept_masks(layout: Layout, kept: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Which pixels the kept tokens stand for: (grid tiles' mask, thumbnail's mask), each [height, width] bool.

    The thumbnail mask is all False when the layout has no thumbnail.
    """
    boxes = token_regions(layout, width, height)  # [|V|, 4]
    grid_tokens = layout.grid_columns * layout.grid_rows * layout.tokens_per_tile
    grid, thumb = np.zeros((height, width), bool), np.zeros((height, width), bool)
    for index in np.asarray(kept, dtype=np.int64):
        x0, y0, x1, y1 = boxes[index]
        (grid if index < grid_tokens else thumb)[y0:y1, x0:x1] = True
    return grid, thumb


def _lit(image: Image.Image, mask: np.ndarray, dim: float = 0.3) -> Image.Image:
    """``image`` with the pixels outside ``mask`` [h, w] darkened to ``dim`` of their value."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # [h, w, 3]
    pixels[~mask] *= dim
    return Image.fromarray(pixels.astype(np.uint8))


def highlight_kept_tokens(
    image: Image.Image,
    layout: Layout,
    kept: np.ndarray,
    region: tuple[int, int, int, int] | None = None,
    caption: Sequence[str] = (),
) -> Image.Image:
    """``image`` with the grid tokens' kept regions lit and the rest dimmed, ``region`` outlined in
    green; beside it at half size the thumbnail tile's kept tokens (when the layout has a thumbnail);
    the ``caption`` lines in a strip below."""
    image = image.convert("RGB")
    width, height = image.size
    grid, thumb = kept_masks(layout, kept, width, height)
    panels = [_lit(image, grid)]
    if layout.thumbnail:
        panels.append(_lit(image, thumb).resize((width // 2, height // 2), Image.Resampling.BILINEAR))
    strip = 6 + 16 * len(caption)
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), height + strip), "white")
    draw = ImageDraw.Draw(canvas)
    left = 0
    for panel in panels:
        canvas.paste(panel, (left, 0))
        if region is not None:
            scale = panel.width / width
            box = [left + round(v * scale) if i % 2 == 0 else round(v * scale) for i, v in enumerate(region)]
            draw.rectangle(box, outline=(40, 220, 60), width=max(1, round(3 * scale)))
        left += panel.width + 8
    if layout.thumbnail:
        draw.text((width + 8, height // 2 + 4), "thumbnail tile", fill=(0, 0, 0))
    for i, line in enumerate(caption):
        draw.text((6, height + 4 + 16 * i), line, fill=(0, 0, 0))
    return canvas


# ----------------------------------------------------------------------------- output


def format_table(rows: Sequence[DemoRow]) -> str:
    """A fixed-width table, one line per question."""
    header = f"{'#':>3}  {'question':<42} {'truth':<9} {'answer':<9} {'route':<5} {'S':>5} "
    header += f"{'kept':>9} {'bytes':>7} {'ms':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        mark = "" if r.correct else " x"
        route = r.route + ("!" if r.degraded else "")
        lines.append(
            f"{r.index:>3}  {r.question[:42]:<42} {r.truth[:9]:<9} {r.answer[:9]:<9} {route:<5} {r.s:>5.3f} "
            f"{f'{r.kept}/{r.num_visual_tokens}':>9} {r.bytes_sent:>7} {r.latency_ms:>7.0f}{mark}"
        )
    return "\n".join(lines)


def format_summary(summary: DemoSummary, config: DemoConfig) -> str:
    n = summary.n
    edge = round(summary.exit_rate * n)
    lines = [
        f"exit rate  {summary.exit_rate:.3f}  ({edge}/{n} answered on the edge, tau {config.tau})",
        f"accuracy   {summary.accuracy:.3f}  ({round(summary.accuracy * n)}/{n} exact matches)",
        f"bytes sent {summary.total_bytes}  ({n - edge} requests, R {config.retention})",
    ]
    if summary.degraded:
        lines.append(f"degraded   {summary.degraded} (the cloud failed; the edge answered; marked '!')")
    return "\n".join(lines)


def write_summary(summary: DemoSummary, config: DemoConfig, path: Path) -> None:
    data = asdict(summary)
    data["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    path.write_text(json.dumps(data, indent=1) + "\n")


# ----------------------------------------------------------------------------- the run


def run_demo(config: DemoConfig) -> DemoSummary:
    """Export, serve, ask, draw, stop; returns the summary (also written to ``summary.json``)."""
    for model_dir in (config.small_dir, config.large_dir):
        if (problem := missing_model_message(model_dir)) is not None:
            hint = "pass --small/--large, or train the embedded pair: python bench/train_pair.py"
            raise FileNotFoundError(f"{problem} ({hint})")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    edge_dir = ensure_export(config.small_dir, config.cache_dir)
    providers, torch_device = DEVICES[config.device]
    model = EdgeModel.load(edge_dir, providers=providers)
    progress(f"edge model {config.small_dir.name} loaded ({', '.join(model.decoder.get_providers())})")
    examples = dataset("test", config.n, config.seed)
    rows = []
    with running_cloud_server(
        config.large_dir,
        config.prune_layer,
        config.out_dir / "cloud.log",
        torch_device,
        config.startup_timeout_s,
    ) as server:
        cascade_config = CascadeConfig(
            tau=config.tau,
            retention=config.retention,
            max_new_tokens=config.max_new_tokens,
            cloud_timeout_s=config.cloud_timeout_s,
        )
        with Cascade(model, server.address, cascade_config) as cascade:
            for index, example in enumerate(examples):
                rows.append(ask_one(cascade, example, index, config.out_dir))
                progress(f"{index + 1}/{config.n}: {rows[-1].route} {rows[-1].answer!r}")
    summary = summarize(rows)
    write_summary(summary, config, config.out_dir / SUMMARY_NAME)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stitch", description="Stitch: the edge-cloud VLM cascade.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the cascade on generated questions, edge + local cloud")
    demo.add_argument("--n", type=int, default=8, help="questions from the synthetic test split")
    demo.add_argument("--seed", type=int, default=0, help="test split seed")
    demo.add_argument("--tau", type=float, default=DEFAULT_TAU, help="exit on the edge when S >= tau")
    demo.add_argument("--retention", type=float, default=0.09, help="R: share of visual tokens kept")
    demo.add_argument("--prune-layer", default="2", help="K of the cloud (layer index or fraction)")
    demo.add_argument("--max-new-tokens", type=int, default=4, help="generation budget, edge and cloud")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="pictures, summary.json, cloud.log")
    demo.add_argument(
        "--small", type=Path, default=None, help=f"small checkpoint (default: {EMBEDDED_SMALL})"
    )
    demo.add_argument(
        "--large", type=Path, default=None, help=f"large checkpoint (default: {EMBEDDED_LARGE})"
    )
    demo.add_argument(
        "--cache", type=Path, default=None, help=f"export cache (default: ${CACHE_ENV} or ~/.cache/stitch)"
    )
    demo.add_argument("--device", choices=sorted(DEVICES), default="cpu", help="edge and cloud device")
    demo.add_argument("--timeout", type=float, default=60.0, help="cloud deadline per question, s")
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = DemoConfig(
            n=args.n,
            seed=args.seed,
            tau=args.tau,
            retention=args.retention,
            prune_layer=args.prune_layer,
            max_new_tokens=args.max_new_tokens,
            out_dir=args.out,
            small_dir=args.small,
            large_dir=args.large,
            cache_dir=args.cache,
            device=args.device,
            cloud_timeout_s=args.timeout,
        )
    except ValueError as error:
        parser.error(str(error))
    # SIGTERM takes the same way out as Ctrl-C, so the server is stopped either way.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run_demo(config)
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        print(f"stitch demo: error: {error}", file=sys.stderr)
        return 1
    print(format_table(summary.rows))
    print()
    print(format_summary(summary, config))
    print(f"pictures and {SUMMARY_NAME} in {config.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
