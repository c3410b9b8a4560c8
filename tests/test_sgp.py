"""SGP (the pruned large model) against independent references.

Inputs come from transformers' own tokenizer, chat template and
GotOcr2ImageProcessorPil; references are ``model.generate`` and the stock
forward pass, never the code under test.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402
from transformers import InternVLForConditionalGeneration  # noqa: E402

from stitchvlm.cloud.sgp import SGPModel, kept_sequence_positions, resolve_prune_layer  # noqa: E402

QUESTIONS = [
    "What colour is the circle?",
    "How many shapes are there? Answer briefly.",
    "Describe the image.",
]
IMAGE_SIZES = [(64, 64), (200, 70), (90, 260)]


def hf_inputs(hf, size, question, seed=0):
    """input_ids [1, S], pixel_values [T, 3, H, W], visual_start, |V| built the transformers way."""
    model, tokenizer, processor = hf
    image = make_test_image(*size, seed=seed)
    pixels = processor(images=image, crop_to_patches=True, return_tensors="pt")
    n_visual = int(pixels["num_patches"][0]) * model.config.image_seq_length
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expanded = (
        tokenizer.start_image_token + tokenizer.context_image_token * n_visual + tokenizer.end_image_token
    )
    text = text.replace(tokenizer.context_image_token, expanded, 1)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    visual = (input_ids[0] == model.config.image_token_id).nonzero()[:, 0]
    assert len(visual) == n_visual and int(visual[-1] - visual[0]) == n_visual - 1
    return input_ids, pixels["pixel_values"], int(visual[0]), n_visual


def sgp_generate(model, k, input_ids, pixel_values, keep_positions, max_new_tokens, eos=()):
    sgp = SGPModel(model, prune_layer=k)
    embeds = sgp.embed(input_ids[0], sgp.image_features(pixel_values))
    return sgp.generate(embeds, keep_positions, max_new_tokens, eos)


def eos_ids(tokenizer):
    return [tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("k", [0, 2, 4])
@pytest.mark.parametrize("case", range(3))
def test_full_retention_equals_generate(hf, case, k):
    """R = 100% must be the unpruned model: guards against wrong positions, masks or caches in the layer loop."""
    model, tokenizer, _ = hf
    input_ids, pixel_values, vstart, n_visual = hf_inputs(hf, IMAGE_SIZES[case], QUESTIONS[case], seed=case)
    out = model.generate(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos_ids(tokenizer),
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref_tokens = out.sequences[0, input_ids.shape[1] :].tolist()
    keep = kept_sequence_positions(input_ids.shape[1], vstart, n_visual, torch.arange(n_visual))
    gen = sgp_generate(model, k, input_ids, pixel_values, keep, 12, eos_ids(tokenizer))
    assert gen.token_ids == ref_tokens
    assert len(set(ref_tokens)) > 1, "degenerate reference: the test model repeats one token"
    for mine, ref in zip(gen.step_logits, out.logits, strict=True):
        torch.testing.assert_close(mine, ref[0].float(), atol=1e-4, rtol=1e-4)
    assert gen.prompt_tokens == gen.pruned_prompt_tokens == input_ids.shape[1]


def pruning_hooks(model, k, keep_positions):
    """Pre-hooks that make the stock forward drop tokens at layer k (slicing states, RoPE and mask)."""
    layers = model.model.language_model.layers

    def hook(layer_idx):
        def pre(module, args, kwargs):
            args = list(args)
            if layer_idx == k:
                args[0] = args[0][:, keep_positions]
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[:, keep_positions], sin[:, keep_positions])
            kwargs["position_ids"] = kwargs["position_ids"][:, keep_positions]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = mask[..., keep_positions, :][..., keep_positions]
            return tuple(args), kwargs

        return pre

    return [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(k, len(layers))]


def slow_reference_generate(model, k, input_ids, pixel_values, keep_visual, vstart, n_visual, steps, eos):
    """Greedy decoding that recomputes the whole pruned sequence with the stock forward every step (no cache)."""
    ids = input_ids.clone()
    tokens, logits_per_step = [], []
    for _ in range(steps):
        keep = kept_sequence_positions(ids.shape[1], vstart, n_visual, keep_visual)
        handles = pruning_hooks(model, k, keep)
        try:
            with torch.no_grad():
                out = model(input_ids=ids, pixel_values=pixel_values, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        logits = out.logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logits_per_step.append(logits)
        if token in eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logits_per_step


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("k", "retention"), [(1, 0.09), (2, 0.35), (3, 0.64)])
def test_pruned_cached_decode_equals_slow_reference(hf, tiny_checkpoint, k, retention, attn):
    """The KV-cached pruned decode (caches of different lengths per layer, decode positions after the
    full prompt) must equal recomputing the pruned sequence from scratch each step."""
    model = hf[0]
    if attn == "eager":
        model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
        model.eval()
    input_ids, pixel_values, vstart, n_visual = hf_inputs(hf, (200, 70), QUESTIONS[1], seed=5)
    n_keep = max(1, int(retention * n_visual))
    keep_visual = torch.randperm(n_visual, generator=torch.Generator().manual_seed(k))[:n_keep].sort().values
    eos = eos_ids(hf[1])
    ref_tokens, ref_logits = slow_reference_generate(
        model, k, input_ids, pixel_values, keep_visual, vstart, n_visual, 10, eos
    )
    keep = kept_sequence_positions(input_ids.shape[1], vstart, n_visual, keep_visual)
    gen = sgp_generate(model, k, input_ids, pixel_values, keep, 10, eos)
    assert gen.token_ids == ref_tokens
    for mine, ref in zip(gen.step_logits, ref_logits, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)
    assert gen.pruned_prompt_tokens == input_ids.shape[1] - n_visual + n_keep


def test_k0_equals_model_on_shorter_sequence(hf):
    """K = 0 prunes the embeddings: equal to the unpruned model run on a sequence that simply lacks the
    dropped visual tokens, with their original position ids (guards against renumbered RoPE positions)."""
    model, tokenizer, _ = hf
    input_ids, pixel_values, vstart, n_visual = hf_inputs(hf, (90, 260), QUESTIONS[0], seed=2)
    keep_visual = torch.arange(0, n_visual, 3)
    keep = kept_sequence_positions(input_ids.shape[1], vstart, n_visual, keep_visual)
    sgp = SGPModel(model, prune_layer=0)
    embeds = sgp.embed(input_ids[0], sgp.image_features(pixel_values))
    gen = sgp.generate(embeds, keep, 8, eos_ids(tokenizer))

    # reference: stock forward on the shorter sequence, with its own DynamicCache, explicit positions
    positions = keep[None]  # [1, S'] original position ids
    seq = embeds[:, keep]
    # an explicit all-ones mask: without it transformers reads gaps in position_ids as packed sequences
    with torch.no_grad():
        out = model(inputs_embeds=seq, position_ids=positions, attention_mask=torch.ones_like(positions))
        cache, tokens = out.past_key_values, []
        logits = out.logits[0, -1]
        full_len = input_ids.shape[1]
        for step in range(8):
            token = int(logits.argmax())
            tokens.append(token)
            torch.testing.assert_close(gen.step_logits[step], logits.float(), atol=1e-4, rtol=1e-4)
            if token in eos_ids(tokenizer):
                break
            out = model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[full_len + step]]),
                attention_mask=torch.ones(1, seq.shape[1] + step + 1, dtype=torch.long),
                past_key_values=cache,
            )
            cache, logits = out.past_key_values, out.logits[0, -1]
    assert gen.token_ids == tokens


def test_pruning_changes_the_answer_path(hf):
    """A guard on the test itself: dropping most visual tokens at K=1 must change the logits,
    or the equality tests above could pass with pruning silently switched off."""
    model, tokenizer, _ = hf
    input_ids, pixel_values, vstart, n_visual = hf_inputs(hf, (200, 70), QUESTIONS[2], seed=7)
    full = sgp_generate(model, 1, input_ids, pixel_values, None, 1)
    keep = kept_sequence_positions(input_ids.shape[1], vstart, n_visual, torch.arange(0, n_visual, 10))
    pruned = sgp_generate(model, 1, input_ids, pixel_values, keep, 1)
    assert (full.step_logits[0] - pruned.step_logits[0]).abs().max() > 1e-3


def test_resolve_prune_layer():
    """K as an index or a fraction of depth; out-of-range values are refused, not clamped."""
    assert resolve_prune_layer(2, 28) == 2
    assert resolve_prune_layer(0, 28) == 0
    assert resolve_prune_layer(28, 28) == 28
    assert resolve_prune_layer(0.1, 28) == 3
    assert resolve_prune_layer(0.5, 48) == 24
    assert resolve_prune_layer(2.0, 28) == 2
    for bad in (-1, 29, 1.5, True):
        with pytest.raises((ValueError, TypeError)):
            resolve_prune_layer(bad, 28)


def test_kept_sequence_positions():
    """Text before and after the image always goes on; visual indices are offset by the span start."""
    pos = kept_sequence_positions(10, 3, 4, torch.tensor([1, 3]))
    assert pos.tolist() == [0, 1, 2, 4, 6, 7, 8, 9]
    with pytest.raises(ValueError):
        kept_sequence_positions(10, 3, 4, torch.tensor([3, 1]))
    with pytest.raises(ValueError):
        kept_sequence_positions(10, 3, 4, torch.tensor([4]))
    with pytest.raises(ValueError):
        kept_sequence_positions(5, 3, 4, torch.tensor([0]))
