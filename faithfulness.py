"""Faithfulness: how well a ranking of units predicts the model's own causal ground truth.

The ground truth of a layer's units is the exact effect of ablating each unit alone, per prompt: the causal
machinery's KL(p_clean ‖ p_ablated) at the unit's own site (`causal_analysis.causal_effects_by_layer`; Mamba-1
and FalconMamba: `ssm`, the channels of the inner width; a Transformer: `attn_heads`, the attention output
before the output projection). A ranking is any per-unit score where higher means "ranked first" (Δ's η², an
attention method's activation, the activation variance, or random as the baseline).

This module holds the comparison of one ranking with the ground truth (`rank_agreement`), a pure function of
arrays; the stage that runs it over every ranking of a run builds on it.

Shapes: n prompts, U units, R bootstrap resamples of the prompts.
"""
from __future__ import annotations

import numpy as np

import stats

DEFINITIONS = {
    "ground_truth": "per unit: the mean over prompts of KL(p_clean || p_ablated) at the prompt's last position, "
                    "the unit ablated alone (zero) at its own site at every position",
    "spearman": "Spearman's rank correlation between the ranking's scores and the ground truth over the units "
                "(average ranks for ties); its 95% interval: the prompts resampled, the ground truth's mean "
                "recomputed on each draw, the ranking held fixed",
    "precision_at_k": "the expected share of the ranking's top k that lies in the ground truth's top k, units tied "
                      "across either cut sharing its places (stats.top_k_stability): k / U for a random ranking",
}


def top_k_weights(scores, k: int) -> np.ndarray:
    """(U,) each unit's share of the top k of `scores` (1 clearly inside, 0 outside, and where units tie across
    the cut, the places left shared among them): the membership a random tie-break gives on average."""
    return stats.top_k_stability(np.asarray(scores, dtype=np.float64)[None, :], k)


def precision_at_k(scores, truth, k: int) -> float:
    """Expected |top_k(scores) ∩ top_k(truth)| / k under random tie-breaking on both sides."""
    k = min(int(k), len(truth))
    return float((top_k_weights(scores, k) * top_k_weights(truth, k)).sum() / k)


def rank_agreement(effects, scores, res: stats.Resamples, ks=(1, 5, 10)) -> dict:
    """How well `scores` (U,) rank the units by their measured effect `effects` (n, U), per prompt:
    {"spearman": {"value", "low", "high"} (None where a side is constant), "precision_at_k": {k: value},
    "n_units", "n_prompts"} (DEFINITIONS). `res`: the draws over the n prompts."""
    e = np.asarray(effects, dtype=np.float64)  # (n, U)
    s = np.asarray(scores, dtype=np.float64)  # (U,)
    if e.ndim != 2 or s.shape != (e.shape[1],):
        raise ValueError(f"effects must be (prompts, units) and scores (units,); got {e.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores hold a value that is not a finite number")
    truth = e.mean(0)  # (U,)
    rho = stats.spearman(s, truth)
    spearman = {"value": rho, "low": None, "high": None}
    if rho is not None and res.defined:
        drawn = [stats.spearman(s, t) for t in res.means(e)]  # (R,): the ranking fixed, the truth resampled
        drawn = np.array([np.nan if d is None else d for d in drawn])
        if np.isfinite(drawn).any():
            low, high = stats.percentile_interval(drawn[np.isfinite(drawn)])
            spearman.update(low=float(low), high=float(high))
    return {"spearman": spearman, "precision_at_k": {int(k): precision_at_k(s, truth, k) for k in ks},
            "n_units": int(s.shape[0]), "n_prompts": int(e.shape[0])}
