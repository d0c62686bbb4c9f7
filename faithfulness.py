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

from dataclasses import dataclass

import numpy as np

import stats

DEFINITIONS = {
    "ground_truth": "per unit: the mean over prompts of KL(p_clean || p_ablated) at the prompt's last position, "
                    "the unit ablated alone at its own site at every position",
    "spearman": "Spearman's rank correlation between the ranking's scores and the ground truth over the units "
                "(average ranks for ties); value: on the observed ground truth. Its interval: the prompts "
                "resampled, the ground truth's mean recomputed on each draw, the ranking held fixed, and the basic "
                "(reverse-percentile) bootstrap interval [2 rho - q97.5, 2 rho - q2.5] of rho over the draws, "
                "clipped to [-1, 1]; corrected: 2 rho - the draws' mean. A ground truth measured on a sample of "
                "prompts is the effect over all prompts of this kind plus noise, which pulls rho towards 0; the "
                "draws add that noise once more, so the percentile interval would sit below rho, and the basic "
                "interval reflects the draws about rho instead: it may lie on one side of rho, and corrected "
                "estimates rho against the noise-free effect. Approximate: in a simulation (bench/"
                "spearman_interval.py) it covered that rho in 86% of repetitions at 24 prompts, 79% with a per-prompt "
                "factor shared by every unit (the percentile interval: 34% and 19%)",
    "precision_at_k": "the expected share of the ranking's top k that lies in the ground truth's top k, units tied "
                      "across either cut sharing its places (stats.top_k_stability): k / U for a random ranking; "
                      "low, high: the 2.5th and 97.5th percentile of the precision on draws of the prompts (the "
                      "ground truth's top k resampled, the ranking's fixed), mean_over_draws their mean: how much "
                      "the precision depends on which prompts measured the ground truth (where its top k is noisy, "
                      "the draws lie below the value); undefined where either side has no order",
    "normalised_area": "(area - random) / (ground truth - random), each area the mean of a deletion curve over the k "
                       "grid: 1 as good as the ground truth's own ranking (its top k chosen on the other half of the "
                       "prompts: DELETION), 0 no better than random; above 1 where the ranking beats it",
}


def top_k_weights(scores, k: int) -> np.ndarray:
    """(U,) each unit's share of the top k of `scores` (1 clearly inside, 0 outside, and where units tie across
    the cut, the places left shared among them): the membership a random tie-break gives on average."""
    return stats.top_k_stability(np.asarray(scores, dtype=np.float64)[None, :], k)


def precision_at_k(scores, truth, k: int) -> float:
    """Expected |top_k(scores) ∩ top_k(truth)| / k under random tie-breaking on both sides."""
    k = min(int(k), len(truth))
    return float((top_k_weights(scores, k) * top_k_weights(truth, k)).sum() / k)


def basic_interval(point: float, drawn, res: stats.Resamples, bounds: tuple[float, float]) -> dict:
    """{"value": point, "corrected", "low", "high"} of a statistic of the ranking against the ground truth, from
    its values `drawn` (R,) on the draws of the prompts (NaN where undefined on a draw): the basic bootstrap
    interval [2·point − q97.5, 2·point − q2.5] and the corrected estimate 2·point − mean(draws), clipped to
    `bounds` (DEFINITIONS["spearman"]); with a "note" where there is no interval."""
    out = {"value": float(point), "corrected": None, "low": None, "high": None}
    d = np.asarray(drawn, dtype=np.float64)
    d = d[np.isfinite(d)]
    if not res.defined:
        return {**out, "note": "one prompt: no interval"}
    if d.size < res.n_resamples:
        return {**out, "note": f"undefined on {res.n_resamples - d.size} of {res.n_resamples} draws of the prompts"}
    q_low, q_high = stats.percentile_interval(d)
    lo, hi = bounds
    return {**out, "corrected": float(np.clip(2 * point - d.mean(), lo, hi)),
            "low": float(np.clip(2 * point - q_high, lo, hi)), "high": float(np.clip(2 * point - q_low, lo, hi))}


def _constant(x) -> bool:
    return bool(np.ptp(np.asarray(x, dtype=np.float64)) == 0)


