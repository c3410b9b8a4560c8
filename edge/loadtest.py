"""``stitch-loadtest``: drive N questions at concurrency C through the edge SDK against a cloud.

    stitch-loadtest --edge EDGE_DIR --cloud 127.0.0.1:50051 -n 200 -c 8 --tau 0.3
    stitch-loadtest --edge-model SMALL_CKPT --start-cloud LARGE_CKPT -n 24 --json-out run.json

Each question goes through ``Cascade.ask_async`` exactly as an application's
would; the cloud is a running ``stitch-cloud`` (``--cloud``: loopback, or a
host named again with ``--allow-remote``) or one this command starts on a free
loopback port and stops at the end (``--start-cloud``). A counting TCP relay
(``relay.CountingRelay``) sits between the SDK and the cloud unless
``--no-relay``, so the report sets the serialized message sizes beside the
bytes that really crossed the socket. The run stops by itself after ``-n``
questions or ``--max-seconds`` (no new question starts after that).

The report (markdown on stdout, then the same numbers as one JSON object on
the last stdout line and in ``--json-out``): exit rate; for escalated
requests, request bytes split into image / indices / other, reply bytes and
socket bytes; latency percentiles per route; throughput; errors per gRPC
status; accuracy when the questions carry labels (``synthetic:SPLIT``).
``--image-mode tiles`` and ``--jpeg-quality`` change the image the device
sends (and itself sees), to measure the bandwidth / accuracy trade-off.

The relay dials the target itself, so with ``--tls-root-cert`` the server's
certificate must also be valid for 127.0.0.1; otherwise use ``--no-relay``.
Failures of the cloud count as errors under their gRPC status (the SDK runs
with ``on_cloud_failure="raise"``), not as degraded answers. Torch-free: the
cloud and ``stitch-export`` run as subprocesses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stitchvlm.shared import synthetic, wire
from stitchvlm.shared.errors import RequestError
from stitchvlm.shared.layout import TilingConfig, cap_max_tiles
from stitchvlm.shared.model_files import read_tiling
from stitchvlm.shared.preprocess import compute_layout, decode_image

from .cloud_client import CloudError, GrpcCloudClient
from .relay import (
    CountingRelay,
    RelayCounts,
    cached_export,
    default_cache_dir,
    is_loopback,
    join_address,
    split_address,
    start_local_cloud,
)
from .runtime import CPU, EdgeModel
from .sdk import ON_FAILURE_RAISE, ROUTE_CLOUD, ROUTE_EDGE, Cascade, CascadeConfig

logger = logging.getLogger("stitchvlm.edge.loadtest")

IMAGE_ORIGINAL, IMAGE_TILES = "original", "tiles"
STATUS_OK = "OK"
EDGE_ERROR = "EDGE_ERROR"  # the edge refused the question (unreadable image, prompt too long)
AUTH_TOKEN_ENV = "STITCH_AUTH_TOKEN"
PERCENTILES = (50, 95, 99)


# ----------------------------------------------------------------------------- questions and images


@dataclass(frozen=True)
class Question:
    """One question of the run."""

    image: bytes  # encoded image as the device has it
    prompt: str  # the question
    answer: str | None  # the label, when known
    qtype: str  # question type ("" when unknown)


def load_questions(spec: str, n: int, seed: int = 0) -> list[Question]:
    """``synthetic:SPLIT`` (``shared.synthetic``, PNG-encoded) or a JSONL file of
    ``{"image": PATH, "question": ..., "answer": optional}`` (paths relative to the
    file), cycled to ``n`` questions."""
    if spec.startswith("synthetic:"):
        split = spec.split(":", 1)[1]
        return [
            Question(_png(example.image), example.question, example.answer, example.qtype)
            for example in synthetic.iter_dataset(split, n, seed)
        ]
    path = Path(spec)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no questions")
    image = lambda row: (path.parent / row["image"]).read_bytes()  # noqa: E731
    pool = [Question(image(row), row["question"], row.get("answer"), row.get("qtype", "")) for row in rows]
    return [pool[i % len(pool)] for i in range(n)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class PreparedImage:
    """The bytes the device sends for one question, and how they came about."""

    data: bytes  # what the SDK gets (and sends when escalating)
    source_bytes: int  # size of the question's own image
    resized: bool  # resized to the tile-grid canvas
    layout_fallback: bool  # tiles mode, but the resized image had another layout: sent unresized


def tile_grid_size(width: int, height: int, tiling: TilingConfig) -> tuple[int, int]:
    """(width, height) of the canvas the tiler cuts: grid_columns * tile x grid_rows * tile."""
    layout = compute_layout(width, height, tiling)
    return layout.grid_columns * layout.tile_size, layout.grid_rows * layout.tile_size


def prepare_image(data: bytes, tiling: TilingConfig, mode: str, jpeg_quality: int | None) -> PreparedImage:
    """The image as ``mode`` / ``jpeg_quality`` say the device should send it.

    ``original``: the bytes as they are (re-encoded as JPEG when a quality is
    given). ``tiles``: resized (BICUBIC, as the tiler resizes) to the tile-grid
    canvas when that is smaller than the image, which leaves the grid tiles as
    the cloud would cut them and changes only the thumbnail; kept unresized
    when the resized image would get another layout (the request's indices
    would point at other tokens), and counted. PNG unless ``jpeg_quality``.
    """
    if mode == IMAGE_ORIGINAL and jpeg_quality is None:
        return PreparedImage(data, len(data), resized=False, layout_fallback=False)
    picture = decode_image(data)  # RGB, EXIF rotation applied: the pixels both sides would see
    resized = fallback = False
    if mode == IMAGE_TILES:
        size = tile_grid_size(picture.width, picture.height, tiling)
        if size[0] * size[1] < picture.width * picture.height:
            if compute_layout(*size, tiling) == compute_layout(picture.width, picture.height, tiling):
                picture, resized = picture.resize(size, Image.Resampling.BICUBIC), True
            else:
                fallback = True
    if jpeg_quality is None and not resized:
        return PreparedImage(data, len(data), resized=False, layout_fallback=fallback)
    buffer = io.BytesIO()
    if jpeg_quality is None:
        picture.save(buffer, format="PNG")
    else:
        picture.save(buffer, format="JPEG", quality=jpeg_quality)
    return PreparedImage(buffer.getvalue(), len(data), resized=resized, layout_fallback=fallback)


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunOptions:
    """How the questions are driven (the cascade's own settings are CascadeConfig's)."""

    concurrency: int = 4  # questions in flight at once
    max_seconds: float = 300.0  # no question starts after this many seconds
    relay: bool = True  # count socket bytes through a CountingRelay
    tls_root_cert: bytes | None = None  # PEM to trust: TLS to the cloud when given
    auth_token: str | None = None  # bearer token for the cloud
    progress: bool = True  # a progress line on stderr


@dataclass(frozen=True)
class Outcome:
    """What happened to one question."""

    index: int  # position in the question list
    status: str  # "OK", a gRPC status name, or "EDGE_ERROR"
    route: str | None  # "edge" / "cloud" when answered
    s: float | None  # the gate's S when answered
    request_id: str  # the cloud request's id ("" when the cloud was not called or failed)
    latency_ms: float  # the SDK's total_ms when answered, else the wall time of the failed call
    cloud_ms: float  # the cloud round trip (0 on the edge route)
    request_bytes: dict[str, int] | None  # serialized request split (total, image, indices, other)
    reply_bytes: int | None  # serialized reply size
    kept: int | None  # visual tokens sent as kept
    num_visual_tokens: int | None  # |V|
    correct: bool | None  # final answer == label (None: unanswered or unlabelled)
    edge_correct: bool | None  # the small model's answer == label
    error: str | None  # the failure, when not OK


async def ask_one(cascade: Cascade, index: int, question: Question, image: bytes) -> Outcome:
    """One question through the cascade; failures become an Outcome, never an exception."""
    started = time.perf_counter()
    failed = dict(route=None, s=None, request_id="", cloud_ms=0.0, request_bytes=None, reply_bytes=None)
    failed.update(kept=None, num_visual_tokens=None, correct=None, edge_correct=None)
    try:
        result = await cascade.ask_async(image, question.prompt)
    except CloudError as error:
        elapsed = 1e3 * (time.perf_counter() - started)
        return Outcome(index, error.code.name, latency_ms=elapsed, error=str(error), **failed)
    except (ValueError, FileNotFoundError) as error:
        elapsed = 1e3 * (time.perf_counter() - started)
        return Outcome(index, EDGE_ERROR, latency_ms=elapsed, error=str(error), **failed)
    label = question.answer
    reply = result.cloud_reply
    return Outcome(
        index=index,
        status=STATUS_OK,
        route=result.route,
        s=result.s,
        request_id=result.request_id,
        latency_ms=result.timings["total_ms"],
        cloud_ms=result.timings["cloud_ms"],
        request_bytes=None if result.wire is None else dataclasses.asdict(result.wire),
        reply_bytes=None if reply is None else wire.reply_to_proto(reply).ByteSize(),
        kept=len(result.kept_indices),
        num_visual_tokens=result.num_visual_tokens,
        correct=None if label is None else synthetic.exact_match(result.answer, label),
        edge_correct=None if label is None else synthetic.exact_match(result.edge_answer, label),
        error=None,
    )


class Progress:
    """A one-line progress bar on stderr, redrawn with ``\\r`` at most ten times a second."""

    def __init__(self, total: int, enabled: bool = True, width: int = 28) -> None:
        self.total, self.enabled, self.width = total, enabled, width
        self.counts: Counter[str] = Counter()
        self.started = time.perf_counter()
        self._drawn = 0.0  # perf_counter() of the last redraw
        self._drawn_done = -1  # questions done at the last redraw

    def update(self, outcome: Outcome) -> None:
        self.counts[outcome.route if outcome.status == STATUS_OK else "errors"] += 1
        if self.enabled and time.perf_counter() - self._drawn > 0.1:
            self._draw()

    def finish(self) -> None:
        if self.enabled:
            if self._drawn_done != sum(self.counts.values()):
                self._draw()
            sys.stderr.write("\n")

    def _draw(self) -> None:
        self._drawn = time.perf_counter()
        self._drawn_done = done = sum(self.counts.values())
        filled, elapsed = int(self.width * done / max(1, self.total)), self._drawn - self.started
        c = self.counts
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} edge {c[ROUTE_EDGE]} "
            f"cloud {c[ROUTE_CLOUD]} errors {c['errors']} {done / max(elapsed, 1e-9):.1f} q/s {elapsed:.1f}s"
        )
        sys.stderr.flush()


async def drive(
    cascade: Cascade, questions: Sequence[Question], images: Sequence[bytes], options: RunOptions
) -> tuple[list[Outcome], float]:
    """Ask every question, ``options.concurrency`` at a time, until done or out of time.

    Returns the outcomes in completion order and the wall time in seconds.
    """
    progress = Progress(len(questions), options.progress)
    pending: Iterator[int] = iter(range(len(questions)))
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    deadline = started + options.max_seconds

    async def worker() -> None:
        while time.perf_counter() < deadline and (index := next(pending, None)) is not None:
            outcome = await ask_one(cascade, index, questions[index], images[index])
            outcomes.append(outcome)
            log_outcome(outcome)
            progress.update(outcome)

    await asyncio.gather(*(worker() for _ in range(options.concurrency)))
    progress.finish()
    return outcomes, time.perf_counter() - started


def log_outcome(outcome: Outcome) -> None:
    """One key=value line per question, the request id first (as the server logs it)."""
    fields = {"id": outcome.request_id or "-", "question": outcome.index, "status": outcome.status}
    if outcome.status == STATUS_OK:
        fields.update(route=outcome.route, s=f"{outcome.s:.4f}")
        if outcome.request_bytes is not None:
            fields.update(request_bytes=outcome.request_bytes["total"], reply_bytes=outcome.reply_bytes)
    fields.update(total_ms=round(outcome.latency_ms, 1), cloud_ms=round(outcome.cloud_ms, 1))
    if outcome.error:
        fields["message"] = json.dumps(outcome.error)
    logger.info("request %s", " ".join(f"{k}={v}" for k, v in fields.items()))


async def run_load(
    model: EdgeModel,
    questions: Sequence[Question],
    images: Sequence[bytes],
    cloud_address: str,
    config: CascadeConfig,
    options: RunOptions,
) -> tuple[list[Outcome], float, RelayCounts | None, dict]:
    """The whole run against ``cloud_address`` ("host:port"): outcomes, wall seconds,
    relay counts (None without relay) and the SDK's counters."""
    host, port = split_address(cloud_address)
    loop = asyncio.get_running_loop()
    # Each question holds at most one worker thread at a time (ONNX, then the gRPC call).
    loop.set_default_executor(ThreadPoolExecutor(options.concurrency + 1, thread_name_prefix="loadtest"))
    relay = CountingRelay(host, port) if options.relay else None
    if relay is not None:
        await relay.start()
    address = relay.address if relay is not None else cloud_address
    client = GrpcCloudClient(address, tls_root_cert=options.tls_root_cert, auth_token=options.auth_token)
    cascade = Cascade(model, client, dataclasses.replace(config, on_cloud_failure=ON_FAILURE_RAISE))
    try:
        outcomes, wall_s = await drive(cascade, questions, images, options)
    finally:
        client.close()
        counts = relay.counts() if relay is not None else None
        if relay is not None:
            await relay.close()
    return outcomes, wall_s, counts, dataclasses.asdict(cascade.stats())


