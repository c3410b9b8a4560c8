"""An operator's cap on tiles per image (``--max-tiles``), the same on edge and cloud.

The cap lowers the checkpoint's ``max_tiles`` (``layout.cap_max_tiles``); the
grid it gives is checked against transformers' ``GotOcr2ImageProcessorPil``
with ``max_patches=N``. End to end, a capped ``stitch-edge`` against a
``stitch-cloud serve --max-tiles`` subprocess answers on the capped layout, a
capped edge against an uncapped cloud fails with one message naming both
``max_tiles``, and a cap the checkpoint cannot take is a usage error (exit 2).

The tiny checkpoints tile at 64 px, 16 tokens per tile, up to 6 tiles; the
test image (192 x 128, aspect 3:2) becomes 3 x 2 tiles + thumbnail uncapped and
2 x 1 + thumbnail at a cap of 2.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import make_test_image, requires_torch
from PIL import Image

from stitchvlm.edge.cloud_client import CloudError, tiling_mismatch
from stitchvlm.shared.layout import TilingConfig, cap_max_tiles
from stitchvlm.shared.preprocess import compute_layout, preprocess_image

got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")

CAP = 2
QUESTION = "What colour is the circle?"
MAX_NEW_TOKENS = 4
RETENTION = 0.25
TINY = TilingConfig(
    tile_size=64,
    min_tiles=1,
    max_tiles=6,
    tokens_per_tile=16,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
)  # what cloud.checkpoints.default_tiling("tiny") ships; checked against the checkpoint below


def reference_tiles(image: Image.Image, tiling: TilingConfig) -> tuple[np.ndarray, int]:
    """Pixels and tile count of the HF processor with ``max_patches`` = the tiling's max_tiles."""
    processor = got_ocr2.GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        size={"height": tiling.tile_size, "width": tiling.tile_size},
        min_patches=tiling.min_tiles,
        max_patches=tiling.max_tiles,
        image_mean=list(tiling.image_mean),
        image_std=list(tiling.image_std),
    )
    out = processor(images=image, return_tensors="np")
    return out["pixel_values"], int(out["num_patches"][0])


def capped_tokens(image: Image.Image, max_tiles: int) -> int:
    """(capped grid tiles + thumbnail) x tokens_per_tile for the tiny tiling."""
    layout = compute_layout(image.width, image.height, cap_max_tiles(TINY, max_tiles))
    tiles = layout.grid_columns * layout.grid_rows + int(layout.thumbnail)
    return tiles * TINY.tokens_per_tile


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return make_test_image(192, 128, seed=5)


# ----------------------------------------------------------------------------- the cap itself


def test_cap_lowers_max_tiles_and_never_changes_the_loaded_config():
    """Guards against a cap that patches the loaded config in place (every later user of the
    checkpoint's tiling would be capped too), one that raises max_tiles above what the checkpoint
    was trained with, and a silent 0 (which would make every candidate grid empty)."""
    loaded = TilingConfig(tile_size=64, min_tiles=2, max_tiles=6)
    capped = cap_max_tiles(loaded, 3)
    assert capped.max_tiles == 3 and loaded.max_tiles == 6
    assert dataclasses.replace(capped, max_tiles=6) == loaded
    assert cap_max_tiles(loaded, None) is loaded
    assert cap_max_tiles(loaded, 6) == loaded
    for bad in (0, 1, 7, 12):
        with pytest.raises(ValueError, match=r"max_tiles must be in 2\.\.6 .*got " + str(bad)):
            cap_max_tiles(loaded, bad)
    with pytest.raises(ValueError, match="integer"):
        cap_max_tiles(loaded, True)