def rank_agreement(effects, scores, res: stats.Resamples, ks=(1, 5, 10)) -> dict:
    """How well `scores` (U,) rank the units by their measured effect `effects` (n, U), per prompt:
    {"spearman": `basic_interval` (value None, with a "note", where a side is constant), "precision_at_k":
    {k: {"value", "low", "high", "mean_over_draws"}: its spread over the draws}, "n_units", "n_prompts"}
    (DEFINITIONS). `res`: the draws over the n prompts; on
    each, the ground truth is the draw's mean and the ranking is held fixed."""
    e = np.asarray(effects, dtype=np.float64)  # (n, U)
    s = np.asarray(scores, dtype=np.float64)  # (U,)
    if e.ndim != 2 or s.shape != (e.shape[1],):
        raise ValueError(f"effects must be (prompts, units) and scores (units,); got {e.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores hold a value that is not a finite number")
    truth = e.mean(0)  # (U,)
    drawn = res.means(e) if res.defined else np.empty((0, e.shape[1]))  # (R, U): the ground truth on each draw
    rho = stats.spearman(s, truth)
    if rho is None:
        why = ("the ranking gives every unit the same score: no order to check" if _constant(s) else
               "the ground truth is the same for every unit (the ablation changes every unit's effect alike): "
               "nothing to predict")
        spearman = {"value": None, "corrected": None, "low": None, "high": None, "note": why}
    else:
        rhos = [stats.spearman(s, t) for t in drawn]
        spearman = basic_interval(rho, [np.nan if r is None else r for r in rhos], res, (-1.0, 1.0))
    precision = {}
    for k in ks:
        k = min(int(k), e.shape[1])
        if rho is None:  # no order on one side: no top k to compare
            precision[k] = {"value": None, "low": None, "high": None, "note": spearman["note"]}
            continue
        point = precision_at_k(s, truth, k)
        mine = top_k_weights(s, k)  # (U,): the ranking's top k, held fixed on the draws
        if not res.defined:
            precision[k] = {"value": point, "low": None, "high": None, "note": "one prompt: no interval"}
            continue
        on_draws = np.array([float(mine @ top_k_weights(t, k)) / k for t in drawn])  # (R,)
        low, high = stats.percentile_interval(on_draws)
        precision[k] = {"value": point, "low": float(low), "high": float(high),
                        "mean_over_draws": float(on_draws.mean())}
    return {"spearman": spearman, "precision_at_k": precision, "n_units": int(s.shape[0]),
            "n_prompts": int(e.shape[0])}


DELETION_DEFINITION = (
    "deletion curve: the mean over prompts of KL(p_clean || p_ablated) when a ranking's top k units are ablated "
    "together (at their own site, ablated as the ground truth's units are), for k on a doubling grid 1, 2, 4, ... "
    "(and the number of units if it is not on it); units with equal scores enter in a seeded random order; a "
    "ranking that gives every unit the same score has no curve; the ground truth's own ranking is cross-fitted: "
    "its top k is chosen on the other half of the prompts (even and odd positions in the prompt list) and "
    "measured on each half, so its curve is not measured on the prompts that chose it; random: the same for k "
    "units drawn uniformly without replacement, the mean and the 2.5 and 97.5 percentiles over the draws")


def k_grid(n_units: int, k_max: int | None = None) -> list[int]:
    """1, 2, 4, ... up to min(k_max, n_units), and that bound itself when it is not a power of 2."""
    top = n_units if k_max is None else min(int(k_max), n_units)
    if top < 1:
        raise ValueError(f"k_max {k_max}: the deletion curve needs at least one unit")
    ks = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
    return ks if ks[-1] == top else [*ks, top]


def ranking_order(scores, seed: int | None = None) -> np.ndarray:
    """(U,) the units, highest score first; units with equal scores in index order, or with `seed` in a random
    order drawn from it."""
    s = np.asarray(scores, dtype=np.float64)
    tie_break = np.arange(s.size) if seed is None else np.random.default_rng(seed).permutation(s.size)
    return np.lexsort((tie_break, -s))  # by score, then the tie-break


def top_sets(scores, ks, seed: int | None = None) -> np.ndarray:
    """(len(ks), U) boolean masks: row i the ranking's top ks[i] units (`ranking_order`)."""
    s = np.asarray(scores, dtype=np.float64)
    order = ranking_order(s, seed)
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


