"""Top-R% selection and SEE gate math against DESIGN.md's formulas, computed independently."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stitchvlm.shared import scoring

# |V| for InternVL3: 1 tile, 4 + thumbnail, 6 + thumbnail, 12 + thumbnail (256 tokens a tile).
INTERNVL_V = [256, 1280, 1792, 3328]
PAPER_R = [0.09, 0.35, 0.64]


def brute_keep_count(r: float, n: int) -> int:
    """The largest k in 1..n with k <= R * |V| (float64 product), else 1: counted one by one."""
    product = r * n  # both Python floats: float64
    k = 1
    for candidate in range(1, n + 1):
        if candidate <= product:
            k = candidate
    return k


@pytest.mark.parametrize("n", [1, 2, 7, *INTERNVL_V])
@pytest.mark.parametrize("r", [*PAPER_R, 1e-9, 0.01, 0.1, 0.5, 0.999, 1.0])
def test_keep_count_matches_brute_force(r, n):
    """Guards against round() instead of floor, a missing max(1, .), or an off-by-one at R = 1."""
    assert scoring.keep_count(r, n) == brute_keep_count(r, n)


def test_keep_count_paper_values():
    """Guards against computing k in another precision than float64, which the two sides must share.

    0.35 as a double is slightly below 0.35, and times 1280 it is 447.99999999999997 exactly;
    the float64 product rounds to 448.0. Exact arithmetic on the double (Fraction) would
    give 447, so an edge and a cloud computing differently would disagree on k.
    """
    assert math.floor(Fraction(0.35) * 1280) == 447  # the trap, computed independently
    expected = {
        (0.09, 256): 23,
        (0.09, 1280): 115,
        (0.09, 1792): 161,
        (0.09, 3328): 299,
        (0.35, 256): 89,
        (0.35, 1280): 448,
        (0.35, 1792): 627,
        (0.35, 3328): 1164,
        (0.64, 256): 163,
        (0.64, 1280): 819,
        (0.64, 1792): 1146,
        (0.64, 3328): 2129,
    }
    for (r, n), k in expected.items():
        # Decimal intent: floor(R * |V|) with R written in decimal, checked by exact rationals.
        assert k == math.floor(Fraction(str(r)) * n)
        assert scoring.keep_count(r, n) == k, (r, n)
    # A float32 R arrives as its own (different) double: the product is taken on that.
    assert scoring.keep_count(np.float32(0.35), 1280) == math.floor(float(np.float32(0.35)) * 1280) == 447


@pytest.mark.parametrize(
    "r, n",
    [
        (0.0, 10),
        (-0.1, 10),
        (1.0000001, 10),
        (float("nan"), 10),
        (float("inf"), 10),
        (0.5, 0),
        (0.5, -3),
        (0.5, 2.5),
    ],
)
def test_keep_count_rejects(r, n):
    """Guards against k silently becoming 0, negative, or more than |V|."""
    with pytest.raises(ValueError):
        scoring.keep_count(r, n)


def brute_top_r(scores: list[float], r: float) -> list[int]:
    k = brute_keep_count(r, len(scores))
    best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return sorted(best)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=300),  # few distinct values: many ties
    st.sampled_from([*PAPER_R, 0.01, 0.5, 1.0]),
    st.sampled_from([np.float32, np.float64, np.int64]),
)
def test_top_r_matches_brute_force(values, r, dtype):
    """Guards against argpartition-style selection that breaks ties arbitrarily."""
    scores = np.asarray(values, dtype=dtype)
    got = scoring.top_r_indices(scores, r)
    assert got.dtype == np.int64
    assert got.tolist() == brute_top_r([float(v) for v in values], r)


def test_top_r_ties_by_lower_index():
    """Guards against keeping the later of two equal scores."""
    scores = np.array([1.0, 3.0, 2.0, 3.0, 3.0], dtype=np.float32)
    assert scoring.top_r_indices(scores, 0.4).tolist() == [1, 3]  # k = 2 of three 3.0s
    assert scoring.top_r_indices(np.zeros(10), 0.35).tolist() == [0, 1, 2]
    assert scoring.top_r_indices(np.array([-np.inf, 5.0, np.inf]), 0.5).tolist() == [2]


def test_top_r_rejects():
    """Guards against NaN scores sorting to an arbitrary end and picking garbage tokens."""
    with pytest.raises(ValueError, match="NaN"):
        scoring.top_r_indices(np.array([0.1, np.nan, 0.3]), 0.5)
    with pytest.raises(ValueError):
        scoring.top_r_indices(np.zeros((2, 3)), 0.5)
    with pytest.raises(ValueError):
        scoring.top_r_indices(np.zeros(0), 0.5)


# ----------------------------------------------------------------------------- gate


def test_confidence_score_formula():
    """Guards against an arithmetic mean or a product in place of the geometric mean."""
    assert scoring.confidence_score([0.5, 0.125]) == pytest.approx(0.25, rel=1e-15)
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 1.0, size=37)
    direct = math.exp(sum(math.log(x) for x in p) / len(p))
    assert scoring.confidence_score(p) == pytest.approx(direct, rel=1e-12)
    assert scoring.confidence_score([1.0, 1.0]) == 1.0


def test_consistency_score_formula():
    """Guards against a mean instead of the product of the teacher-forced probabilities."""
    assert scoring.consistency_score([0.5, 0.25]) == pytest.approx(0.125, rel=1e-15)
    rng = np.random.default_rng(2)
    p = rng.uniform(0.5, 1.0, size=200)
    assert scoring.consistency_score(p) == pytest.approx(math.prod(p.tolist()), rel=1e-12)
    # float32 input is widened, not multiplied in float32.
    p32 = p.astype(np.float32)
    assert scoring.consistency_score(p32) == pytest.approx(math.prod(float(x) for x in p32), rel=1e-12)


def test_zero_probability_without_warnings():
    """Guards against log(0) RuntimeWarnings or NaN leaking into the gate."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scoring.confidence_score([0.9, 0.0, 0.8]) == 0.0
        assert scoring.consistency_score([0.9, 0.0]) == 0.0
        assert scoring.consistency_score([1e-300] * 5) == 0.0  # underflows to 0, quietly


