"""``stitch-edge``: the edge's command line (the only place that parses its arguments).

``stitch-edge ask --model EDGE_DIR --image PATH --prompt TEXT [--cloud HOST:PORT[,HOST:PORT...] ...]``
answers one question through ``sdk.Cascade`` and prints a short summary, or
with ``--json`` one JSON object holding the answer, the route, the gate's
scores, the edge's token probabilities and full visual-score vector, the kept
indices, the bytes sent, and the timings. Also ``python -m stitchvlm.edge.cli``.

Exit codes: 0 answered (also when degraded to the edge's answer), 1 the cloud
failed under ``--on-cloud-failure raise``, 2 bad arguments, a missing file, an
export directory that does not load, or an image/prompt the model refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from stitchvlm.shared.token_file import read_token_file

from .cloud_client import CloudError, GrpcCloudClient
from .gate import DEFAULT_CONSISTENCY_RETENTION, DEFAULT_TAU
from .runtime import CPU, EdgeModel
from .sdk import ON_FAILURE_DEGRADE, ON_FAILURE_RAISE, Cascade, CascadeConfig, Result

AUTH_TOKEN_ENV = "STITCH_AUTH_TOKEN"  # the same variable stitch-cloud reads its token from
EXIT_OK, EXIT_CLOUD_FAILED = 0, 1  # usage errors exit 2 through argparse


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
        "--cloud",
        default=None,
        help="HOST:PORT of stitch-cloud, or replicas to balance over (HOST:PORT,HOST:PORT or "
        "dns:///NAME:PORT); without it every answer is local",
    )
    ask.add_argument("--tau", type=float, default=DEFAULT_TAU, help="exit on the edge when S >= tau")
    ask.add_argument("--retention", type=float, default=0.09, help="R: share of visual tokens sent as kept")
    ask.add_argument(
        "--consistency-retention",
        type=float,
        default=DEFAULT_CONSISTENCY_RETENTION,
        help="r_c: share of visual tokens in the gate's consistency pass",
    )
    ask.add_argument("--max-new-tokens", type=int, default=32, help="generation budget, edge and cloud")
    ask.add_argument(
        "--timeout", type=float, default=10.0, help="cloud deadline in seconds, retries included"
    )
    ask.add_argument(
        "--on-cloud-failure",
        choices=[ON_FAILURE_DEGRADE, ON_FAILURE_RAISE],
        default=ON_FAILURE_DEGRADE,
        help="degrade: answer locally (exit 0); raise: report the error (exit 1)",
    )
    ask.add_argument(
        "--tls-root-cert", type=Path, help="PEM certificate to trust: TLS to the cloud when given"
    )
    auth = ask.add_mutually_exclusive_group()
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
    ask.add_argument("--cpu", action="store_true", help="run ONNX Runtime on the CPU even when CUDA is there")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    ask.add_argument(
        "--stream", action="store_true", help="print the answer as it is generated, then the summary"
    )
    ask.set_defaults(command_parser=ask)  # usage errors then show the subcommand's usage
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CascadeConfig:
    """Check files and values; exit 2 through ``parser.error`` when wrong."""
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: no such directory")
    if not args.image.is_file():
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
            tau=args.tau,
            retention=args.retention,
            consistency_retention=args.consistency_retention,
            max_new_tokens=args.max_new_tokens,
            cloud_timeout_s=args.timeout,
            on_cloud_failure=args.on_cloud_failure,
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


def ask(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = config_from_args(parser, args)
    try:
        model = EdgeModel.load(args.model, providers=[CPU] if args.cpu else None)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--model {args.model}: not a usable export directory: {error}")
    cloud = None
    if args.cloud:
        root_cert = args.tls_root_cert.read_bytes() if args.tls_root_cert else None
        try:
            cloud = GrpcCloudClient(args.cloud, tls_root_cert=root_cert, auth_token=args.auth_token)
        except ValueError as error:  # a malformed or unresolvable replica list
            parser.error(f"--cloud {args.cloud}: {error}")
    with Cascade(model, cloud, config) as cascade:
        try:
            result = stream_answer(cascade, args) if args.stream else cascade.ask(args.image, args.prompt)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        except CloudError as error:
            print(f"stitch-edge: cloud failed: {error}", file=sys.stderr)
            return EXIT_CLOUD_FAILED
        finally:
            if cloud is not None:
                cloud.close()
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return ask(args.command_parser, args)  # "ask" is the one command; argparse refuses any other


if __name__ == "__main__":
    sys.exit(main())