def normalised_area_interval(kl, truth_kl, random_kl, n_draws: int, res: stats.Resamples, seed: int = 0) -> dict:
    """(A − R) / (T − R) (DEFINITIONS["normalised_area"]) from the per-prompt KL of the ranking's sets (n, G), the
    ground truth's (n, G) and
    the random sets' (n, G * n_draws, `random_sets`' order), with its interval: on each draw of the prompts
    the random sets are drawn again too (with replacement among the n_draws per k, seeded), so the interval
    carries the random baseline's own sampling error. {"value", "low", "high"}, and a "note" where value or
    interval is undefined: the ground truth's curve not above random, by more than float32's resolution
    (`stats.TIE_RTOL`; on some draw: the ratio is unbounded)."""
    a, t = (np.asarray(x, dtype=np.float64).mean(1) for x in (kl, truth_kl))  # (n,) each: the area per prompt
    rk = np.asarray(random_kl, dtype=np.float64)  # (n, G * D)
    gap = t.mean() - rk.mean()
    if not gap > stats.TIE_RTOL * abs(rk.mean()):  # equal to float32 resolution: not above random
        return {"value": None, "low": None, "high": None,
                "note": "the ground truth's curve does not rise above random: nothing to normalise by"}
    value = (a.mean() - rk.mean()) / gap
    if not res.defined:
        return {"value": float(value), "low": None, "high": None, "note": "one prompt: no interval"}
    da, dt = res.means(a), res.means(t)  # (R,) each
    per = res.means(rk).reshape(res.n_resamples, -1, n_draws)  # (R, G, D): each random set on each draw
    pick = np.random.default_rng(seed).integers(0, n_draws, size=per.shape)  # the random sets drawn again
    dr = np.take_along_axis(per, pick, axis=2).mean((1, 2))  # (R,)
    below = int((dt - dr <= stats.TIE_RTOL * np.abs(dr)).sum())
    if below:
        return {"value": float(value), "low": None, "high": None,
                "note": f"the ground truth's curve is not above random on {below} of {res.n_resamples} draws"}
    return stats.interval(value, (da - dr) / (dt - dr), res)


# --------------------------------------------------------------------------------------------------
# The faithfulness stage: every ranking of a run's units at --layer against the ground truth
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Space:
    """The units a set of rankings orders and how one is ablated: at the layer's `site`, unit u is the site's
    dimension u (`groups` None) or the dimensions groups[u] (groups: (U, W) booleans) ablated together."""

    name: str  # "channels", "heads" or "dims"
    site: str
    unit: str  # what one unit is called: "channel", "head", "dim"
    n_units: int
    description: str
    groups: np.ndarray | None = None

    def site_masks(self, masks) -> np.ndarray:
        """(K, U) sets of units as (K, W) sets of the site's dimensions."""
        m = np.asarray(masks, dtype=bool)
        return m if self.groups is None else (m.astype(np.int64) @ self.groups.astype(np.int64)) > 0


@dataclass(frozen=True)
class Ranking:
    """One ranking of a space's units: `scores` (U,), higher first; `n_undefined` units had no score (an
    undefined η²) and are ranked last."""

    name: str
    stage: str
    space: str
    scores: np.ndarray  # (U,) the order's scores: a unit without a score below every unit with one
    ranks_by: str
    label: str  # the score's short name (a plot's axis)
    defined: np.ndarray  # (U,) bool: the unit has a score

    @property
    def n_undefined(self) -> int:
        return int((~self.defined).sum())

    def shown_scores(self) -> np.ndarray:
        """(U,) the scores as measured, NaN (null in the JSON) where a unit has none."""
        return np.where(self.defined, self.scores, np.nan)


def unit_spaces(adapter, layer: int) -> dict[str, Space]:
    """The spaces whose units the run's rankings order at `layer`, by family: Mamba-1 and FalconMamba the
    channels of the inner width at `ssm` (Δ, the attention channels, the activation variance); Mamba-2 those
    and its heads (Δ is one value per head: a head is its head_dim channels of `ssm` ablated together); a
    Transformer the dimensions of the attention output before the output projection (`attn_heads`, the
    attention neurons' units). A hybrid's layer: a state-space layer's as Mamba's, at its `neurons` site (the
    same module as `ssm`); an attention layer's attention dimensions, and its dense MLP's hidden units where
    it has one (`neurons`, the sparsity stage's)."""
    from models import NotApplicable

    ssm_site = "neurons" if adapter.hybrid else "ssm"
    if adapter.is_ssm and adapter.has_ssm(layer):
        out = {"channels": Space("channels", ssm_site, "channel", adapter.inner_size,
                                 f"the channels of the inner width at {ssm_site} (the gated scan output entering "
                                 "out_proj)")}
        if adapter.ssm_kind == "mamba2":
            H, P = adapter.n_heads, adapter.inner_size // adapter.n_heads
            out["heads"] = Space("heads", ssm_site, "head", H, f"the {H} heads, each its {P} channels of "
                                 f"{ssm_site} ablated together", np.kron(np.eye(H, dtype=bool), np.ones((1, P), dtype=bool)))
        return out
    out = {}
    if adapter.has_attention(layer):
        try:
            out["dims"] = Space("dims", "attn_heads", "dim", adapter.site("attn_heads", layer).size,
                                "the dimensions of the heads' concatenated output entering the attention's output "
                                "projection (attn_heads)")
        except NotApplicable:  # Zamba2's shared attention
            pass
    if adapter.hybrid:
        try:
            out["neurons"] = Space("neurons", "neurons", "neuron", adapter.site("neurons", layer).size,
                                   "the dense MLP's hidden units entering its down projection (neurons)")
        except NotApplicable:  # a mixture of experts or no MLP
            pass
    return out


