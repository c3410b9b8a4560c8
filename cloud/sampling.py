"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with a per-request seed.

``TokenChooser`` belongs to one sequence and sees only that sequence's logits
row, with its own ``torch.Generator``: with a seed, the tokens a request gets do
not depend on which other requests share its batch. The draw is one uniform
number per token turned into a token by the inverse CDF, on the CPU in
float64, so it is the same on any device. It knows nothing about batches,
tokenizers or stop strings.
"""

from __future__ import annotations

import secrets

import torch

from ..shared.types import SamplingParams


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [vocab] -> probabilities [vocab] float64 after temperature, top-k and top-p."""
    scaled = logits.double() / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        order = torch.argsort(probs, descending=True, stable=True)
        sorted_probs = probs[order]
        # keep each token whose more likely predecessors have not yet reached top_p (the first always stays)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = order[before >= params.top_p]
        probs = probs.index_fill(0, drop, 0.0)
        probs = probs / probs.sum()
    return probs


class TokenChooser:
    """Picks one sequence's tokens from its logits rows."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def choose(self, logits: torch.Tensor) -> int:
        """logits: [vocab] (any device) -> the token id."""
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = filtered_probabilities(logits.detach().cpu(), self.params)
        cdf = torch.cumsum(probs, dim=-1)
        u = torch.rand((), generator=self.generator, dtype=torch.float64) * cdf[-1]
        token = int(torch.searchsorted(cdf, u, right=True))
        token = min(token, probs.numel() - 1)
        while probs[token] == 0.0:  # u landed on the edge of a filtered run; step back to a kept token
            token -= 1
        return token