@pytest.mark.parametrize("cap", [1, 2, 3, 4, 6])
@pytest.mark.parametrize(("width", "height"), [(192, 128), (640, 100), (100, 300), (5, 7), (1000, 1000)])
def test_capped_tiles_match_the_hf_processor_with_max_patches(width, height, cap):
    """Guards against a cap that the reference preprocessor would not reproduce: a grid chosen
    among other candidates than ``max_patches=N`` allows, a thumbnail kept at N = 1, or the
    cap applied after the grid was chosen (cropping instead of re-tiling)."""
    image = make_test_image(width, height, seed=width + height)
    tiling = cap_max_tiles(TINY, cap)
    ours, layout = preprocess_image(image, tiling)
    reference, num_patches = reference_tiles(image, tiling)
    assert layout.grid_columns * layout.grid_rows <= cap
    assert ours.shape == reference.shape and layout.num_tiles == num_patches
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_capped_internvl3_grid_matches_the_hf_processor():
    """At the real InternVL3 shape (448 px, max_patches 12) a cap of 4 gives the processor's
    tile count with ``max_patches=4``. Guards against the cap only working for tiny tiles."""
    internvl3 = TilingConfig(tile_size=448, min_tiles=1, max_tiles=12)
    processor = got_ocr2.GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": 448, "width": 448})
    for width, height in ((1500, 900), (1344, 448), (300, 1200), (4000, 3000)):
        for cap in (1, 2, 4, 12):
            layout = compute_layout(width, height, cap_max_tiles(internvl3, cap))
            patches = processor.get_number_of_image_patches(
                height, width, {"crop_to_patches": True, "min_patches": 1, "max_patches": cap}
            )
            assert layout.num_tiles == patches, (width, height, cap)


def test_tiling_mismatch_names_both_max_tiles():
    """Guards against a mismatch message that says only "layout mismatch": the operator must see
    which side has which cap, and that other differences are not a --max-tiles matter."""
    assert tiling_mismatch(TINY, TINY) is None
    message = tiling_mismatch(cap_max_tiles(TINY, CAP), TINY)
    assert "edge max_tiles=2, cloud max_tiles=6" in message and "same --max-tiles" in message
    other = tiling_mismatch(TINY, dataclasses.replace(TINY, tile_size=32, tokens_per_tile=4))
    assert "edge max_tiles=6, cloud max_tiles=6" in other and "edge tile_size=64, cloud tile_size=32" in other


# ----------------------------------------------------------------------------- SDK and engine


@pytest.fixture(scope="module")
def edge_dir(tiny_edge_dir):
    return tiny_edge_dir


@pytest.fixture(scope="module")
def edge(edge_dir):
    from stitchvlm.edge.runtime import CPU, EdgeModel

    return EdgeModel.load(edge_dir, providers=[CPU])


@requires_torch
def test_edge_model_cap_derives_a_new_model(edge, image):
    """Guards against ``with_max_tiles`` changing the loaded model (a Cascade capping its model
    would cap every other user of it) and against raising the exported checkpoint's max."""
    assert edge.files.tiling == TINY  # the fixture checkpoint tiles as this module assumes
    capped = edge.with_max_tiles(CAP)
    assert capped is not edge and capped.files.tiling == cap_max_tiles(TINY, CAP)
    assert edge.files.tiling.max_tiles == 6
    assert capped.with_max_tiles(6).files.tiling == TINY  # the cap applies to the checkpoint's tiling
    assert edge.with_max_tiles(None) is edge
    generation = capped.generate(image, QUESTION, max_new_tokens=2)
    assert len(generation.visual_scores) == generation.layout.num_visual_tokens == capped_tokens(image, CAP)
    with pytest.raises(ValueError, match=r"1\.\.6"):
        edge.with_max_tiles(7)


@requires_torch
def test_config_classes_refuse_a_zero_cap(tiny_large_checkpoint):
    """Guards against max_tiles=0 reaching the tiling (no candidate grid) through the SDK or the engine."""
    from stitchvlm.cloud.engine import CloudEngine, EngineConfig
    from stitchvlm.edge.sdk import CascadeConfig

    for config_class, extra in ((CascadeConfig, {}), (EngineConfig, {"model_dir": tiny_large_checkpoint})):
        with pytest.raises(ValueError, match="max_tiles must be >= 1"):
            config_class(max_tiles=0, **extra)
    with pytest.raises(ValueError, match=r"max_tiles must be in 1\.\.6"):
        CloudEngine.load(EngineConfig(model_dir=tiny_large_checkpoint, max_tiles=7))


@requires_torch
def test_in_process_cloud_with_another_cap_is_refused_before_the_request(edge, tiny_large_checkpoint, image):
    """The in-process transport runs the same tiling check as gRPC. Guards against the check
    being a gRPC-only feature, so SDK tests without a network would miss a mismatch."""
    from stitchvlm.cloud.engine import CloudEngine, EngineConfig
    from stitchvlm.edge.sdk import Cascade

    engine = CloudEngine.load(EngineConfig(model_dir=tiny_large_checkpoint, max_tiles=CAP))
    try:
        assert engine.files.tiling == cap_max_tiles(TINY, CAP)
        capped = Cascade(
            edge, engine, tau=1.01, retention=RETENTION, max_new_tokens=MAX_NEW_TOKENS, max_tiles=CAP
        )
        result = capped.ask(image, QUESTION)
        assert (result.route, result.degraded) == ("cloud", False), result.error
        assert result.cloud_reply.num_visual_tokens == result.num_visual_tokens == capped_tokens(image, CAP)

        uncapped = Cascade(edge, engine, tau=1.01, max_new_tokens=MAX_NEW_TOKENS, on_cloud_failure="raise")
        with pytest.raises(CloudError) as info:
            uncapped.ask(image, QUESTION)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "edge max_tiles=6, cloud max_tiles=2" in info.value.message
    finally:
        engine.close()