def _ranking(name, stage, space: Space, scores, ranks_by: str, label: str) -> Ranking:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (space.n_units,):
        raise ValueError(f"{name} scores {s.shape[0] if s.ndim == 1 else s.shape} units; the {space.name} space "
                         f"has {space.n_units}")
    ok = np.isfinite(s)
    if not ok.all():  # undefined for those units: ordered after every unit with a score (never shown as a score)
        s = np.where(ok, s, (s[ok].min() if ok.any() else 0.0) - 1.0)
    return Ranking(name, stage, space.name, s, ranks_by, label, ok)


def collect_rankings(ctx, spaces: dict[str, Space]) -> tuple[list[Ranking], dict[str, str]]:
    """(the rankings of this run's stages at the layer, {ranking: why it is left out}). A stage that is not
    in the run or does not apply to the family contributes nothing; one that failed is named."""
    from pipeline import STAGES

    rankings, left = [], {}
    family = ctx.adapter.family

    def ran(stage: str):
        if stage not in ctx.stages or not STAGES[stage].applies_to(family):
            return None
        r = ctx.upstream(stage)
        if r is None:
            left[stage] = f"the {stage} stage did not succeed at this layer (its entry says why)"
        return r

    delta = ran("delta")
    if delta is not None:
        space = spaces["channels" if delta["unit"] == "channel" else "heads"]
        for key, what, label in (("eta_squared", "η², the between-text share of Δ's variance", "Δ's η²"),
                                 ("text_variance", "the raw variance across texts of the text's mean Δ",
                                  "variance across texts of mean Δ")):
            v = delta["per_channel"].get(key)
            if v is None:
                left[f"delta.{key}"] = f"undefined: {(delta.get('undefined') or {}).get(key, 'not computed')}"
            else:
                rankings.append(_ranking(f"delta.{key}", "delta", space, v, f"per {space.unit}: {what}", label))
    att = ran("attention")
    if att is not None:
        space = spaces.get("channels") or spaces.get("dims")
        for m, entry in att["methods"].items() if space is not None else ():
            acts = entry.get("neuron_activations")
            if acts is None:
                left[f"attention.{m}"] = f"undefined: {(entry.get('undefined') or {}).get('mean_activation')}"
            else:
                rankings.append(_ranking(f"attention.{m}", "attention", space, acts,
                                         f"per {space.unit}: the method's mean activation per query token",
                                         "mean activation per query token"))
    sp = ran("sparsity")
    if sp is not None:
        space = next((s for s in spaces.values() if s.site == sp["site"] and s.groups is None), None)
        if space is None:
            left["sparsity.activation_variance"] = (
                f"ranks the neurons of {sp['site']} ({sp['single']['n_neurons']} units), a site without a ground "
                f"truth here (that is {', '.join(s.site for s in spaces.values())}): a different space")
        else:
            rankings.append(_ranking("sparsity.activation_variance", "sparsity", space, sp["single"]["neuron_variance"],
                                     f"per {space.unit}: the variance of its activation over every token",
                                     "activation variance over tokens"))
    return rankings, left


def ground_truth(ctx, space: Space) -> tuple[np.ndarray, str]:
    """(per-prompt KL (n, U) of each unit ablated alone at the layer, where it came from): the causal stage's
    own scan when it ran at this space's site over every dimension, else a scan here with the causal stages'
    ablation, prompts and clean runs."""
    import causal_analysis as ca

    o = ctx.opts
    causal = ctx.upstream("causal")
    if space.groups is None and causal is not None and causal["site"] == space.site and o.causal_dims is None:
        return np.asarray(causal["scores_per_prompt"], dtype=np.float64), "the causal stage's scan of this site"
    kw = dict(intervention_scale=ca.scale_of(o), ablation=o.ablation, batch_size=o.causal_batch_size,
              progress=ctx.progress, cleans=ctx.clean_runs(space.site))
    if space.groups is None:
        eff = ca.causal_effects_by_layer(ctx.model, ctx.tokenizer, o.prompt_list, [ctx.layer], site=space.site, **kw)
    else:
        eff = ca.set_ablation_effects(ctx.model, ctx.tokenizer, o.prompt_list, ctx.layer, space.groups,
                                      site=space.site, **kw)
    return eff.kl[:, 0], "scanned here"


