"""Tiny InternVL checkpoints: published layout, loading back through transformers, forward passes."""

from __future__ import annotations

import json

import pytest
from conftest import make_test_image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration  # noqa: E402

from stitchvlm.cloud.checkpoints import (  # noqa: E402
    INTERNVL_CHAT_TEMPLATE,
    build_tokenizer,
    default_tiling,
    save_checkpoint,
    tiny_internvl_config,
)
from stitchvlm.shared.layout import TilingConfig  # noqa: E402

# The files OpenGVLab/InternVL3-1B-hf ships (transformers 5 writes the chat template as .jinja).
PUBLISHED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
}
QUESTIONS = [
    "What colour is the circle?",
    "How many stars are there?",
    "Which digit is written in red?",
    "Describe the image.",
    "Is there a blue square in the image?",
    "What number is shown?",
    "Where is the triangle?",
    "What is the largest object in the picture?",
]


def hf_inputs(checkpoint, image, question: str) -> dict:
    """input_ids and pixel_values the way InternVLProcessor builds them (it needs torchvision, so by hand)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = GotOcr2ImageProcessorPil.from_pretrained(checkpoint)
    image_seq_length = json.loads((checkpoint / "processor_config.json").read_text())["image_seq_length"]
    pixels = processor(image, return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    context = tokenizer.context_image_token * image_seq_length * int(pixels["num_patches"][0])
    text = text.replace(
        tokenizer.context_image_token, tokenizer.start_image_token + context + tokenizer.end_image_token, 1
    )
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return {"input_ids": input_ids, "pixel_values": pixels["pixel_values"]}


def test_saved_directory_has_the_published_files(tiny_checkpoint):
    """Guards against a layout other loaders (edge ModelFiles, from_pretrained, the exporter) do not expect."""
    assert {p.name for p in tiny_checkpoint.iterdir()} == PUBLISHED_FILES
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    tokenizer_json = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    assert config["image_token_id"] == ids["<IMG_CONTEXT>"]
    assert config["tie_word_embeddings"] is True
    text = config["text_config"]
    assert text["num_key_value_heads"] < text["num_attention_heads"], "GQA must be exercised"
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids["<|im_end|>"]
    preprocessor = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"].startswith("GotOcr2ImageProcessor")
    assert preprocessor["crop_to_patches"] is True
    assert (tiny_checkpoint / "chat_template.jinja").read_text() == INTERNVL_CHAT_TEMPLATE


def test_tokens_per_tile_agree_with_the_vision_geometry(tiny_checkpoint):
    """Guards against image_seq_length disagreeing with what the ViT and pixel shuffle really emit."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    vision = config["vision_config"]
    side = vision["image_size"][0] // vision["patch_size"][0]
    tokens = int(side * config["downsample_ratio"]) ** 2
    processor_config = json.loads((tiny_checkpoint / "processor_config.json").read_text())
    assert processor_config["image_seq_length"] == config["image_seq_length"] == tokens == 16

    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    pixels = torch.zeros(3, 3, vision["image_size"][0], vision["image_size"][1])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output
    # features: [tiles * tokens_per_tile, text_hidden] (or [tiles, tokens_per_tile, text_hidden])
    assert features.reshape(-1, config["text_config"]["hidden_size"]).shape[0] == 3 * tokens