# ----------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def capped_server(tiny_large_checkpoint):
    pytest.importorskip("torch")
    from servers import running_cloud

    with running_cloud(tiny_large_checkpoint, "--max-tiles", str(CAP)) as process:
        yield process


@pytest.fixture(scope="module")
def uncapped_server(tiny_large_checkpoint):
    pytest.importorskip("torch")
    from servers import running_cloud

    with running_cloud(tiny_large_checkpoint) as process:
        yield process


@requires_torch
def test_capped_edge_and_cloud_answer_on_the_capped_layout(capped_server, edge, image):
    """Capped edge + ``stitch-cloud serve --max-tiles 2`` over gRPC: the cloud publishes the cap,
    accepts the edge's capped layout and reports |V| = (capped grid + thumbnail) x tokens per tile.
    Guards against a cap applied on one side only (every request refused) or only to the
    published ModelInfo while the engine still tiles with the checkpoint's max."""
    from stitchvlm.edge.cloud_client import GrpcCloudClient
    from stitchvlm.edge.sdk import Cascade

    uncapped = compute_layout(image.width, image.height, TINY)
    capped_layout = compute_layout(image.width, image.height, cap_max_tiles(TINY, CAP))
    assert (uncapped.grid_columns, uncapped.grid_rows) == (3, 2)  # the cap really changes this image's grid
    assert (capped_layout.grid_columns, capped_layout.grid_rows) == (2, 1) and capped_layout.thumbnail
    with GrpcCloudClient(capped_server.address) as client:
        assert client.cloud_tiling(10.0) == cap_max_tiles(TINY, CAP)
        sdk = Cascade(
            edge, client, tau=1.01, retention=RETENTION, max_new_tokens=MAX_NEW_TOKENS, max_tiles=CAP
        )
        result = sdk.ask(image, QUESTION)
    assert (result.route, result.degraded, result.error) == ("cloud", False, None)
    assert result.num_visual_tokens == result.cloud_reply.num_visual_tokens == (2 * 1 + 1) * 16
    assert result.num_visual_tokens == capped_tokens(image, CAP) == capped_layout.num_visual_tokens
    _, reference_patches = reference_tiles(image, cap_max_tiles(TINY, CAP))  # HF with max_patches=2
    assert result.num_visual_tokens == reference_patches * TINY.tokens_per_tile