def random_spearman(truth, n_draws: int, seed: int) -> dict:
    """The chance level of Spearman's ρ against `truth` (U,): 0, and the central 95% of ρ over `n_draws`
    uniformly random rankings (seeded)."""
    rng = np.random.default_rng(seed)
    t = stats.average_ranks(truth)
    if t.std() == 0:
        return {"value": None, "low": None, "high": None}
    perms = rng.permuted(np.tile(np.arange(t.size, dtype=np.float64), (n_draws, 1)), axis=1)  # (draws, U)
    t = (t - t.mean()) / t.std()
    p = (perms - perms.mean(1, keepdims=True)) / perms.std(1, keepdims=True)
    rho = (p * t).mean(1)  # (draws,)
    low, high = np.percentile(rho, [2.5, 97.5])
    return {"value": 0.0, "low": float(low), "high": float(high)}


def precision_ks(top_k: int, n_units: int) -> list[int]:
    """The k of precision@k: 1, 5 and --top_k, those at most the units."""
    return sorted(k for k in {1, 5, int(top_k)} if k <= n_units)


def _halves(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(prompts measured on, prompts chosen on)]: the even and the odd positions, each measured with the
    other's choice; with one prompt, that prompt both (not cross-fitted)."""
    if n < 2:
        return [(np.arange(n), np.arange(n))]
    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    return [(even, odd), (odd, even)]


def check_space(ctx, space: Space, rankings: list[Ranking], res: stats.Resamples) -> dict:
    """The ground truth of one space and every ranking of it against it (module doc, DEFINITIONS)."""
    import causal_analysis as ca

    o = ctx.opts
    truth_kl, source = ground_truth(ctx, space)  # (n, U)
    n, U = truth_kl.shape
    truth = truth_kl.mean(0)  # (U,)
    drawn = res.means(truth_kl) if res.defined else None  # (R, U)
    low, high = stats.intervals(truth, drawn, res)
    top = stats.ranked(truth, o.top_k, drawn, res, key=space.unit)
    ks, pks, D = k_grid(U, o.faithfulness_max_k), precision_ks(o.top_k, U), o.faithfulness_draws
    G = len(ks)
    cleans = ctx.clean_runs(space.site)
    ablated = [0]  # rows of two or more units, over every prompt

    def effects(masks, on) -> np.ndarray:
        """(len(on), K) the per-prompt KL of the sets `masks` (K, U) on the prompts `on`: each distinct set
        once, a set of one unit read from the ground truth (already measured)."""
        distinct, back = np.unique(masks, axis=0, return_inverse=True)
        one = distinct.sum(1) == 1
        out = np.empty((len(on), len(distinct)))
        out[:, one] = truth_kl[np.ix_(on, distinct[one].argmax(1))]
        if (~one).any():
            out[:, ~one] = ca.set_ablation_effects(
                ctx.model, ctx.tokenizer, [o.prompt_list[i] for i in on], ctx.layer, space.site_masks(distinct[~one]),
                site=space.site, intervention_scale=ca.scale_of(o), ablation=o.ablation,
                batch_size=o.causal_batch_size, progress=ctx.progress, cleans=[cleans[i] for i in on]).kl[:, 0]
            ablated[0] += int((~one).sum()) * len(on)
        return out[:, back.reshape(-1)]

    curved = [r for r in rankings if not _constant(r.scores)]  # a constant ranking has no order to delete by
    kl = effects(np.concatenate([*(top_sets(r.scores, ks, o.seed) for r in curved), random_sets(U, ks, D, o.seed)]),
                 np.arange(n))  # (n, G * (len(curved) + D))
    rand_kl = kl[:, G * len(curved):]
    truth_sets = np.empty((n, G))  # the ground truth's own ranking, cross-fitted (DELETION_DEFINITION)
    for on, chosen in _halves(n):
        truth_sets[on] = effects(top_sets(truth_kl[chosen].mean(0), ks, o.seed), on)
    truth_curve, band = deletion_curve(truth_sets, ks, res), random_band(rand_kl, ks, D)
    rank_of = stats.ranks(truth)
    entries = {}
    for r in rankings:
        shown = r.shown_scores()
        entry = {"stage": r.stage, "ranks_by": r.ranks_by, "score_label": r.label, "n_undefined": r.n_undefined,
                 **rank_agreement(truth_kl, r.scores, res, pks)}
        if any(c is r for c in curved):
            i = next(j for j, c in enumerate(curved) if c is r)
            own = kl[:, G * i:G * (i + 1)]  # (n, G)
            entry.update(deletion=deletion_curve(own, ks, res),
                         normalised_area=normalised_area_interval(own, truth_sets, rand_kl, D, res, o.seed))
        else:
            entry.update(deletion=None, normalised_area={"value": None, "low": None, "high": None,
                                                         "note": "a constant ranking: no order to delete by"})
        order = ranking_order(r.scores, o.seed)[:o.top_k] if not _constant(r.scores) else []  # as top_sets orders
        entry["top_units"] = [{space.unit: int(u), "score": None if np.isnan(shown[u]) else float(shown[u]),
                               "effect": {"value": float(truth[u]), "low": None if low is None else float(low[u]),
                                          "high": None if high is None else float(high[u])},
                               "effect_rank": int(rank_of[u])} for u in order]
        entry["scores"] = shown
        entries[r.name] = entry
    return {"site": space.site, "unit": space.unit, "n_units": U, "description": space.description,
            "ground_truth": {"from": source, "scores": truth, "low": low, "high": high, "per_prompt": truth_kl,
                             "top": top, "ties": stats.ties_note(top, space.unit), "deletion": truth_curve,
                             "deletion_cross_fitted": n >= 2},
            "random": {"spearman": random_spearman(truth, o.bootstrap_resamples, o.seed),
                       "precision_at_k": {k: k / U for k in pks}, "deletion": band, "n_draws": D},
            "ks": ks, "precision_ks": pks, "n_sets_ablated": round(ablated[0] / n, 1), "rankings": entries}


