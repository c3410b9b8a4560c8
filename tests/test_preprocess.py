"""Tests of ``stitchvlm.shared.preprocess`` against transformers' own GOT-OCR2 / InternVL code.

The independent references: ``GotOcr2ImageProcessorPil`` (pixels, tile counts,
``get_optimal_tiled_canvas``), ``transformers.image_transforms.convert_to_rgb``,
``transformers.image_utils.load_image`` (EXIF) and ``InternVLModel.get_image_features``
(token count and raster order).
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from stitchvlm.shared.errors import RequestError
from stitchvlm.shared.layout import Layout, TilingConfig, layout_fingerprint
from stitchvlm.shared.preprocess import (
    compute_layout,
    convert_to_rgb,
    decode_image,
    preprocess_image,
    tiling_config_from_files,
    token_regions,
)

got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
GotOcr2ImageProcessorPil = got_ocr2.GotOcr2ImageProcessorPil

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise image: bicubic overshoot and rounding show up on every pixel."""
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode=mode)


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def reference_processor(config: TilingConfig) -> GotOcr2ImageProcessorPil:
    return GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        size={"height": config.tile_size, "width": config.tile_size},
        min_patches=config.min_tiles,
        max_patches=config.max_tiles,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


def reference_pixels(image: Image.Image, config: TilingConfig) -> tuple[np.ndarray, int]:
    out = reference_processor(config)(images=image, return_tensors="np")
    return out["pixel_values"], int(out["num_patches"][0])


# ---------------------------------------------------------------------------
# Pixels and layout against GotOcr2ImageProcessorPil
# ---------------------------------------------------------------------------

PIXEL_CASES = [
    # (width, height, tile, min_tiles, max_tiles)
    (448, 448, 448, 1, 12),  # square, one tile
    (1344, 448, 448, 1, 12),  # wide 3:1
    (300, 1200, 448, 1, 12),  # tall 1:4
    (5, 7, 448, 1, 12),  # tiny: 12 upsampled tiles
    (1500, 900, 448, 1, 12),  # large
    (1000, 1000, 448, 1, 12),  # tie 1x1 / 2x2 / 3x3, area decides 3x3
    (1800, 900, 448, 1, 12),  # tie 2x1 / 4x2
    (130, 70, 64, 2, 6),  # small tile, min_tiles > 1
    (100, 100, 64, 1, 4),  # small tile, tie 1x1 / 2x2
    (90, 30, 64, 1, 1),  # max_tiles 1: the processor's no-crop path
    (200, 50, 64, 3, 8),
]


