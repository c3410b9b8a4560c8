"""The torch modules that become the edge's ONNX graphs.

``ScoringDecoder`` runs the text model of an ``InternVLForConditionalGeneration``
one forward pass at a time with an explicit KV cache and, next to the logits,
returns the visual-token score of that pass (DESIGN "Visual-token score"):

    visual_scores[b, k] = sum over layers l, heads h, queries q of
                          score_query_mask[b, q] * attn[l, h, q, k]

It is composed from the stock modules' weights (``q_proj``/``k_proj``/
``v_proj``/``o_proj``, the two RMSNorms, the MLP, the final norm, the rotary
embedding and ``lm_head``) and the library's own RoPE helpers; only the
attention itself is written out, so that its probabilities can be summed in the
graph without ever leaving it as a per-layer output.

``UnscoredDecoder`` is the same graph without the score, for benchmarks only.

``VisionEncoder`` is ``InternVLModel.get_image_features`` (vision tower, pixel
shuffle, projector) flattened to one row per visual token.

This module builds graphs only; exporting, converting and verifying them is in
``export``, running them in ``runtime``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

# Text models whose decoder layer is exactly: RMSNorm -> attention (q/k/v/o
# projections, RoPE on q and k, no q/k norm, no sliding window) -> residual ->
# RMSNorm -> MLP -> residual. Anything else would be silently mis-exported.
SUPPORTED_TEXT_MODELS = ("qwen2", "llama")


def check_supported(model: InternVLForConditionalGeneration) -> None:
    """Refuse a text model the explicit attention below would compute wrongly."""
    text = model.config.text_config
    if text.model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"text model {text.model_type!r} is not supported; known: {SUPPORTED_TEXT_MODELS}")
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(f"only full-attention layers can be exported, got {sorted(set(layer_types))}")
    rope_type = (getattr(text, "rope_parameters", None) or {}).get("rope_type", "default")
    if "dynamic" in rope_type or "longrope" in rope_type:
        # These recompute inv_freq from the sequence length at run time.
        raise ValueError(f"RoPE type {rope_type!r} depends on the sequence length and cannot be exported")


def attention_bias(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: 0 where query q may see key k, the dtype's minimum elsewhere.

    Causality comes from the sequence index (query q sits at kv index P + q),
    not from position ids, which may skip values after visual tokens are dropped.
    """
    # attention_mask: [batch, kv_len] int64, 1 = real token
    kv_len = attention_mask.shape[1]
    key_index = torch.arange(kv_len, device=attention_mask.device)  # [kv_len]
    query_index = torch.arange(query_len, device=attention_mask.device) + (kv_len - query_len)  # [S]
    causal = key_index[None, :] <= query_index[:, None]  # [S, kv_len]
    allowed = causal[None, None, :, :] & (attention_mask[:, None, None, :] > 0)  # [batch, 1, S, kv_len]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, blocked)


