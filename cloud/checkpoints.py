"""Tiny InternVL checkpoints in the published Hugging Face layout, built locally.

Tests, the exporter and the trainer need InternVL checkpoints without the hub.
This module builds one from nothing: a small byte-level BPE tokenizer with the
InternVL3 special tokens, an ``InternVLConfig`` from a named size preset, a
seeded random ``InternVLForConditionalGeneration``, and the files that
``OpenGVLab/InternVL3-1B-hf`` ships (config, generation config, safetensors,
tokenizer files, chat template, image-processor and processor configs), so that
``from_pretrained(path)`` of model, ``AutoTokenizer`` and
``GotOcr2ImageProcessorPil`` load it with no network.

It does not train anything (the trainer does) and does not read checkpoints
back for the edge (``stitchvlm.shared.model_files`` does, without torch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
    Qwen2Tokenizer,
)

from stitchvlm.shared.layout import TilingConfig

# The ImageNet normalisation that OpenGVLab/InternVL3-*-hf write in preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Special tokens in the order Qwen2 / InternVL3 add them after the BPE vocabulary.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
START_IMAGE = "<img>"
END_IMAGE = "</img>"
CONTEXT_IMAGE = "<IMG_CONTEXT>"
VIDEO = "<video>"
SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    START_IMAGE,
    END_IMAGE,
    CONTEXT_IMAGE,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    VIDEO,
)
# The named tokens InternVLProcessor reads from the tokenizer (tokenizer.start_image_token, ...).
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": START_IMAGE,
    "end_image_token": END_IMAGE,
    "context_image_token": CONTEXT_IMAGE,
    "video_token": VIDEO,
}

# Qwen2's pre-tokenizer split (the regex Qwen2Tokenizer builds), kept so tiny
# tokenizers split text the way the real ones do.
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The InternVL3-hf chat template: no default system turn, an image entry becomes
# the context token and a newline, which InternVLProcessor later expands to
# <img> + <IMG_CONTEXT> * n + </img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A small English corpus about the synthetic images (shapes, colours, digits) so
# the BPE learns whole words for the questions and answers the project uses.
_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray", "pink")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "line", "dot", "cross")
_BUILTIN_CORPUS = (
    [f"What colour is the {s}? The {s} is {c}." for s in _SHAPES for c in _COLOURS]
    + [f"How many {s}s are there? There are {n} {s}s." for s in _SHAPES for n in range(10)]
    + [f"Which digit is written in {c}? The digit is {d}." for c in _COLOURS for d in range(10)]
    + [f"Is there a {c} {s} in the image? Yes. No." for c in _COLOURS for s in _SHAPES]
    + [
        "Describe the image. Where is the shape? It is on the left, right, top, bottom or in the centre.",
        "What number is shown? Answer with a single word. The answer is 0 1 2 3 4 5 6 7 8 9.",
        "What is the largest object in the picture? Please answer the question briefly.",
    ]
    # the chat roles, which every prompt spells out (repeated: BPE merges only pairs seen twice)
    + ["user\nassistant\nsystem\nYou are a helpful assistant."] * 4
)


def build_tokenizer(extra_corpus: Sequence[str] = (), vocab_size: int = 640) -> Tokenizer:
    """A small byte-level BPE with Qwen2's normaliser, pre-tokenizer and decoder.

    ``vocab_size`` caps the BPE vocabulary (256 byte symbols plus merges; the
    built-in corpus alone stops near 410, since BPE merges only pairs seen
    twice). The InternVL3 special tokens are appended after it with the next ids, as Qwen2
    appends its added tokens, and are never split by the model.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([*_BUILTIN_CORPUS, *extra_corpus], trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of one tiny InternVL; presets that share the vision geometry share the tiling."""

    vision_hidden: int  # ViT width
    vision_layers: int  # ViT depth
    vision_heads: int  # ViT attention heads
    image_size: int  # tile side in px (the ViT input)
    patch_size: int  # ViT patch side in px
    text_hidden: int  # Qwen2 width
    text_layers: int  # Qwen2 depth
    text_heads: int  # Qwen2 query heads
    text_kv_heads: int  # Qwen2 key/value heads (fewer than query heads: GQA on purpose)
    text_intermediate: int  # Qwen2 MLP width
    max_position_embeddings: int = 4096  # context length
    downsample_ratio: float = 0.5  # pixel shuffle factor: tokens per tile = (image/patch * ratio) ** 2
    # std of the random init (text and vision); 0.02 (the HF default) leaves tied embeddings
    # dominating the residual stream, so a random model just repeats its last input token.
    initializer_range: float = 0.2

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return int(side * self.downsample_ratio) ** 2

    @classmethod
    def from_name(cls, name: str | TinyPreset) -> TinyPreset:
        if isinstance(name, TinyPreset):
            return name
        if name not in TINY_PRESETS:
            raise ValueError(f"unknown tiny preset {name!r}; known: {sorted(TINY_PRESETS)}")
        return TINY_PRESETS[name]


_TINY_VISION = dict(vision_hidden=32, vision_layers=2, vision_heads=4, image_size=64, patch_size=8)
TINY_PRESETS: dict[str, TinyPreset] = {
    "tiny": TinyPreset(
        **_TINY_VISION, text_hidden=64, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=128
    ),
    "tiny-large": TinyPreset(
        **_TINY_VISION, text_hidden=96, text_layers=6, text_heads=6, text_kv_heads=2, text_intermediate=192
    ),
    # Sizes for the trained synthetic pair (DESIGN "Models"): 224 px tiles, 64 tokens per tile,
    # 1.2M and 6.9M parameters. Trained from the HF default init, not the wide random one.
    "synthetic-small": TinyPreset(
        vision_hidden=64,
        vision_layers=2,
        vision_heads=4,
        image_size=224,
        patch_size=14,
        text_hidden=128,
        text_layers=4,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=512,
        initializer_range=0.02,
    ),
    "synthetic-large": TinyPreset(
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        image_size=224,
        patch_size=14,
        text_hidden=256,
        text_layers=6,
        text_heads=8,
        text_kv_heads=2,
        text_intermediate=1024,
        initializer_range=0.02,
    ),
}


def tiny_internvl_config(preset: str | TinyPreset, tokenizer: Tokenizer) -> InternVLConfig:
    """An ``InternVLConfig`` of a preset (by name or given) whose token ids come from ``tokenizer``.

    Word embeddings are tied, as in InternVL3-1B; float32 so parity tests are exact.
    """
    sizes = TinyPreset.from_name(preset)
    ids = {token: _token_id(tokenizer, token) for token in (ENDOFTEXT, IM_END, CONTEXT_IMAGE)}
    vision = InternVLVisionConfig(
        hidden_size=sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        intermediate_size=4 * sizes.vision_hidden,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        initializer_range=sizes.initializer_range,
    )
    text = Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        initializer_range=sizes.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids[CONTEXT_IMAGE],
        image_seq_length=sizes.tokens_per_tile,
        downsample_ratio=sizes.downsample_ratio,
        tie_word_embeddings=True,
        architectures=["InternVLForConditionalGeneration"],
        dtype="float32",
    )


def default_tiling(preset: str | TinyPreset = "tiny") -> TilingConfig:
    """The tiling tiny checkpoints ship: one ViT tile per grid cell, up to 6 tiles, thumbnail on."""
    sizes = TinyPreset.from_name(preset)
    return TilingConfig(
        tile_size=sizes.image_size,
        min_tiles=1,
        max_tiles=6,
        use_thumbnail=True,
        tokens_per_tile=sizes.tokens_per_tile,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def save_checkpoint(
    model: InternVLForConditionalGeneration,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    tiling: TilingConfig,
    chat_template: str = INTERNVL_CHAT_TEMPLATE,
) -> Path:
    """Write ``model`` and its tokenizer/processor files in the InternVL3-*-hf layout; return the dir.

    Refuses a tiling the model cannot produce (tile size or tokens per tile not
    matching the ViT) or one GOT-OCR2's processor cannot express (no thumbnail).
    """
    out = Path(out_dir)
    _check_tiling(model.config, tiling)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _hf_tokenizer(tokenizer, chat_template, model.config).save_pretrained(out)
    _generation_config(tokenizer).save_pretrained(out)
    _image_processor(tiling).save_pretrained(out)
    processor_config = {"image_seq_length": tiling.tokens_per_tile, "processor_class": "InternVLProcessor"}
    (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    return out


def make_tiny_checkpoint(
    out_dir: str | Path,
    preset: str | TinyPreset = "tiny",
    seed: int = 0,
    tiling: TilingConfig | None = None,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Build and save a seeded random tiny InternVL; the same seed gives the same weights.

    Pass ``tokenizer`` to share one vocabulary between a small and a large model.
    """
    tokenizer = tokenizer or build_tokenizer()
    config = tiny_internvl_config(preset, tokenizer)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    return save_checkpoint(model, tokenizer, out_dir, tiling or default_tiling(preset))


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token!r}")
    return token_id


