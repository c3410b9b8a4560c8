"""Bytes on the wire for the kept-token indices: BITMAP vs DELTA_VARINT vs PLAIN.

For InternVL3 layouts (1 tile; 4, 6 and 12 tiles + thumbnail; 256 tokens a
tile) and the paper's retentions (9%, 35%, 64%), it selects top-R of two kinds
of score maps and reports the serialized size of the ``KeptTokens`` message
(tag, encoding, count and payload) for each encoding:

- ``random``: i.i.d. uniform scores, the worst case for DELTA_VARINT;
- ``blob``: a Gaussian blob on the image, seen through every grid tile and the
  thumbnail, plus a little noise, the way attention concentrates on an object.

Prints a markdown table and, last, one JSON line. Run:
``python bench/index_codec.py [--seeds 20]``. Measures sizes only, not time.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from stitchvlm.shared.codec import encode_indices, encoding_name
from stitchvlm.shared.layout import Layout
from stitchvlm.shared.scoring import top_r_indices

TOKENS_SIDE = 16  # 256 tokens a tile = a 16 x 16 token grid after pixel shuffle
LAYOUTS = [  # (grid_columns, grid_rows, thumbnail): |V| = 256, 1280, 1792, 3328
    (1, 1, False),
    (2, 2, True),
    (3, 2, True),
    (4, 3, True),
]
RETENTIONS = [0.09, 0.35, 0.64]
ENCODINGS = ["BITMAP", "DELTA_VARINT", "PLAIN"]


def random_scores(layout: Layout, rng: np.random.Generator) -> np.ndarray:
    return rng.random(layout.num_visual_tokens)  # [|V|]


def blob_scores(layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian blob at a random spot of the image, in InternVL's token order.

    Tokens are tile by tile (grid tiles row-major, then the thumbnail), and
    row-major within a tile; each token gets the blob's value at its centre in
    image coordinates [0, 1)^2.
    """
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    sigma = rng.uniform(0.08, 0.2)
    local = (np.arange(TOKENS_SIDE) + 0.5) / TOKENS_SIDE  # [16] token centres within a tile
    tiles = [
        (col, row, layout.grid_columns, layout.grid_rows)
        for row in range(layout.grid_rows)
        for col in range(layout.grid_columns)
    ]
    if layout.thumbnail:
        tiles.append((0, 0, 1, 1))  # the whole image in one tile
    maps = []
    for col, row, cols, rows in tiles:
        x = (col + local) / cols  # [16]
        y = (row + local) / rows  # [16]
        d2 = (x[None, :] - cx) ** 2 + (y[:, None] - cy) ** 2  # [16, 16]
        maps.append(np.exp(-d2 / (2 * sigma**2)).reshape(-1))
    scores = np.concatenate(maps)  # [|V|]
    return scores + 0.05 * rng.random(scores.size)


def measure(layout: Layout, retention: float, score_map, seeds: int) -> dict:
    """Mean KeptTokens bytes per encoding (and the auto choice) over ``seeds`` maps."""
    sizes = {name: [] for name in ENCODINGS}
    auto = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        idx = top_r_indices(score_map(layout, rng), retention)  # [k]
        for name in ENCODINGS:
            sizes[name].append(encode_indices(idx, layout.num_visual_tokens, name).to_proto().ByteSize())
        auto.append(encoding_name(encode_indices(idx, layout.num_visual_tokens).encoding))
    return {
        "num_visual_tokens": layout.num_visual_tokens,
        "tiles": f"{layout.grid_columns}x{layout.grid_rows}{'+thumb' if layout.thumbnail else ''}",
        "retention": retention,
        "k": int(idx.size),
        "map": score_map.__name__.removesuffix("_scores"),
        **{name: float(np.mean(v)) for name, v in sizes.items()},
        "auto": max(set(auto), key=auto.count),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="score maps averaged per row")
    args = parser.parse_args(argv)
    rows = []
    for cols, grid_rows, thumb in LAYOUTS:
        layout = Layout(448, cols, grid_rows, thumb, TOKENS_SIDE**2)
        for retention in RETENTIONS:
            for score_map in (random_scores, blob_scores):
                rows.append(measure(layout, retention, score_map, args.seeds))
    print(f"KeptTokens message bytes per request (mean of {args.seeds} score maps)\n")
    print("| |V| | tiles | R | k | map | BITMAP | DELTA_VARINT | PLAIN (packed) | auto |")
    print("|---:|:---|---:|---:|:---|---:|---:|---:|:---|")
    for r in rows:
        print(
            f"| {r['num_visual_tokens']} | {r['tiles']} | {r['retention']:.0%} | {r['k']} | {r['map']} "
            f"| {r['BITMAP']:.0f} | {r['DELTA_VARINT']:.1f} | {r['PLAIN']:.1f} | {r['auto']} |"
        )
    print()
    print(json.dumps({"bench": "index_codec", "unit": "KeptTokens bytes", "seeds": args.seeds, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
