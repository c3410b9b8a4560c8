"""The visual-token layout of one image, and its fingerprint.

Edge and cloud each compute the layout from the image size and the checkpoint's
preprocessing config; the request carries the edge's layout and fingerprint and
the cloud refuses a mismatch (DESIGN invariant 1). This module only describes a
layout; the tiling itself is in ``preprocess``. proto/stitch/v1/LAYOUT.md
specifies both for clients in other languages, with test vectors beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass, field

# CLIP normalisation, the InternVL / GOT-OCR2 default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# First field of the fingerprinted string; v1 was a BLAKE2b-64 over decimal-formatted floats.
FINGERPRINT_VERSION = "stitch-layout-v2"


@dataclass(frozen=True)
class TilingConfig:
    """How a checkpoint cuts an image into tiles (read from its preprocessor_config.json)."""

    tile_size: int = 448  # side of a square tile in px (the ViT's input size)
    min_tiles: int = 1  # fewest grid tiles (thumbnail not counted)
    max_tiles: int = 12  # most grid tiles (thumbnail not counted)
    use_thumbnail: bool = True  # add a whole-image tile when the grid has more than one tile
    tokens_per_tile: int = 256  # visual tokens per tile after pixel shuffle
    image_mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean after rescale to [0, 1]
    image_std: tuple[float, float, float] = CLIP_STD  # per-channel std after rescale to [0, 1]

    def __post_init__(self) -> None:
        if self.tile_size <= 0 or self.tokens_per_tile <= 0:
            raise ValueError("tile_size and tokens_per_tile must be positive")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")


def cap_max_tiles(config: TilingConfig, max_tiles: int | None) -> TilingConfig:
    """``config`` with at most ``max_tiles`` grid tiles: an operator's cap on vision work per image.

    ``None`` returns ``config`` itself. The cap only lowers the checkpoint's
    ``max_tiles``: a value above it, or below ``min_tiles``, raises
    ``ValueError`` naming the allowed range. The result is a new config
    (``dataclasses.replace``); ``config`` is not changed. Edge and cloud must
    apply the same cap, or their layouts (and fingerprints) differ.
    """
    if max_tiles is None:
        return config
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int):
        raise ValueError(f"max_tiles must be an integer, got {max_tiles!r}")
    if not config.min_tiles <= max_tiles <= config.max_tiles:
        raise ValueError(
            f"max_tiles must be in {config.min_tiles}..{config.max_tiles} (the checkpoint's min_tiles.."
            f"max_tiles; a cap can only lower max_tiles), got {max_tiles}"
        )
    return dataclasses.replace(config, max_tiles=max_tiles)


@dataclass(frozen=True)
class Layout:
    """The tile grid one image became, and how many visual tokens that is."""

    tile_size: int  # side of one tile in px
    grid_columns: int  # tiles across
    grid_rows: int  # tiles down
    thumbnail: bool  # a thumbnail tile follows the grid tiles
    tokens_per_tile: int  # visual tokens per tile
    num_tiles: int = field(init=False)  # grid tiles + thumbnail
    num_visual_tokens: int = field(init=False)  # |V|

    def __post_init__(self) -> None:
        tiles = self.grid_columns * self.grid_rows + int(self.thumbnail)
        object.__setattr__(self, "num_tiles", tiles)
        object.__setattr__(self, "num_visual_tokens", tiles * self.tokens_per_tile)


def fingerprint_input(layout: Layout, config: TilingConfig) -> bytes:
    """The ASCII byte string ``layout_fingerprint`` digests (specified in proto/stitch/v1/LAYOUT.md).

    ``stitch-layout-v2|tile=448|grid=3x2|thumb=1|tpt=256|mean=M0,M1,M2|std=S0,S1,S2``:
    integers in decimal without leading zeros, ``thumb`` 0 or 1, and each mean
    and std value as the 16 lowercase hex digits of its IEEE-754 float64 bits,
    big-endian (no decimal formatting, whose rounding differs between languages).
    """
    text = "|".join(
        [
            FINGERPRINT_VERSION,
            f"tile={layout.tile_size}",
            f"grid={layout.grid_columns}x{layout.grid_rows}",
            f"thumb={int(layout.thumbnail)}",
            f"tpt={layout.tokens_per_tile}",
            "mean=" + ",".join(_float64_hex(v) for v in config.image_mean),
            "std=" + ",".join(_float64_hex(v) for v in config.image_std),
        ]
    )
    return text.encode("ascii")


def layout_fingerprint(layout: Layout, config: TilingConfig) -> int:
    """64-bit digest of everything that decides which visual token is which.

    Two sides with equal fingerprints put the same pixels behind the same token
    index: same grid, tile size, thumbnail, tokens per tile and normalisation.
    The first 8 bytes of SHA-256 over ``fingerprint_input``, read as a
    big-endian unsigned 64-bit integer (what every standard library can compute).
    """
    return int.from_bytes(hashlib.sha256(fingerprint_input(layout, config)).digest()[:8], "big")


def _float64_hex(value: float) -> str:
    return struct.pack(">d", float(value)).hex()