def _check_tiling(config: InternVLConfig, tiling: TilingConfig) -> None:
    vision = config.vision_config
    side = vision.image_size[0] // vision.patch_size[0]
    tokens = int(side * config.downsample_ratio) ** 2
    if tiling.tile_size != vision.image_size[0] or tiling.tokens_per_tile != tokens:
        raise ValueError(
            f"tiling (tile {tiling.tile_size}px, {tiling.tokens_per_tile} tokens) does not match the ViT "
            f"(tile {vision.image_size[0]}px, {tokens} tokens)"
        )
    if not tiling.use_thumbnail:
        raise ValueError(
            "GotOcr2ImageProcessor always adds a thumbnail tile; use_thumbnail=False cannot be saved"
        )


def _hf_tokenizer(tokenizer: Tokenizer, chat_template: str, config: InternVLConfig) -> Qwen2Tokenizer:
    # Qwen2Tokenizer, as InternVL3-*-hf declare: no BOS, no UNK, <|im_end|> ends a turn.
    hf = Qwen2Tokenizer(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
        bos_token=None,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
        model_max_length=config.text_config.max_position_embeddings,
        errors="replace",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        return_token_type_ids=False,
    )
    hf.chat_template = chat_template
    return hf


def _generation_config(tokenizer: Tokenizer) -> GenerationConfig:
    # InternVL3 stops on <|im_end|>; Qwen2 pads and begins with <|endoftext|>.
    return GenerationConfig(
        bos_token_id=_token_id(tokenizer, ENDOFTEXT),
        eos_token_id=_token_id(tokenizer, IM_END),
        pad_token_id=_token_id(tokenizer, ENDOFTEXT),
    )


def _image_processor(tiling: TilingConfig) -> GotOcr2ImageProcessorPil:
    return GotOcr2ImageProcessorPil(
        do_resize=True,
        size={"height": tiling.tile_size, "width": tiling.tile_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(tiling.image_mean),
        image_std=list(tiling.image_std),
        do_convert_rgb=True,
        crop_to_patches=True,
        min_patches=tiling.min_tiles,
        max_patches=tiling.max_tiles,
    )
