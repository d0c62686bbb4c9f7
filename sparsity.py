"""Activation sparsity of one layer's neurons, in memory and streamed.

"Neurons" are the inner site of a layer: Mamba `ssm` (u = y·SiLU(z), width e), Transformer `mlp` (the
MLP's hidden units after the activation). `a` below is an activations array (tokens, neurons) over the
text set, N the number of neurons, `c` the per-neuron mean |a| over all tokens.

Two different questions, each under its own name (they can disagree: a code with one active neuron per
token, each neuron active as often as the others, is maximally sparse per token and perfectly equal in
usage):
- population sparsity (per token, across neurons: how sparse is each token's code): Gini, Hoyer and the
  normalised entropy H of each token's activations, each averaged over the tokens;
- usage inequality (per neuron, over the corpus: how unequally the neurons are used): Gini and Hoyer of c.

Formulas, for a non-negative vector x of length N (a token's |a|, or c):
- Gini (Hurley & Rickard 2009): sort x ascending, G = 1 − 2 Σ_k (x_k/‖x‖₁)·(N − k + ½)/N, k = 1..N:
  0 for a uniform vector, 1 − 1/N for a one-hot.
- Hoyer: (√N − ‖x‖₁/‖x‖₂)/(√N − 1): 0 uniform, 1 one-hot.
- normalised entropy of a token: q_k = a_k² / Σ a², H = −Σ q log q / log N (0 log 0 = 0): 1 when the
  energy is spread evenly, 0 when one neuron carries it all; LOWER H = SPARSER. "entropy sparsity" is
  1 − H (HIGHER = SPARSER); both are reported, each under its own name, never one for the other.
- traditional: fraction of neurons with c < threshold (Mamba 0.01, Transformer 1e-5 by default);
  scale-dependent, so not comparable across architectures. When it is 0 or 1 the threshold lies outside
  the range of c: the number then says where the threshold sits, not what the model does, and the result
  says so ("informative": false and "uninformative": the reason).
- percentile: for p in PERCENTILES, τ_p = the p-th percentile of all |a| of the layer, and the fraction
  of neurons with c < τ_p. (The literal "fraction of neurons whose variance is below the p-th percentile
  of the variances" is p/100 for any activations, by construction, so it is not what is computed.)
- optimal threshold: the τ below or at which a target fraction of all |a| falls, and the fraction of
  neurons with c < τ.
- dead neurons (Voita et al. 2023): max over every token of |a| < eps; with the least active neuron's
  max |a| beside the count, so a count of 0 says how far above eps every neuron is.

A per-token measure is undefined for a token whose activations are all 0 (no distribution: counted
apart, left out of the mean), H and Hoyer for every token when N = 1; the mean over tokens is taken over
the tokens where the measure is defined. Gini and Hoyer of c are undefined when every c is 0, Hoyer
also for N = 1. An undefined measure is None, never NaN, with the reason in the result's "undefined"
dict ({measure: "undefined: ..."}; see `UNDEFINED`).

Entropy, Gini and Hoyer are scale-free, and computed scale-free: each vector (a token's activations, or c)
is divided by its largest |value| before any square or sum, so a scaled copy gives the same value (exactly
for a power-of-two scale, to rounding for any other): no square or sum overflows at any finite scale (|a|
near 1e200 in float64; every float32 value), and a uniformly tiny vector (1e-200) does not underflow to 0.

Intervals (`stats.py`): the items of the bootstrap are the texts (in a stream: the chunks fed, one per
text). A population measure is a token-weighted mean, Σ_texts S_i / Σ_texts n_i (S_i the sum of the
measure over text i's tokens where it is defined, n_i their number), resampled as such; usage Gini and
Hoyer and traditional sparsity are recomputed on each resample from the resampled per-neuron means
c* = Σ_i w_i s_i / Σ_i w_i t_i (s_i the per-neuron sums of |a| over text i, t_i its tokens, w_i how often
the resample drew it). The interval's point is the whole-corpus value. Percentile sparsity, the optimal
threshold, dead neurons and the activation variance carry no interval (a quantile or a max over all
tokens, not a mean over texts).

Quantiles (τ_p, optimal thresholds) are order statistics of |a| rounded to float32, "inverted CDF":
the smallest value v with at least a fraction q of all |a| ≤ v (numpy's method="inverted_cdf").
Streamed, they are found exactly by a two-pass radix select on the float32 bit patterns (which order
like the values for |a| ≥ 0): pass 1 counts the top 16 bits, pass 2 the low 16 bits inside the bins that
hold the wanted ranks. Every other statistic is a running sum in float64 (the per-token measures are
computed per token in pass 1 and summed: exactly the per-token values, to float64 summation order). Pass 2
reads the bit patterns that pass 1 kept when they fit in a memory budget (a quarter of the free host
memory by default), else it runs over the source again (for a model: a second forward per text); the
result is the same. The per-text sums for the intervals take n_texts × N float64 per layer.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np

import stats
from utils import shown  # light

logger = logging.getLogger(__name__)

PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
TARGET_FRACTIONS = (0.5, 0.9)
TRADITIONAL_THRESHOLDS = {"mamba": 0.01, "transformer": 1e-5}
DEAD_EPS = 1e-6
ENTROPY_BINS = np.linspace(0.0, 1.0, 21)  # edges of the per-token histograms (H, Gini, Hoyer all lie in [0, 1])
POPULATION = ("normalised_entropy", "gini", "hoyer")  # the per-token measures, in the accumulators' order
UNDEFINED = {
    "all_zero": "undefined: every neuron's mean |a| is 0 (no distribution over the neurons to measure)",
    "one_neuron_hoyer": "undefined: one neuron (Hoyer divides by sqrt(N) - 1 = 0)",
    "no_energy": "undefined: every token's activations are all 0 (no token has a distribution over the neurons)",
    "one_neuron_entropy": "undefined: one neuron (the entropy is normalised by log N = 0)",
}
SCALE_NOTE = ("traditional sparsity uses an absolute threshold, so it depends on the activation scale "
              "and is not comparable across architectures; percentile, entropy, Gini and Hoyer are "
              "scale-free")
DEFINITIONS = {
    "population": "population sparsity: per token, across the N neurons, each averaged over the tokens where "
                  "it is defined (token-weighted over texts); 95% interval over texts",
    "population.gini": "mean over tokens of the Gini index of the token's |a| (sorted ascending x, "
                       "G = 1 − 2 Σ_k (x_k/‖x‖₁)(N − k + ½)/N; 0 uniform, 1 − 1/N one-hot)",
    "population.hoyer": "mean over tokens of the Hoyer sparsity of the token's |a|, "
                        "(√N − ‖a‖₁/‖a‖₂)/(√N − 1) (0 uniform, 1 one-hot)",
    "population.normalised_entropy": "H: mean over tokens of −Σ_k q_k log q_k / log N with q_k = a_k²/Σ a² "
                                     "(1 = energy spread evenly, 0 = one neuron; LOWER = SPARSER)",
    "population.entropy_sparsity": "1 − H (HIGHER = SPARSER); the same information as H, named apart",
    "usage": "usage inequality (lifetime): per neuron over the corpus; 95% interval over texts, Gini and Hoyer "
             "recomputed on each resample from the resampled per-neuron means",
    "usage.gini": "Gini index of c, the per-neuron mean |a| over all tokens (0 = every neuron used equally)",
    "usage.hoyer": "Hoyer sparsity of c (0 = every neuron used equally, 1 = one neuron carries it all)",
    "gini, hoyer": "legacy aliases: the point values of usage.gini and usage.hoyer (usage inequality, NOT "
                   "population sparsity)",
    "entropy": "legacy: 'sparsity' = 1 − H (entropy sparsity), 'mean_entropy' = H (normalised entropy); "
               "n_zero_tokens: tokens whose activations are all 0 (left out of every per-token mean); the "
               "histogram is of the per-token H",
    "traditional": "fraction of neurons with c < threshold; 'sparsity_interval' over texts; informative false "
                   "(with the reason in 'uninformative') when it is 0 or 1: the threshold lies outside the "
                   "range of c",
    "percentile": "τ_p = p-th percentile of all |a| (inverted CDF, float32), and the fraction of neurons with "
                  "c < τ_p (the literal 'fraction of neurons whose variance is below the p-th percentile of the "
                  "variances' is p/100 by construction, so it is not computed)",
    "optimal_threshold": "τ: the smallest |a| with at least the target fraction of all |a| ≤ τ; neuron_sparsity: "
                         "fraction of neurons with c < τ",
    "dead_neurons": "neurons with max |a| < eps over every token (a count, no interval); least_active_max_abs: "
                    "the smallest per-neuron max |a| (how far above eps the least active neuron is)",
    "activation_variance": "per-neuron variance of a over all tokens (population variance): mean, median, max",
}


def default_threshold(family: str) -> float:
    from models import SSM_FAMILIES

    return TRADITIONAL_THRESHOLDS["mamba" if family in SSM_FAMILIES else "transformer"]


def default_thresholds(adapter, layers) -> float | dict:
    """The traditional threshold by default: the family's, or on a hybrid each layer's by what its neurons
    are ({layer: threshold}: Mamba's at a state-space layer's channels, a Transformer's at a dense MLP's)."""
    if not adapter.hybrid:
        return default_threshold(adapter.family)
    return {la: TRADITIONAL_THRESHOLDS["mamba" if adapter.has_ssm(la) else "transformer"] for la in layers}


def neuron_site(adapter) -> str:
    """The inner neuron site of a family: Mamba `ssm` (e), Transformers `mlp`, a hybrid's `neurons` (each
    layer's own: `models.HybridAdapter.neuron_path`)."""
    if adapter.hybrid:
        return "neurons"
    return "ssm" if adapter.is_ssm else "mlp"