@pytest.mark.parametrize(("width", "height", "tile", "min_tiles", "max_tiles"), PIXEL_CASES)
def test_pixels_match_reference_processor(width, height, tile, min_tiles, max_tiles):
    """Guards against any drift from the HF processor: resize filter, rounding, rescale in
    float32 instead of float64, mean/std order, tile order, thumbnail placement."""
    config = TilingConfig(
        tile_size=tile,
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    image = random_image(width, height, seed=width * 7 + height)
    ours, layout = preprocess_image(image, config)
    reference, num_patches = reference_pixels(image, config)

    assert ours.dtype == np.float32
    assert ours.shape == reference.shape == (layout.num_tiles, 3, tile, tile)
    assert layout.num_tiles == num_patches
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def _tiling_cases():
    rng = np.random.default_rng(1)
    sizes = [(w, h) for w in range(1, 70, 3) for h in range(1, 70, 4)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(150)]
    sizes += [(1000, 1000), (1800, 900), (900, 1800), (896, 448), (200, 200), (300, 100)]
    limits = [(1, 12), (1, 6), (2, 6), (4, 9), (1, 1), (3, 3)]
    return [(w, h, tile, lo, hi) for (w, h) in sizes for tile in (16, 448) for (lo, hi) in limits]


def test_layout_matches_reference_grid_and_patch_count():
    """Guards against a different grid choice (float tie-breaking, candidate order, the
    half-area rule) and a thumbnail counted when the grid is one tile."""
    mismatches = []
    for width, height, tile, lo, hi in _tiling_cases():
        config = TilingConfig(tile_size=tile, min_tiles=lo, max_tiles=hi)
        layout = compute_layout(width, height, config)
        grid = got_ocr2.get_optimal_tiled_canvas((height, width), (tile, tile), lo, hi)
        patches = reference_processor(config).get_number_of_image_patches(
            height, width, {"crop_to_patches": True, "min_patches": lo, "max_patches": hi}
        )
        if hi > 1 and (layout.grid_columns, layout.grid_rows) != tuple(grid):
            mismatches.append(("grid", width, height, tile, lo, hi, layout, grid))
        if layout.num_tiles != patches:
            mismatches.append(("patches", width, height, tile, lo, hi, layout.num_tiles, patches))
        assert layout.num_visual_tokens == layout.num_tiles * config.tokens_per_tile
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize(("width", "height", "tile"), [(1000, 1000, 448), (1800, 900, 448), (100, 100, 64)])
def test_tie_breaking_case_is_a_real_tie(width, height, tile):
    """Guards against the tie test cases silently not exercising the tie rule: several
    candidate grids share the best ratio difference and the reference picks a larger one."""
    config = TilingConfig(tile_size=tile, min_tiles=1, max_tiles=12)
    candidates = got_ocr2.get_all_supported_aspect_ratios(1, 12)
    diffs = [abs(width / height - c / r) for c, r in candidates]
    tied = [grid for grid, diff in zip(candidates, diffs, strict=True) if diff == min(diffs)]
    assert len(tied) > 1
    layout = compute_layout(width, height, config)
    chosen = (layout.grid_columns, layout.grid_rows)
    assert chosen == tuple(got_ocr2.get_optimal_tiled_canvas((height, width), (tile, tile), 1, 12))
    assert chosen != tied[0]  # more tiles won the tie


def test_no_thumbnail_when_disabled():
    """Guards against use_thumbnail being ignored (the layout would count 256 phantom tokens)."""
    config = TilingConfig(tile_size=64, max_tiles=6, use_thumbnail=False)
    image = random_image(200, 60)
    pixels, layout = preprocess_image(image, config)
    with_thumb, _ = preprocess_image(image, dataclasses.replace(config, use_thumbnail=True))
    assert not layout.thumbnail and layout.grid_columns * layout.grid_rows > 1
    assert pixels.shape[0] == layout.num_tiles == with_thumb.shape[0] - 1
    np.testing.assert_array_equal(pixels, with_thumb[:-1])


# ---------------------------------------------------------------------------
# Colour conversion
# ---------------------------------------------------------------------------


def _mode_images() -> dict[str, Image.Image]:
    rgba = random_image(37, 23, "RGBA", seed=3)
    palette = random_image(37, 23, "RGB", seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    rgb_transparent = random_image(37, 23, "RGB", seed=5)
    rgb_transparent.info["transparency"] = tuple(int(v) for v in np.asarray(rgb_transparent)[0, 0])
    return {
        "RGBA": rgba,
        "LA": random_image(37, 23, "LA", seed=6),
        "L": random_image(37, 23, "L", seed=7),
        "P": palette,
        "P+transparency": palette_transparent,
        "RGB+transparency": rgb_transparent,
        "CMYK": random_image(37, 23, "CMYK", seed=8),
    }


@pytest.mark.parametrize("name", list(_mode_images()))
def test_mode_conversion_matches_reference(name):
    """Guards against alpha dropped instead of composited on white (RGBA.convert("RGB")
    gives black behind transparent pixels) and palette transparency ignored."""
    from transformers.image_transforms import convert_to_rgb as reference_convert

    image = _mode_images()[name]
    config = TilingConfig(tile_size=32, max_tiles=4)
    ours, _ = preprocess_image(image, config)
    reference, _ = reference_pixels(image, config)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)

    fmt = "JPEG" if name == "CMYK" else "PNG"
    data = encode(image, fmt)
    decoded = decode_image(data, f"image/{fmt.lower()}")
    assert decoded.mode == "RGB"
    expected = reference_convert(Image.open(io.BytesIO(data)), return_numpy=True)
    np.testing.assert_array_equal(np.asarray(decoded), expected)


# 16-bit grey levels and their 8-bit values round(v * 255 / 65535), worked out by hand:
# 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 1000/257 = 3.89 -> 4, 32768/257 = 127.5019 -> 128.
WIDE_GREY = [0, 128, 129, 257, 1000, 32768, 65278, 65535]
WIDE_GREY_8_BIT = [0, 0, 1, 1, 4, 128, 254, 255]


def test_16_bit_greyscale_png_is_scaled_to_8_bits():
    """Guards against 16-bit greyscale PNGs (mode I;16) coming out almost white: Pillow's
    convert("RGB") clips every value above 255 instead of scaling (issue 13, defect 8)."""
    values = np.array([WIDE_GREY, WIDE_GREY[::-1]], dtype=np.uint16)  # [2, 8]
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode_image(data, "image/png")
    assert decoded.mode == "RGB"
    expected = np.array([WIDE_GREY_8_BIT, WIDE_GREY_8_BIT[::-1]], dtype=np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(np.asarray(decoded)[..., channel], expected)
    # preprocess_image of the decoded image equals that of the 8-bit image it should be
    config = TilingConfig(tile_size=32, max_tiles=1)
    ours, _ = preprocess_image(decoded, config)
    eight_bit, _ = preprocess_image(Image.fromarray(expected).convert("RGB"), config)
    np.testing.assert_array_equal(ours, eight_bit)


def test_16_bit_greyscale_transparency_and_mode_i():
    """Guards against the 16-bit fix dropping a tRNS grey value (transparent pixels must still be
    composited on white) and against mode I (how older Pillow opens such PNGs) staying clipped."""
    values = np.array([WIDE_GREY], dtype=np.uint16)  # [1, 8]
    data = encode(Image.fromarray(values), "PNG", transparency=1000)
    decoded = np.asarray(decode_image(data, "image/png"))[0, :, 0]
    expected = list(WIDE_GREY_8_BIT)
    expected[WIDE_GREY.index(1000)] = 255  # transparent, composited on white
    assert decoded.tolist() == expected

    wide = Image.fromarray(np.array([[-5, 0, 514, 65535, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(convert_to_rgb(wide))[0, :, 1].tolist() == [0, 0, 2, 255, 255]


def test_decode_round_trips_every_accepted_format():
    """Guards against an accepted format failing to decode or decoding to other pixels."""
    image = random_image(31, 17, seed=9)
    for fmt, mime, lossless in [
        ("PNG", "image/png", True),
        ("BMP", "image/bmp", True),
        ("WEBP", "image/webp", True),
        ("GIF", "image/gif", False),
        ("JPEG", "image/jpeg", False),
    ]:
        save_args = {"lossless": True} if fmt == "WEBP" else {}
        data = encode(image, fmt, **save_args)
        for declared in (mime, ""):
            decoded = decode_image(data, declared)
            assert decoded.mode == "RGB" and decoded.size == image.size, fmt
            expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(decoded), expected)
            if lossless:
                np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))


def test_decode_applies_exif_orientation_like_load_image(tmp_path):
    """Guards against a phone photo's EXIF rotation being ignored (edge and HF would see
    a sideways image, and token regions would point at the wrong pixels)."""
    from transformers.image_utils import load_image

    image = random_image(40, 24, seed=10)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif, quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)

    decoded = decode_image(data, "image/jpeg")
    assert decoded.size == (24, 40)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(load_image(str(path))))


# ---------------------------------------------------------------------------
# Decode errors
# ---------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny IDAT: no real pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _decode_error(data: bytes, mime: str = "", **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_image(data, mime, **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value


def test_decode_errors_are_invalid_argument_with_specific_messages():
    """Guards against bad images crashing the servicer or giving one vague error: each
    case must be INVALID_ARGUMENT and say what is wrong."""
    png = encode(random_image(64, 64, seed=11), "PNG")
    assert "empty" in _decode_error(b"").message
    assert "not a PNG, JPEG" in _decode_error(b"definitely not an image" * 10).message
    assert "truncated" in _decode_error(png[: len(png) * 2 // 3]).message
    jpeg = encode(random_image(64, 64), "JPEG")
    assert "header is corrupt or truncated" in _decode_error(jpeg[:400]).message
    assert "data is corrupt or truncated (JPEG)" in _decode_error(jpeg[: len(jpeg) * 2 // 3]).message
    assert "does not match" in _decode_error(png, "image/jpeg").message
    assert "is PNG" in _decode_error(png, "image/gif").message
    assert "unsupported mime_type" in _decode_error(png, "image/tiff").message
    assert "too large" in _decode_error(png, max_pixels=64 * 64 - 1).message
    decode_image(png, "image/png", max_pixels=64 * 64)  # exactly at the limit is fine
    # Pillow refuses a zero-sized header itself; either way it is INVALID_ARGUMENT
    _decode_error(_png_header(0, 10))


def test_decompression_bomb_header_is_refused_before_decoding(monkeypatch):
    """Guards against a 100000x100000 PNG header allocating 30 GB, and against relying
    on Pillow's global MAX_IMAGE_PIXELS (here switched off) for that."""
    bomb = _png_header(100_000, 100_000)
    assert "too large" in _decode_error(bomb).message  # Pillow's own limit trips first
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    message = _decode_error(bomb).message
    assert "too large" in message and "100000x100000" in message


def test_pillow_bomb_warning_never_escapes_as_its_own_exception():
    """Guards against Pillow's DecompressionBombWarning (size between Pillow's limit and
    twice it) surfacing as a non-RequestError when warnings are errors."""
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "too large" in _decode_error(_png_header(side, side), max_pixels=side * side * 2).message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "too large" in _decode_error(_png_header(side, side)).message


# ---------------------------------------------------------------------------
# Checkpoint configs
# ---------------------------------------------------------------------------

# The keys of a published InternVL *-hf preprocessor config (InternVL3 / Intern-S1
# family): GOT-OCR2 processor, ImageNet statistics, and crop_to_patches false, which
# InternVLProcessor overrides with crop_to_patches=True at call time.
PUBLISHED_PREPROCESSOR_CONFIG = {
    "crop_size": None,
    "crop_to_patches": False,
    "data_format": "channels_first",
    "default_to_square": True,
    "device": None,
    "do_center_crop": None,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_processor_type": "GotOcr2ImageProcessorFast",
    "image_std": list(IMAGENET_STD),
    "input_data_format": None,
    "max_patches": 12,
    "min_patches": 1,
    "processor_class": "InternVLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "return_tensors": None,
    "size": {"height": 448, "width": 448},
}


def _tiny_internvl_config(image_size: int = 48, patch_size: int = 8, vision_layers: int = 1):
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
            "vocab_size": 64,
        },
    )


def _saved_json(obj, tmp_path, name: str) -> dict:
    obj.save_pretrained(tmp_path)
    return json.loads((tmp_path / name).read_text())


def test_published_internvl_config_reads_as_tiled_448_with_256_tokens(tmp_path):
    """Guards against taking crop_to_patches=false literally (one tile where the HF
    pipeline makes up to 13) and against CLIP statistics where the file says ImageNet."""
    from transformers import InternVLConfig

    model_config = _saved_json(InternVLConfig(), tmp_path, "config.json")  # InternVL3 geometry: 448 / 14
    config = tiling_config_from_files(PUBLISHED_PREPROCESSOR_CONFIG, model_config)
    assert (config.tile_size, config.min_tiles, config.max_tiles) == (448, 1, 12)
    assert config.tokens_per_tile == (448 // 14 // 2) ** 2
    assert config.image_mean == IMAGENET_MEAN and config.image_std == IMAGENET_STD
    assert config.use_thumbnail

    # processor_config.json nests the image processor next to image_seq_length
    nested = {"image_processor": PUBLISHED_PREPROCESSOR_CONFIG, "image_seq_length": 256}
    assert tiling_config_from_files(nested, model_config) == config

    image = random_image(700, 300, seed=12)
    published = {k: v for k, v in PUBLISHED_PREPROCESSOR_CONFIG.items() if v is not None}
    reference = GotOcr2ImageProcessorPil(**published)(images=image, crop_to_patches=True, return_tensors="np")
    ours, layout = preprocess_image(image, config)
    assert layout.num_tiles == reference["num_patches"][0] > 1
    np.testing.assert_allclose(ours, reference["pixel_values"], rtol=0, atol=1e-6)


def test_saved_processor_round_trips_and_token_count_matches_model(tmp_path):
    """Guards against reading tokens per tile from config.json's image_seq_length, which
    InternVLConfig always writes (default 256) even when the tower makes 9 per tile."""
    import torch
    from transformers import InternVLModel

    torch.manual_seed(0)
    torch.set_num_threads(1)
    processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True, size={"height": 48, "width": 48}, min_patches=1, max_patches=6
    )
    preprocessor_config = _saved_json(processor, tmp_path, "preprocessor_config.json")
    model_config_obj = _tiny_internvl_config(image_size=48, patch_size=8)
    model_config = _saved_json(model_config_obj, tmp_path, "config.json")
    assert model_config["image_seq_length"] == 256  # the misleading default really is in the file

    config = tiling_config_from_files(preprocessor_config, model_config)
    image = random_image(150, 70, seed=13)
    ours, layout = preprocess_image(image, config)
    reloaded = GotOcr2ImageProcessorPil.from_pretrained(tmp_path)
    reference = reloaded(images=image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)

    model = InternVLModel(model_config_obj).eval()
    with torch.no_grad():
        features = model.get_image_features(
            torch.from_numpy(ours),
            vision_feature_layer=model_config_obj.vision_feature_layer,
            vision_feature_select_strategy=model_config_obj.vision_feature_select_strategy,
        ).pooler_output
    # features: [num_tiles, tokens_per_tile, hidden]
    assert features.shape[0] * features.shape[1] == layout.num_visual_tokens
    assert features.shape[1] == config.tokens_per_tile


@pytest.mark.parametrize(
    ("change", "model_change", "match"),
    [
        ({"resample": 2}, {}, "resample"),
        ({"rescale_factor": 1 / 127.5}, {}, "rescale_factor"),
        ({"do_normalize": False}, {}, "do_normalize"),
        ({"size": {"height": 448, "width": 224}}, {}, "square"),
        ({"size": None}, {}, "size"),
        ({"image_processor_type": "CLIPImageProcessor"}, {}, "unsupported image processor"),
        ({}, {"vision_config": {"image_size": [224, 224], "patch_size": [14, 14]}}, "image_size"),
    ],
)
def test_config_settings_we_cannot_reproduce_are_refused(change, model_change, match):
    """Guards against silently producing different pixels or token counts than the
    checkpoint's own processor for settings preprocess_image does not implement."""
    from transformers import InternVLConfig

    preprocessor = {**PUBLISHED_PREPROCESSOR_CONFIG, **change}
    model_config = {**InternVLConfig().to_dict(), **model_change}
    with pytest.raises(ValueError, match=match):
        tiling_config_from_files(preprocessor, model_config)


def test_processor_token_count_disagreeing_with_tower_is_refused():
    """Guards against a processor_config.json whose image_seq_length (the placeholders
    InternVLProcessor inserts) differs from what the tower makes: every request would fail."""
    from transformers import InternVLConfig

    nested = {"image_processor": PUBLISHED_PREPROCESSOR_CONFIG, "image_seq_length": 64}
    with pytest.raises(ValueError, match="image_seq_length"):
        tiling_config_from_files(nested, InternVLConfig().to_dict())


# ---------------------------------------------------------------------------
# Layout fingerprint
# ---------------------------------------------------------------------------


def test_layout_fingerprint_separates_every_field():
    """Guards against a fingerprint that ignores a field, which would let the cloud prune
    the wrong tokens for a request tiled differently on the edge."""
    config = TilingConfig()
    layout = Layout(tile_size=448, grid_columns=3, grid_rows=2, thumbnail=True, tokens_per_tile=256)
    base = layout_fingerprint(layout, config)
    assert base == layout_fingerprint(
        Layout(tile_size=448, grid_columns=3, grid_rows=2, thumbnail=True, tokens_per_tile=256),
        TilingConfig(),
    )
    variants = [
        dataclasses.replace(layout, tile_size=224),
        dataclasses.replace(layout, grid_columns=2),
        dataclasses.replace(layout, grid_rows=3),
        dataclasses.replace(layout, grid_columns=2, grid_rows=3),  # transposed grid, same count
        dataclasses.replace(layout, thumbnail=False),
        dataclasses.replace(layout, tokens_per_tile=64),
    ]
    prints = [layout_fingerprint(v, config) for v in variants]
    prints.append(layout_fingerprint(layout, dataclasses.replace(config, image_mean=IMAGENET_MEAN)))
    prints.append(layout_fingerprint(layout, dataclasses.replace(config, image_std=IMAGENET_STD)))
    assert base not in prints
    assert len(set(prints)) == len(prints)


# ---------------------------------------------------------------------------
# Token regions
# ---------------------------------------------------------------------------


def test_token_regions_follow_internvl_pixel_shuffle_order():
    """Guards against a transposed token raster (pixel_shuffle permutes height and width
    twice): each token's box must be exactly the pixels its features depend on.

    The vision tower has no encoder layers, so a token's output depends only on the
    pixels of its own patches; the gradient of one token's features with respect to the
    tiles marks those pixels, through the real get_image_features / pixel_shuffle.
    """
    import torch
    from transformers import InternVLModel

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tile = 48
    model_config = _tiny_internvl_config(image_size=tile, patch_size=8, vision_layers=0)
    model = InternVLModel(model_config).eval()
    config = TilingConfig(tile_size=tile, min_tiles=1, max_tiles=4, tokens_per_tile=9)
    width, height = 2 * tile, tile  # the grid canvas is the image itself: regions are exact
    image = random_image(width, height, seed=14)
    pixels, layout = preprocess_image(image, config)
    assert (layout.grid_columns, layout.grid_rows, layout.thumbnail) == (2, 1, True)

    pixel_values = torch.from_numpy(pixels).requires_grad_(True)
    features = model.get_image_features(
        pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output  # features: [num_tiles, tokens_per_tile, hidden]
    assert features.shape[:2] == (layout.num_tiles, layout.tokens_per_tile)

    regions = token_regions(layout, width, height)
    assert regions.shape == (layout.num_visual_tokens, 4)
    for tile_index in range(layout.num_tiles):
        for token in range(layout.tokens_per_tile):
            (grad,) = torch.autograd.grad(features[tile_index, token].sum(), pixel_values, retain_graph=True)
            touched = grad.abs().sum(dim=1) > 0  # touched: [num_tiles, tile, tile]
            assert touched.any(dim=(1, 2)).nonzero().flatten().tolist() == [tile_index]
            ys, xs = touched[tile_index].nonzero(as_tuple=True)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            assert bool(touched[tile_index, y0:y1, x0:x1].all())
            if tile_index < layout.grid_columns * layout.grid_rows:
                row, column = divmod(tile_index, layout.grid_columns)
                expected = (column * tile + x0, row * tile + y0, column * tile + x1, row * tile + y1)
            else:  # thumbnail: the tile is the whole image scaled by (width / tile, height / tile)
                sx, sy = width // tile, height // tile
                expected = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            assert tuple(regions[tile_index * layout.tokens_per_tile + token]) == expected


@pytest.mark.parametrize(("width", "height", "tile"), [(5, 7, 448), (1500, 900, 448), (130, 70, 64)])
def test_token_regions_cover_the_image(width, height, tile):
    """Guards against boxes that fall outside the image, are empty, or leave pixels that
    no grid token (or no thumbnail token) claims when sizes do not divide evenly."""
    config = TilingConfig(tile_size=tile, tokens_per_tile=16)
    layout = compute_layout(width, height, config)
    regions = token_regions(layout, width, height)
    assert regions.shape == (layout.num_visual_tokens, 4) and regions.dtype == np.int64
    x0, y0, x1, y1 = regions.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    assert (x1 > x0).all() and (y1 > y0).all()

    n_grid = layout.grid_columns * layout.grid_rows * layout.tokens_per_tile
    for part in (regions[:n_grid], regions[n_grid:]):
        if len(part) == 0:
            continue
        covered = np.zeros((height, width), dtype=bool)
        for bx0, by0, bx1, by1 in part:
            covered[by0:by1, bx0:bx1] = True
        assert covered.all()


def test_token_regions_refuse_non_square_token_count():
    """Guards against a silently wrong raster for a tokens_per_tile with no square side."""
    layout = Layout(tile_size=448, grid_columns=1, grid_rows=1, thumbnail=False, tokens_per_tile=200)
    with pytest.raises(ValueError, match="square"):
        token_regions(layout, 100, 100)


# ---------------------------------------------------------------------------
# Edge runtime constraint
# ---------------------------------------------------------------------------


def test_import_does_not_pull_in_torch(tmp_path):
    """Guards against a torch import sneaking into the edge's preprocessing path (DESIGN
    invariant 5): the module and its imports must load and run with torch never imported."""
    path = tmp_path / "image.png"
    path.write_bytes(encode(random_image(50, 20), "PNG"))
    code = (
        "import sys, stitchvlm.shared.preprocess as p; "
        "p.preprocess_image(p.decode_image(open(sys.argv[1], 'rb').read()), p.TilingConfig(tile_size=32)); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
