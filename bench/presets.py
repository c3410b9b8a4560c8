"""Model shapes the speed benchmarks build with random weights, by name.

One table for every speed benchmark (``cloud_speed``, ``edge_speed``), so that
"internvl3-1b" means the same shape in both. Random weights: speed depends on
the shape, not on what the weights learned. Nothing here builds a model; each
benchmark builds its own from a preset (``internvl_config`` is the shared
config for it).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config


@dataclass(frozen=True)
class BenchPreset:
    """Model shape of one benchmark run (random weights)."""

    vision_hidden: int  # ViT width
    vision_layers: int  # ViT depth
    vision_heads: int  # ViT heads
    tile: int  # tile side in px (ViT input)
    patch: int  # ViT patch side
    text_hidden: int  # LLM width
    text_layers: int  # LLM depth
    text_heads: int  # LLM query heads
    text_kv_heads: int  # LLM key/value heads
    text_intermediate: int  # LLM MLP width
    vocab: int  # LLM vocabulary (LM head cost)
    image_size: tuple[int, int]  # benchmark image (width, height); decides the tile grid
    max_tiles: int  # most grid tiles

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens per tile after InternVL's 2x2 pixel shuffle."""
        return (self.tile // self.patch // 2) ** 2

    @classmethod
    def from_name(cls, name: str) -> BenchPreset:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    # CPU-sized: 224-px tiles of 64 tokens, 6 tiles + thumbnail = 448 visual tokens
    "quick": BenchPreset(64, 2, 4, 224, 14, 256, 8, 8, 2, 768, 1000, (672, 448), 6),
    # InternVL3-8B: InternViT-300M + Qwen2.5-7B, 448-px tiles of 256 tokens, 3x2 grid + thumbnail
    "internvl3-8b": BenchPreset(1024, 24, 16, 448, 14, 3584, 28, 28, 4, 18944, 151674, (1344, 896), 6),
    # InternVL3-1B: the same ViT + Qwen2.5-0.5B; 3x2 grid + thumbnail = 1792 visual tokens
    "internvl3-1b": BenchPreset(1024, 24, 16, 448, 14, 896, 24, 14, 2, 4864, 151674, (1344, 896), 6),
}


def internvl_config(
    preset: BenchPreset, image_token_id: int, eos_token_id: int | None = None, bos_token_id: int | None = None
) -> InternVLConfig:
    """The ``InternVLConfig`` of a preset: InternViT-style tower, Qwen2 text model with RoPE theta 1e6."""
    return InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=preset.vision_hidden,
            num_hidden_layers=preset.vision_layers,
            num_attention_heads=preset.vision_heads,
            intermediate_size=4 * preset.vision_hidden,
            image_size=preset.tile,
            patch_size=preset.patch,
        ),
        text_config=Qwen2Config(
            vocab_size=preset.vocab,
            hidden_size=preset.text_hidden,
            intermediate_size=preset.text_intermediate,
            num_hidden_layers=preset.text_layers,
            num_attention_heads=preset.text_heads,
            num_key_value_heads=preset.text_kv_heads,
            max_position_embeddings=32768,
            rope_theta=1e6,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        ),
        image_token_id=image_token_id,
        image_seq_length=preset.tokens_per_tile,
    )
