"""``stitch-edge``: the edge's command line (the only place that parses its arguments).

``stitch-edge ask --model EDGE_DIR --image PATH --prompt TEXT [--cloud HOST:PORT[,HOST:PORT...] ...]``
answers one question through ``sdk.Cascade`` and prints a short summary, or
with ``--json`` one JSON object holding the answer, the route, the gate's
scores, the edge's token probabilities and full visual-score vector, the kept
indices, the bytes sent, and the timings. ``--tau`` defaults to the export's
calibrated threshold when there is one. ``--max-tiles N`` cuts each image into
at most N grid tiles (the cloud must be started with the same ``--max-tiles``).

``stitch-edge calibrate --model EDGE_DIR --questions synthetic:val --cloud HOST:PORT
--target-agreement 0.95`` runs a question set once (every question escalated),
prints exit rate, cloud load, agreement with the cloud and accuracy (labelled
questions) for a sweep of tau, picks the tau that meets the target with the
most exits, and writes it to ``EDGE_DIR/stitch_calibration.json``. Also
``python -m stitchvlm.edge.cli``.

Exit codes: 0 answered (also when degraded to the edge's answer), 1 the cloud
failed under ``--on-cloud-failure raise``, 2 bad arguments, a missing file, an
export directory that does not load, or an image/prompt the model refuses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from stitchvlm.shared.token_file import read_token_file

from . import calibrate
from .calibrate import CALIBRATION_FILE, Calibration, read_calibration
from .cloud_client import CloudError, GrpcCloudClient
from .gate import DEFAULT_CONSISTENCY_RETENTION, DEFAULT_TAU
from .loadtest import load_questions
from .runtime import CPU, EdgeModel
from .sdk import ON_FAILURE_DEGRADE, ON_FAILURE_RAISE, Cascade, CascadeConfig, Result

AUTH_TOKEN_ENV = "STITCH_AUTH_TOKEN"  # the same variable stitch-cloud reads its token from
EXIT_OK, EXIT_CLOUD_FAILED = 0, 1  # usage errors exit 2 through argparse


def add_generation_arguments(command: argparse.ArgumentParser) -> None:
    """R, r_c and the token budget, shared by ask and calibrate (calibrate with what ask will run)."""
    command.add_argument(
        "--retention", type=float, default=0.09, help="R: share of visual tokens sent as kept"
    )
    command.add_argument(
        "--consistency-retention",
        type=float,
        default=DEFAULT_CONSISTENCY_RETENTION,
        help="r_c: share of visual tokens in the gate's consistency pass",
    )
    command.add_argument("--max-new-tokens", type=int, default=32, help="generation budget, edge and cloud")


def tile_count(text: str) -> int:
    """A ``--max-tiles`` value: an integer >= 1 (the checkpoint's own range is checked once it is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_tiling_argument(command: argparse.ArgumentParser) -> None:
    """--max-tiles, shared by ask and calibrate; stitch-cloud serve must get the same value."""
    command.add_argument(
        "--max-tiles",
        type=tile_count,
        default=None,
        metavar="N",
        help="cut each image into at most N grid tiles (+ thumbnail), below the checkpoint's max_tiles: "
        "less vision work, fewer pixels seen. Give stitch-cloud serve the same --max-tiles",
    )


def add_cloud_arguments(command: argparse.ArgumentParser) -> None:
    """--cloud, --timeout, TLS and bearer-token flags, shared by ask and calibrate."""
    command.add_argument(
        "--cloud",
        default=None,
        help="HOST:PORT of stitch-cloud, or replicas to balance over (HOST:PORT,HOST:PORT or "
        "dns:///NAME:PORT); without it every answer is local",
    )
    command.add_argument(
        "--timeout", type=float, default=10.0, help="cloud deadline in seconds, retries included"
    )
    command.add_argument(
        "--tls-root-cert", type=Path, help="PEM certificate to trust: TLS to the cloud when given"
    )
    auth = command.add_mutually_exclusive_group()
    auth.add_argument(
        "--auth-token",
        default=os.environ.get(AUTH_TOKEN_ENV) or None,
        help=f"bearer token for the cloud (default: ${AUTH_TOKEN_ENV}). "
        "Visible in the process list: prefer --auth-token-file or the variable",
    )
    auth.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help=f"file holding the bearer token for the cloud; wins over ${AUTH_TOKEN_ENV}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stitch-edge", description="Stitch edge: the small VLM and the SEE gate."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="answer one question about one image")
    ask.add_argument("--model", type=Path, required=True, help="export directory (stitch-export --out)")
    ask.add_argument("--image", type=Path, required=True, help="image file (PNG, JPEG, WebP, BMP, GIF)")
    ask.add_argument("--prompt", required=True, help="the question")
    ask.add_argument(
        "--tau",
        type=float,
        default=None,
        help=f"exit on the edge when S >= tau (default: the export's {CALIBRATION_FILE} when "
        f"stitch-edge calibrate wrote one, else {DEFAULT_TAU})",
    )
    add_generation_arguments(ask)
    add_tiling_argument(ask)
    ask.add_argument(
        "--on-cloud-failure",
        choices=[ON_FAILURE_DEGRADE, ON_FAILURE_RAISE],
        default=ON_FAILURE_DEGRADE,
        help="degrade: answer locally (exit 0); raise: report the error (exit 1)",
    )
    add_cloud_arguments(ask)
    ask.add_argument("--cpu", action="store_true", help="run ONNX Runtime on the CPU even when CUDA is there")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    ask.add_argument(
        "--stream", action="store_true", help="print the answer as it is generated, then the summary"
    )
    ask.set_defaults(command_parser=ask, run=run_ask)  # usage errors then show the subcommand's usage

    cal = commands.add_parser("calibrate", help="sweep tau on a question set and pick one for a target")
    cal.add_argument("--model", type=Path, required=True, help="export directory (stitch-export --out)")
    cal.add_argument(
        "--questions",
        default="synthetic:val",
        help="synthetic:SPLIT or a JSONL file of image/question/answer",
    )
    cal.add_argument("-n", type=int, default=100, help="questions to run")
    add_generation_arguments(cal)
    add_tiling_argument(cal)
    add_cloud_arguments(cal)
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-exit-rate", type=float, help="exit on the edge at most this share")
    target.add_argument(
        "--target-agreement", type=float, help="agree with the cloud alone at least this often"
    )
    target.add_argument(
        "--target-accuracy", type=float, help="be right at least this often (labelled questions)"
    )
    cal.add_argument(
        "--out", type=Path, help=f"where to write the result (default: MODEL/{CALIBRATION_FILE})"
    )
    cal.add_argument("--cpu", action="store_true", help="run ONNX Runtime on the CPU even when CUDA is there")
    cal.set_defaults(command_parser=cal, run=run_calibrate)
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, tau: float) -> CascadeConfig:
    """Check files and values; exit 2 through ``parser.error`` when wrong."""
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: no such directory")
    if getattr(args, "image", None) is not None and not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    if args.tls_root_cert is not None and not args.tls_root_cert.is_file():
        parser.error(f"--tls-root-cert {args.tls_root_cert}: no such file")
    if args.auth_token_file is not None:
        try:
            args.auth_token = read_token_file(args.auth_token_file)
        except (FileNotFoundError, ValueError) as error:
            parser.error(f"--auth-token-file {args.auth_token_file}: {error}")
    try:
        return CascadeConfig(
            tau=tau,
            retention=args.retention,
            consistency_retention=args.consistency_retention,
            max_new_tokens=args.max_new_tokens,
            cloud_timeout_s=args.timeout,
            on_cloud_failure=getattr(args, "on_cloud_failure", ON_FAILURE_DEGRADE),
            max_tiles=args.max_tiles,
        )
    except ValueError as error:
        parser.error(str(error))