@pytest.mark.parametrize("fn", [scoring.confidence_score, scoring.consistency_score])
@pytest.mark.parametrize("probs", [[], [0.5, 1.5], [-0.1], [float("nan")]])
def test_gate_scores_reject(fn, probs):
    """Guards against a gate score for an empty answer or impossible probabilities."""
    with pytest.raises(ValueError):
        fn(probs)


def test_decide_threshold_is_inclusive():
    """Guards against exiting on S > tau instead of S >= tau, and against S not being the mean."""
    d = scoring.decide(0.5, 0.25, 0.375)  # S = 0.375 exactly
    assert d == scoring.GateDecision(s_conf=0.5, s_cons=0.25, s=0.375, tau=0.375, exit_on_edge=True)
    assert not scoring.decide(0.5, 0.25, math.nextafter(0.375, 1.0)).exit_on_edge
    assert scoring.see_score(0.9, 0.3) == pytest.approx(0.6, rel=1e-15)
    assert scoring.decide(0.0, 0.0, 0.0).exit_on_edge
    assert not scoring.decide(1.0, 1.0, 1.5).exit_on_edge


@pytest.mark.parametrize(
    "args", [(1.2, 0.5, 0.5), (0.5, -0.1, 0.5), (float("nan"), 0.5, 0.5), (0.5, 0.5, float("nan"))]
)
def test_decide_rejects(args):
    """Guards against a NaN or out-of-range score making the exit decision arbitrary."""
    with pytest.raises(ValueError):
        scoring.decide(*args)