def ablation_text(opts) -> str:
    """How the stage ablates a unit, in words."""
    import causal_analysis as ca

    if opts.ablation == "mean":
        return "set to its mean over every position of every prompt's clean run"
    scale = ca.scale_of(opts)
    return "set to 0" if scale == 0 else f"multiplied by {scale:g}"


STAGE_DEFINITIONS = {
    **DEFINITIONS, "deletion": DELETION_DEFINITION,
    "normalised_area": DEFINITIONS["normalised_area"] + "; its interval: the prompts resampled (the ranking's, the "
                       "ground truth's and the random curves together) and the random sets redrawn among the draws "
                       "on each; None, with a note, where the ground truth's curve does not rise above random (on "
                       "some draw, for the interval), and for a constant ranking",
    "random": "the baseline: Spearman's chance level 0 with the central 95% of rho over random rankings (low, high); "
              "precision@k k / U; the deletion band of random sets",
    "top_units": "a ranking's top --top_k units, each with its score, its causal effect (the ground truth's mean "
                 "KL with its 95% interval over prompts) and that effect's rank among every unit (1 = largest): "
                 "an attention method's 'importance' is this measured effect",
    "n_undefined": "units the ranking has no score for (an undefined η²: Δ constant): ordered after every unit "
                   "with a score, their score null",
    "n_sets_ablated": "sets of two or more units ablated per prompt (mean over the prompts); sets of one unit are "
                      "the ground truth's own values",
}


def _by_area(row: dict) -> float:
    """Sort key: the best normalised area first, an undefined one last."""
    a = row["normalised_area"]["value"]
    return np.inf if a is None else -a


def _run_faithfulness(ctx):
    """Every ranking of the layer's units that ran (Δ, each attention method, the activation variance) against
    the ground truth of ablating each unit alone: Spearman, precision@k, deletion curves beside the ground
    truth's own and random sets', and the normalised area."""
    from functools import partial

    import causal_analysis as ca
    from models import NotApplicable

    o = ctx.opts
    spaces = unit_spaces(ctx.adapter, ctx.layer)
    rankings, left = collect_rankings(ctx, spaces)
    if not rankings:
        why = "; ".join(f"{k}: {v}" for k, v in left.items()) or "none of delta, attention, sparsity is in the run"
        raise NotApplicable(f"no ranking of units to check ({why})")
    res = stats.Resamples.draw(len(o.prompt_list), o.bootstrap_resamples, o.seed, "prompts")
    checked = {name: check_space(ctx, space, [r for r in rankings if r.space == name], res)
               for name, space in spaces.items() if any(r.space == name for r in rankings)}
    table = [{"ranking": name, "space": sn, "spearman": e["spearman"], "precision_at_k": e["precision_at_k"],
              "normalised_area": e["normalised_area"]} for sn, s in checked.items() for name, e in s["rankings"].items()]
    table.sort(key=_by_area)
    results = {"layer": ctx.layer, "ablation": o.ablation, "ablated_as": ablation_text(o),
               "intervention_scale": ca.scale_of(o) if o.ablation == "zero" else None,
               "prompts": o.prompt_list, "n_prompts": len(o.prompt_list), "spaces": checked, "table": table,
               "left_out": left, "interval_method": res.method(),
               "ranked_by": "table: by normalised area (1 = as good as the ground truth's own ranking, 0 = random)",
               "definitions": {**STAGE_DEFINITIONS, "ground_truth": DEFINITIONS["ground_truth"].replace(
                   "ablated alone", f"ablated alone ({ablation_text(o)})")}}
    name = f"{ctx.prefix}_faithfulness_layer{ctx.layer}"
    return results, [partial(plot_deletion_curves, results, ctx.plots_dir, f"{name}_deletion"),
                     partial(plot_score_vs_effect, results, ctx.plots_dir, f"{name}_score_vs_effect")]


