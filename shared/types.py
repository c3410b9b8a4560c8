"""Internal request / reply types of the cascade, apart from the wire messages.

The edge SDK and the cloud servicer convert ``stitch.v1`` protobuf messages to
and from these dataclasses at the boundary (``wire``); everything behind the
boundary (gate, engine, in-process client) uses only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .layout import Layout


@dataclass(frozen=True)
class Timings:
    """Where one cloud answer spent its time, in milliseconds."""

    queue_ms: float = 0.0  # admitted, waiting to join the running batch
    vision_ms: float = 0.0  # preprocessing + vision tower + projector
    prefill_ms: float = 0.0  # decoder prefill
    decode_ms: float = 0.0  # all decode steps
    total_ms: float = 0.0  # receipt to reply
    first_token_ms: float = 0.0  # receipt to the first generated token (time to first token)


@dataclass(frozen=True)
class SamplingParams:
    """How the cloud picks each token; the defaults are greedy decoding."""

    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # sample among the k most likely tokens only; 0: all
    top_p: float = 1.0  # sample within the smallest set whose probability reaches top_p; 1: all
    seed: int | None = None  # seeds this request's own generator (same tokens in any batch); None: fresh
    stop: tuple[str, ...] = ()  # end once the answer text contains one; the text is cut before it

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class CloudRequest:
    """One escalated question: what the edge sends the cloud."""

    image: bytes  # encoded image, as the device has it
    mime_type: str  # e.g. "image/png"
    prompt: str  # the user's question, no chat template
    kept_indices: np.ndarray  # [k] int64, ascending, within 0..num_visual_tokens-1
    num_visual_tokens: int  # |V| the edge computed
    retention: float  # R in (0, 1]
    layout: Layout  # the edge's layout for this image
    layout_fingerprint: int  # layout_fingerprint(layout, tiling config) on the edge
    max_new_tokens: int = 32  # generation budget
    request_id: str = ""  # caller's id; the server makes one when empty
    model: str = ""  # served model id; empty selects the default
    sampling: SamplingParams = field(default_factory=SamplingParams)  # greedy unless set


@dataclass(frozen=True)
class CloudReply:
    """The large model's answer and what it cost."""

    request_id: str
    model: str  # id of the model that answered
    text: str  # decoded answer without special tokens
    token_ids: tuple[int, ...]  # generated ids, EOS included when generated
    prompt_tokens: int  # full prompt length
    pruned_prompt_tokens: int  # prompt length seen by layers >= K
    num_visual_tokens: int
    kept_visual_tokens: int
    prune_layer: int  # K
    timings: Timings = field(default_factory=Timings)
    finish_reason: str = ""  # "eos" | "length" (max_new_tokens) | "stop" (a stop string)