def site_layers(adapter, layers, site: str | None = None) -> tuple[list[int], dict]:
    """(those of `layers` that have the site (default `neuron_site`), {layer without it: why}): a hybrid's
    layers may lack one (a mixture-of-experts or attention-only block has no dense neurons)."""
    from models import NotApplicable

    site = site or neuron_site(adapter)
    kept, skipped = [], {}
    for la in layers:
        try:
            adapter.site(site, la)
            kept.append(la)
        except NotApplicable as exc:
            skipped[la] = str(exc)
    return kept, skipped


# --------------------------------------------------------------------------------------------------
# Pure functions over an activations array (tokens, neurons)
# --------------------------------------------------------------------------------------------------
def _as_2d(a, allow_no_tokens: bool = False) -> np.ndarray:
    """`a` as float64 (tokens, neurons). ValueError for another shape, no neurons, no tokens (unless
    `allow_no_tokens`: an empty chunk of a stream), or any NaN / infinite value: no statistic here is
    defined on them, and none is returned for them."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"activations must be (tokens, neurons); got shape {a.shape}")
    if a.shape[1] == 0 or (a.shape[0] == 0 and not allow_no_tokens):
        raise ValueError(f"activations are empty (shape {a.shape}); need at least one token and one neuron")
    _check_finite(a, "activations")
    return a


def _check_finite(a: np.ndarray, what: str) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        n_nan = int(np.isnan(a).sum())
        raise ValueError(f"{what} contain {n_nan} NaN and {int((~finite).sum()) - n_nan} infinite values")


def _finite_number(name: str, value) -> float:
    from causal_analysis import finite_number  # the one check, shared by the analysis modules

    return finite_number(name, value)


def _abs32(a: np.ndarray) -> np.ndarray:
    """|a| (checked by `_as_2d`) rounded to float32, flattened: the values the quantiles are order
    statistics of."""
    with np.errstate(over="ignore"):  # an overflow is reported just below, in words
        x = np.abs(a.astype(np.float32)).ravel()
    if x.size and not np.isfinite(x.max()):  # finite in float64, beyond float32's range: |a| > 3.4e38
        raise ValueError("activations overflow float32 (|a| > 3.4e38)")
    return x


def neuron_means(a) -> np.ndarray:
    """c: mean |a| per neuron, float64 (N,). Where the plain sum over tokens overflows (|a| near float64's
    limit), the mean is taken of |a| / max|a| and scaled back."""
    absa = np.abs(_as_2d(a))
    with np.errstate(over="ignore"):
        c = absa.mean(axis=0)
    if not np.isfinite(c).all():
        peak = absa.max()
        c = (absa / peak).mean(axis=0) * peak
    return c


def traditional(a, threshold: float) -> float:
    return float((neuron_means(a) < _finite_number("threshold", threshold)).mean())


def abs_quantiles(a, fractions) -> np.ndarray:
    """Order statistics of |a| (float32) at the given fractions, inverted CDF (see module doc)."""
    return np.quantile(_abs32(_as_2d(a)), np.asarray(fractions, dtype=np.float64),
                       method="inverted_cdf").astype(np.float64)


def percentile(a, percentiles=PERCENTILES) -> dict:
    """{"percentiles", "thresholds" τ_p, "sparsity": fraction of neurons with mean |a| < τ_p}."""
    tau = abs_quantiles(a, np.asarray(percentiles, dtype=np.float64) / 100.0)
    return _percentile_table(percentiles, tau, neuron_means(a))


def token_measures(a) -> dict:
    """The per-token population measures {"normalised_entropy", "gini", "hoyer"}: each (tokens,) float64,
    scale-free (each token's activations divided by their largest |a| first). Per-token marker arrays,
    not results: NaN where the measure is undefined (a token whose activations are all 0; H and Hoyer for
    every token when there is one neuron); the means and the sparsity dicts leave those out and say so."""
    return dict(zip(POPULATION, _token_measures(_as_2d(a))))


def token_entropy(a) -> np.ndarray:
    """Normalised entropy H per token (tokens,) (lower = sparser): `token_measures`' "normalised_entropy"."""
    return _token_measures(_as_2d(a))[0]


def _token_measures(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, Gini, Hoyer) per token of an array already checked by `_as_2d` (not checked again on the
    streamed path), in float64 through torch (on every core: the log and the sort per value are the
    streamed path's heaviest steps)."""
    import torch

    n = a.shape[1]
    t = torch.from_numpy(a).abs()  # (T, N) float64
    peak = t.amax(1, keepdim=True)  # (T, 1): each token's largest |a|
    zero = peak[:, 0] == 0  # (T,): tokens with no energy
    x = t.div_(torch.where(zero[:, None], 1.0, peak))  # (T, N), each row's largest is 1: no overflow
    l1 = x.sum(1).clamp_(min=1.0)  # (T,); a non-zero row sums to >= 1
    w = (n - torch.arange(1, n + 1, dtype=torch.float64) + 0.5) / n  # (N,) Gini weights, ascending order
    g = 1.0 - 2.0 * (torch.sort(x, 1).values @ w) / l1
    sq = x.square_()  # x is not needed after this
    l2sq = sq.sum(1).clamp_(min=1.0)
    if n > 1:
        hoy = (math.sqrt(n) - l1 / l2sq.sqrt()) / (math.sqrt(n) - 1.0)
        q = sq.div_(l2sq[:, None])
        h = torch.xlogy(q, q).sum(1).neg_().div_(math.log(n))
    else:
        hoy = torch.full((len(a),), float("nan"), dtype=torch.float64)
        h = hoy.clone()
    for v in (h, g, hoy):
        v[zero] = float("nan")
    return h.numpy(), g.numpy(), hoy.numpy()


def entropy(a) -> float | None:
    """Entropy sparsity 1 − mean H over the tokens with energy (higher = sparser; `normalised_entropy` is
    the mean H itself); None when undefined (every token all 0, or one neuron: the reasons in `UNDEFINED`)."""
    h = normalised_entropy(a)
    return None if h is None else 1.0 - h


def normalised_entropy(a) -> float | None:
    """Mean normalised entropy H over the tokens with energy (lower = sparser); None when undefined."""
    h = token_entropy(a)
    return float(np.nanmean(h)) if np.isfinite(h).any() else None


def population_sparsity(a) -> dict:
    """{"normalised_entropy", "entropy_sparsity", "gini", "hoyer"}: each per-token measure averaged over the
    tokens where it is defined (None where no token has it defined)."""
    m = token_measures(a)
    out = {k: (float(np.nanmean(v)) if np.isfinite(v).any() else None) for k, v in m.items()}
    out["entropy_sparsity"] = None if out["normalised_entropy"] is None else 1.0 - out["normalised_entropy"]
    return out


def _vector(c) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    c = neuron_means(c) if c.ndim == 2 else np.abs(c)
    if c.ndim != 1 or len(c) == 0:
        raise ValueError(f"need a vector of per-neuron values or a (tokens, neurons) array; got shape {c.shape}")
    _check_finite(c, "per-neuron values")
    return c


def _unit_rows(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c / its row max (rows of 0 left as 0), which rows are all 0) for non-negative rows (R, N)."""
    peak = c.max(axis=1)
    zero = peak == 0
    return c / np.where(zero, 1.0, peak)[:, None], zero


def gini_rows(c) -> np.ndarray:
    """Gini of each row of non-negative values (R, N), scale-free; NaN for an all-zero row."""
    x, zero = _unit_rows(np.sort(np.asarray(c, dtype=np.float64), axis=1))
    n = x.shape[1]
    w = (n - np.arange(1, n + 1) + 0.5) / n
    l1 = np.where(zero, 1.0, x.sum(axis=1))  # in [1, N] for a non-zero row
    g = 1.0 - 2.0 * (x @ w) / l1
    g[zero] = np.nan
    return g


def hoyer_rows(c) -> np.ndarray:
    """Hoyer of each row of non-negative values (R, N), scale-free; NaN for an all-zero row or N = 1."""
    x, zero = _unit_rows(np.asarray(c, dtype=np.float64))
    n = x.shape[1]
    if n == 1:
        return np.full(len(x), np.nan)
    l2 = np.sqrt(np.where(zero, 1.0, np.sum(x * x, axis=1)))  # in [1, √N]
    h = (math.sqrt(n) - x.sum(axis=1) / l2) / (math.sqrt(n) - 1.0)
    h[zero] = np.nan
    return h


def _none(v) -> float | None:
    return None if not np.isfinite(v) else float(v)


def gini(c) -> float | None:
    """Gini index of the per-neuron mean |a| (or of the |values| of a given vector): the usage inequality
    of a (tokens, neurons) array. 0 for a uniform vector, 1 − 1/N for a one-hot; computed on c / max(c)
    (scale-free). None for an all-zero vector (undefined: UNDEFINED["all_zero"])."""
    return _none(gini_rows(_vector(c)[None])[0])


def hoyer(c) -> float | None:
    """Hoyer sparsity (√N − ‖c‖₁/‖c‖₂)/(√N − 1) of the per-neuron mean |a| (or of a given vector): 0
    uniform, 1 one-hot; computed on c / max(c) (scale-free, so ‖c‖₂ never overflows). None when undefined:
    one neuron (UNDEFINED["one_neuron_hoyer"]) or all zeros (UNDEFINED["all_zero"])."""
    return _none(hoyer_rows(_vector(c)[None])[0])


def undefined_measures(means, n_defined: dict) -> dict:
    """{measure: reason} for the measures of a layer that are undefined (None in its sparsity dict): the
    population measures ("population.<name>": no token with energy, or one neuron for H and Hoyer; from
    `n_defined`, the number of tokens where each per-token measure is defined) and the usage measures
    ("usage.gini", "usage.hoyer": every mean |a| 0, Hoyer also for one neuron). Empty when every measure is
    defined."""
    n, zero = len(means), not np.any(np.asarray(means) > 0)
    out = {}
    for m in POPULATION:
        if n_defined[m] == 0:
            out[f"population.{m}"] = UNDEFINED["one_neuron_entropy" if m == "normalised_entropy" and n == 1 else
                                               "one_neuron_hoyer" if m == "hoyer" and n == 1 else "no_energy"]
    if "population.normalised_entropy" in out:
        out["population.entropy_sparsity"] = out["population.normalised_entropy"]
    if zero:
        out["usage.gini"] = UNDEFINED["all_zero"]
    if n == 1 or zero:
        out["usage.hoyer"] = UNDEFINED["one_neuron_hoyer" if n == 1 else "all_zero"]
    return out


def optimal_threshold(a, target: float = 0.5) -> float:
    """The smallest τ among the |a| with at least `target` of all |a| ≤ τ."""
    if not 0.0 < _finite_number("target fraction", target) <= 1.0:
        raise ValueError(f"target fraction {target} must lie in (0, 1]")
    return float(abs_quantiles(a, [target])[0])


def dead_neurons(a, eps: float = DEAD_EPS) -> np.ndarray:
    """Indices of the neurons with |a| < eps on every token."""
    return np.flatnonzero(np.abs(_as_2d(a)).max(axis=0) < _finite_number("eps", eps))


@dataclass
class Items:
    """Per-item (per-text) sums for the intervals: `tokens` (n,), `sum_abs` (n, N) per-neuron sums of |a|,
    `pop_sum` (n, 3) and `pop_count` (n, 3): the sums of the per-token measures (POPULATION order) over the
    item's tokens where each is defined, and how many those are."""

    tokens: np.ndarray
    sum_abs: np.ndarray
    pop_sum: np.ndarray
    pop_count: np.ndarray

    @classmethod
    def of(cls, chunks: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> Items:
        return cls(np.array([c[0] for c in chunks], dtype=np.float64), np.stack([c[1] for c in chunks]),
                   np.stack([c[2] for c in chunks]), np.stack([c[3] for c in chunks]))


def _item_row(a: np.ndarray, measures) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One item's row of `Items` from its activations (T, N) and their per-token measures."""
    ok = [np.isfinite(v) for v in measures]
    return (a.shape[0], np.abs(a).sum(axis=0), np.array([float(v[k].sum()) for v, k in zip(measures, ok)]),
            np.array([float(k.sum()) for k in ok]))


def comprehensive_sparsity(a, threshold: float, eps: float = DEAD_EPS, percentiles=PERCENTILES,
                           targets=TARGET_FRACTIONS, lengths=None, n_resamples: int = stats.DEFAULT_RESAMPLES,
                           seed: int = 0) -> dict:
    """Every statistic of the module doc for one layer's activations held in memory (the reference the
    streamed statistics are tested against). `lengths`: the tokens of each text, in order (the items of
    the intervals; they must sum to the tokens of `a`); default one text (then no interval)."""
    a = _as_2d(a)
    lengths = [a.shape[0]] if lengths is None else [int(n) for n in lengths]
    if sum(lengths) != a.shape[0] or min(lengths) < 1:
        raise ValueError(f"lengths {lengths} must be positive and sum to the {a.shape[0]} tokens")
    x = _abs32(a)
    fractions = [p / 100.0 for p in percentiles] + list(targets)
    tau = abs_quantiles(a, fractions)
    measures = _token_measures(a)
    bounds = np.cumsum([0, *lengths])
    items = Items.of([_item_row(a[s:e], [v[s:e] for v in measures]) for s, e in zip(bounds[:-1], bounds[1:])])
    return _summarise(
        n_tokens=a.shape[0], means=neuron_means(a), variances=a.var(axis=0), max_abs=np.abs(a).max(axis=0),
        pop_sum=np.array([float(np.nansum(v)) for v in measures]),
        pop_count=np.array([int(np.isfinite(v).sum()) for v in measures]),
        zero_tokens=int((np.abs(a).max(axis=1) == 0).sum()),
        pop_hist=np.stack([np.histogram(v[np.isfinite(v)], ENTROPY_BINS)[0] for v in measures]),
        percentiles=percentiles, tau_p=tau[:len(percentiles)], targets=targets, tau_t=tau[len(percentiles):],
        at_or_below_t=np.array([(x <= t).sum() for t in tau[len(percentiles):]]),
        threshold=threshold, eps=eps, items=items, n_resamples=n_resamples, seed=seed)


def _percentile_table(percentiles, tau, means) -> dict:
    return {"percentiles": list(percentiles), "thresholds": [float(t) for t in tau],
            "sparsity": [float((means < t).mean()) for t in tau]}


@functools.lru_cache(maxsize=4)
def _draws(n: int, n_resamples: int, seed: int) -> stats.Resamples:
    """The bootstrap's draws over n texts (the same for every layer of a run: cached)."""
    return stats.Resamples.draw(n, n_resamples, seed, "texts")


def interval_method(n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> str:
    """The sentence describing the intervals of a sparsity result (`stats.Resamples.method`)."""
    return stats.METHOD.format(items="texts", n_resamples=n_resamples, seed=seed)


def _interval(point, resampled, res: stats.Resamples) -> dict | None:
    """{"value", "low", "high"} with `point` the whole-corpus value; None when the measure is undefined
    (the layer's "undefined" says why); no interval (low/high None, with a "note") when it is undefined
    in some resamples (every drawn text without a token where it is defined)."""
    if point is None:
        return None
    resampled = np.asarray(resampled, dtype=np.float64)
    bad = int((~np.isfinite(resampled)).sum())
    if bad and res.defined:
        return {"value": float(point), "low": None, "high": None,
                "note": f"undefined in {bad} of {len(resampled)} resamples"}
    return stats.interval(point, resampled, res)


def uninformative(fraction: float, threshold: float, means) -> str | None:
    """The reason a threshold fraction (of neurons with mean |a| < threshold) says nothing about the model,
    or None: at 0 every neuron's mean |a| is at or above the threshold, at 1 every one is below it."""
    if 0.0 < fraction < 1.0:
        return None
    side, which, v = (("at or above", "smallest", np.min(means)) if fraction == 0.0 else
                      ("below", "largest", np.max(means)))
    return f"uninformative at threshold {threshold:g}: every neuron's mean |a| is {side} it (the {which} is {v:.3g})"


def _summarise(n_tokens, means, variances, max_abs, pop_sum, pop_count, zero_tokens, pop_hist,
               percentiles, tau_p, targets, tau_t, at_or_below_t, threshold, eps, items: Items,
               n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """The result dict shared by the in-memory and the streamed computation (keys: DEFINITIONS). A measure
    undefined for its input is None, and "undefined" maps each such measure to its reason
    (`undefined_measures`; an empty dict when all are defined)."""
    threshold, eps = _finite_number("threshold", threshold), _finite_number("eps", eps)
    n = len(means)
    dead = np.flatnonzero(max_abs < eps)
    res = _draws(len(items.tokens), int(n_resamples), int(seed))
    pop_count = np.asarray(pop_count, dtype=np.float64)
    point = {m: (float(pop_sum[i] / pop_count[i]) if pop_count[i] else None) for i, m in enumerate(POPULATION)}
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a defined token: NaN, said
        drawn_sum, drawn_n = res.counts @ items.pop_sum, res.counts @ items.pop_count  # (R, 3) each
        pop_resampled = drawn_sum / drawn_n
        usage_means = (res.counts @ items.sum_abs) / (res.counts @ items.tokens)[:, None]  # (R, N)
    population = {m: _interval(point[m], pop_resampled[:, i], res) for i, m in enumerate(POPULATION)}
    h = population["normalised_entropy"]
    population["entropy_sparsity"] = None if h is None else _interval(1.0 - h["value"], 1.0 - pop_resampled[:, 0],
                                                                       res)
    population["n_tokens_defined"] = {m: int(pop_count[i]) for i, m in enumerate(POPULATION)}
    population["histograms"] = {"edges": ENTROPY_BINS, **{m: np.asarray(pop_hist[i], dtype=np.int64)
                                                          for i, m in enumerate(POPULATION)}}
    g, hy = gini(means), hoyer(means)
    usage = {"gini": _interval(g, gini_rows(usage_means), res), "hoyer": _interval(hy, hoyer_rows(usage_means), res)}
    trad = float((means < threshold).mean())
    why = uninformative(trad, threshold, means)
    mean_h = point["normalised_entropy"]
    return {
        "n_tokens": int(n_tokens), "n_neurons": int(n), "n_texts": len(items.tokens),
        "population": population, "usage": usage,
        "traditional": {"threshold": float(threshold), "sparsity": trad,
                        "sparsity_interval": _interval(trad, (usage_means < threshold).mean(1), res),
                        "informative": why is None, "uninformative": why, "note": SCALE_NOTE},
        "percentile": _percentile_table(percentiles, tau_p, means),
        "entropy": {"sparsity": None if mean_h is None else 1.0 - mean_h, "mean_entropy": mean_h,
                    "n_zero_tokens": int(zero_tokens),
                    "histogram_edges": ENTROPY_BINS, "histogram_counts": np.asarray(pop_hist[0], dtype=np.int64)},
        "gini": g, "hoyer": hy,
        "optimal_threshold": {"targets": list(targets), "thresholds": [float(t) for t in tau_t],
                              "fraction_at_or_below": [float(c) / (n_tokens * n) for c in at_or_below_t],
                              "neuron_sparsity": [float((means < t).mean()) for t in tau_t]},
        "dead_neurons": {"eps": float(eps), "count": int(len(dead)), "fraction": len(dead) / n, "indices": dead,
                         "least_active_max_abs": float(np.min(max_abs))},
        "activation_variance": {"mean": float(np.mean(variances)), "median": float(np.median(variances)),
                                "max": float(np.max(variances))},
        "neuron_mean_abs": means, "neuron_variance": variances,
        "undefined": undefined_measures(means, {m: int(pop_count[i]) for i, m in enumerate(POPULATION)}),
    }
# --------------------------------------------------------------------------------------------------
# Streamed statistics
# --------------------------------------------------------------------------------------------------
def _bits(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False).view(np.uint32)


def _inverted_cdf_rank(n: int, q: float) -> int:
    """0-based rank of the inverted-CDF quantile q of n values, computed as numpy does."""
    v = n * q - 1.0
    k = math.floor(v) + (1 if v - math.floor(v) > 0 else 0)
    return min(max(k, 0), n - 1)


@dataclass
class SparsityAccumulator:
    """Running statistics of one layer's activations, fed chunk by chunk of tokens (T, N); each non-empty
    chunk is one item (text) of the intervals.

    Pass 1: `update(chunk)` for every chunk. If quantiles are wanted, pass 2: `start_refine(fractions)`,
    then `refine(chunk)` for the same chunks again. `result(...)` gives what `comprehensive_sparsity`
    gives for all chunks stacked, with the chunks' lengths as its `lengths`."""

    n_neurons: int
    n_tokens: int = 0
    mean: np.ndarray = None  # (N,) running mean of a (Chan's parallel update)
    m2: np.ndarray = None  # (N,) running Σ (a − mean)²
    sum_abs: np.ndarray = None  # (N,)
    max_abs: np.ndarray = None  # (N,)
    pop_sum: np.ndarray = None  # (3,) sums of the per-token measures (POPULATION order) where defined
    pop_count: np.ndarray = None  # (3,) tokens where each is defined
    zero_tokens: int = 0  # tokens whose activations are all 0
    pop_hist: np.ndarray = None  # (3, bins) histograms of the per-token measures
    items: list = field(default_factory=list)  # per chunk: `_item_row`
    hist_hi: np.ndarray = None  # (65536,) counts of the top 16 bits of |a| (float32)
    fractions: list = field(default_factory=list)
    _ranks: list = field(default_factory=list)  # [(fraction, rank, hi bin, rank within the bin)]
    _hist_lo: dict = field(default_factory=dict)  # hi bin -> (65536,) counts of the low 16 bits

    def __post_init__(self):
        n = self.n_neurons
        self.mean, self.m2, self.sum_abs = np.zeros(n), np.zeros(n), np.zeros(n)
        self.max_abs = np.zeros(n)
        self.pop_sum, self.pop_count = np.zeros(len(POPULATION)), np.zeros(len(POPULATION), dtype=np.int64)
        self.pop_hist = np.zeros((len(POPULATION), len(ENTROPY_BINS) - 1), dtype=np.int64)
        self.hist_hi = np.zeros(1 << 16, dtype=np.int64)

    # the legacy names of the entropy's running sums
    @property
    def entropy_sum(self) -> float:
        return float(self.pop_sum[0])

    @property
    def entropy_count(self) -> int:
        return int(self.pop_count[0])

    def update(self, chunk) -> np.ndarray:
        """Pass 1 on a (T, N) chunk; returns the float32 bit patterns of its |a| (T·N,) uint32, which
        `refine_bits` takes in pass 2 in place of the chunk itself."""
        a = _as_2d(chunk, allow_no_tokens=True)
        if a.shape[1] != self.n_neurons:
            raise ValueError(f"chunk has {a.shape[1]} neurons, expected {self.n_neurons}")
        t = a.shape[0]
        if t == 0:
            return np.zeros(0, dtype=np.uint32)
        mean_c, m2_c = a.mean(axis=0), ((a - a.mean(axis=0)) ** 2).sum(axis=0)  # (N,) each
        total = self.n_tokens + t
        delta = mean_c - self.mean
        self.m2 += m2_c + delta * delta * self.n_tokens * t / total
        self.mean += delta * t / total
        self.n_tokens = total
        absa = np.abs(a)
        row = _item_row(a, measures := _token_measures(a))
        self.items.append(row)
        self.sum_abs += row[1]
        np.maximum(self.max_abs, absa.max(axis=0), out=self.max_abs)
        self.zero_tokens += int((absa.max(axis=1) == 0).sum())
        self.pop_sum += row[2]
        self.pop_count += row[3].astype(np.int64)
        for i, v in enumerate(measures):
            self.pop_hist[i] += np.histogram(v[np.isfinite(v)], ENTROPY_BINS)[0]
        bits = _bits(_abs32(a))  # (T·N,)
        self.hist_hi += np.bincount(bits >> 16, minlength=1 << 16)
        return bits
    def start_refine(self, fractions) -> None:
        """After pass 1: locate the top-16-bit bin of each wanted rank; pass 2 counts inside them."""
        total = self.n_tokens * self.n_neurons
        if total == 0:
            raise ValueError("no activations were seen")
        cum = np.cumsum(self.hist_hi)
        self.fractions, self._ranks, self._hist_lo = list(fractions), [], {}
        for q in self.fractions:
            k = _inverted_cdf_rank(total, q)
            hi = int(np.searchsorted(cum, k, side="right"))  # first bin whose cumulative count exceeds k
            self._ranks.append((q, k, hi, k - (int(cum[hi - 1]) if hi else 0)))
            self._hist_lo.setdefault(hi, np.zeros(1 << 16, dtype=np.int64))

    def refine(self, chunk) -> None:
        self.refine_bits(_bits(_abs32(_as_2d(chunk, allow_no_tokens=True))))

    def refine_bits(self, bits: np.ndarray) -> None:
        """Pass 2 on the bit patterns `update` returned for a chunk (the same counts as `refine`)."""
        hi = bits >> 16
        for b, counts in self._hist_lo.items():
            counts += np.bincount(bits[hi == b] & 0xFFFF, minlength=1 << 16)

    def quantiles(self) -> np.ndarray:
        out = []
        for _q, _k, hi, within in self._ranks:
            lo = int(np.searchsorted(np.cumsum(self._hist_lo[hi]), within, side="right"))
            out.append(float(np.array([(hi << 16) | lo], dtype=np.uint32).view(np.float32)[0]))
        return np.array(out)

    def count_at_or_below(self, tau: float) -> int:
        """How many |a| are ≤ tau, for a tau found by `quantiles` (exact from the two histograms)."""
        bits = int(np.array([tau], dtype=np.float32).view(np.uint32)[0])
        hi, lo = bits >> 16, bits & 0xFFFF
        return int(self.hist_hi[:hi].sum() + self._hist_lo[hi][:lo + 1].sum())

    def result(self, threshold: float, eps: float = DEAD_EPS, percentiles=PERCENTILES,
               targets=TARGET_FRACTIONS, n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
        tau = self.quantiles()
        if len(tau) != len(percentiles) + len(targets):
            raise ValueError("start_refine must be given the percentiles / 100 followed by the targets")
        return _summarise(
            n_tokens=self.n_tokens, means=self.sum_abs / self.n_tokens, variances=self.m2 / self.n_tokens,
            max_abs=self.max_abs, pop_sum=self.pop_sum, pop_count=self.pop_count,
            zero_tokens=self.zero_tokens, pop_hist=self.pop_hist, percentiles=percentiles,
            tau_p=tau[:len(percentiles)], targets=targets, tau_t=tau[len(percentiles):],
            at_or_below_t=np.array([self.count_at_or_below(t) for t in tau[len(percentiles):]]),
            threshold=threshold, eps=eps, items=Items.of(self.items), n_resamples=n_resamples, seed=seed)


def default_cache_bytes() -> int:
    """How much of the first pass `stream_sparsity` keeps for the second by default: a quarter of the
    host's free memory now."""
    import torch

    from utils import free_memory_bytes

    return free_memory_bytes(torch.device("cpu")) // 4


class SparsityStream:
    """The two passes of `stream_sparsity` for a source that is fed rather than pulled: `feed(chunk)` with
    a (T, N) array or a {key: (T, N)} dict (pass 1, keeping the |a| bit patterns while they fit in
    `cache_bytes`), then `finish(...)` runs pass 2 on the kept patterns, or, once they were dropped, on
    the chunks of `again()` (the same values in the same order). `kept_all` says whether pass 2 can run
    without the source. So a loop that computes the activations for another purpose (the attention
    stage's gradient forward) can feed them, and the sparsity numbers need no forward of their own."""

    def __init__(self, n_neurons: int | None, cache_bytes: int | None = None):
        self.n_neurons = n_neurons  # None: each key's width is its first chunk's (a hybrid's layers differ)
        self.budget = default_cache_bytes() if cache_bytes is None else int(cache_bytes)
        self.accs: dict = {}
        self.keyed = None  # whether chunks are {key: array} dicts
        self.kept, self.used = [], 0  # kept: [{key: bits}] per chunk, None once over the budget
        self.finished = False

    @property
    def kept_all(self) -> bool:
        return self.kept is not None

    def feed(self, chunk) -> None:
        keyed = isinstance(chunk, dict)
        if self.keyed is None:
            self.keyed = keyed
        elif keyed != self.keyed:
            raise ValueError("a stream's chunks must all be arrays or all be {key: array} dicts")
        c = chunk if keyed else {None: chunk}
        if self.finished:
            raise ValueError("the stream is finished: its second pass has run")
        row = {key: self.accs.setdefault(key, SparsityAccumulator(a.shape[1] if self.n_neurons is None else self.n_neurons)).update(a)
               for key, a in c.items()}
        if self.kept is not None:
            self.used += sum(b.nbytes for b in row.values())
            if self.used > self.budget:
                logger.info("sparsity: the first pass's |a| exceed %d bytes; the second pass recomputes them",
                            self.budget)
                self.kept = None
            else:
                self.kept.append(row)

    def finish(self, threshold: float, eps: float = DEAD_EPS, percentiles=PERCENTILES, targets=TARGET_FRACTIONS,
               again=None, n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
        """Pass 2 and the results ({key: dict} for keyed chunks, else one dict); `threshold`: one for every key,
        or {key: threshold} (a hybrid's layers). `again`: a function
        returning the chunks once more, needed only when not `kept_all`. Intervals: `n_resamples` draws
        over the chunks fed (the texts), seeded by `seed` (the same draws for every key)."""
        if self.finished:  # the kept patterns are gone: a second pass 2 would count nothing
            raise ValueError("the stream is finished: its second pass has run")
        if not self.accs:
            raise ValueError("no activations were seen: the chunks were empty")
        for acc in self.accs.values():
            acc.start_refine([p / 100.0 for p in percentiles] + list(targets))
        if self.kept is not None:
            for row in self.kept:
                for key, bits in row.items():
                    self.accs[key].refine_bits(bits)
        elif again is None:
            raise ValueError("the first pass's |a| were not all kept: the second pass needs the chunks again")
        else:
            for c in again():
                for key, a in (c if self.keyed else {None: c}).items():
                    self.accs[key].refine(a)
        self.kept, self.finished = [], True  # the patterns are read: free them
        out = {key: acc.result(threshold[key] if isinstance(threshold, dict) else threshold, eps, percentiles,
                               targets, n_resamples, seed)
               for key, acc in self.accs.items()}
        return out if self.keyed else out[None]


def stream_sparsity(chunks, n_neurons: int, threshold: float, eps: float = DEAD_EPS,
                    percentiles=PERCENTILES, targets=TARGET_FRACTIONS, cache_bytes: int | None = None,
                    n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """`comprehensive_sparsity` over the chunks from `chunks()`: a function returning a fresh iterable of
    (T, N) arrays, or of {key: (T, N) array} dicts (then the result is {key: dict}); each non-empty chunk
    is one text of the intervals (`n_resamples` draws, seeded by `seed`).

    The quantiles need a second pass over the same values. While the float32 bit patterns of every |a|
    seen (4 bytes a value) fit in `cache_bytes` (default: a quarter of the free host memory), pass 1 keeps
    them and pass 2 reads them back, so `chunks()` is called once (for a model: one forward per text).
    Past that, the kept patterns are dropped at once and `chunks()` is called a second time. The numbers
    are the same either way (`SparsityStream`)."""
    stream = SparsityStream(n_neurons, cache_bytes)
    for c in chunks():
        stream.feed(c)
    return stream.finish(threshold, eps, percentiles, targets, again=chunks, n_resamples=n_resamples, seed=seed)


# --------------------------------------------------------------------------------------------------
# Collecting activations from a model
# --------------------------------------------------------------------------------------------------
def site_map(adapter, layers, site: str | None = None) -> dict:
    """{layer: models.Site} of the neuron site (default `neuron_site`) at each of `layers`."""
    site = site or neuron_site(adapter)
    return {layer: adapter.site(site, layer) for layer in layers}


@contextlib.contextmanager
def tracing_sites(model, sites: dict, out: dict, stop: bool = False):
    """Hooks the sites (all of one name, so all read the module's input or all its output:
    `models.Site.capture`) for the block, around a forward of the model; on a normal exit `out` is filled
    with {layer: (L, N) float32 numpy} of the first example. Every site must have fired (utils.trace);
    `stop`: the forward ends after the last site."""
    from utils import trace

    kinds = {s.capture for s in sites.values()}
    if len(kinds) != 1:
        raise ValueError(f"sites of one name expected, got captures {sorted(kinds)}")
    kind = kinds.pop()
    paths = list(dict.fromkeys(s.path for s in sites.values()))
    with trace(model, paths, retain_input=kind == "input", retain_output=kind == "output", stop=stop) as tr:
        yield
    for layer, s in sites.items():
        out[layer] = (tr[s.path].input if kind == "input" else tr[s.path].output)[0].float().cpu().numpy()  # (L, N)


def capture_sites(model, sites: dict, ids, blocked: bool = False) -> dict:
    """{layer: (L, N) float32 numpy}: the sites of one text (1, L), from one forward of the model stopped
    after the last site (`blocked`: Mamba-1 mixers run `ssm.blocked_inference`, else the model's own)."""
    import torch

    from ssm import blocked_inference

    out = {}
    swap = blocked_inference(model) if blocked else contextlib.nullcontext()
    with torch.no_grad(), swap, tracing_sites(model, sites, out, stop=True):
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    return out


def site_difference(model, sites: dict, ids, acts: dict) -> float:
    """The largest difference between `acts` ({layer: (L, N)}, from another forward path of text `ids`) and
    the model's own forward's sites, relative to each layer's largest |a|."""
    from passes import site_difference as relative_difference

    return relative_difference(capture_sites(model, sites, ids), acts)


def check_sites(model, sites: dict, ids, acts: dict, what: str) -> None:
    """ReconstructionError unless `acts` equal the model's own forward's sites within float rounding
    (`site_difference` ≤ passes.SITE_TOLERANCE in float32/64, 1e-2 in half precision: another forward path's
    rounding, grown through the layers above, as the text pass allows its gradient forward's sites)."""
    from passes import site_tolerance
    from ssm import ReconstructionError

    worst, tolerance = site_difference(model, sites, ids, acts), site_tolerance(model)
    if worst > tolerance:
        raise ReconstructionError(f"{what} differs from the model's own forward by {worst:.3g} (relative) > "
                                  f"{tolerance:g} at the {next(iter(sites.values())).name} site")


def layer_activation_chunks(model, adapter, input_ids, layers, site: str | None = None, progress: bool = False,
                            desc: str = "activations"):
    """A function returning a fresh generator of {layer: (L_i, N) float32 numpy} per text: the neuron
    site of every requested layer captured in one forward per text (stopped after the last of them).

    Mamba models run `ssm.blocked_inference` (transformers' own mixer operations with the scan in chunks of
    positions, cache-blocked: the same numbers to float rounding, about twice as fast at batch 1 on a CPU). The first text is also
    captured through the model's own forward, and the two must agree (ReconstructionError otherwise).
    `input_ids` and `layers` are checked as in `layer_sparsity`, before any forward."""
    from tqdm.auto import tqdm

    from causal_analysis import check_layers, check_token_ids

    input_ids = check_token_ids(input_ids, "input_ids")
    sites = site_map(adapter, list(dict.fromkeys(check_layers(adapter, layers))), site)
    blocked = adapter.blocked_forward  # Mamba-1 mixers run the blocked forward, checked once
    verified = [not blocked]  # the others run their own forward

    def chunks():
        for ids in tqdm(input_ids, desc=desc, disable=not progress, leave=False):
            acts = capture_sites(model, sites, ids, blocked)
            if not verified[0]:
                check_sites(model, sites, ids, acts, "the blocked mixer forward")
                verified[0] = True
            yield acts

    return chunks


class SparsityProfile:
    """`layer_sparsity` fed by the text pass: the sparsity stage's reader (`request`: the neuron site at
    `layers`; `read(text)` feeds each text's sites to a `SparsityStream`; `finish()` gives `layer_sparsity`'s
    dict). When the first pass's |a| did not all fit in memory, both passes run again over forwards of its
    own (`layer_sparsity` over `input_ids`, the same texts), so that they read the same values."""

    def __init__(self, model, adapter, layers, input_ids, sparsity_threshold: float | None = None,
                 dead_eps: float = DEAD_EPS, n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0):
        from causal_analysis import check_layers

        self.model, self.adapter, self.input_ids = model, adapter, input_ids
        self.layers = list(dict.fromkeys(check_layers(adapter, layers)))
        self.threshold = (default_thresholds(adapter, self.layers) if sparsity_threshold is None
                          else _finite_number("sparsity_threshold", sparsity_threshold))
        self.given_threshold = sparsity_threshold  # None: each layer's default (`default_thresholds`)
        self.eps = _finite_number("dead_eps", dead_eps)
        self.n_resamples, self.seed = int(n_resamples), int(seed)
        self.sites = site_map(adapter, self.layers)
        widths = {s.size for s in self.sites.values()}
        self.stream = SparsityStream(widths.pop() if len(widths) == 1 else None)
        self.sites_from = None  # the text pass's forward the sites came from

    @property
    def request(self):
        from passes import TextRequest

        return TextRequest(sites=frozenset(self.layers))

    def read(self, text) -> None:
        self.stream.feed({la: text.sites[la] for la in self.layers})
        self.sites_from = text.sites_from

    def finish(self) -> dict:
        if not self.stream.kept_all:  # both passes must read the same values: measured again, from one source
            self.stream = None
            self.sites_from = ("its own forwards (the first pass's |a| did not fit in memory, so both passes ran "
                               "again, over forwards of its own)")
            return layer_sparsity(self.model, self.adapter, self.input_ids, self.layers, self.given_threshold, self.eps,
                                  n_resamples=self.n_resamples, seed=self.seed)
        return _layer_entries(self.adapter, self.sites, self.stream.finish(
            self.threshold, self.eps, n_resamples=self.n_resamples, seed=self.seed))


def _layer_entries(adapter, sites: dict, per_layer: dict) -> dict:
    return {la: {"layer": la, "relative_depth": la / max(1, adapter.n_layers - 1), "site": s.name,
                 **({"layer_kind": adapter.layer_kind(la), "site_description": adapter.neuron_path(la)[1]}
                    if adapter.hybrid and s.name == "neurons" else {}), **per_layer[la]}
            for la, s in sites.items()}


def layer_sparsity(model, adapter, input_ids, layers, sparsity_threshold: float | None = None,
                   dead_eps: float = DEAD_EPS, site: str | None = None, progress: bool = False,
                   n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """{layer: comprehensive sparsity dict} of the neuron site of each layer over the texts, streamed
    (every layer captured in the same forward; one forward per text while the first pass's |a| fit the
    memory budget of `stream_sparsity`, else two). `sparsity_threshold` (default: the family's) and
    `dead_eps`: as the options of those names; `n_resamples`, `seed`: the intervals' bootstrap over the
    texts (--bootstrap_resamples, --seed).

    Refused before any forward (ValueError): `input_ids` not a non-empty list of (1, L_i) token-id tensors,
    `layers` not a non-empty list of layer indices (a layer given twice is measured once), a threshold or
    eps that is not a finite number."""
    from causal_analysis import check_layers, check_token_ids

    input_ids = check_token_ids(input_ids, "input_ids")
    eps = _finite_number("dead_eps", dead_eps)
    layers = list(dict.fromkeys(check_layers(adapter, layers)))
    threshold = (default_thresholds(adapter, layers) if sparsity_threshold is None
                 else _finite_number("sparsity_threshold", sparsity_threshold))
    sites = site_map(adapter, layers, site)
    widths = {s.size for s in sites.values()}
    n = widths.pop() if len(widths) == 1 else None  # None: a hybrid's layers differ
    per_layer = stream_sparsity(layer_activation_chunks(model, adapter, input_ids, layers, site, progress), n,
                                threshold, eps, n_resamples=n_resamples, seed=seed)
    return _layer_entries(adapter, sites, per_layer)


# --------------------------------------------------------------------------------------------------
# Plots: each consumes [(label, one layer's sparsity dict)], one entry per model (or per layer)
# --------------------------------------------------------------------------------------------------
def _figure(ncols: int = 1, width: float = 6.0):
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, 4.2), squeeze=False)


def _save(fig, plots_dir, name: str) -> str:
    from utils import save_figure

    fig.tight_layout()
    return save_figure(fig, plots_dir, name)


def _label(label: str, s: dict) -> str:
    return f"{label} (layer {s['layer']})" if "layer" in s else label



def _plotted(values) -> list[float]:
    """Values for a line plot, None drawn as a gap (NaN exists only in the figure, never in the results)."""
    return [np.nan if v is None else float(v) for v in values]


def plot_percentile(entries, plots_dir, name: str) -> str:
    fig, axes = _figure(2)
    ax0, ax1 = axes[0]
    for i, (lab, s) in enumerate(entries):
        p = s["percentile"]
        ax0.plot(p["percentiles"], p["sparsity"], "o-", color=f"C{i}", label=_label(lab, s))
        ax1.plot(p["percentiles"], p["thresholds"], "o-", color=f"C{i}", label=_label(lab, s))
    ax0.set(xlabel="percentile p of all |a|", ylabel="fraction of neurons with mean |a| < τ_p",
            title="Percentile sparsity (scale-adaptive)")
    ax1.set(xlabel="percentile p", ylabel="τ_p", yscale="log", title="Thresholds τ_p")
    ax0.legend(fontsize=8)
    ax1.legend(fontsize=8)
    return _save(fig, plots_dir, name)


def _value(d) -> float | None:
    """The point value of an interval dict (None for an undefined measure)."""
    return None if d is None else d["value"]


def _population(s: dict) -> dict:
    """A layer's population measures (results of versions before they were measured lack them: KeyError)."""
    return s["population"]


POPULATION_PANELS = (("normalised_entropy", "normalised entropy H of a token's activation energy\n(lower = sparser; "
                                            "1 = spread evenly over the neurons)"),
                     ("gini", "Gini of a token's |a| across the neurons (higher = sparser)"),
                     ("hoyer", "Hoyer of a token's |a| across the neurons (higher = sparser)"))


def plot_population(entries, plots_dir, name: str) -> str:
    """Population sparsity: the histograms over tokens of each token's H, Gini and Hoyer across the neurons,
    with the means over tokens (and 1 − H, named as entropy sparsity) in the legends."""
    fig, axes = _figure(3, width=5.5)
    for ax, (m, xlabel) in zip(axes[0], POPULATION_PANELS):
        for i, (lab, s) in enumerate(entries):
            p = _population(s)
            counts = np.asarray(p["histograms"][m], dtype=float)
            mean = f"mean {m if m != 'normalised_entropy' else 'H'} {shown(_value(p[m]))}"
            if m == "normalised_entropy":
                mean += f"; entropy sparsity 1 − H {shown(_value(p['entropy_sparsity']))}"
            ax.stairs(counts / max(1.0, counts.sum()), np.asarray(p["histograms"]["edges"]), color=f"C{i}", lw=2,
                      label=f"{_label(lab, s)}: {mean}")
        ax.set(xlabel=xlabel, ylabel="fraction of tokens")
        ax.legend(fontsize=7)
    fig.suptitle("Population sparsity: how sparse each token's code is (per token, across the neurons)")
    return _save(fig, plots_dir, name)


def plot_usage(entries, plots_dir, name: str) -> str:
    """Usage inequality: Lorenz curves of the per-neuron mean |a|, with its Gini and Hoyer."""
    fig, axes = _figure()
    ax = axes[0][0]
    for i, (lab, s) in enumerate(entries):
        c = np.sort(np.asarray(s["neuron_mean_abs"], dtype=float))
        cum = np.concatenate([[0.0], np.cumsum(c) / c.sum()]) if c.sum() > 0 else np.zeros(len(c) + 1)
        ax.plot(np.linspace(0, 1, len(cum)), cum, color=f"C{i}",
                label=f"{_label(lab, s)}: usage Gini {shown(s['gini'])}, usage Hoyer {shown(s['hoyer'])}")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="every neuron used equally (Gini 0)")
    ax.set(xlabel="fraction of neurons (ascending mean |a|)", ylabel="fraction of total mean |a|",
           title="Usage inequality: Lorenz curve of the per-neuron mean |a| over the corpus")
    ax.legend(fontsize=8)
    return _save(fig, plots_dir, name)


def plot_optimal_threshold(entries, plots_dir, name: str) -> str:
    fig, axes = _figure(2)
    ax0, ax1 = axes[0]
    n = len(entries)
    for i, (lab, s) in enumerate(entries):
        o = s["optimal_threshold"]
        x = np.arange(len(o["targets"])) + (i - (n - 1) / 2) * 0.8 / n
        ax0.bar(x, o["thresholds"], width=0.8 / n, color=f"C{i}", label=_label(lab, s))
        ax1.bar(x, o["neuron_sparsity"], width=0.8 / n, color=f"C{i}", label=_label(lab, s))
    for ax in (ax0, ax1):
        ax.set_xticks(range(len(TARGET_FRACTIONS)), [f"{t:.0%} of |a| ≤ τ" for t in entries[0][1]["optimal_threshold"]["targets"]])
        ax.legend(fontsize=8)
    ax0.set(ylabel="τ", yscale="log", title="Optimal threshold τ for a target fraction of |a|")
    ax1.set(ylabel="fraction of neurons with mean |a| < τ", title="Neuron sparsity at τ")
    return _save(fig, plots_dir, name)


def _log_histograms(entries, values, legend, plots_dir, name: str, xlabel: str, title: str, lines=None) -> str:
    """One log10 histogram per entry of values(s) (zeros cannot be placed on it: counted in the legend),
    with optional vertical lines at lines(s)."""
    fig, axes = _figure()
    ax = axes[0][0]
    for i, (lab, s) in enumerate(entries):
        v = np.asarray(values(s), dtype=float)
        zeros = int((v <= 0).sum())
        v = v[v > 0]
        if len(v):
            ax.hist(np.log10(v), bins=40, color=f"C{i}", alpha=0.5, density=True,
                    label=f"{_label(lab, s)}: {legend(s)}" + (f" ({zeros} zeros not shown)" if zeros else ""))
        if lines is not None and lines(s) > 0:
            ax.axvline(np.log10(lines(s)), color=f"C{i}", ls="--")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=8)
    return _save(fig, plots_dir, name)


def plot_traditional(entries, plots_dir, name: str) -> str:
    return _log_histograms(
        entries, lambda s: s["neuron_mean_abs"],
        lambda s: f"{s['traditional']['sparsity']:.3f} below {s['traditional']['threshold']:g}"
                  + ("" if s["traditional"].get("informative", True) else " (uninformative at this threshold)"),
        plots_dir, name,
        "log10 mean |a| per neuron", "Traditional sparsity (absolute threshold, dashed): scale-dependent",
        lines=lambda s: s["traditional"]["threshold"])


def plot_activation_variance(entries, plots_dir, name: str) -> str:
    return _log_histograms(entries, lambda s: s["neuron_variance"],
                           lambda s: f"mean {s['activation_variance']['mean']:.3g}", plots_dir, name,
                           "log10 variance over tokens, per neuron", "Activation variance")


def _usage(s: dict, m: str) -> float | None:
    """A layer's usage Gini / Hoyer (`m`: "gini", "hoyer"); results of versions before the usage intervals hold
    the same point value under the legacy key (s["gini"], s["hoyer"])."""
    return _value(s["usage"][m]) if "usage" in s else s[m]


def _entropy(s: dict, m: str) -> float | None:
    """A layer's population H (`m` "normalised_entropy") or 1 − H ("entropy_sparsity"); results of versions
    before the population measures hold the same values as entropy.mean_entropy and entropy.sparsity."""
    if "population" in s:
        return _value(s["population"][m])
    return s["entropy"]["mean_entropy" if m == "normalised_entropy" else "sparsity"]


MULTILAYER_METRICS = (("traditional", lambda s: s["traditional"]["sparsity"]),
                      ("percentile p50",
                       lambda s: s["percentile"]["sparsity"][s["percentile"]["percentiles"].index(50)]),
                      ("population H (normalised entropy, lower = sparser)",
                       lambda s: _entropy(s, "normalised_entropy")),
                      ("population 1-H (entropy sparsity, higher = sparser)",
                       lambda s: _entropy(s, "entropy_sparsity")),
                      ("population Gini", lambda s: _value(_population(s)["gini"])),
                      ("population Hoyer", lambda s: _value(_population(s)["hoyer"])),
                      ("usage Gini", lambda s: _usage(s, "gini")),
                      ("usage Hoyer", lambda s: _usage(s, "hoyer")),
                      ("dead fraction", lambda s: s["dead_neurons"]["fraction"]))
MULTILAYER_INTERVALS = {"traditional": lambda s: s["traditional"]["sparsity_interval"],
                        "population H (normalised entropy, lower = sparser)":
                            lambda s: _population(s)["normalised_entropy"],
                        "population 1-H (entropy sparsity, higher = sparser)":
                            lambda s: _population(s)["entropy_sparsity"],
                        "population Gini": lambda s: _population(s)["gini"],
                        "population Hoyer": lambda s: _population(s)["hoyer"],
                        "usage Gini": lambda s: s["usage"]["gini"], "usage Hoyer": lambda s: s["usage"]["hoyer"]}


def multilayer_table(per_layer: dict) -> dict:
    """{metric: [value per layer]} plus layers and relative depths: the numbers `plot_multilayer` shows (None
    where the measure is undefined at that layer: its layer dict's "undefined" says why), and "intervals":
    {metric: [{"value", "low", "high"} per layer]} for the metrics that are means over the texts."""
    layers = sorted(per_layer)
    out = {"layers": layers, "relative_depth": [per_layer[la]["relative_depth"] for la in layers]}
    out.update({m: [None if (v := f(per_layer[la])) is None else float(v) for la in layers]
                for m, f in MULTILAYER_METRICS})
    out["activation_variance_mean"] = [per_layer[la]["activation_variance"]["mean"] for la in layers]
    out["intervals"] = {m: [f(per_layer[la]) for la in layers] for m, f in MULTILAYER_INTERVALS.items()}
    return out


MULTILAYER_YLABELS = {"traditional": "fraction of neurons with mean |a| < threshold",
                      "percentile p50": "fraction of neurons with mean |a| < τ_50",
                      "dead fraction": "fraction of neurons dead",
                      "activation_variance_mean":
                          "mean variance over tokens per neuron\n((activation units)², log scale)"}


def plot_multilayer(models: list[tuple[str, dict]], plots_dir, name: str, relative: bool = False) -> str:
    """Every method against layer, one line per model, with the 95% interval over the texts as a band where
    there is one: `models` = [(label, {layer: dict})]. With `relative`, or with more than one model (their
    depths may differ), against relative depth (layer / (layers − 1)). Each panel of a measure in [0, 1]
    (fractions, H, 1 − H, Gini, Hoyer) shows all of [0, 1], so that a small difference does not look like
    a cliff; the activation variance (no natural range) is on a log scale."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    relative = relative or len(models) > 1
    metrics = [m for m, _ in MULTILAYER_METRICS] + ["activation_variance_mean"]
    fig, axes = plt.subplots(3, 4, figsize=(17, 10.5))
    for i, (lab, per_layer) in enumerate(models):
        t = multilayer_table(per_layer)
        x = t["relative_depth"] if relative else t["layers"]
        drawn = t["layers"]
        which = (", ".join(map(str, drawn)) if len(drawn) <= 6 else
                 f"{len(drawn)} layers, {drawn[0]}–{drawn[-1]}")
        for ax, m in zip(axes.ravel(), metrics):
            ax.plot(x, _plotted(t[m]), "o-", color=f"C{i}", label=f"{lab} (layer{'s' * (len(drawn) != 1)} {which})")
            ivs = t["intervals"].get(m)
            if ivs and any(d is not None and d.get("low") is not None for d in ivs):
                ax.fill_between(x, _plotted([None if d is None else d.get("low") for d in ivs]),
                                _plotted([None if d is None else d.get("high") for d in ivs]), color=f"C{i}",
                                alpha=0.2, lw=0)
    for ax, m in zip(axes.ravel(), metrics):
        ax.set_title(m.replace("_", " "), fontsize=9)
        ax.set_xlabel("relative depth (layer / (layers − 1))" if relative else "layer")
        if relative:
            ax.set_xlim(-0.05, 1.05)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if m == "activation_variance_mean":
            ax.set_yscale("log")
        else:  # every other measure lies in [0, 1]: the whole range, always
            ax.set_ylim(-0.03, 1.03)
            ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel(MULTILAYER_YLABELS.get(m, "0 … 1 (no unit)"), fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Sparsity across layers (population: per token across neurons; usage: per neuron over the corpus; "
                 "bands: 95% interval over texts)" + ("; models of different depth over relative depth"
                                                      if len(models) > 1 else ""))
    fig.tight_layout()
    from utils import save_figure

    return save_figure(fig, plots_dir, name)


def sparsity_plots(entries, models_by_layer, plots_dir, prefix: str, tag: str = "", relative: bool = False,
                   multilayer: bool = True) -> list[str]:
    """The full sparsity plot set: percentile, population sparsity, usage inequality, optimal threshold,
    traditional and activation variance for `entries` (one layer per model; file names end in `tag`), and
    (with `multilayer`) the multi-layer plot for `models_by_layer` = [(label, {layer: dict})]."""
    paths = [plot_percentile(entries, plots_dir, f"{prefix}_sparsity_percentile{tag}"),
             plot_population(entries, plots_dir, f"{prefix}_sparsity_population{tag}"),
             plot_usage(entries, plots_dir, f"{prefix}_sparsity_usage{tag}"),
             plot_optimal_threshold(entries, plots_dir, f"{prefix}_sparsity_optimal_threshold{tag}"),
             plot_traditional(entries, plots_dir, f"{prefix}_sparsity_traditional{tag}"),
             plot_activation_variance(entries, plots_dir, f"{prefix}_activation_variance{tag}")]
    if multilayer:
        paths.append(plot_multilayer(models_by_layer, plots_dir, f"{prefix}_sparsity_multilayer", relative))
    return paths


# --------------------------------------------------------------------------------------------------
# The sparsity stage (a text stage: it reads the neuron sites of the text pass)
# --------------------------------------------------------------------------------------------------
def chosen_layers(ctx) -> list[int]:
    """--sparsity_layers (default 0 1 2, those the model has)."""
    chosen = ctx.opts.sparsity_layers
    if chosen is None:
        return [la for la in (0, 1, 2) if la < ctx.adapter.n_layers]
    return [ctx.adapter.check_layer(la) for la in chosen]


class SparsityRead(SparsityProfile):
    """A `SparsityProfile` whose `finish()` also says where the sites came from: {"stats": {layer: dict},
    "measured_in": the text pass's description of that forward}."""

    def finish(self) -> dict:
        return {"stats": super().finish(), "measured_in": self.sites_from}


def _stage_reader(ctx):
    from models import NotApplicable

    layers, skipped = site_layers(ctx.adapter, sorted({*ctx.layers, *chosen_layers(ctx)}))
    if not layers:
        raise NotApplicable(next(iter(skipped.values())))
    return SparsityRead(ctx.model, ctx.adapter, layers, ctx.tokens.input_ids, ctx.opts.sparsity_threshold,
                        ctx.opts.dead_eps, n_resamples=ctx.opts.bootstrap_resamples, seed=ctx.opts.seed)


def _stage_run(ctx, read: dict):
    """Every sparsity method for the neuron site at --layer, and across --sparsity_layers, from the text
    pass's sites (`passes`: where they came from is recorded as "measured_in")."""
    from functools import partial

    multi, skipped = site_layers(ctx.adapter, chosen_layers(ctx))
    per_layer = read["stats"]
    if ctx.layer not in per_layer:
        ctx.adapter.site(neuron_site(ctx.adapter), ctx.layer)  # raises NotApplicable: the layer has no neuron site
    single = per_layer[ctx.layer]
    chosen = {la: per_layer[la] for la in multi}
    results = {"site": single["site"], "layer": ctx.layer, "sparsity_layers": multi, "single": single,
               **({"sparsity_layers_without_site": skipped} if skipped else {}), "layers": chosen, "multilayer": multilayer_table(chosen), "note": SCALE_NOTE,
               "interval_method": interval_method(ctx.opts.bootstrap_resamples, ctx.opts.seed),
               "definitions": DEFINITIONS, "measured_in": read["measured_in"]}
    # the multi-layer plot is the same at every layer of a --layers run: written once, at its first layer
    return results, [partial(sparsity_plots, [(ctx.prefix, single)], [(ctx.prefix, chosen)], ctx.plots_dir,
                             ctx.prefix, tag=f"_layer{ctx.layer}", multilayer=ctx.layers[0] == ctx.layer)]


def _iv(d, spec: str = ".3f") -> str:
    """An interval dict as 'value [low, high]' (without one: why, its note), 'undefined' for None."""
    return "undefined" if d is None else stats.shown(d, spec)


def sparsity_lines(s: dict) -> list[str]:
    """One layer's sparsity measures, each family on its line (results of versions before the population
    measures were measured lack them: shown as such)."""
    p50 = s["percentile"]["sparsity"][s["percentile"]["percentiles"].index(50)]
    t, d = s["traditional"], s["dead_neurons"]
    if t.get("uninformative"):
        trad = f"traditional {t['sparsity']:.3f}: {t['uninformative']}"
    else:
        trad = f"traditional {_iv(t.get('sparsity_interval') or {'value': t['sparsity']})} (< {t['threshold']:g})"
    dead = f"dead {d['count']} (max |a| < {d['eps']:g} on every token"
    dead += (f"; the least active neuron peaks at {d['least_active_max_abs']:.3g})" if "least_active_max_abs" in d
             else ")")
    lines = []
    if "population" in s:
        p = s["population"]
        lines.append(f"population sparsity (per token, across neurons; mean over tokens): Gini {_iv(p['gini'])}, "
                     f"Hoyer {_iv(p['hoyer'])}, normalised entropy H {_iv(p['normalised_entropy'])} (lower = "
                     f"sparser), entropy sparsity 1 − H {_iv(p['entropy_sparsity'])} (higher = sparser)")
        lines.append(f"usage inequality (per neuron, its mean |a| over the corpus): Gini {_iv(s['usage']['gini'])}, "
                     f"Hoyer {_iv(s['usage']['hoyer'])}")
    else:
        lines.append(f"usage inequality (per neuron, its mean |a| over the corpus): Gini {shown(s['gini'])}, "
                     f"Hoyer {shown(s['hoyer'])}; entropy sparsity 1 − H {shown(s['entropy']['sparsity'])} "
                     f"(population measures: not in these results)")
    lines.append(f"{trad}; percentile-50 {p50:.3f}; {dead}")
    return lines


def sparsity_line(s: dict) -> str:
    """One layer's sparsity measures on one line."""
    return "; ".join(sparsity_lines(s))


def sparsity_summary(r: dict) -> str:
    s = r["single"]
    where = f"; measured in {r['measured_in']}" if "measured_in" in r else ""  # (results of older versions lack it)
    texts = f", {s['n_texts']} texts (intervals: 95% over texts)" if "n_texts" in s else ""
    lines = [f"    site {r['site']} ({s['n_neurons']} neurons), {s['n_tokens']} tokens{texts}{where}"]
    order = [r["layer"], *[la for la in r["layers"] if la != r["layer"]]]
    per_layer = {**r["layers"], r["layer"]: s}
    for la in order:
        first, *rest = sparsity_lines(per_layer[la])
        what = per_layer[la].get("site_description")  # a hybrid's: what this layer's neurons are
        lines.append(f"    layer {la}" + (f" ({per_layer[la]['n_neurons']} neurons: {what})" if what else "") + f": {first}")
        lines += [f"      {line}" for line in rest]
    lines += [f"    --sparsity_layers {la}: not measured ({why})" for la, why in
              (r.get("sparsity_layers_without_site") or {}).items()]
    informative = [st["traditional"].get("informative", True) for st in per_layer.values()]
    if not any(informative):
        lines.append(f"    traditional sparsity is uninformative at threshold {s['traditional']['threshold']:g} at "
                     f"every layer shown (0 or 1 by where the threshold sits): read the scale-free measures")
    lines.append(f"    note: {r['note']}")
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("sparsity", _stage_run, sparsity_summary, reader=_stage_reader, per_layer=True))


_register()
