"""Shared test setup: offline hub, one CPU thread, tiny checkpoints built once per session.

torch is optional here: the torch-free edge tests must still collect on a
machine without it, so torch is imported behind a guard and the checkpoint
fixtures skip when it is missing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# Never reach the hub: every checkpoint a test uses is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HAS_TORCH = importlib.util.find_spec("torch") is not None
if HAS_TORCH:
    import torch

    # Several helpers share two cores; one thread each keeps runs predictable.
    torch.set_num_threads(1)

requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The one tokenizer both tiny checkpoints share (a small and large model need one vocabulary)."""
    pytest.importorskip("torch")
    from stitchvlm.cloud.checkpoints import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    """A seeded random InternVL of preset "tiny" saved in the InternVL3-*-hf layout."""
    from stitchvlm.cloud.checkpoints import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-internvl"
    return make_tiny_checkpoint(out, preset="tiny", seed=0, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_large_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    """Preset "tiny-large": deeper and wider text model, same tokenizer and tiling as ``tiny_checkpoint``."""
    from stitchvlm.cloud.checkpoints import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-large-internvl"
    return make_tiny_checkpoint(out, preset="tiny-large", seed=1, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    """``tiny_checkpoint`` loaded by transformers itself: (model [sdpa, eval], tokenizer, image processor)."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    processor = GotOcr2ImageProcessorPil.from_pretrained(tiny_checkpoint)
    return model, tokenizer, processor


def make_test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of a coloured background with a few random ellipses, rectangles and lines."""
    rng = np.random.default_rng(seed)

    def colour() -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(0, 256, size=3))

    image = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour())
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour())
        else:
            draw.line([x0, y0, x1, y1], fill=colour(), width=max(1, min(width, height) // 16))
    return image


@pytest.fixture
def image_factory():
    """Factory fixture: ``image_factory(width, height, seed=0)`` -> PIL image (see ``make_test_image``)."""
    return make_test_image


@pytest.fixture(scope="session")
def tiny_edge_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    """``tiny_checkpoint`` exported once per session (fp32, no verification) for the edge tests."""
    from stitchvlm.edge.export import ExportConfig, export_edge

    out = tmp_path_factory.mktemp("edge") / "tiny"
    export_edge(ExportConfig(model_dir=tiny_checkpoint, out_dir=out, verify=False))
    return out


@pytest.fixture(scope="session")
def sharp_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """``tiny_checkpoint`` with its weight matrices redrawn at std 0.2 (test_export.sharpen_checkpoint):
    peaked attention, so score and top-R checks mean something. Read-only for the tests."""
    from test_export import sharpen_checkpoint

    return sharpen_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("sharp") / "sharp-internvl")


@pytest.fixture(scope="session")
def lean_dir(sharp_checkpoint, tmp_path_factory) -> Path:
    """``sharp_checkpoint`` exported by the console script with its defaults (both graphs lean),
    verification on."""
    from stitchvlm.edge.export import main
    from stitchvlm.edge.sidecar import EdgeSidecar

    out = tmp_path_factory.mktemp("edge") / "lean"
    assert main(["--model", str(sharp_checkpoint), "--out", str(out)]) == 0
    sidecar = EdgeSidecar.load(out)
    assert (sidecar.graph, sidecar.vision_graph) == ("lean", "lean")  # the default export is lean
    return out
