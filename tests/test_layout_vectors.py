"""The layout test vectors in proto/stitch/v1/layout_vectors.json, checked against shared's code.

The vectors are the contract a client in another language implements
(proto/stitch/v1/LAYOUT.md): image size and tiling config -> grid, thumbnail,
|V| and fingerprint, plus top-R counts. Here they are checked three ways:
against ``compute_layout`` / ``layout_fingerprint`` / ``keep_count``, against
independent references (transformers' ``get_optimal_tiled_canvas`` for the
grid, ``hashlib.sha256`` over the spelled-out input for the fingerprint), and
for internal consistency (hex and decimal strings of one number). Regenerate
the file with ``python tests/test_layout_vectors.py`` after a deliberate
change of the rule, and say so in the spec.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest

from stitchvlm.shared.layout import FINGERPRINT_VERSION, TilingConfig, fingerprint_input, layout_fingerprint
from stitchvlm.shared.preprocess import compute_layout
from stitchvlm.shared.scoring import keep_count

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "proto" / "stitch" / "v1" / "layout_vectors.json"
SPEC = ROOT / "proto" / "stitch" / "v1" / "LAYOUT.md"

IMAGENET = {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)}
# (name, tiling config, image sizes): InternVL3-*-hf, transformers' CLIP default, the tiny test
# checkpoints, the embedded synthetic pair, and the edge cases of the rule.
CONFIGS = [
    (
        "internvl3-hf",
        TilingConfig(tile_size=448, min_tiles=1, max_tiles=12, tokens_per_tile=256, **IMAGENET),
        [(448, 448), (1344, 448), (300, 1200), (5, 7), (1500, 900), (1000, 1000), (1800, 900),
         (4032, 3024), (1, 1000), (1000, 1)],
    ),
    ("clip-default", TilingConfig(), [(640, 480), (896, 448)]),
    (
        "tiny-test-checkpoint",
        TilingConfig(tile_size=64, min_tiles=1, max_tiles=6, tokens_per_tile=16, **IMAGENET),
        [(64, 64), (96, 64), (200, 50), (100, 100), (130, 70), (48, 48)],
    ),
    (
        "synthetic-pair",
        TilingConfig(tile_size=224, min_tiles=1, max_tiles=6, tokens_per_tile=64, **IMAGENET),
        [(224, 224), (448, 224), (320, 240)],
    ),
    ("min-tiles-2", TilingConfig(tile_size=64, min_tiles=2, max_tiles=6, tokens_per_tile=16, **IMAGENET),
     [(130, 70), (64, 64)]),
    ("one-tile", TilingConfig(tile_size=64, min_tiles=1, max_tiles=1, tokens_per_tile=16, **IMAGENET),
     [(90, 30)]),
    ("no-thumbnail", TilingConfig(tile_size=64, max_tiles=6, use_thumbnail=False, tokens_per_tile=16),
     [(200, 60)]),
]  # fmt: skip
# (R, |V|): float64 products just below an integer (0.29 * 100 = 28.999999999999996) and the floor of 1.
KEEP_COUNTS = [(1.0, 1792), (0.09, 1792), (0.29, 100), (0.57, 100), (0.35, 1280), (0.001, 80), (0.5, 1)]


def build_vectors() -> dict:
    """The vector file's content, computed by shared's code."""
    layouts = []
    for name, config, sizes in CONFIGS:
        for width, height in sizes:
            layout = compute_layout(width, height, config)
            fingerprint = layout_fingerprint(layout, config)
            layouts.append(
                {
                    "name": f"{name} {width}x{height}",
                    "width": width,
                    "height": height,
                    "tiling": {
                        "tile_size": config.tile_size,
                        "min_tiles": config.min_tiles,
                        "max_tiles": config.max_tiles,
                        "use_thumbnail": config.use_thumbnail,
                        "tokens_per_tile": config.tokens_per_tile,
                        "image_mean": list(config.image_mean),
                        "image_std": list(config.image_std),
                    },
                    "grid_columns": layout.grid_columns,
                    "grid_rows": layout.grid_rows,
                    "thumbnail": layout.thumbnail,
                    "num_tiles": layout.num_tiles,
                    "num_visual_tokens": layout.num_visual_tokens,
                    "fingerprint_input": fingerprint_input(layout, config).decode("ascii"),
                    "fingerprint_hex": f"{fingerprint:016x}",
                    "fingerprint_decimal": str(fingerprint),
                }
            )
    return {
        "spec": "LAYOUT.md",
        "fingerprint_version": FINGERPRINT_VERSION,
        "note": "fingerprints are unsigned 64-bit: compare the hex or decimal strings, never a JSON number",
        "layouts": layouts,
        "keep_counts": [
            {"retention": r, "num_visual_tokens": n, "count": keep_count(r, n)} for r, n in KEEP_COUNTS
        ],
    }


@pytest.fixture(scope="module")
def vectors() -> dict:
    return json.loads(VECTORS.read_text())


def test_vectors_file_is_what_shared_computes(vectors):
    """Guards against the tiling or fingerprint code drifting from the published contract
    (a client built from the spec would then be refused FAILED_PRECONDITION)."""
    assert vectors == build_vectors()
    assert len(vectors["layouts"]) >= 25
    spec = SPEC.read_text()
    assert vectors["fingerprint_version"] in spec
    example = next(e for e in vectors["layouts"] if e["name"] == "internvl3-hf 1500x900")
    # the worked example in the spec is this vector
    assert example["fingerprint_input"] in spec
    assert example["fingerprint_hex"] in spec and example["fingerprint_decimal"] in spec


def _tiling(entry: dict) -> TilingConfig:
    t = entry["tiling"]
    return TilingConfig(**{**t, "image_mean": tuple(t["image_mean"]), "image_std": tuple(t["image_std"])})


def test_fingerprints_are_sha256_of_the_spelled_out_input(vectors):
    """Guards against a fingerprint that is not the documented digest: hashlib's SHA-256 over the
    spec's byte string, first 8 bytes big-endian, and hex and decimal strings of the same number."""
    for entry in vectors["layouts"]:
        t = entry["tiling"]
        floats = {
            key: ",".join(struct.pack(">d", v).hex() for v in t[key]) for key in ("image_mean", "image_std")
        }
        # The spec's string, rebuilt field by field here rather than by fingerprint_input.
        spelled = (
            f"stitch-layout-v2|tile={t['tile_size']}|grid={entry['grid_columns']}x{entry['grid_rows']}"
            f"|thumb={int(entry['thumbnail'])}|tpt={t['tokens_per_tile']}"
            f"|mean={floats['image_mean']}|std={floats['image_std']}"
        )
        assert entry["fingerprint_input"] == spelled, entry["name"]
        digest = hashlib.sha256(spelled.encode("ascii")).digest()
        assert entry["fingerprint_hex"] == digest[:8].hex(), entry["name"]
        assert int(entry["fingerprint_decimal"]) == int(entry["fingerprint_hex"], 16)
        assert int(entry["fingerprint_decimal"]) == struct.unpack(">Q", digest[:8])[0]
    assert len({e["fingerprint_hex"] for e in vectors["layouts"]}) == len(
        {(e["fingerprint_input"]) for e in vectors["layouts"]}
    )
    # at least one fingerprint above 2**63 (a signed or float reader gets it wrong)
    assert any(int(e["fingerprint_decimal"]) >= 2**63 for e in vectors["layouts"])


