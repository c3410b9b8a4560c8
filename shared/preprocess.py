"""InternVL / GOT-OCR2 image preprocessing in numpy and Pillow, without torch.

Edge and cloud both turn request bytes into model input here, so both sides
cut an image into the same tiles and the same visual-token layout (DESIGN
invariant 1). The pixels equal what ``transformers``' ``GotOcr2ImageProcessorPil``
(the image processor of ``InternVLProcessor``) produces with
``crop_to_patches=True``; the tests compare against it.

- ``decode_image``: request bytes -> RGB ``PIL.Image``, refusing bad input with
  ``RequestError(INVALID_ARGUMENT)``.
- ``compute_layout``: image size -> tile grid and token count, no pixels.
- ``preprocess_image``: RGB image -> ``[num_tiles, 3, tile, tile]`` float32.
- ``tiling_config_from_files``: a checkpoint's JSON configs -> ``TilingConfig``.
- ``token_regions``: which original-image pixels each visual token stands for.

Not done here: the prompt, image placeholder tokens, the vision tower. PIL's
module globals (``MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) are
read, never changed: with ``LOAD_TRUNCATED_IMAGES`` switched on by someone
else, Pillow itself decodes truncated files and ``decode_image`` cannot tell.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import grpc
import numpy as np
from PIL import Image, ImageOps

from .errors import RequestError, clip_text
from .layout import CLIP_MEAN, CLIP_STD, Layout, TilingConfig

# At most 8192 x 8192 decoded pixels (192 MiB as RGB) unless the caller says otherwise.
DEFAULT_MAX_PIXELS = 8192 * 8192

# Accepted mime types and the Pillow formats each may decode as. Phone JPEGs with
# several pictures inside open as "MPO" (JPEG's plugin picks the class).
MIME_FORMATS: dict[str, tuple[str, ...]] = {
    "image/png": ("PNG",),
    "image/jpeg": ("JPEG", "MPO"),
    "image/webp": ("WEBP",),
    "image/bmp": ("BMP",),
    "image/gif": ("GIF",),
}
# Modes in which Pillow holds 16-bit greyscale (a 16-bit PNG opens as I;16, as I before Pillow 10).
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Pillow plugins tried on request bytes; the many other formats Pillow knows stay out.
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")

# The GOT-OCR2 processor's fixed choices that TilingConfig does not carry.
RESCALE_FACTOR = 1 / 255  # uint8 -> [0, 1]
_PIL_BICUBIC = 3  # PILImageResampling.BICUBIC, the "resample" value in preprocessor configs
_GOT_OCR2_PROCESSORS = ("GotOcr2ImageProcessor", "GotOcr2ImageProcessorFast", "GotOcr2ImageProcessorPil")


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def decode_image(data: bytes, mime_type: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode request bytes into an RGB image, or raise ``RequestError(INVALID_ARGUMENT)``.

    Accepts PNG, JPEG, WebP, BMP and GIF (first frame). A non-empty ``mime_type``
    must name one of these and match what the bytes are. The size in the header
    is checked against ``max_pixels`` before any pixel is decoded, whatever
    Pillow's own ``MAX_IMAGE_PIXELS`` is. EXIF orientation is applied (as
    ``transformers.image_utils.load_image`` does); transparency is composited on
    white (``convert_to_rgb``). Every failure of Pillow becomes a ``RequestError``.
    """
    if not data:
        raise _invalid("image is empty (0 bytes)")
    allowed = _formats_for_mime(mime_type)
    try:
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit, hit while reading the header (the warning arrives as an
        # exception only under a warnings-as-errors filter); ours is checked below.
        raise _invalid(f"image is too large to decode (limit {max_pixels} pixels): {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise _invalid("image data is not a PNG, JPEG, WebP, BMP or GIF image") from exc
    except Exception as exc:  # a header Pillow recognises but cannot parse
        raise _invalid(f"image header is corrupt or truncated: {type(exc).__name__}: {exc}") from exc

    with image:
        detected = image.format or "unknown"
        if allowed is not None and detected not in allowed:
            raise _invalid(f"mime_type {clip_text(mime_type)} does not match the image data, which is {detected}")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise _invalid(f"image has zero size ({width}x{height})")
        if width * height > max_pixels:
            raise _invalid(f"image is too large: {width}x{height} = {width * height} pixels > {max_pixels}")
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return convert_to_rgb(upright)
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
            raise _invalid(
                f"image data is corrupt or truncated ({detected}): {type(exc).__name__}: {exc}"
            ) from exc


def _formats_for_mime(mime_type: str) -> tuple[str, ...] | None:
    """Pillow formats a declared mime type allows; None when none was declared."""
    mime = mime_type.strip().lower()
    if not mime:
        return None
    if mime not in MIME_FORMATS:
        raise _invalid(f"unsupported mime_type {clip_text(mime_type)}; expected one of {sorted(MIME_FORMATS)}")
    return MIME_FORMATS[mime]


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``, transparency composited onto white.

    The rule of ``transformers.image_transforms.convert_to_rgb`` (what the
    GOT-OCR2 processor applies with ``do_convert_rgb``): an image with an alpha
    band or a ``transparency`` entry goes through RGBA and ``alpha_composite``
    over opaque white; every other mode is ``convert("RGB")`` (L, P, CMYK...).

    Except 16-bit greyscale (``I;16`` and friends, and ``I`` as older Pillow
    opens such PNGs): ``convert`` clips those at 255, so an ordinary 16-bit
    scan comes out almost white. They are scaled to 8 bits first
    (``_wide_grey_to_8_bit``); transformers clips them, so here the pixels
    deliberately differ from its processor.
    """
    if image.mode in WIDE_GREY_MODES:
        image = _wide_grey_to_8_bit(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _wide_grey_to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> ``L`` (``LA`` when a tRNS grey value marks transparent pixels).

    Each value v in 0..65535 becomes round(v * 255 / 65535) = (v + 128) // 257
    (v / 257 is never exactly half-way); mode ``I`` values outside 0..65535
    are clipped first.
    """
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)  # [h, w]
    grey = Image.fromarray(((values + 128) // 257).astype(np.uint8))
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):  # PNG tRNS of a greyscale image is one grey value
        return grey
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


# ---------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------


@lru_cache(maxsize=32)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (columns, rows) with min_tiles <= columns * rows <= max_tiles, fewest tiles first.

    Within one tile count the order is by columns, then rows: the order in
    which ``choose_grid`` breaks ties, so it must not change.
    """
    grids = [
        (columns, rows)
        for columns in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= columns * rows <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))  # stable: keeps the order above


def choose_grid(width: int, height: int, config: TilingConfig) -> tuple[int, int]:
    """(columns, rows) of the grid whose aspect ratio is closest to the image's.

    The InternVL "dynamic preprocess" rule as GOT-OCR2's ``get_optimal_tiled_canvas``
    states it: on an exact tie in ratio difference, a grid with more tiles wins
    only while the image area exceeds half the area those tiles cover. Ratios
    are compared as the same floats the reference computes, so ties fall the
    same way.
    """
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for columns, rows in candidate_grids(config.min_tiles, config.max_tiles):
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best_diff, best = diff, (columns, rows)
        elif diff == best_diff and area > 0.5 * config.tile_size * config.tile_size * columns * rows:
            best = (columns, rows)
    return best


def compute_layout(width: int, height: int, config: TilingConfig) -> Layout:
    """The tile grid an image of ``width`` x ``height`` becomes; no pixels are touched.

    A thumbnail (the whole image in one tile) follows the grid only when the
    grid has more than one tile and ``config.use_thumbnail``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    columns, rows = choose_grid(width, height, config)
    return Layout(
        tile_size=config.tile_size,
        grid_columns=columns,
        grid_rows=rows,
        thumbnail=config.use_thumbnail and columns * rows > 1,
        tokens_per_tile=config.tokens_per_tile,
    )


def preprocess_image(image: Image.Image, config: TilingConfig) -> tuple[np.ndarray, Layout]:
    """Tiles of ``image`` as normalised float32 pixels, and their layout.

    Returns pixel values ``[num_tiles, 3, tile, tile]``: grid tiles row by row,
    then the thumbnail. Resizing is Pillow BICUBIC on the uint8 RGB image (the
    whole grid canvas at once, the thumbnail from the original), then
    ``x * (1/255)`` in float64 cast to float32, then ``(x - mean) / std`` in
    float32: the operations, in order and dtype, of ``GotOcr2ImageProcessorPil``.
    """
    tiles, layout = tile_image(image, config)
    return normalize_tiles(tiles, config), layout


def tile_image(image: Image.Image, config: TilingConfig) -> tuple[np.ndarray, Layout]:
    """The uint8 tiles ``[num_tiles, 3, tile, tile]`` that ``preprocess_image`` normalises, and their layout."""
    rgb = convert_to_rgb(image)
    width, height = rgb.size
    layout = compute_layout(width, height, config)
    tile = config.tile_size
    columns, rows = layout.grid_columns, layout.grid_rows

    canvas = np.asarray(rgb.resize((columns * tile, rows * tile), Image.Resampling.BICUBIC))
    # canvas: [rows * tile, columns * tile, 3] uint8 -> tiles: [rows * columns, 3, tile, tile]
    tiles = canvas.reshape(rows, tile, columns, tile, 3).transpose(0, 2, 4, 1, 3)
    tiles = tiles.reshape(rows * columns, 3, tile, tile)
    if layout.thumbnail:
        thumbnail = np.asarray(rgb.resize((tile, tile), Image.Resampling.BICUBIC))
        # thumbnail: [tile, tile, 3] -> [1, 3, tile, tile]
        tiles = np.concatenate([tiles, thumbnail.transpose(2, 0, 1)[None]], axis=0)
    return tiles, layout


def normalize_tiles(tiles: np.ndarray, config: TilingConfig) -> np.ndarray:
    """uint8 tiles ``[n, 3, h, w]`` -> float32 ``(x / 255 - mean) / std``.

    The rescale runs in float64 and is cast to float32 before normalising, as
    the reference does (a float32 multiply by 1/255 differs in the last bit for
    half of the levels). A uint8 channel has only 256 values, so the result is
    looked up in a table computed with exactly those operations.
    """
    levels = np.arange(256, dtype=np.uint8)[None, :, None]  # [1, 256, 1]
    scaled = (levels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]  # [3, 1, 1]
    std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]  # [3, 1, 1]
    table = ((scaled - mean) / std)[:, :, 0]  # table: [3, 256] float32
    out = np.empty(tiles.shape, dtype=np.float32)  # out: [n, 3, h, w]
    for channel in range(3):
        out[:, channel] = table[channel][tiles[:, channel]]
    return out


# ---------------------------------------------------------------------------
# Checkpoint configs
# ---------------------------------------------------------------------------


def tiling_config_from_files(preprocessor_config: dict, model_config: dict) -> TilingConfig:
    """The ``TilingConfig`` of a Hugging Face InternVL checkpoint.

    ``preprocessor_config``: the parsed ``preprocessor_config.json`` (or a
    ``processor_config.json`` whose ``image_processor`` entry holds it);
    ``model_config``: the parsed ``config.json``. Missing keys take the
    GOT-OCR2 processor's defaults; ``size`` is required. Anything this module
    does not reproduce (another resample filter or rescale factor, no
    normalisation, non-square tiles) raises ``ValueError`` rather than giving
    silently different pixels.

    For ``model_type == "internvl"`` the image is always tiled, whatever
    ``crop_to_patches`` says: ``InternVLProcessor`` passes ``crop_to_patches=True``
    at call time. Tokens per tile come from the vision tower, ``(tile / patch *
    downsample_ratio) ** 2``, which is what ``pixel_shuffle`` outputs;
    ``config.json``'s ``image_seq_length`` is used only when the vision config
    lacks sizes, because ``InternVLConfig`` writes its default 256 even for a
    tower that makes 16 tokens.
    """
    image_config = preprocessor_config.get("image_processor", preprocessor_config)
    _check_reproducible(image_config)
    tile_size = _square_side(image_config.get("size"), "preprocessor size")

    tiled = model_config.get("model_type") == "internvl" or bool(image_config.get("crop_to_patches", False))
    max_tiles = int(image_config.get("max_patches", 12))
    if not tiled or max_tiles <= 1:  # the processor resizes the whole image into one tile
        min_tiles = max_tiles = 1
    else:
        min_tiles = int(image_config.get("min_patches", 1))

    tokens_per_tile = _tokens_per_tile(model_config, tile_size)
    processor_tokens = preprocessor_config.get("image_seq_length")  # processor_config.json only
    if processor_tokens is not None and int(processor_tokens) != tokens_per_tile:
        raise ValueError(
            f"processor image_seq_length {processor_tokens} != {tokens_per_tile} tokens the vision tower makes"
        )
    return TilingConfig(
        tile_size=tile_size,
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        use_thumbnail=True,  # the GOT-OCR2 processor always adds one to a multi-tile grid
        tokens_per_tile=tokens_per_tile,
        image_mean=_three_floats(image_config.get("image_mean", CLIP_MEAN), "image_mean"),
        image_std=_three_floats(image_config.get("image_std", CLIP_STD), "image_std"),
    )


def _check_reproducible(image_config: dict) -> None:
    """Refuse preprocessing settings that ``preprocess_image`` does not implement."""
    processor_type = image_config.get("image_processor_type")
    if processor_type is not None and processor_type not in _GOT_OCR2_PROCESSORS:
        raise ValueError(f"unsupported image processor {processor_type!r}; expected a GOT-OCR2 one")
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if image_config.get(flag, True) is not True:
            raise ValueError(
                f"preprocessor config sets {flag}={image_config[flag]!r}; only true is supported"
            )
    if int(image_config.get("resample", _PIL_BICUBIC)) != _PIL_BICUBIC:
        raise ValueError(f"resample={image_config['resample']} is not supported; only BICUBIC (3)")
    if not math.isclose(float(image_config.get("rescale_factor", RESCALE_FACTOR)), RESCALE_FACTOR):
        raise ValueError(f"rescale_factor={image_config['rescale_factor']} is not supported; only 1/255")


def _tokens_per_tile(model_config: dict, tile_size: int) -> int:
    """Visual tokens one tile becomes after InternVL's pixel shuffle."""
    vision = model_config.get("vision_config") or {}
    if vision.get("image_size") is None or vision.get("patch_size") is None:
        if "image_seq_length" not in model_config:
            raise ValueError("config has neither vision_config image_size/patch_size nor image_seq_length")
        return int(model_config["image_seq_length"])
    image_size = _square_side(vision["image_size"], "vision_config.image_size")
    patch_size = _square_side(vision["patch_size"], "vision_config.patch_size")
    if image_size != tile_size:
        raise ValueError(f"preprocessor tile size {tile_size} != vision_config.image_size {image_size}")
    if tile_size % patch_size:
        raise ValueError(f"tile size {tile_size} is not a multiple of patch size {patch_size}")
    side = tile_size // patch_size * float(model_config.get("downsample_ratio", 0.5))
    if side != int(side) or side < 1:
        raise ValueError(f"{tile_size // patch_size} patches per side do not shuffle into whole tokens")
    return int(side) ** 2


def _square_side(size: object, what: str) -> int:
    """Side of a square size given as an int, [h, w] or {"height", "width"}."""
    if isinstance(size, dict):
        if "height" not in size or "width" not in size:
            raise ValueError(f"{what} must have height and width, got {size}")
        height, width = size["height"], size["width"]
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = size
    elif isinstance(size, int):
        height = width = size
    else:
        raise ValueError(f"{what} missing or malformed: {size!r}")
    if height != width or int(height) <= 0:
        raise ValueError(f"{what} must be square and positive, got {height}x{width}")
    return int(height)


def _three_floats(values: object, what: str) -> tuple[float, float, float]:
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{what} must be three numbers, got {values!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


# ---------------------------------------------------------------------------
# Token geometry
# ---------------------------------------------------------------------------


def token_regions(layout: Layout, width: int, height: int) -> np.ndarray:
    """Original-image box ``(x0, y0, x1, y1)`` of every visual token, ``[num_visual_tokens, 4]`` int64.

    Token index order is the model's: tiles in ``preprocess_image`` order, and
    within a tile a ``g x g`` raster (``g = sqrt(tokens_per_tile)``) row by row,
    which is what InternVL's ``pixel_shuffle`` + reshape produce (tested against
    them). A grid tile's raster spans that tile's share of the image; the
    thumbnail's spans the whole image. Boxes are half-open, widened outward to
    whole pixels, so each has at least one pixel and neighbours may share one.
    """
    side = math.isqrt(layout.tokens_per_tile)
    if side * side != layout.tokens_per_tile:
        raise ValueError(f"tokens_per_tile {layout.tokens_per_tile} is not a square number")
    ty, tx = np.divmod(np.arange(layout.tokens_per_tile), side)  # ty, tx: [tokens_per_tile]

    boxes = []
    for tile_index in range(layout.grid_columns * layout.grid_rows):
        row, column = divmod(tile_index, layout.grid_columns)
        boxes.append(
            _cell_boxes(
                column * side + tx,
                row * side + ty,
                layout.grid_columns * side,
                layout.grid_rows * side,
                width,
                height,
            )
        )
    if layout.thumbnail:
        boxes.append(_cell_boxes(tx, ty, side, side, width, height))
    return np.concatenate(boxes, axis=0)


def _cell_boxes(
    cx: np.ndarray, cy: np.ndarray, cells_x: int, cells_y: int, width: int, height: int
) -> np.ndarray:
    """Pixel boxes of cells (cx, cy) of a ``cells_x x cells_y`` raster laid over the image.

    Cell c covers [c * size / cells, (c + 1) * size / cells): floor the start,
    ceil the end, in exact integer arithmetic.
    """
    x0 = cx * width // cells_x
    x1 = -(-(cx + 1) * width // cells_x)
    y0 = cy * height // cells_y
    y1 = -(-(cy + 1) * height // cells_y)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)  # [cells, 4]
