"""Faithfulness: how well a ranking of units predicts the model's own causal ground truth.

The ground truth of a layer's units is the exact effect of ablating each unit alone, per prompt: the causal
machinery's KL(p_clean ‖ p_ablated) at the unit's own site (`causal_analysis.causal_effects_by_layer`; Mamba-1
and FalconMamba: `ssm`, the channels of the inner width; a Transformer: `attn_heads`, the attention output
before the output projection). A ranking is any per-unit score where higher means "ranked first" (Δ's η², an
attention method's activation, the activation variance, or random as the baseline).

This module holds the comparison of one ranking with the ground truth (`rank_agreement`: Spearman and
precision@k) and the parts of a deletion curve (`k_grid`, `top_sets`, `random_sets` give the sets that
`causal_analysis.set_ablation_effects` ablates together; `deletion_curve`, `random_band` and
`normalised_area` read its per-prompt KL), pure functions of arrays; the stage that runs them over every
ranking of a run builds on them.

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
    "normalised_area": "(area - random) / (ground truth - random), each area the mean of a deletion curve over the k "
                       "grid: 1 as good as the ground truth's own ranking, 0 no better than random",
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


DELETION_DEFINITION = (
    "deletion curve: the mean over prompts of KL(p_clean || p_ablated) when a ranking's top k units are ablated "
    "together (zero, at their own site), for k on a doubling grid 1, 2, 4, ... (and the number of units if it is "
    "not on it); units tied in the ranking enter in index order; random: the same for k units drawn uniformly "
    "without replacement, the mean and the 2.5 and 97.5 percentiles over the draws")


def k_grid(n_units: int, k_max: int | None = None) -> list[int]:
    """1, 2, 4, ... up to min(k_max, n_units), and that bound itself when it is not a power of 2."""
    top = n_units if k_max is None else min(int(k_max), n_units)
    if top < 1:
        raise ValueError(f"k_max {k_max}: the deletion curve needs at least one unit")
    ks = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
    return ks if ks[-1] == top else [*ks, top]


def top_sets(scores, ks) -> np.ndarray:
    """(len(ks), U) boolean masks: row i the ranking's top ks[i] units (highest score first, ties in index
    order)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    masks = np.zeros((len(ks), s.size), dtype=bool)
    for i, k in enumerate(ks):
        masks[i, order[:k]] = True
    return masks


def random_sets(n_units: int, ks, n_draws: int, seed: int = 0) -> np.ndarray:
    """(len(ks) * n_draws, U) boolean masks: for each k (outer) n_draws sets of k units drawn uniformly
    without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(ks) * n_draws, n_units), dtype=bool)
    for i, k in enumerate(ks):
        for d in range(n_draws):
            masks[i * n_draws + d, rng.choice(n_units, size=k, replace=False)] = True
    return masks


def deletion_curve(kl, ks, res: stats.Resamples) -> list[dict]:
    """[{"k", "value", "low", "high"}] from the per-prompt KL (n, len(ks)) of the top-k sets: the mean over
    prompts and its interval."""
    kl = np.asarray(kl, dtype=np.float64)
    means, drawn = kl.mean(0), res.means(kl)  # (len(ks),), (R, len(ks))
    return [{"k": int(k), **stats.interval(means[i], drawn[:, i], res)} for i, k in enumerate(ks)]


def random_band(kl, ks, n_draws: int) -> list[dict]:
    """[{"k", "mean", "low", "high"}] from the per-prompt KL (n, len(ks) * n_draws) of `random_sets`: per k the
    mean over prompts of each draw, then their mean and 2.5 / 97.5 percentiles over the draws."""
    per_draw = np.asarray(kl, dtype=np.float64).mean(0).reshape(len(ks), n_draws)  # (len(ks), draws)
    low, high = np.percentile(per_draw, [2.5, 97.5], axis=1)
    return [{"k": int(k), "mean": float(per_draw[i].mean()), "low": float(low[i]), "high": float(high[i])}
            for i, k in enumerate(ks)]


def normalised_area(curve, truth_curve, random_curve) -> float | None:
    """(area − random) / (ground truth − random), each area the mean of the curve's values over the k grid: 1
    for a ranking as good as the ground truth's own, 0 for one no better than random, negative for worse;
    None when the ground truth's curve does not rise above random (nothing to normalise by)."""
    a = float(np.mean([p["value"] for p in curve]))
    t = float(np.mean([p["value"] for p in truth_curve]))
    r = float(np.mean([p["mean"] for p in random_curve]))
    return None if not t > r else (a - r) / (t - r)