def scored_self_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One attention block with the stock projections; also returns its probabilities.

    Returns (output [B, S, D], key [B, kv_heads, P+S, hd], value [...], probs
    [B, heads, S, P+S] float32). Scores and softmax run in float32 whatever the
    weights' dtype, as transformers' eager attention does.
    """
    batch, seq_len, _ = hidden.shape
    head_dim = attn.head_dim
    query = attn.q_proj(hidden).view(batch, seq_len, -1, head_dim).transpose(1, 2)  # [B, H, S, hd]
    key = attn.k_proj(hidden).view(batch, seq_len, -1, head_dim).transpose(1, 2)  # [B, KV, S, hd]
    value = attn.v_proj(hidden).view(batch, seq_len, -1, head_dim).transpose(1, 2)  # [B, KV, S, hd]
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    key = torch.cat([past_key, key], dim=2)  # [B, KV, P+S, hd]
    value = torch.cat([past_value, value], dim=2)

    groups = attn.num_key_value_groups
    logits = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * attn.scaling  # [B, H, S, P+S]
    probs = torch.softmax(logits.float() + bias, dim=-1)  # [B, H, S, P+S] float32
    context = torch.matmul(probs.to(value.dtype), repeat_kv(value, groups))  # [B, H, S, hd]
    context = context.transpose(1, 2).reshape(batch, seq_len, -1)
    return attn.o_proj(context), key, value, probs


def scored_attention(probs: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    """One layer's attention on each key, summed over heads and weighted queries.

    Heads are summed first and the queries by a matmul, rather than ``(probs *
    weight).sum``: that product would write a second tensor the size of
    ``probs`` (heads x S x P+S) in every layer of a prefill.
    """
    # probs: [B, H, S, P+S] float32; query_weight: [B, 1, S] float32 -> [B, P+S]
    return torch.matmul(query_weight, probs.sum(dim=1)).squeeze(1)


def last_positions(hidden: torch.Tensor, num_logits: torch.Tensor) -> torch.Tensor:
    """The last ``num_logits`` positions of ``hidden``, so the head runs on them alone.

    A gather over ``arange`` rather than a Python slice: the tracer would freeze
    ``hidden[:, -n:]`` at the traced ``n``, the gather keeps it a graph input.
    The caller keeps ``1 <= num_logits <= seq`` (the runtime checks it).
    """
    # hidden: [B, S, D]; num_logits: [] int64
    seq_len = hidden.shape[1]
    index = torch.arange(num_logits, device=hidden.device) + (seq_len - num_logits)  # [n]
    return hidden.index_select(1, index)  # [B, n, D]


class ScoringDecoder(nn.Module):
    """Text model + lm_head with an explicit KV cache and the in-graph visual score.

    forward(inputs_embeds [B, S, D], position_ids [B, S] int64, attention_mask
    [B, P+S] int64, score_query_mask [B, S] float32, num_logits [] int64,
    past_key_0, past_value_0, ... [B, kv_heads, P, hd]) -> (logits [B, n, vocab]
    float32 for the last n = num_logits positions, visual_scores [B, P+S]
    float32, present_key_0, present_value_0, ... [B, kv_heads, P+S, hd]).

    The final norm and lm_head run on the last ``num_logits`` positions only: a
    prefill needs one row of logits, not ``S`` (at a 151k vocabulary, 1800
    prompt tokens would be ~1 GB of float32 logits).
    """

    def __init__(self, model: InternVLForConditionalGeneration) -> None:
        super().__init__()
        check_supported(model)
        text_model = model.model.language_model
        self.layers = text_model.layers
        self.norm = text_model.norm
        self.rotary_emb = text_model.rotary_emb
        self.lm_head = model.lm_head

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        score_query_mask: torch.Tensor,
        num_logits: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        logits, visual_scores, presents = self.run_layers(
            inputs_embeds, position_ids, attention_mask, score_query_mask, num_logits, past
        )
        return (logits, visual_scores, *presents)

    def run_layers(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        score_query_mask: torch.Tensor | None,
        num_logits: torch.Tensor,
        past: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """(logits, visual_scores or None when ``score_query_mask`` is None, presents)."""
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)  # [B, S, hd] each
        bias = attention_bias(attention_mask, inputs_embeds.shape[1], torch.float32)  # [B, 1, S, P+S]
        hidden = inputs_embeds
        visual_scores = None
        if score_query_mask is not None:
            query_weight = score_query_mask.float()[:, None, :]  # [B, 1, S]
            visual_scores = torch.zeros(attention_mask.shape, dtype=torch.float32, device=hidden.device)
        presents: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            attn_out, key, value, probs = scored_self_attention(
                layer.self_attn,
                layer.input_layernorm(hidden),
                cos,
                sin,
                bias,
                past[2 * index],
                past[2 * index + 1],
            )
            if visual_scores is not None:
                visual_scores = visual_scores + scored_attention(probs, query_weight)  # [B, P+S]
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            presents += [key, value]
        # float32 logits whatever the weights' dtype: the runtime's softmax wants them wide anyway.
        logits = self.lm_head(self.norm(last_positions(hidden, num_logits))).float()  # [B, n, vocab]
        return logits, visual_scores, presents


class UnscoredDecoder(ScoringDecoder):
    """``ScoringDecoder`` without the score: for measuring what the score costs, not for serving.

    forward(inputs_embeds, position_ids, attention_mask, num_logits, past_key_0,
    ...) -> (logits, present_key_0, ...): no ``score_query_mask`` input, no
    ``visual_scores`` output, no score sum in the graph. The attention is the
    same explicit softmax, so the difference to ``ScoringDecoder`` is the score
    alone (not the fused attention kernel a graph without scores could use).
    """

    def forward(  # type: ignore[override]
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_logits: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        logits, _, presents = self.run_layers(
            inputs_embeds, position_ids, attention_mask, None, num_logits, past
        )
        return (logits, *presents)


class VisionEncoder(nn.Module):
    """pixel_values [tiles, 3, t, t] -> image_embeds [tiles * tokens_per_tile, text_hidden]."""

    def __init__(self, model: InternVLForConditionalGeneration) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        return features.reshape(-1, features.shape[-1])  # [tiles * tokens_per_tile, D]