def test_loads_back_through_transformers(tiny_checkpoint):
    """Guards against files from_pretrained cannot read offline, or a tokenizer without InternVL's named tokens."""
    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    processor = GotOcr2ImageProcessorPil.from_pretrained(tiny_checkpoint)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert (tokenizer.start_image_token, tokenizer.end_image_token) == ("<img>", "</img>")
    assert tokenizer.context_image_token_id == model.config.image_token_id
    assert tokenizer.video_token == "<video>"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token is None
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config._attn_implementation in ("sdpa", "eager")
    assert processor.size["height"] == default_tiling("tiny").tile_size
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_reloaded_model_gives_the_same_logits(tmp_path, tiny_tokenizer):
    """Guards against weights lost or renamed on save (e.g. a tied or vision weight re-initialised on load)."""
    config = tiny_internvl_config("tiny", tiny_tokenizer)
    torch.manual_seed(3)
    model = InternVLForConditionalGeneration(config).eval()
    path = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", default_tiling("tiny"))
    reloaded = InternVLForConditionalGeneration.from_pretrained(path).eval()
    inputs = hf_inputs(path, make_test_image(150, 90, seed=1), "What colour is the circle?")
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = reloaded(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_forward_with_processor_pixels_and_image_changes_logits(tiny_checkpoint):
    """Guards against the image being ignored: two images must give different text logits."""
    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    first = hf_inputs(tiny_checkpoint, make_test_image(200, 100, seed=2), "What colour is the circle?")
    second = hf_inputs(tiny_checkpoint, make_test_image(200, 100, seed=3), "What colour is the circle?")
    assert torch.equal(first["input_ids"], second["input_ids"])  # same size -> same tiling
    assert first["pixel_values"].shape[0] > 1  # a wide image tiles into a grid plus thumbnail
    with torch.no_grad():
        logits_a = model(**first).logits
        logits_b = model(**second).logits
    # logits: [1, seq, vocab]
    assert logits_a.shape == (1, first["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits_a).all()
    assert (logits_a[0, -1] - logits_b[0, -1]).abs().max() > 1e-3


def test_wrong_image_token_count_raises(tiny_checkpoint):
    """Guards against silently misaligned image features (transformers' own count check must fire)."""
    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    inputs = hf_inputs(tiny_checkpoint, make_test_image(120, 120, seed=4), "Describe the image.")
    image_id = model.config.image_token_id
    ids = inputs["input_ids"][0].tolist()
    ids.remove(image_id)  # one visual token short
    with torch.no_grad(), pytest.raises(ValueError, match="[Ii]mage"):
        model(input_ids=torch.tensor([ids]), pixel_values=inputs["pixel_values"])


def test_greedy_generation_is_not_degenerate(tiny_checkpoint):
    """Guards against a random init that makes every answer empty (EOS first) or the same for every prompt."""
    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    eos = model.generation_config.eos_token_id
    answers = []
    for seed, question in enumerate(QUESTIONS):
        inputs = hf_inputs(
            tiny_checkpoint, make_test_image(64 + 23 * seed, 160 - 11 * seed, seed=seed), question
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers.append(tuple(out[0, inputs["input_ids"].shape[1] :].tolist()))
    first_is_eos = sum(answer[0] == eos for answer in answers)
    assert first_is_eos <= len(answers) // 4, answers
    assert len(set(answers)) >= len(answers) // 2, answers
    assert any(len(set(answer)) > 1 for answer in answers), "every answer repeats one token"


def test_small_and_large_share_tokenizer_and_tiling(tiny_checkpoint, tiny_large_checkpoint):
    """Guards against a small/large pair whose token ids or visual-token layouts differ (SGL needs both equal)."""
    for name in (
        "tokenizer.json",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (tiny_checkpoint / name).read_bytes() == (tiny_large_checkpoint / name).read_bytes(), name
    small = json.loads((tiny_checkpoint / "config.json").read_text())
    large = json.loads((tiny_large_checkpoint / "config.json").read_text())
    assert small["vision_config"] == large["vision_config"]
    assert large["text_config"]["num_hidden_layers"] > small["text_config"]["num_hidden_layers"]
    assert large["text_config"]["hidden_size"] > small["text_config"]["hidden_size"]


@pytest.mark.parametrize(("small", "large"), [("tiny", "tiny-large"), ("synthetic-small", "synthetic-large")])
def test_preset_pairs_share_the_tiling(tiny_tokenizer, small, large):
    """Guards against a preset pair whose ViT geometry (and so visual-token layout) differs."""
    assert default_tiling(small) == default_tiling(large)
    small_config = tiny_internvl_config(small, tiny_tokenizer)
    large_config = tiny_internvl_config(large, tiny_tokenizer)
    for config in (small_config, large_config):
        text = config.text_config
        assert text.num_key_value_heads < text.num_attention_heads
        assert text.hidden_size % text.num_attention_heads == 0
    assert small_config.vision_config.image_size == large_config.vision_config.image_size
    assert (
        small_config.image_seq_length
        == large_config.image_seq_length
        == default_tiling(small).tokens_per_tile
    )
    assert large_config.text_config.num_hidden_layers > small_config.text_config.num_hidden_layers


def test_tokenizer_extra_corpus_and_determinism():
    """Guards against a tokenizer that changes between builds (checkpoints built apart must agree on ids)."""
    assert build_tokenizer().to_str() == build_tokenizer().to_str()
    extended = build_tokenizer(["zebra zebra zebra zebra giraffe giraffe giraffe"], vocab_size=700)
    assert len(extended.encode("zebra").ids) < len(build_tokenizer().encode("zebra").ids)


@pytest.mark.parametrize(
    "tiling",
    [
        TilingConfig(tile_size=32, tokens_per_tile=16),
        TilingConfig(tile_size=64, tokens_per_tile=64),
        TilingConfig(tile_size=64, tokens_per_tile=16, use_thumbnail=False),
    ],
)
def test_save_refuses_a_tiling_the_model_cannot_produce(tmp_path, tiny_tokenizer, tiling):
    """Guards against a checkpoint whose processor config promises a layout the ViT does not make."""
    model = InternVLForConditionalGeneration(tiny_internvl_config("tiny", tiny_tokenizer))
    with pytest.raises(ValueError):
        save_checkpoint(model, tiny_tokenizer, tmp_path / "bad", tiling)
    assert not (tmp_path / "bad").exists()
