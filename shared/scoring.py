"""Top-R% visual-token selection and the SEE gate, exactly as DESIGN.md defines them.

Pure numpy functions; edge and cloud both call ``keep_count`` so that they
agree on ``k`` for a given (R, |V|) down to the last float64 rounding.

This module does not compute the visual-token scores A or the probabilities
p_i / p'_i; the edge runtime does (A comes summed out of the ONNX decoder). It
only turns them into kept indices and an exit decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def keep_count(retention: float, num_visual_tokens: int) -> int:
    """``k = max(1, floor(R * |V|))``, the product taken in float64.

    Raises ``ValueError`` unless ``0 < R <= 1`` and ``|V| >= 1``.
    """
    r = float(retention)  # a float32 R is widened exactly; the product is float64 either way
    if not 0.0 < r <= 1.0:  # also false for NaN
        raise ValueError(f"retention must be in (0, 1], got {retention}")
    if isinstance(num_visual_tokens, bool) or int(num_visual_tokens) != num_visual_tokens:
        raise ValueError(f"num_visual_tokens must be an integer, got {num_visual_tokens!r}")
    n = int(num_visual_tokens)
    if n < 1:
        raise ValueError(f"num_visual_tokens must be >= 1, got {n}")
    return max(1, math.floor(r * n))


def top_r_indices(scores: np.ndarray, retention: float) -> np.ndarray:
    """The ``keep_count(R, |V|)`` highest-scoring visual tokens, ascending int64.

    Ties are broken by the lower index. Raises ``ValueError`` for NaN scores or a
    scores array that is not 1-D and non-empty.
    """
    # scores: [n_visual]
    scores = np.asarray(scores)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    values = scores.astype(np.float64)  # widening is exact for float16/32; negation then is safe
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    k = keep_count(retention, values.size)
    # A stable sort of the negated scores keeps equal scores in index order: lower index first.
    order = np.argsort(-values, kind="stable")  # [n_visual]
    return np.sort(order[:k]).astype(np.int64)  # [k]


def _probabilities(token_probs: Sequence[float] | np.ndarray) -> np.ndarray:
    """``token_probs`` as a checked [n_tokens] float64 array of values in [0, 1]."""
    p = np.asarray(token_probs, dtype=np.float64).reshape(-1)  # [n_tokens]
    if p.size == 0:
        raise ValueError("no generated tokens: the gate scores are undefined")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("token probabilities must lie in [0, 1]")
    return p


def confidence_score(token_probs: Sequence[float] | np.ndarray) -> float:
    """``S_conf = exp(mean_i log p_i)``, the geometric mean over all generated tokens.

    A probability of 0 makes it 0 (log 0 = -inf), without a numpy warning.
    """
    p = _probabilities(token_probs)  # [n_tokens]
    if (p == 0).any():
        return 0.0
    return float(np.exp(np.mean(np.log(p))))


def consistency_score(token_probs: Sequence[float] | np.ndarray) -> float:
    """``S_cons = prod_i p'_i`` over the answer tokens of the teacher-forced pruned pass.

    Summed in log space, so a long answer of small probabilities does not
    accumulate rounding step by step; a probability of 0 gives exactly 0.
    """
    p = _probabilities(token_probs)  # [n_tokens]
    if (p == 0).any():
        return 0.0
    return float(np.exp(np.sum(np.log(p))))


def see_score(s_conf: float, s_cons: float) -> float:
    """``S = (S_conf + S_cons) / 2``."""
    return (float(s_conf) + float(s_cons)) / 2.0


@dataclass(frozen=True)
class GateDecision:
    """What the SEE gate saw and decided for one question."""

    s_conf: float  # S_conf, confidence of the small model's own greedy answer
    s_cons: float  # S_cons, probability of that answer with only the top r_c visual tokens
    s: float  # (S_conf + S_cons) / 2
    tau: float  # threshold the decision used
    exit_on_edge: bool  # s >= tau: answer locally, no cloud call


def decide(s_conf: float, s_cons: float, tau: float) -> GateDecision:
    """Exit on the edge when ``S >= tau``. Raises ``ValueError`` for scores outside [0, 1] or NaN tau."""
    for name, value in (("s_conf", s_conf), ("s_cons", s_cons)):
        if not 0.0 <= float(value) <= 1.0:  # also false for NaN
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if math.isnan(float(tau)):
        raise ValueError("tau is NaN")
    s = see_score(s_conf, s_cons)
    return GateDecision(float(s_conf), float(s_cons), s, float(tau), s >= float(tau))
