"""The committed gRPC stubs in shared/pb are what codegen writes from proto/ now.

Guards against editing ``proto/stitch/v1/*.proto`` without rerunning
``python -m stitchvlm.shared.codegen`` (or hand-editing a generated file): the
stubs would then disagree with the contract the other side is built from.
"""

from __future__ import annotations

from pathlib import Path

from stitchvlm.shared import codegen


def test_committed_stubs_are_fresh(tmp_path: Path):
    """Guards against stale or hand-edited stubs, and against stubs for a removed .proto lingering."""
    written = codegen.generate(tmp_path)
    assert written, "codegen produced no files"
    generated = {p.name for p in tmp_path.iterdir()}
    committed = {p.name for p in codegen.OUT_DIR.iterdir() if p.name.endswith(codegen.GENERATED_SUFFIXES)}
    assert generated == committed
    for name in sorted(generated):
        fresh = (tmp_path / name).read_bytes()
        assert fresh == (codegen.OUT_DIR / name).read_bytes(), (
            f"shared/pb/{name} is stale: run python -m stitchvlm.shared.codegen"
        )