def result_json(result: Result) -> dict:
    """The ``--json`` object: plain numbers and lists only."""
    reply = result.cloud_reply
    return {
        "answer": result.answer,
        "route": result.route,
        "s_conf": result.s_conf,
        "s_cons": result.s_cons,
        "s": result.s,
        "tau": result.tau,
        "edge_answer": result.edge_answer,
        "edge_token_ids": list(result.edge_token_ids),
        "token_probs": result.token_probs.tolist(),
        "num_visual_tokens": result.num_visual_tokens,
        "visual_scores": result.visual_scores.tolist(),
        "kept_indices": result.kept_indices.tolist(),
        "bytes_sent": result.bytes_sent,
        "wire": None if result.wire is None else vars(result.wire),
        "degraded": result.degraded,
        "error": result.error,
        "request_id": result.request_id,
        "cloud": None
        if reply is None
        else {
            "model": reply.model,
            "token_ids": list(reply.token_ids),
            "prompt_tokens": reply.prompt_tokens,
            "pruned_prompt_tokens": reply.pruned_prompt_tokens,
            "kept_visual_tokens": reply.kept_visual_tokens,
            "prune_layer": reply.prune_layer,
            "timings": vars(reply.timings),
        },
        "timings": result.timings,
    }


def summary(result: Result) -> str:
    """A few lines for a person."""
    comparison = ">=" if result.s >= result.tau else "<"
    lines = [f"answer: {result.answer}"]
    if result.degraded:
        lines.append(f"route: edge, DEGRADED (cloud failed: {result.error})")
    else:
        lines.append(f"route: {result.route}")
    lines.append(
        f"gate: S={result.s:.4f} {comparison} tau={result.tau:g} (S_conf={result.s_conf:.4f}, S_cons={result.s_cons:.3g})"
    )
    if result.route == "cloud" or result.degraded:
        lines.append(f"edge answer: {result.edge_answer}")
    lines.append(
        f"kept {len(result.kept_indices)}/{result.num_visual_tokens} visual tokens, sent {result.bytes_sent} bytes"
    )
    lines.append(
        "time: " + ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in result.timings.items())
    )
    return "\n".join(lines)