# ----------------------------------------------------------------------------- the report


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "min": float(array.min()),
        "max": float(array.max()),
        "sum": float(array.sum()),
    }


def _latency(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    p = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    summary = {f"p{q}": float(v) for q, v in zip(PERCENTILES, p, strict=True)}
    return {"count": len(values), **summary, "mean": float(np.mean(values))}


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def build_report(
    outcomes: Sequence[Outcome],
    wall_s: float,
    relay: RelayCounts | None,
    sdk_stats: dict,
    *,
    planned: int,
    prepared: Sequence[PreparedImage],
    settings: dict,
) -> dict:
    """Every figure of the run as plain JSON-able values (see the module docstring)."""
    ok = [o for o in outcomes if o.status == STATUS_OK]
    edge = [o for o in ok if o.route == ROUTE_EDGE]
    cloud = [o for o in ok if o.route == ROUTE_CLOUD]
    errors = Counter(o.status for o in outcomes if o.status not in (STATUS_OK, EDGE_ERROR))
    edge_errors = sum(o.status == EDGE_ERROR for o in outcomes)
    # Every cloud error passed the gate first: it escalated.
    gated = len(ok) + sum(errors.values())
    escalations = len(cloud) + sum(errors.values())
    upstream = relay.upstream_bytes if relay else None
    downstream = relay.downstream_bytes if relay else None
    report = {
        "settings": settings,
        "counts": {
            "planned": planned,
            "answered": len(ok),
            "edge": len(edge),
            "cloud": len(cloud),
            "errors": dict(sorted(errors.items())),
            "edge_errors": edge_errors,
            "not_started": planned - len(outcomes),
        },
        "exit_rate": _rate(len(edge), gated),
        "throughput_qps": len(ok) / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
        "latency_ms": {
            ROUTE_EDGE: _latency([o.latency_ms for o in edge]),
            ROUTE_CLOUD: _latency([o.latency_ms for o in cloud]),
            "cloud_round_trip": _latency([o.cloud_ms for o in cloud]),
            "all": _latency([o.latency_ms for o in ok]),
        },
        "bytes": {
            "request": {
                part: _stats([o.request_bytes[part] for o in cloud])
                for part in ("total", "image", "indices", "other")
            },
            "reply": _stats([o.reply_bytes for o in cloud]),
            "kept_tokens": _stats([o.kept for o in cloud]),
            "socket": None
            if relay is None
            else {
                "upstream": upstream,
                "downstream": downstream,
                "connections": relay.connections,
                "escalations": escalations,
                "upstream_per_escalation": upstream / escalations if escalations else None,
                "downstream_per_escalation": downstream / escalations if escalations else None,
            },
        },
        "image": {
            "resized": sum(p.resized for p in prepared),
            "layout_fallbacks": sum(p.layout_fallback for p in prepared),
            "source_bytes": _stats([p.source_bytes for p in prepared]),
            "sent_bytes": _stats([len(p.data) for p in prepared]),
        },
        "accuracy": _accuracy(ok),
        "sdk_stats": sdk_stats,
        "requests": [dataclasses.asdict(o) for o in sorted(outcomes, key=lambda o: o.index)],
    }
    return report


def _accuracy(ok: Sequence[Outcome]) -> dict | None:
    labelled = [o for o in ok if o.correct is not None]
    if not labelled:
        return None

    def share(items: Sequence[Outcome], attr: str) -> float | None:
        return _rate(sum(bool(getattr(o, attr)) for o in items), len(items))

    escalated = [o for o in labelled if o.route == ROUTE_CLOUD]
    exited = [o for o in labelled if o.route == ROUTE_EDGE]
    return {
        "labelled": len(labelled),
        "final": share(labelled, "correct"),  # what the application shows
        "edge_model": share(labelled, "edge_correct"),  # the small model alone on every question
        "exited": share(exited, "correct"),  # answered on the edge
        "escalated_cloud": share(escalated, "correct"),  # the cloud on the questions it got
        "escalated_edge": share(escalated, "edge_correct"),  # the small model on those same questions
    }


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_report(report: dict) -> str:
    """The report as markdown tables for a person."""
    counts, size = report["counts"], report["bytes"]
    errors = ", ".join(f"{code} {n}" for code, n in counts["errors"].items()) or "none"
    lines = [
        "| run | value |",
        "| --- | --- |",
        f"| questions | {counts['planned']} planned, {counts['answered']} answered, "
        f"{counts['not_started']} not started |",
        f"| routes | edge {counts['edge']}, cloud {counts['cloud']} |",
        f"| exit rate | {_fmt(report['exit_rate'], 3)} |",
        f"| cloud errors by status | {errors} |",
        f"| edge errors | {counts['edge_errors']} |",
        f"| throughput | {_fmt(report['throughput_qps'], 2)} questions/s over {report['wall_s']:.1f} s |",
    ]
    if report["accuracy"] is not None:
        acc = report["accuracy"]
        lines.append(
            f"| accuracy | final {_fmt(acc['final'], 3)}, small model {_fmt(acc['edge_model'], 3)}, "
            f"escalated: cloud {_fmt(acc['escalated_cloud'], 3)} vs edge {_fmt(acc['escalated_edge'], 3)} |"
        )
    lines += ["", "| latency (ms) | n | p50 | p95 | p99 | mean |", "| --- | --- | --- | --- | --- | --- |"]
    for route, row in report["latency_ms"].items():
        if row is not None:
            cells = " | ".join(_fmt(row[k]) for k in ("p50", "p95", "p99", "mean"))
            lines.append(f"| {route} | {row['count']} | {cells} |")
    lines += ["", "| bytes per escalated request | mean | min | max |", "| --- | --- | --- | --- |"]
    rows = [(f"request {part}", size["request"][part]) for part in ("total", "image", "indices", "other")]
    for name, row in [*rows, ("reply", size["reply"]), ("kept visual tokens", size["kept_tokens"])]:
        if row is not None:
            lines.append(f"| {name} | {_fmt(row['mean'])} | {_fmt(row['min'], 0)} | {_fmt(row['max'], 0)} |")
    socket = size["socket"]
    if socket is not None:
        lines.append(f"| socket up (relay) | {_fmt(socket['upstream_per_escalation'])} | | |")
        lines.append(f"| socket down (relay) | {_fmt(socket['downstream_per_escalation'])} | | |")
    image = report["image"]
    lines.append(
        f"\nimage: {report['settings']['image_mode']}, jpeg quality {report['settings']['jpeg_quality'] or '-'}; "
        f"{_fmt(image['source_bytes']['mean'] if image['source_bytes'] else None)} -> "
        f"{_fmt(image['sent_bytes']['mean'] if image['sent_bytes'] else None)} bytes on average, "
        f"{image['resized']} resized, {image['layout_fallbacks']} layout fallbacks"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stitch-loadtest", description="Load test of the Stitch cascade: edge SDK against a cloud."
    )
    edge = parser.add_mutually_exclusive_group(required=True)
    edge.add_argument("--edge", type=Path, help="edge export directory (stitch-export --out)")
    edge.add_argument("--edge-model", type=Path, help="small checkpoint: exported once into --cache-dir")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where --edge-model exports go")
    cloud = parser.add_mutually_exclusive_group(required=True)
    cloud.add_argument("--cloud", help="HOST:PORT of a running stitch-cloud (loopback unless --allow-remote)")
    cloud.add_argument("--start-cloud", type=Path, metavar="MODEL_DIR", help="start stitch-cloud on loopback")
    parser.add_argument(
        "--allow-remote", action="append", default=[], metavar="HOST", help="non-loopback host to allow"
    )
    parser.add_argument("--cloud-arg", action="append", default=[], help="extra stitch-cloud serve argument")
    parser.add_argument("--cloud-log", type=Path, help="log file of the started cloud (default: a temp file)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for the cloud to serve")
    parser.add_argument("--questions", default="synthetic:test", help="synthetic:SPLIT or a JSONL file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic questions")
    parser.add_argument("-n", "--num-questions", type=int, default=100, help="questions to ask")
    parser.add_argument("-c", "--concurrency", type=int, default=4, help="questions in flight at once")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="no question starts after this")
    parser.add_argument("--tau", type=float, default=CascadeConfig.tau, help="SEE threshold")
    parser.add_argument(
        "--retention", type=float, default=CascadeConfig.retention, help="R sent to the cloud"
    )
    parser.add_argument("--max-new-tokens", type=int, default=CascadeConfig.max_new_tokens)
    parser.add_argument(
        "--timeout", type=float, default=CascadeConfig.cloud_timeout_s, help="cloud deadline, s"
    )
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        metavar="N",
        help="at most N grid tiles per image on the edge, and on a --start-cloud cloud (a --cloud "
        "must run with the same stitch-cloud --max-tiles)",
    )
    parser.add_argument("--image-mode", choices=[IMAGE_ORIGINAL, IMAGE_TILES], default=IMAGE_ORIGINAL)
    parser.add_argument("--jpeg-quality", type=int, default=None, help="re-encode the image as JPEG (1-95)")
    parser.add_argument("--no-relay", action="store_true", help="dial the cloud directly (no socket bytes)")
    parser.add_argument("--tls-root-cert", type=Path, help="PEM certificate to trust: TLS when given")
    parser.add_argument("--auth-token", default=os.environ.get(AUTH_TOKEN_ENV) or None, help="bearer token")
    parser.add_argument("--cpu", action="store_true", help="ONNX Runtime on the CPU even when CUDA is there")
    parser.add_argument("--json-out", type=Path, help="also write the JSON report here")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CascadeConfig:
    """Refuse bad values and non-loopback targets not named by --allow-remote (exit 2)."""
    if args.num_questions < 1 or args.concurrency < 1 or args.max_seconds <= 0:
        parser.error("-n and -c must be >= 1 and --max-seconds > 0")
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 95:
        parser.error("--jpeg-quality must be in 1..95")
    for flag, path in (
        ("--edge", args.edge),
        ("--edge-model", args.edge_model),
        ("--start-cloud", args.start_cloud),
    ):
        if path is not None and not path.is_dir():
            parser.error(f"{flag} {path}: no such directory")
    if args.cloud is not None:
        try:
            host, _ = split_address(args.cloud)
        except ValueError as error:
            parser.error(f"--cloud: {error}")
        if not is_loopback(host) and host not in args.allow_remote:
            parser.error(
                f"--cloud {args.cloud} is not loopback; name it with --allow-remote {host} to load it"
            )
    if args.max_tiles is not None:
        check_max_tiles(parser, args)
    try:
        return CascadeConfig(
            tau=args.tau,
            retention=args.retention,
            max_new_tokens=args.max_new_tokens,
            cloud_timeout_s=args.timeout,
            max_tiles=args.max_tiles,
        )
    except ValueError as error:
        parser.error(str(error))