@requires_torch
def test_cli_ask_with_max_tiles_against_a_capped_cloud(capped_server, edge_dir, image, tmp_path):
    """``stitch-edge ask --max-tiles 2`` reaches a capped cloud: the JSON reports the capped |V|.
    Guards against the flag being parsed but never reaching the model."""
    path = tmp_path / "image.png"
    image.save(path)
    done = subprocess.run(
        [sys.executable, "-m", "stitchvlm.edge.cli", "ask", "--model", str(edge_dir), "--image", str(path)]
        + ["--prompt", QUESTION, "--cpu", "--json", "--tau", "1.01", "--max-new-tokens", str(MAX_NEW_TOKENS)]
        + ["--cloud", capped_server.address, "--max-tiles", str(CAP), "--on-cloud-failure", "raise"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["route"] == "cloud" and out["degraded"] is False
    assert out["num_visual_tokens"] == len(out["visual_scores"]) == capped_tokens(image, CAP)
    assert out["cloud"]["kept_visual_tokens"] == len(out["kept_indices"])


@requires_torch
def test_capped_edge_against_uncapped_cloud_names_both_max_tiles(uncapped_server, edge, image):
    """A capped edge and an uncapped cloud: the SDK's first escalation fails with one message
    naming both max_tiles (raise mode) or degrades with it (degrade mode). Guards against an
    operator who capped only the edge getting silent degraded answers with a fingerprint in hex."""
    from stitchvlm.edge.cloud_client import GrpcCloudClient
    from stitchvlm.edge.sdk import Cascade

    with GrpcCloudClient(uncapped_server.address) as client:
        options = dict(tau=1.01, retention=RETENTION, max_new_tokens=MAX_NEW_TOKENS, max_tiles=CAP)
        with pytest.raises(CloudError) as info:
            Cascade(edge, client, on_cloud_failure="raise", **options).ask(image, QUESTION)
        degraded = Cascade(edge, client, **options).ask(image, QUESTION)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "edge max_tiles=2, cloud max_tiles=6" in info.value.message
    assert "--max-tiles" in info.value.message
    assert degraded.degraded and degraded.route == "edge"
    assert "edge max_tiles=2, cloud max_tiles=6" in degraded.error


@requires_torch
def test_capped_request_to_uncapped_cloud_is_refused_by_the_server(uncapped_server, image):
    """A request built on the capped layout, sent past the SDK's check (another client, an old
    SDK), is still refused by the cloud with FAILED_PRECONDITION saying the cloud's max_tiles.
    Guards against the SDK check replacing the server's own layout check."""
    from servers import cloud_request

    from stitchvlm.edge.cloud_client import GrpcCloudClient

    request = cloud_request(cap_max_tiles(TINY, CAP), image, QUESTION, retention=RETENTION)
    assert request.num_visual_tokens == capped_tokens(image, CAP)
    with GrpcCloudClient(uncapped_server.address, max_retries=0) as client, pytest.raises(CloudError) as info:
        client.answer(request, 10.0)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    message = info.value.message
    assert f"num_visual_tokens {request.num_visual_tokens} does not match the 112" in message
    assert "2x1+thumbnail" in message and "3x2+thumbnail" in message
    assert "max_tiles=6" in message and "--max-tiles" in message


# ----------------------------------------------------------------------------- usage errors


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)


@requires_torch
@pytest.mark.parametrize(
    ("value", "words"), [("0", "must be >= 1, got 0"), ("7", "max_tiles must be in 1..6")]
)
def test_edge_cli_refuses_a_cap_the_checkpoint_cannot_take(edge_dir, image, tmp_path, value, words):
    """``stitch-edge ask|calibrate --max-tiles 0|7`` (checkpoint max 6): exit 2 with a message
    naming the flag, no traceback. Guards against a cap above the checkpoint silently raising
    the tile count, and against a ValueError traceback for an operator's typo."""
    path = tmp_path / "image.png"
    image.save(path)
    for command in (
        ["ask", "--image", str(path), "--prompt", QUESTION],
        ["calibrate", "--target-exit-rate", "0.5", "-n", "1"],
    ):
        done = _run("stitchvlm.edge.cli", *command, "--model", str(edge_dir), "--cpu", "--max-tiles", value)
        assert done.returncode == 2, done.stderr
        assert "--max-tiles" in done.stderr and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@requires_torch
@pytest.mark.parametrize(
    ("value", "words"), [("0", "must be >= 1, got 0"), ("7", "max_tiles must be in 1..6")]
)
def test_cloud_cli_refuses_a_cap_the_checkpoint_cannot_take(tiny_large_checkpoint, value, words):
    """``stitch-cloud serve --max-tiles 0|7`` (checkpoint max 6): exit 2 before any weight loads,
    no traceback. Guards against a server that starts, loads, then dies with exit 1 (or serves
    the checkpoint's tiling) on a bad cap."""
    done = _run(
        "stitchvlm.cloud.cli",
        "serve",
        "--model",
        str(tiny_large_checkpoint),
        "--port",
        "0",
        "--max-tiles",
        value,
    )
    assert done.returncode == 2, done.stderr
    assert "--max-tiles" in done.stderr and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "listening on" not in done.stderr


@requires_torch
def test_loadtest_refuses_a_cap_the_models_cannot_take(edge_dir, tiny_large_checkpoint, capsys):
    """``stitch-loadtest --max-tiles 7`` exits 2 before exporting, loading or starting a cloud.
    Guards against a load test that starts a cloud which then dies on the cap (exit 1 after a wait)."""
    from stitchvlm.edge.loadtest import main as loadtest_main

    with pytest.raises(SystemExit) as info:
        loadtest_main(
            ["--edge", str(edge_dir), "--start-cloud", str(tiny_large_checkpoint), "--max-tiles", "7"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--max-tiles 7 for --edge {edge_dir}" in err and "max_tiles must be in 1..6" in err