def calibration_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Calibration | None:
    """The export's calibration, read once, when ``--tau`` is not given (None when there is none)."""
    if args.tau is not None:
        return None
    try:
        return read_calibration(args.model)
    except ValueError as error:  # unreadable JSON or not a calibration: recalibrate, or give --tau
        parser.error(f"{error}: run stitch-edge calibrate again, or give --tau")


def warn_if_calibrated_otherwise(
    calibration: Calibration | None, config: CascadeConfig, model: EdgeModel
) -> None:
    """On stderr, when tau comes from the export's calibration and this run computes S otherwise."""
    changed = calibrate.differences(calibration, calibrate.settings_of(config, model)) if calibration else []
    if changed:
        print(
            f"stitch-edge: warning: tau {calibration.tau:.4f} was calibrated with other settings "
            f"({'; '.join(changed)}), so S is not on the same scale: run stitch-edge calibrate again "
            "with these flags, or give --tau",
            file=sys.stderr,
        )


@contextlib.contextmanager
def open_cascade(
    parser: argparse.ArgumentParser, args: argparse.Namespace, config: CascadeConfig
) -> Iterator[Cascade]:
    """The export and the cloud client the flags name, as a ``Cascade``; the client is closed on exit."""
    try:
        model = EdgeModel.load(args.model, providers=[CPU] if args.cpu else None)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--model {args.model}: not a usable export directory: {error}")
    try:
        model = model.with_max_tiles(args.max_tiles)
    except ValueError as error:  # above the checkpoint's max_tiles or below its min_tiles
        parser.error(f"--max-tiles {args.max_tiles}: {error}")
    cloud = None
    if args.cloud:
        root_cert = args.tls_root_cert.read_bytes() if args.tls_root_cert else None
        try:
            cloud = GrpcCloudClient(args.cloud, tls_root_cert=root_cert, auth_token=args.auth_token)
        except ValueError as error:  # a malformed or unresolvable replica list
            parser.error(f"--cloud {args.cloud}: {error}")
    try:
        with Cascade(model, cloud, config) as cascade:
            yield cascade
    finally:
        if cloud is not None:  # given to the Cascade, not made by it: closed here
            cloud.close()


