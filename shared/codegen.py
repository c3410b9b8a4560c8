"""Generate the gRPC stubs in ``shared/pb`` from ``proto/stitch/v1/*.proto``.

The one codegen step of the project: ``python -m stitchvlm.shared.codegen``
(needs the ``dev`` extra for ``grpcio-tools``). protoc writes absolute imports
(``from stitch.v1 import cascade_pb2``); ``stitch`` is not our import name, so
they are rewritten to relative ones. ``tests/test_stubs.py`` regenerates into a
temporary folder and fails when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_PACKAGE_DIR = Path("stitch") / "v1"
OUT_DIR = REPO / "shared" / "pb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto of the package; write flat stubs into ``out_dir``."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        import_prefix = ".".join(PROTO_PACKAGE_DIR.parts)
        absolute_import = re.compile(rf"^from {re.escape(import_prefix)} import ", re.MULTILINE)
        for src in sorted((Path(tmp) / PROTO_PACKAGE_DIR).iterdir()):
            if not src.name.endswith(GENERATED_SUFFIXES):
                continue
            text = absolute_import.sub("from . import ", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: shared/pb)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
