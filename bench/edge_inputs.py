"""The edge benchmarks' question, image and ORT session options: numpy, Pillow and onnxruntime only.

Shared by ``edge_speed.py``, ``edge_peer.py`` and ``edge_stages.py``; torch-free
so that ``edge_stages.py``'s measuring processes hold only what the edge runtime
holds.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from PIL import Image

QUESTION = "What colour is the triangle?"


def bench_image(image_size: tuple[int, int]) -> Image.Image:
    """A seeded noise image of ``(width, height)``: the size decides the tile grid, the pixels nothing."""
    rng = np.random.default_rng(0)
    width, height = image_size
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ORT's idle worker threads spin after each run; interleaved with torch on the same cores
    # that spinning slows torch down, so neither side keeps cores busy between its own runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
