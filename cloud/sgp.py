"""SGP: a large InternVL model that runs on the kept visual tokens from layer K on.

Small-model-Guided Pruning (SGL, arXiv 2412.03324): decoder layers ``0..K-1``
see the whole prompt; at the input of layer ``K`` only the text tokens and the
kept visual tokens go on. Kept tokens keep their original position ids (RoPE),
and decode positions continue from the full prompt length, so layers ``< K``
hold a KV cache of the full prompt and layers ``>= K`` a cache of the pruned
one. With every visual token kept the model equals the unpruned one.

This module composes the stock ``transformers`` modules of a loaded
``InternVLForConditionalGeneration`` (vision tower, projector, decoder layers,
final norm, LM head); it never copies or patches a modeling file. It knows
nothing about images or tokenization: callers hand it pixel values and token
ids (``engine`` does preprocessing and prompts). Prefill and ``generate`` run
one sequence (batch 1, the reference the batched path is tested against);
``decode_batch`` advances many prefilled sequences by one token in one forward
pass over a ``RowKVCache`` (``scheduler`` decides which).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, InternVLForConditionalGeneration

from .batch_cache import RowKVCache


class GenerationCancelled(Exception):
    """``should_stop`` turned true between two decode steps."""


def resolve_prune_layer(prune_layer: float, num_layers: int) -> int:
    """K as a layer index: an int in ``0..num_layers``, or a fraction of depth in ``(0, 1)``.

    A fraction rounds to the nearest layer (0.1 of 28 layers is layer 3).
    ``K = num_layers`` keeps every token in every layer (no pruning).
    """
    if isinstance(prune_layer, bool):
        raise TypeError("prune_layer must be a number, not a bool")
    if isinstance(prune_layer, float) and not prune_layer.is_integer():
        if not 0.0 < prune_layer < 1.0:
            raise ValueError(f"a fractional prune layer must lie in (0, 1), got {prune_layer}")
        return round(prune_layer * num_layers)
    k = int(prune_layer)
    if not 0 <= k <= num_layers:
        raise ValueError(f"prune layer {k} outside 0..{num_layers}")
    return k


def kept_sequence_positions(
    seq_len: int, visual_start: int, num_visual: int, keep_visual: torch.Tensor
) -> torch.Tensor:
    """Sequence positions that go on at layer K: every text token and the kept visual ones.

    keep_visual: [k] ascending indices within the visual span (0..num_visual-1).
    Returns [S'] ascending positions in 0..seq_len-1.
    """
    if visual_start < 0 or visual_start + num_visual > seq_len:
        raise ValueError(f"visual span {visual_start}+{num_visual} outside a sequence of {seq_len}")
    keep_visual = keep_visual.to(torch.long).cpu()
    if keep_visual.numel() and (keep_visual.min() < 0 or keep_visual.max() >= num_visual):
        raise ValueError("kept visual index outside the visual span")
    if keep_visual.numel() > 1 and not bool((keep_visual[1:] > keep_visual[:-1]).all()):
        raise ValueError("kept visual indices must be strictly ascending")
    before = torch.arange(visual_start)
    after = torch.arange(visual_start + num_visual, seq_len)
    return torch.cat([before, keep_visual + visual_start, after])


@dataclass
class SGPGeneration:
    """Greedy output of the pruned model."""

    token_ids: list[int]  # generated ids, EOS included when generated
    step_logits: list[torch.Tensor] = field(repr=False)  # each [vocab] float32, logits that chose token i
    prompt_tokens: int = 0  # full prompt length S
    pruned_prompt_tokens: int = 0  # S' seen by layers >= K
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


class SGPModel:
    """Pruned greedy generation on top of a loaded ``InternVLForConditionalGeneration``."""

    def __init__(self, model: InternVLForConditionalGeneration, prune_layer: float = 2) -> None:
        self.model = model.eval()
        self.text_config = model.config.text_config
        self.language_model = model.model.language_model
        self.num_layers = self.text_config.num_hidden_layers
        self.max_context = self.text_config.max_position_embeddings  # positions a sequence may reach
        self.prune_layer = resolve_prune_layer(prune_layer, self.num_layers)
        self.image_token_id = model.config.image_token_id
        # SDPA without a mask takes its causal fast path (flash / efficient kernels);
        # eager attention adds no causality by itself, so it gets an explicit mask.
        self._explicit_mask = self.text_config._attn_implementation != "sdpa"
        layer_types = getattr(self.text_config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError("SGP supports full-attention decoders only (no sliding window)")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [tiles, 3, H, W] -> visual token embeddings [tiles * tokens_per_tile, hidden]."""
        out = self.model.model.get_image_features(pixel_values=pixel_values.to(self.device, self.model.dtype))
        features = out.pooler_output  # [tiles, tokens_per_tile, hidden]
        return features.reshape(-1, features.shape[-1])

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """input_ids: [S] with one image-context id per visual token -> inputs_embeds [1, S, hidden]."""
        input_ids = input_ids.to(self.device)
        embeds = self.language_model.embed_tokens(input_ids)  # [S, hidden]
        is_visual = input_ids == self.image_token_id
        n_visual = int(is_visual.sum())
        if n_visual != image_features.shape[0]:
            raise ValueError(
                f"prompt has {n_visual} image tokens but the image gave {image_features.shape[0]}"
            )
        embeds = embeds.clone()
        embeds[is_visual] = image_features.to(embeds.dtype)
        return embeds.unsqueeze(0)

    def _causal_mask(self, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        if not self._explicit_mask:
            return None
        mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=self.device)
        return mask.triu(1)[None, None]  # [1, 1, length, length]

    def _padded_causal_mask(self, lengths: list[int], total: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, total, total] additive mask: causal, and no key past a row's own length.

        Query positions past a row's length (padding) keep their causal past, so
        no softmax row is empty (NaN); their outputs are never read.
        """
        i = torch.arange(total, device=self.device)[:, None]
        j = torch.arange(total, device=self.device)[None]
        length = torch.tensor(lengths, device=self.device)[:, None, None]  # [rows, 1, 1]
        allowed = (j <= i) & ((j < length) | (i >= length))  # [rows, total, total]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def _run_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        layers: range,
        cache: DynamicCache,
        causal: bool,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden: [rows, n, hidden], position_ids: [rows, n] -> hidden after ``layers`` (cache updated).

        ``mask`` (additive, [rows, 1, n, n]) replaces the causal mask this builds for eager attention.
        """
        position_embeddings = self.language_model.rotary_emb(hidden, position_ids)
        if mask is None and causal:
            mask = self._causal_mask(hidden.shape[1], hidden.dtype)
        for i in layers:
            hidden = self.language_model.layers[i](
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                past_key_values=cache,
                use_cache=True,
            )
        return hidden

    def _logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """hidden_last: [1, 1, hidden] -> [vocab] float32."""
        return self.model.lm_head(self.language_model.norm(hidden_last))[0, -1].float()

    @torch.inference_mode()
    def prefill(
        self, inputs_embeds: torch.Tensor, keep_positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, DynamicCache, int]:
        """Run the prompt: layers < K on all of it, layers >= K on ``keep_positions``.

        inputs_embeds: [1, S, hidden]; keep_positions: [S'] ascending or None (keep all).
        Returns the next-token logits [vocab], the cache, and S'.
        """
        seq_len = inputs_embeds.shape[1]
        cache = DynamicCache(config=self.text_config)
        position_ids = torch.arange(seq_len, device=self.device)[None]  # [1, S]
        k = self.prune_layer
        hidden = self._run_layers(inputs_embeds, position_ids, range(k), cache, causal=True)
        if keep_positions is not None and k < self.num_layers:
            keep_positions = keep_positions.to(self.device)
            hidden = hidden[:, keep_positions]  # [1, S', hidden]
            position_ids = position_ids[:, keep_positions]  # original RoPE positions
        hidden = self._run_layers(hidden, position_ids, range(k, self.num_layers), cache, causal=True)
        return self._logits(hidden[:, -1:]), cache, hidden.shape[1]

    @torch.inference_mode()
    def prefill_batch(
        self, inputs_embeds: Sequence[torch.Tensor], keep_positions: Sequence[torch.Tensor | None]
    ) -> list[tuple[torch.Tensor, DynamicCache, int]]:
        """``prefill`` of several prompts in one padded pass; what ``prefill`` returns, per prompt.

        inputs_embeds: each [1, S_i, hidden]; keep_positions: each [S'_i] or None.
        Layers < K run the prompts right-padded to the longest, layers >= K each
        prompt's kept positions right-padded to the longest of those, both under
        masks that hide the padding, so each row equals its own ``prefill`` up to
        the rounding of batched kernels. One prompt goes through ``prefill`` itself.
        """
        if len(inputs_embeds) == 1:
            return [self.prefill(inputs_embeds[0], keep_positions[0])]
        k = self.prune_layer
        lengths = [e.shape[1] for e in inputs_embeds]
        total = max(lengths)
        hidden = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, total - e.shape[1])) for e in inputs_embeds])
        position_ids = torch.arange(total, device=self.device).expand(len(lengths), -1)  # [rows, S]
        cache = DynamicCache(config=self.text_config)
        mask = self._padded_causal_mask(lengths, total, hidden.dtype)
        hidden = self._run_layers(hidden, position_ids, range(k), cache, causal=True, mask=mask)
        kept = [
            torch.arange(n, device=self.device)
            if keep is None or k >= self.num_layers
            else keep.to(self.device)
            for n, keep in zip(lengths, keep_positions, strict=True)
        ]
        pruned = [len(keep) for keep in kept]
        width = max(pruned)
        # each row's kept positions, padded by repeating its last one (masked out below)
        index = torch.stack([torch.cat([keep, keep[-1:].expand(width - len(keep))]) for keep in kept])
        rows = torch.arange(len(lengths), device=self.device)[:, None]
        hidden = hidden[rows, index]  # [rows, S'_max, hidden]
        position_ids = position_ids[rows, index]  # original RoPE positions
        mask = self._padded_causal_mask(pruned, width, hidden.dtype)
        hidden = self._run_layers(
            hidden, position_ids, range(k, self.num_layers), cache, causal=True, mask=mask
        )
        logits = self.model.lm_head(
            self.language_model.norm(hidden[rows[:, 0], torch.tensor(pruned, device=self.device) - 1])
        )
        out = []
        for row, (n, m) in enumerate(zip(lengths, pruned, strict=True)):
            own = DynamicCache(config=self.text_config)
            for layer, entry in enumerate(cache.layers):
                length = n if layer < k else m
                own.update(
                    entry.keys[row : row + 1, :, :length], entry.values[row : row + 1, :, :length], layer
                )
            out.append((logits[row].float(), own, m))
        return out

    @torch.inference_mode()
    def decode_step(self, token_id: int, position: int, cache: DynamicCache) -> torch.Tensor:
        """One new token at absolute position ``position`` -> next-token logits [vocab]."""
        ids = torch.tensor([[token_id]], device=self.device)
        hidden = self.language_model.embed_tokens(ids)  # [1, 1, hidden]
        position_ids = torch.tensor([[position]], device=self.device)
        hidden = self._run_layers(hidden, position_ids, range(self.num_layers), cache, causal=False)
        return self._logits(hidden)

    @torch.inference_mode()
    def decode_batch(
        self, token_ids: torch.Tensor, positions: torch.Tensor, cache: RowKVCache
    ) -> torch.Tensor:
        """One decode step for every row of ``cache``.

        token_ids, positions: [rows] (each row's last token and its absolute
        position, which continues from the row's full prompt length) -> next-token
        logits [rows, vocab] float32. Each layer attends through its own padding
        mask, since rows and layers hold KV of different lengths.
        """
        ids = token_ids.to(self.device)[:, None]  # [rows, 1]
        position_ids = positions.to(self.device)[:, None]  # [rows, 1]
        hidden = self.language_model.embed_tokens(ids)  # [rows, 1, hidden]
        position_embeddings = self.language_model.rotary_emb(hidden, position_ids)
        masks = cache.begin_step(hidden.dtype)  # per layer [rows, 1, 1, L_layer + 1]
        completed = False
        try:
            for i, layer in enumerate(self.language_model.layers):
                hidden = layer(
                    hidden,
                    attention_mask=masks[i],
                    position_ids=position_ids,
                    position_embeddings=position_embeddings,
                    past_key_values=cache,
                    use_cache=True,
                )
            completed = True
        finally:
            cache.end_step(completed)
        return self.model.lm_head(self.language_model.norm(hidden))[:, -1].float()

    @torch.inference_mode()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        keep_positions: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        should_stop: Callable[[], bool] | None = None,
    ) -> SGPGeneration:
        """Greedy decoding with the KV cache; stops on an EOS id or after ``max_new_tokens``."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        eos = set(eos_token_ids)
        t0 = time.perf_counter()
        logits, cache, pruned_len = self.prefill(inputs_embeds, keep_positions)
        _sync(self.device)
        t1 = time.perf_counter()
        seq_len = inputs_embeds.shape[1]
        tokens: list[int] = []
        step_logits: list[torch.Tensor] = []
        while True:
            token = int(torch.argmax(logits))
            tokens.append(token)
            step_logits.append(logits.cpu())
            if token in eos or len(tokens) >= max_new_tokens:
                break
            if should_stop is not None and should_stop():
                raise GenerationCancelled(f"stopped after {len(tokens)} tokens")
            # decode positions continue from the full prompt length, pruned or not
            logits = self.decode_step(token, seq_len + len(tokens) - 1, cache)
        _sync(self.device)
        t2 = time.perf_counter()
        return SGPGeneration(
            token_ids=tokens,
            step_logits=step_logits,
            prompt_tokens=seq_len,
            pruned_prompt_tokens=pruned_len,
            prefill_ms=(t1 - t0) * 1e3,
            decode_ms=(t2 - t1) * 1e3,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