# --------------------------------------------------------------------------------------------------
# Summary and plots (they only read the results)
# --------------------------------------------------------------------------------------------------
def table_rows(r: dict) -> list[dict]:
    """The stage's table as flat rows (the report's): ranking, space, ρ with its interval and corrected
    estimate, precision@k, the normalised area and its interval; best area first."""
    rows = []
    for row in r["table"]:
        rho, area = row["spearman"], row["normalised_area"]
        rows.append({"ranking": row["ranking"], "space": row["space"], "Spearman rho": rho["value"],
                     "rho low": rho["low"], "rho high": rho["high"], "rho corrected": rho.get("corrected"),
                     **{f"precision@{k}": v["value"] for k, v in row["precision_at_k"].items()},
                     "normalised area": area["value"], "area low": area["low"], "area high": area["high"],
                     "note": "; ".join(dict.fromkeys(d["note"] for d in (rho, area, *row["precision_at_k"].values())
                                                     if d.get("note")))})
    return rows


def faithfulness_summary(r: dict) -> str:
    how = r["ablated_as"]
    lines = [f"    every ranking of the units at layer {r['layer']} against the ground truth, each unit ablated alone "
             f"({how}), mean KL over {r['n_prompts']} prompts. ρ: Spearman; p@k: precision; area: the deletion "
             "curve's area normalised (1 = the ground truth's own ranking, cross-fitted; 0 = random); [intervals "
             "over prompts, nominal 95%]. ρ's is the basic bootstrap's (79-86% coverage in simulations): a "
             "ground truth measured on a sample of prompts pulls ρ towards 0, so the interval may lie on one side "
             "of ρ, and 'corrected' estimates ρ without that noise; p@k's is the spread over draws of the prompts "
             "(docs/reference.md)\n"]
    for sn, s in r["spaces"].items():
        g = s["ground_truth"]
        best = g["top"][0]
        lines.append(f"    {s['n_units']} {s['unit']}s of {s['site']} ({sn}; ground truth {g['from']}): top {s['unit']} "
                     f"{best[s['unit']]}, KL {stats.shown({'value': best['score'], 'low': best.get('low'), 'high': best.get('high')})}"
                     f" nats\n")
        rows = sorted(s["rankings"].items(), key=lambda kv: _by_area(kv[1]))
        width = max(len(n) for n, _ in rows) + 2
        for name, e in rows:
            tops = ", ".join(f"{t[s['unit']]} (#{t['effect_rank']})" for t in e["top_units"][:3]) or "none (no order)"
            p = " ".join(f"@{k} {stats.shown(v, '.2f', corrected=False)}" for k, v in e["precision_at_k"].items())
            missing = (f"; {e['n_undefined']} {s['unit']}s without a score, ordered last" if e["n_undefined"] else "")
            lines.append(f"      {name:<{width}} ρ {stats.shown(e['spearman'], '.2f')}; "
                         f"area {stats.shown(e['normalised_area'], '.2f')}\n")
            lines.append(f"      {'':<{width}} p{p}; its top {s['unit']}s' causal ranks: {tops}{missing}\n")
        rs = s["random"]["spearman"]
        null = "" if rs["low"] is None else f" (95% of random rankings: [{rs['low']:.2f}, {rs['high']:.2f}])"
        chance = " ".join(f"@{k} {v:.3f}" for k, v in s["random"]["precision_at_k"].items())
        lines.append(f"      {'random':<{width}} ρ 0{null}; area 0; p{chance}\n")
    for name, why in r["left_out"].items():
        lines.append(f"    left out: {name}: {why}\n")
    return "".join(lines)


def _area_label(e: dict) -> str:
    a = e["normalised_area"]["value"]
    return "area undefined" if a is None else f"area {a:.2f}"


