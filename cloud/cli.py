"""``stitch-cloud``: the cloud's command line (the only place that parses arguments).

``stitch-cloud serve --model DIR`` runs the gRPC service (``server.serve``)
until SIGTERM/SIGINT. Also reachable as ``python -m stitchvlm.cloud.cli``.
It does not load anything itself: it turns flags into ``ServerConfig`` and
``EngineConfig`` and hands them over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..shared.layout import cap_max_tiles
from ..shared.model_files import read_tiling
from ..shared.token_file import read_token_file
from .engine import DEVICE_MAPS, DTYPES, EngineConfig, device_map_available
from .lifecycle import serve
from .server import ServerConfig

AUTH_TOKEN_ENV = "STITCH_AUTH_TOKEN"


def prune_layer(text: str) -> float:
    """``"2"`` -> layer 2; ``"0.1"`` -> 10% of the depth (the engine resolves the fraction)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value.is_integer() and value >= 0:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"expected a layer index >= 0 or a fraction in (0, 1), got {text!r}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stitch-cloud", description="Stitch cloud: the pruned large VLM over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve stitch.v1.Cascade (plus health and reflection)")
    model = serve_cmd.add_argument_group("model")
    model.add_argument("--model", type=Path, required=True, help="Hugging Face InternVL checkpoint directory")
    model.add_argument("--model-id", default="", help="id requests name (default: the directory name)")
    model.add_argument(
        "--prune-layer", type=prune_layer, default=2, help="K: layer index (2) or fraction of depth (0.1)"
    )
    model.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    model.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        default=None,
        help="spread the model over this machine's GPUs with accelerate (auto); replaces --device",
    )
    model.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    model.add_argument(
        "--max-tiles",
        type=positive_int,
        default=None,
        metavar="N",
        help="cut each image into at most N grid tiles (+ thumbnail), below the checkpoint's max_tiles: "
        "less vision work, fewer pixels seen. Edges must run with the same --max-tiles",
    )
    model.add_argument(
        "--max-new-tokens", type=positive_int, default=256, help="largest budget a request may ask"
    )
    net = serve_cmd.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all)")
    net.add_argument("--port", type=non_negative_int, default=50051, help="0 picks a free port")
    model.add_argument(
        "--max-image-mpx", type=float, default=16.0, help="largest decoded image accepted, megapixels"
    )
    batch = serve_cmd.add_argument_group("batching")
    batch.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=8,
        help="sequences decoded together in one forward pass",
    )
    batch.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=8192,
        help="prompt tokens prefilled per step between decode steps (a longer prompt runs alone)",
    )
    batch.add_argument(
        "--max-queue", type=non_negative_int, default=8, help="requests that may wait beyond a full batch"
    )
    net.add_argument("--max-message-mb", type=float, default=32.0, help="largest request accepted, MiB")
    net.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    net.add_argument(
        "--metrics-port",
        type=non_negative_int,
        default=None,
        help="serve Prometheus /metrics on this port of --host (0 picks a free one; default: off)",
    )
    net.add_argument("--tls-cert", type=Path, help="PEM certificate chain (TLS when given, with --tls-key)")
    net.add_argument("--tls-key", type=Path, help="PEM private key")
    auth = net.add_mutually_exclusive_group()
    auth.add_argument(
        "--auth-token",
        default=os.environ.get(AUTH_TOKEN_ENV) or None,
        help=f"bearer token clients must send (default: ${AUTH_TOKEN_ENV}; none = no auth). "
        "Visible in the process list: prefer --auth-token-file or the variable",
    )
    auth.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help=f"file holding the bearer token (e.g. a mounted secret); wins over ${AUTH_TOKEN_ENV}",
    )
    serve_cmd.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def configs_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[ServerConfig, EngineConfig]:
    """Check the flags that need the file system; exit 2 through ``parser.error`` when wrong."""
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: no such directory")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.device_map is not None:
        if not device_map_available():
            parser.error("--device-map needs accelerate, which is not installed (pip install accelerate)")
        if args.device != "cpu":
            parser.error("--device-map places the model itself; drop --device")
    if args.max_tiles is not None:  # checked here so a bad cap exits 2 before the weights load
        try:
            tiling = read_tiling(args.model)
        except (FileNotFoundError, ValueError) as error:
            parser.error(f"--model {args.model}: {error}")
        try:
            cap_max_tiles(tiling, args.max_tiles)
        except ValueError as error:  # above the checkpoint's max_tiles or below its min_tiles
            parser.error(f"--max-tiles {args.max_tiles}: {error}")
    if args.max_message_mb <= 0:
        parser.error("--max-message-mb must be > 0")
    if args.max_image_mpx <= 0:
        parser.error("--max-image-mpx must be > 0")
    if args.auth_token_file is not None:
        try:
            args.auth_token = read_token_file(args.auth_token_file)
        except (FileNotFoundError, ValueError) as error:
            parser.error(f"--auth-token-file {args.auth_token_file}: {error}")
    try:
        return _configs(args)
    except ValueError as error:  # a value the config classes refuse
        parser.error(str(error))


def _configs(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    server = ServerConfig(
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        grace_seconds=args.grace,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token=args.auth_token or None,  # an empty token means no auth
        metrics_port=args.metrics_port,
    )
    engine = EngineConfig(
        model_dir=args.model,
        prune_layer=args.prune_layer,
        device=args.device,
        device_map=args.device_map,
        dtype=args.dtype,
        max_new_tokens_limit=args.max_new_tokens,
        max_image_pixels=int(args.max_image_mpx * 1e6),
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        model_id=args.model_id,
        max_tiles=args.max_tiles,
    )
    return server, engine


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    server_config, engine_config = configs_from_args(parser, args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    code = asyncio.run(serve(server_config, engine_config))
    exit_now(code)


def exit_now(code: int) -> None:
    """End the process with ``code`` once logs and stdout are flushed, skipping interpreter teardown.

    ``serve`` has stopped the server, the batching loop and every thread that
    matters; unloading torch and grpc afterwards took 1-4 s on a loaded 2-core
    machine, which would push the exit past the grace period an orchestrator
    allows (SIGKILL after ``terminationGracePeriodSeconds``).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