def test_grids_match_the_reference_processor(vectors):
    """Guards against vectors (and so clients) encoding a grid transformers' InternVL processor
    would not choose: ties, the half-area rule and min/max tiles as GOT-OCR2 decides them."""
    got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    for entry in vectors["layouts"]:
        t = entry["tiling"]
        grid = got_ocr2.get_optimal_tiled_canvas(
            (entry["height"], entry["width"]),
            (t["tile_size"], t["tile_size"]),
            t["min_tiles"],
            t["max_tiles"],
        )
        if t["max_tiles"] > 1:
            assert (entry["grid_columns"], entry["grid_rows"]) == tuple(grid), entry["name"]
        tiles = entry["grid_columns"] * entry["grid_rows"]
        assert entry["thumbnail"] == (t["use_thumbnail"] and tiles > 1)
        assert entry["num_tiles"] == tiles + int(entry["thumbnail"])
        assert entry["num_visual_tokens"] == entry["num_tiles"] * t["tokens_per_tile"]
        assert (
            compute_layout(entry["width"], entry["height"], _tiling(entry)).grid_columns
            == entry["grid_columns"]
        )


def test_keep_counts_are_floor_of_the_float64_product(vectors):
    """Guards against a count rule that rounds (0.29 * 100 is 28.999999999999996 in float64: 28, not 29)."""
    counts = {(c["retention"], c["num_visual_tokens"]): c["count"] for c in vectors["keep_counts"]}
    assert counts[(0.29, 100)] == 28 and counts[(1.0, 1792)] == 1792 and counts[(0.001, 80)] == 1
    assert counts[(0.09, 1792)] == 161  # 161.28


if __name__ == "__main__":  # regenerate the vector file
    VECTORS.write_text(json.dumps(build_vectors(), indent=1) + "\n")
    print(f"wrote {VECTORS}", file=sys.stderr)