def check_max_tiles(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--max-tiles within every given model's min_tiles..max_tiles (exit 2), before anything loads."""
    for flag, path in (
        ("--edge", args.edge),
        ("--edge-model", args.edge_model),
        ("--start-cloud", args.start_cloud),
    ):
        if path is None:
            continue
        try:  # an export directory holds the checkpoint's config files too
            cap_max_tiles(read_tiling(path), args.max_tiles)
        except FileNotFoundError as error:
            parser.error(f"{flag} {path}: {error}")
        except ValueError as error:
            parser.error(f"--max-tiles {args.max_tiles} for {flag} {path}: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 after a completed run (request errors are in the report), 1 when nothing could run, 2 usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = check_args(parser, args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "auth_token"}
    with contextlib.ExitStack() as stack:
        cloud = None
        if args.start_cloud is not None:  # first: its weights load while the edge model is prepared
            fd, log = tempfile.mkstemp(prefix="stitch-cloud-", suffix=".log")
            os.close(fd)
            settings["cloud_log"] = str(args.cloud_log or log)
            cloud_args = args.cloud_arg + (
                [] if args.max_tiles is None else ["--max-tiles", str(args.max_tiles)]
            )
            cloud = start_local_cloud(args.start_cloud, cloud_args, Path(settings["cloud_log"]))
            stack.callback(cloud.stop)
        try:
            edge_dir = args.edge or cached_export(args.edge_model, args.cache_dir or default_cache_dir())
            model = EdgeModel.load(edge_dir, providers=[CPU] if args.cpu else None, max_tiles=args.max_tiles)
            questions = load_questions(args.questions, args.num_questions, args.seed)
            tiling = model.files.tiling
            prepared = [prepare_image(q.image, tiling, args.image_mode, args.jpeg_quality) for q in questions]
            if cloud is not None:
                cloud.wait_serving(args.startup_timeout)
        except (OSError, ValueError, RuntimeError, RequestError, subprocess.CalledProcessError) as error:
            print(f"stitch-loadtest: {error}", file=sys.stderr)
            return 1
        address = cloud.address if cloud is not None else join_address(*split_address(args.cloud))
        options = RunOptions(
            concurrency=args.concurrency,
            max_seconds=args.max_seconds,
            relay=not args.no_relay,
            tls_root_cert=args.tls_root_cert.read_bytes() if args.tls_root_cert else None,
            auth_token=args.auth_token,
            progress=not args.no_progress,
        )
        images = [p.data for p in prepared]
        run = asyncio.run(run_load(model, questions, images, address, config, options))
    settings.update(edge=str(edge_dir), cloud=address, tau=config.tau, retention=config.retention)
    report = build_report(*run, planned=len(questions), prepared=prepared, settings=settings)
    line = json.dumps(report, allow_nan=False)
    if args.json_out is not None:
        args.json_out.write_text(line + "\n")
    print(markdown_report(report))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
