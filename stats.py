"""Intervals and rank stability: the percentile bootstrap over texts or prompts.

Every mean over texts (or prompts) the tool reports carries a 95% interval: the items are drawn with
replacement `n_resamples` times (seeded: the same seed gives the same draws), the statistic is computed
on each draw, and the interval is the 2.5th and 97.5th percentile of those values (percentile
bootstrap). A draw is a row of `Resamples.counts` (how often each item was drawn), so a resampled mean
of per-item values is one matrix product, and statistics made of means (a variance, a ratio, a Gini of
per-neuron means) are computed from resampled means.

Rank stability of a top-k list: for each listed unit, its expected share of the top-k places over the draws
(`STABILITY_DEFINITION`: 1 where its score is above the draw's k-th largest on every draw; units tied with
the k-th largest split the places left). Ties (scores equal within `TIE_RTOL`, float32's
resolution) share a rank and are listed as ties.

Shapes: n items (texts or prompts), R resamples, U units.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95
STABILITY_DEFINITION = ("the unit's expected share of the top-k places over the bootstrap draws: 1 where it stays "
                        "in the top k on every draw; units tied with a draw's k-th largest split the places left, so "
                        "a tie group wider than the cut shares k places")
TIE_RTOL = 1e-6  # scores this close (relative) are ties: float32 cannot order them
METHOD = ("percentile bootstrap over {items}: {n_resamples} resamples with replacement (seed {seed}); "
          "the 95% interval is the 2.5th and 97.5th percentile of the resampled statistic")


@dataclass(frozen=True)
class Resamples:
    """`counts` (R, n): how often each of the n items is drawn in each of R resamples (rows sum to n)."""

    counts: np.ndarray
    seed: int
    items: str = "texts"

    @classmethod
    def draw(cls, n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, items: str = "texts") -> Resamples:
        if n < 1 or n_resamples < 1:
            raise ValueError(f"a bootstrap needs at least one item and one resample; got n={n}, "
                             f"n_resamples={n_resamples}")
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, n, size=(n_resamples, n))  # (R, n) item indices
        counts = np.zeros((n_resamples, n), dtype=np.float64)
        np.add.at(counts, (np.arange(n_resamples)[:, None], picks), 1.0)
        return cls(counts, seed, items)

    @property
    def n(self) -> int:
        return self.counts.shape[1]

    @property
    def n_resamples(self) -> int:
        return self.counts.shape[0]

    @property
    def defined(self) -> bool:
        """An interval over one item is not an interval (every draw is that item)."""
        return self.n >= 2

    def means(self, values, weights=None) -> np.ndarray:
        """The resampled (weighted) means (R, ...) of per-item `values` (n, ...): Σ c_i w_i x_i / Σ c_i w_i
        with c the draw's counts (weights: (n,), e.g. tokens per text; default 1)."""
        x = np.asarray(values, dtype=np.float64)
        if x.shape[0] != self.n:
            raise ValueError(f"values have {x.shape[0]} items; the resamples were drawn over {self.n}")
        w = np.ones(self.n) if weights is None else np.asarray(weights, dtype=np.float64)
        cw = self.counts * w  # (R, n)
        flat = x.reshape(self.n, -1)  # (n, m)
        return ((cw @ flat) / cw.sum(1, keepdims=True)).reshape(self.n_resamples, *x.shape[1:])

    def method(self) -> str:
        return METHOD.format(items=self.items, n_resamples=self.n_resamples, seed=self.seed)