def plot_deletion_curves(r: dict, plots_dir, name: str) -> str:
    """Per space: the mean KL when the top k units are ablated together against k, for the ground truth's
    ranking (with its 95% interval), each ranking, and random sets (their mean and central 95%)."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    spaces = r["spaces"]
    fig, axes = plt.subplots(1, len(spaces), figsize=(7.5 * len(spaces), 5), squeeze=False, constrained_layout=True)
    for ax, (sn, s) in zip(axes[0], spaces.items()):
        ks = s["ks"]
        band = s["random"]["deletion"]
        ax.fill_between(ks, [b["low"] for b in band], [b["high"] for b in band], color="grey", alpha=0.25,
                        label=f"random sets (central 95% of {s['random']['n_draws']} draws)")
        ax.plot(ks, [b["mean"] for b in band], color="grey", ls="--", label="random sets (mean)")
        g = s["ground_truth"]["deletion"]
        values = np.array([p["value"] for p in g])
        err = None
        if all(p["low"] is not None for p in g):
            err = np.clip(np.stack([values - [p["low"] for p in g], [p["high"] for p in g] - values]), 0, None)
        ax.errorbar(ks, values, yerr=err, color="black", lw=2.5, marker="o", capsize=3,
                    label="ground truth's ranking" + (", cross-fitted" if s["ground_truth"]["deletion_cross_fitted"] else
                                                      ", in-sample (one prompt)")
                    + ("" if err is None else " (95% interval over prompts)"))
        for i, (rn, e) in enumerate(s["rankings"].items()):
            if e["deletion"] is None:  # a constant ranking
                continue
            ax.plot(ks, [p["value"] for p in e["deletion"]], marker="s", ms=4, color=f"C{i}",
                    label=f"{rn} ({_area_label(e)})")
        values = [*(p["value"] for p in g), *(b["mean"] for b in band),
                  *(p["value"] for e in s["rankings"].values() for p in e["deletion"] or ())]
        positive = [v for v in values if v > 0]
        ax.set_yscale("symlog", linthresh=min(positive) if positive else 1e-6)  # log above the smallest value shown
        ax.set(xscale="log", xlabel=f"k ({s['unit']}s ablated together, top k of each ranking)",
               ylabel="mean KL(p_clean ‖ p_ablated) (nats)",
               title=f"{s['n_units']} {s['unit']}s of {s['site']}, layer {r['layer']}")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.legend(fontsize=7)
    fig.suptitle(f"Deletion curves over {r['n_prompts']} prompts: the higher a ranking's curve, the more its top "
                 "units matter to the output")
    return save_figure(fig, plots_dir, name)


def plot_score_vs_effect(r: dict, plots_dir, name: str) -> str:
    """One panel per ranking: each unit's score against its measured causal effect (the ground truth's mean KL),
    the ground truth's top --top_k units marked; Spearman's ρ with its interval in the title."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    panels = [(sn, s, rn, e) for sn, s in r["spaces"].items() for rn, e in s["rankings"].items()]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False, constrained_layout=True)
    for ax, (sn, s, rn, e) in zip(axes.flat, panels):
        effect = np.asarray(s["ground_truth"]["scores"], dtype=np.float64)
        score = np.asarray(e["scores"], dtype=np.float64)
        top = [t[s["unit"]] for t in s["ground_truth"]["top"]]
        scored = np.isfinite(score)  # a unit without a score is not placed
        top = [u for u in top if scored[u]]
        ax.scatter(score[scored], effect[scored], s=6, alpha=0.5, color="tab:blue",
                   label=f"{s['unit']}s" + ("" if scored.all() else f" ({int((~scored).sum())} without a score)"))
        ax.scatter(score[top], effect[top], s=14, color="tab:red", label=f"ground truth's top {len(top)}")
        positive = effect[effect > 0]
        ax.set_yscale("symlog", linthresh=float(positive.min()) if positive.size else 1e-6)
        spread = score[scored & (score > 0)]
        if (score[scored] >= 0).all() and spread.size and np.percentile(spread, 99) > 1e3 * np.percentile(spread, 1):
            ax.set_xscale("symlog", linthresh=float(np.percentile(spread, 1)))  # a heavy right tail
        rho = e["spearman"]
        title = f"ρ = {stats.shown(rho, '.2f')}"
        ax.set(title=f"{rn} ({sn})\n{title}", xlabel=f"{e['score_label']} (the ranking's score)",
               ylabel="causal effect: mean KL (nats)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Each ranking's score against the unit's causal effect, layer {r['layer']}")
    return save_figure(fig, plots_dir, name)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("faithfulness", _run_faithfulness, faithfulness_summary,
                   needs=("delta", "causal", "attention", "sparsity"), per_layer=True))


_register()