def run_ask(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    calibration = calibration_of(parser, args)
    tau = args.tau if args.tau is not None else calibration.tau if calibration is not None else DEFAULT_TAU
    config = config_from_args(parser, args, tau)
    with open_cascade(parser, args, config) as cascade:
        warn_if_calibrated_otherwise(calibration, config, cascade.model)
        try:
            result = stream_answer(cascade, args) if args.stream else cascade.ask(args.image, args.prompt)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        except CloudError as error:
            print(f"stitch-edge: cloud failed: {error}", file=sys.stderr)
            return EXIT_CLOUD_FAILED
    print(json.dumps(result_json(result), allow_nan=False) if args.json else summary(result))
    return EXIT_OK


def stream_answer(cascade: Cascade, args: argparse.Namespace) -> Result:
    """Print the answer's text as its chunks arrive (stderr for --json, whose stdout is one object)."""
    out = sys.stderr if args.json else sys.stdout
    result = None
    for chunk in cascade.stream(args.image, args.prompt):
        print(chunk.text, end="", file=out, flush=True)
        result = chunk.result or result
    print(file=out, flush=True)
    return result


def run_calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Observe every question once (the cloud asked for each), sweep tau, pick, print, save."""
    if args.n < 1:
        parser.error("-n must be >= 1")
    # tau never exits while observing; the old calibration (if any, even a corrupt one) is not read: it is replaced
    config = config_from_args(parser, args, calibrate.NEVER_EXIT)
    target, value = next(
        (name, getattr(args, f"target_{name}"))
        for name in ("exit_rate", "agreement", "accuracy")
        if getattr(args, f"target_{name}") is not None
    )
    try:
        questions = load_questions(args.questions, args.n)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--questions {args.questions}: {error}")
    if args.cloud is None and target != "exit_rate":
        parser.error(f"--target-{target.replace('_', '-')} needs --cloud (the cloud's answers)")
    with open_cascade(parser, args, config) as cascade:
        model = cascade.model
        try:
            observations = calibrate.observe(
                cascade, ((q.image, q.prompt, q.answer) for q in progress_of(questions))
            )
        except CloudError as error:
            print(f"stitch-edge: cloud failed: {error}", file=sys.stderr)
            return EXIT_CLOUD_FAILED
    rows = calibrate.sweep(observations)
    try:
        chosen = calibrate.pick(rows, target, value)
    except ValueError as error:
        print(f"stitch-edge: {error}", file=sys.stderr)
        print(calibrate.table(rows))
        return EXIT_CLOUD_FAILED
    out = args.out or args.model / calibrate.CALIBRATION_FILE
    result = calibrate.Calibration(
        tau=chosen.tau,
        target=target,
        target_value=value,
        questions=len(observations),
        retention=config.retention,
        chosen=chosen,
        sweep=rows,
        **calibrate.settings_of(config, model),
    )
    calibrate.save(result, out)
    print(calibrate.table(rows, chosen))
    print(
        f"\ntau = {chosen.tau:.4f} for {target} {value:g}: exit rate {chosen.exit_rate:.3f}, "
        f"cloud load {chosen.cloud_load:.3f} on {len(observations)} questions; written to {out}"
    )
    return EXIT_OK


def progress_of(questions: list) -> Iterator:
    """The questions, with a progress line on stderr every tenth of the way."""
    step = max(1, len(questions) // 10)
    for i, question in enumerate(questions, 1):
        yield question
        if i % step == 0 or i == len(questions):
            print(f"calibrate: {i}/{len(questions)} questions", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args.command_parser, args)


if __name__ == "__main__":
    sys.exit(main())