def weighted_mean(values, weights=None) -> np.ndarray:
    """The point estimate matching `Resamples.means`: Σ w_i x_i / Σ w_i over axis 0."""
    x = np.asarray(values, dtype=np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.tensordot(w, x, axes=1) / w.sum()


def percentile_interval(resampled, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) over axis 0 of resampled statistics (R, ...)."""
    r = np.asarray(resampled, dtype=np.float64)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(r, [tail, 100 - tail], axis=0)
    return low, high


def interval(point: float, resampled, res: Resamples) -> dict:
    """{"value", "low", "high"} of one statistic (`resampled`: (R,)); low/high None with one item."""
    if not res.defined:
        return {"value": float(point), "low": None, "high": None}
    low, high = percentile_interval(resampled)
    return {"value": float(point), "low": float(low), "high": float(high)}


def mean_interval(values, res: Resamples, weights=None) -> dict:
    """The (weighted) mean over items of `values` (n,) with its interval: {"value", "low", "high"}."""
    return interval(float(weighted_mean(values, weights)), res.means(values, weights), res)


def intervals(point, resampled, res: Resamples) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(low (U,), high (U,)) of per-unit statistics, or (None, None) with one item."""
    if not res.defined:
        return None, None
    return percentile_interval(resampled)


def ranks(scores) -> np.ndarray:
    """Competition ranks (1 = highest; ties within TIE_RTOL share the better rank): rank = 1 + the number of
    units with a clearly higher score."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.sort(s)[::-1]
    tol = TIE_RTOL * np.maximum(np.abs(s), np.finfo(np.float64).tiny)
    return 1 + np.searchsorted(-order, -(s + tol), side="left")


def top_k_stability(resampled, k: int) -> np.ndarray:
    """(U,) each unit's expected share of the top k over the draws: 1 in a draw where its score is clearly
    above the draw's k-th largest, and where it ties with the k-th largest (within TIE_RTOL) its share of the
    slots left, (k − units clearly above) / (units tied there), so that units tied across the cut share
    the k places instead of all counting as in (the shares of a draw sum to k)."""
    r = np.asarray(resampled, dtype=np.float64)  # (R, U)
    k = min(k, r.shape[1])
    kth = np.partition(r, r.shape[1] - k, axis=1)[:, r.shape[1] - k][:, None]  # (R, 1)
    tol = TIE_RTOL * np.maximum(np.abs(kth), np.finfo(np.float64).tiny)
    above, at = r > kth + tol, np.abs(r - kth) <= tol  # (R, U) each
    slots = (k - above.sum(1, keepdims=True)) / np.maximum(at.sum(1, keepdims=True), 1)  # (R, 1)
    return (above + at * slots).mean(0)


def ranked(scores, k: int, resampled=None, res: Resamples | None = None, ids=None, key: str = "unit") -> list[dict]:
    """The top `k` units by `scores` (U,), highest first (ties keep index order), each as {key: id, "score",
    "rank" (shared by ties), "tied": bool, "n_tied" (how many of all U units share its rank)} and, with `resampled` (R, U) and `res`, "low", "high" (its 95%
    interval) and "stability" (STABILITY_DEFINITION). Ranks and ties are over all U."""
    s = np.asarray(scores, dtype=np.float64)
    ids = np.arange(len(s)) if ids is None else np.asarray(ids)
    order = np.argsort(-s, kind="stable")[:k]
    rk = ranks(s)
    counts = np.bincount(rk, minlength=len(s) + 2)
    low = high = stab = None
    if resampled is not None and res is not None and res.defined:
        low, high = percentile_interval(resampled)
        stab = top_k_stability(resampled, k)
    out = []
    for i in order:
        entry = {key: int(ids[i]), "score": float(s[i]), "rank": int(rk[i]), "tied": bool(counts[rk[i]] > 1),
                 "n_tied": int(counts[rk[i]])}  # units sharing this rank, over all U
        if stab is not None:
            entry.update(low=float(low[i]), high=float(high[i]), stability=float(stab[i]))
        out.append(entry)
    return out


def ties_note(entries: list[dict], key: str = "unit") -> str | None:
    """A line naming the tied units of a ranked list, or None when no listed unit is tied."""
    groups: dict[int, list] = {}
    total: dict[int, int] = {}
    for e in entries:
        if e.get("tied"):
            groups.setdefault(e["rank"], []).append(e[key])
            total[e["rank"]] = e.get("n_tied", 0)
    if not groups:
        return None
    return "; ".join(f"rank {r}: {', '.join(map(str, u))} tied"
                     + (f" ({total[r]} units share this rank, {len(u)} listed)" if total[r] > len(u) else "")
                     for r, u in groups.items())


def shown(d: dict | None, spec: str = ".3g", corrected: bool = True) -> str:
    """An interval dict as text: 'value [low, high]', with ' (corrected c)' where the dict has a corrected
    estimate (and `corrected`); 'value (no interval: why)' with the dict's "note" (default: one item); 'undefined
    (why)' where its value is None."""
    if d is None:
        return "n/a"
    if d["value"] is None:
        return f"undefined ({d.get('note', 'not computed')})"
    if d.get("low") is None:
        return f"{d['value']:{spec}} (no interval: {d.get('note', 'one item')})"
    more = f" (corrected {d['corrected']:{spec}})" if corrected and d.get("corrected") is not None else ""
    return f"{d['value']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}]{more}"


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def average_ranks(x) -> np.ndarray:
    """Ranks 0..U−1 in ascending order of `x` (U,), tied values sharing their average rank (Spearman's)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]


def _beta_fraction(x: np.ndarray, a: float, b: float, max_terms: int = 100_000, tol: float = 1e-14) -> np.ndarray:
    """The continued fraction of the regularised incomplete beta function (modified Lentz), for x below
    (a + 1) / (a + b + 2), where it converges fast: I_x(a, b) = x^a (1 − x)^b / (a B(a, b)) · fraction."""
    tiny = 1e-300
    c = np.ones_like(x)
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    f = d.copy()
    for m in range(1, max_terms + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even step, then the odd one
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            step = c * d
            f *= step
        if np.all(np.abs(step - 1.0) < tol):
            return f
    raise ArithmeticError(f"the incomplete beta fraction did not converge in {max_terms} terms (a={a}, b={b})")


def beta_regularized(x, a: float, b: float) -> np.ndarray:
    """I_x(a, b), the regularised incomplete beta function, for x in [0, 1] (an array) and a, b > 0: from
    its continued fraction on the side of x where it converges, the other side by I_x(a, b) = 1 − I_{1−x}(b, a)."""
    import math

    x = np.asarray(x, dtype=np.float64)
    out = np.where(x <= 0, 0.0, 1.0)
    inner = (x > 0) & (x < 1)
    if not inner.any():
        return out
    xi = x[inner]
    log_front = lambda y, p, q: (p * np.log(y) + q * np.log1p(-y) - (math.lgamma(p) + math.lgamma(q)
                                                                      - math.lgamma(p + q)) - math.log(p))
    low = xi < (a + 1.0) / (a + b + 2.0)
    val = np.empty_like(xi)
    if low.any():
        y = xi[low]
        val[low] = np.exp(log_front(y, a, b)) * _beta_fraction(y, a, b)
    if (~low).any():
        y = 1.0 - xi[~low]
        val[~low] = 1.0 - np.exp(log_front(y, b, a)) * _beta_fraction(y, b, a)
    out[inner] = np.clip(val, 0.0, 1.0)
    return out


def f_survival(f, df_between: float, df_within: float) -> np.ndarray:
    """P(F ≥ f) for F with (df_between, df_within) degrees of freedom: the one-way analysis of variance's
    p-value, I_{d2 / (d2 + d1 f)}(d2 / 2, d1 / 2). For an upper tail far below 1 the fraction is evaluated
    on that side, so p-values down to about 1e-300 keep their relative precision."""
    f = np.asarray(f, dtype=np.float64)
    d1, d2 = float(df_between), float(df_within)
    x = d2 / (d2 + d1 * np.maximum(f, 0.0))
    return beta_regularized(x, d2 / 2.0, d1 / 2.0)
