"""Container health check: exit 0 when a gRPC health service says SERVING, else 1.

    python /usr/local/bin/stitch-health-probe --address 127.0.0.1:50051

Asks the standard ``grpc.health.v1.Health/Check`` (for ``--service``, "" = the
whole server), which ``stitch-cloud`` answers NOT_SERVING while the weights
load and while it shuts down, and which needs no bearer token. Uses only
grpcio and grpcio-health-checking, which both images install; nothing is
downloaded. Prints one line saying what it saw, for ``docker inspect``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(address: str, service: str = "", timeout_s: float = 3.0, root_cert: bytes | None = None) -> str:
    """The status name the server reports for ``service``; ``grpc.RpcError`` when it does not answer."""
    if root_cert is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_cert))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stitch-health-probe", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    parser.add_argument("--service", default="", help='service name to ask about ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-root-cert", type=Path, help="PEM certificate to trust: TLS when given")
    args = parser.parse_args(argv)
    root_cert = args.tls_root_cert.read_bytes() if args.tls_root_cert else None
    try:
        status = probe(args.address, args.service, args.timeout, root_cert)
    except grpc.RpcError as error:
        print(f"{args.address}: no answer ({error.code().name})")
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
