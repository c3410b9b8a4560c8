"""The SEE gate on the edge: may the small model's answer stand, or does the cloud answer?

``see_gate`` scores one ``EdgeGeneration`` exactly as DESIGN.md "SEE gate" says:

- ``S_conf = exp(mean_i log p_i)`` over the probabilities the small model gave
  its own greedy tokens (the EOS included when it was generated);
- ``S_cons = prod_i p'_i`` from one teacher-forced pass of the small model over
  the same prompt with only the top ``r_c`` of its visual tokens (by the
  generation's own scores A, original position ids) and the same answer;
- ``S = (S_conf + S_cons) / 2``; the answer stays on the edge when ``S >= tau``.

The arithmetic is ``shared.scoring``'s; the teacher-forced pass is the edge
runtime's. This module neither generates nor talks to the cloud, and imports
no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stitchvlm.shared.scoring import (
    GateDecision,
    confidence_score,
    consistency_score,
    decide,
    top_r_indices,
)

from .runtime import EdgeGeneration, EdgeModel

DEFAULT_TAU = 0.5
DEFAULT_CONSISTENCY_RETENTION = 0.05


@dataclass(frozen=True)
class GateConfig:
    """How the SEE gate decides."""

    tau: float = DEFAULT_TAU  # exit on the edge when S >= tau; 0 always exits, > 1 never does
    consistency_retention: float = DEFAULT_CONSISTENCY_RETENTION  # r_c: visual tokens kept for S_cons

    def __post_init__(self) -> None:
        if math.isnan(float(self.tau)):
            raise ValueError("tau is NaN")
        if not 0.0 < float(self.consistency_retention) <= 1.0:  # also false for NaN
            raise ValueError(f"consistency_retention must be in (0, 1], got {self.consistency_retention}")


def consistency_probs(model: EdgeModel, gen: EdgeGeneration, consistency_retention: float) -> np.ndarray:
    """p'_i of every generated token (EOS included) with only the top-r_c visual tokens kept.

    Returns [N_G] float64. The kept set is ``top_r_indices(gen.visual_scores, r_c)``:
    the same ranking the cloud request uses, at the smaller retention.
    """
    keep = top_r_indices(gen.visual_scores, consistency_retention)  # [k_c] ascending
    return model.teacher_forced_probs(gen.prompt, gen.image_embeds, keep, gen.token_ids)  # [N_G]


def see_gate(model: EdgeModel, gen: EdgeGeneration, config: GateConfig | None = None) -> GateDecision:
    """S_conf, S_cons, S and the exit decision for one generation of ``model``.

    Raises ``ValueError`` when the generation holds no tokens or a probability
    outside [0, 1] (``shared.scoring``).
    """
    config = config or GateConfig()
    s_conf = confidence_score(gen.token_probs)
    s_cons = consistency_score(consistency_probs(model, gen, config.consistency_retention))
    return decide(s_conf, s_cons, config.tau)
