"""Activation sparsity of one layer's neurons, in memory and streamed.

"Neurons" are the inner site of a layer: Mamba `ssm` (u = y·SiLU(z), width e), Transformer `mlp` (the
MLP's hidden units after the activation). `a` below is an activations array (tokens, neurons) over the
text set; `c` the per-neuron mean |a|.

- traditional: fraction of neurons with c < threshold (Mamba 0.01, Transformer 1e-5 by default);
  scale-dependent, so not comparable across architectures.
- percentile: for p in PERCENTILES, τ_p = the p-th percentile of all |a| of the layer, and the fraction
  of neurons with c < τ_p.
- entropy: per token q_k = a_k² / Σ a², H = −Σ q log q / log N; sparsity = 1 − mean H over tokens
  (tokens whose activations are all 0 have no distribution: counted apart, left out of the mean).
- gini (Hurley & Rickard 2009) and hoyer of c.

Entropy, Gini and Hoyer are scale-free, and computed scale-free: each vector (a token's activations, or c)
is divided by its largest |value| before any square or sum, so a scaled copy gives the same value (exactly
for a power-of-two scale, to rounding for any other): no square or sum overflows at any finite scale (|a|
near 1e200 in float64; every float32 value), and a uniformly tiny vector (1e-200) does not underflow to 0. A measure undefined for its input is
None, never NaN, with the reason in the result's "undefined" dict ({measure: "undefined: ..."}; see
`UNDEFINED`): entropy when every token's activations are all 0 or there is one neuron, Gini and Hoyer when
every c is 0, Hoyer also for one neuron.
- optimal threshold: the τ below or at which a target fraction of all |a| falls.
- dead neurons: max over every token of |a| < eps.

Quantiles (τ_p, optimal thresholds) are order statistics of |a| rounded to float32, "inverted CDF":
the smallest value v with at least a fraction q of all |a| ≤ v (numpy's method="inverted_cdf").
Streamed, they are found exactly by a two-pass radix select on the float32 bit patterns (which order
like the values for |a| ≥ 0): pass 1 counts the top 16 bits, pass 2 the low 16 bits inside the bins that
hold the wanted ranks. Every other statistic is a running sum in float64. Pass 2 reads the bit patterns
that pass 1 kept when they fit in a memory budget (a quarter of the free host memory by default), else it
runs over the source again (for a model: a second forward per text); the result is the same.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from utils import shown  # light

logger = logging.getLogger(__name__)

PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
TARGET_FRACTIONS = (0.5, 0.9)
TRADITIONAL_THRESHOLDS = {"mamba": 0.01, "transformer": 1e-5}
DEAD_EPS = 1e-6
ENTROPY_BINS = np.linspace(0.0, 1.0, 21)  # edges of the per-token entropy histogram
UNDEFINED = {
    "all_zero": "undefined: every neuron's mean |a| is 0 (no distribution over the neurons to measure)",
    "one_neuron_hoyer": "undefined: one neuron (Hoyer divides by sqrt(N) - 1 = 0)",
    "no_energy": "undefined: every token's activations are all 0 (no token has an energy distribution)",
    "one_neuron_entropy": "undefined: one neuron (the entropy is normalised by log N = 0)",
}
SCALE_NOTE = ("traditional sparsity uses an absolute threshold, so it depends on the activation scale "
              "and is not comparable across architectures; percentile, entropy, Gini and Hoyer are "
              "scale-free")


def default_threshold(family: str) -> float:
    from models import SSM_FAMILIES

    return TRADITIONAL_THRESHOLDS["mamba" if family in SSM_FAMILIES else "transformer"]


def neuron_site(adapter) -> str:
    """The inner neuron site of a family: Mamba `ssm` (e), Transformers `mlp`."""
    return "ssm" if adapter.is_ssm else "mlp"


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


def token_entropy(a) -> np.ndarray:
    """Normalised entropy H per token (tokens,), float64, scale-free (each token's activations divided by
    their largest |a| before squaring). A per-token marker array, not a result: NaN where H is undefined,
    for a token whose activations are all 0 and for every token when there is one neuron (log N = 0);
    `entropy` and the sparsity dicts leave those out and say so."""
    return _token_entropy(_as_2d(a))


def _token_entropy(a: np.ndarray) -> np.ndarray:
    """`token_entropy` of an array already checked by `_as_2d` (not checked again on the streamed path).
    In float64 through torch (xlogy, 0 log 0 = 0, on every core: the log per value is the streamed
    path's heaviest step)."""
    import torch

    n = a.shape[1]
    t = torch.from_numpy(a)  # (T, N) float64
    peak = t.abs().amax(1, keepdim=True)  # (T, 1): each token's largest |a|
    zero = peak[:, 0] == 0  # (T,): tokens with no energy
    sq = t.div(torch.where(zero[:, None], 1.0, peak)).square_()  # (T, N), each row's largest is 1: no overflow
    q = sq.div_(sq.sum(1, keepdim=True).clamp_(min=1.0))  # (T, N); a non-zero row sums to >= 1 before this
    h = torch.xlogy(q, q).sum(1).neg_().div_(math.log(n)) if n > 1 else torch.full((len(a),), float("nan"),
                                                                                       dtype=torch.float64)
    h[zero] = float("nan")
    return h.numpy()


def entropy(a) -> float | None:
    """Entropy sparsity 1 − mean H over the tokens with energy; None when undefined (every token all 0,
    or one neuron: the reasons in `UNDEFINED`)."""
    h = token_entropy(a)
    return float(1.0 - np.nanmean(h)) if np.isfinite(h).any() else None


def _vector(c) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    c = neuron_means(c) if c.ndim == 2 else np.abs(c)
    if c.ndim != 1 or len(c) == 0:
        raise ValueError(f"need a vector of per-neuron values or a (tokens, neurons) array; got shape {c.shape}")
    _check_finite(c, "per-neuron values")
    return c


def _unit_max(c: np.ndarray) -> np.ndarray | None:
    """c / max(c) (the largest value becomes 1: nothing below can overflow or underflow), None for all 0."""
    peak = c.max()
    return None if peak == 0 else c / peak


def gini(c) -> float | None:
    """Gini index of the per-neuron mean |a| (or of the |values| of a given vector): 0 for a uniform vector,
    1 − 1/N for a one-hot; computed on c / max(c) (scale-free). None for an all-zero vector (undefined:
    UNDEFINED["all_zero"])."""
    c = _unit_max(np.sort(_vector(c)))
    if c is None:
        return None
    n, l1 = len(c), c.sum()  # l1 in [1, N]
    k = np.arange(1, n + 1)
    return float(1.0 - 2.0 * np.sum((c / l1) * (n - k + 0.5) / n))


def hoyer(c) -> float | None:
    """Hoyer sparsity (√N − ‖c‖₁/‖c‖₂)/(√N − 1): 0 uniform, 1 one-hot; computed on c / max(c) (scale-free,
    so ‖c‖₂ never overflows). None when undefined: one neuron (UNDEFINED["one_neuron_hoyer"]) or all zeros
    (UNDEFINED["all_zero"])."""
    c = _vector(c)
    c = None if len(c) == 1 else _unit_max(c)
    if c is None:
        return None
    n, l2 = len(c), math.sqrt(float(np.sum(c * c)))  # l2 in [1, √N]
    return float((math.sqrt(n) - c.sum() / l2) / (math.sqrt(n) - 1.0))


def undefined_measures(means, n_energy_tokens: int) -> dict:
    """{measure: reason} for the measures of a layer that are undefined (None in its sparsity dict): entropy
    (no token with energy among `n_energy_tokens`, or one neuron), gini and hoyer (every mean |a| 0; Hoyer
    also for one neuron). Empty when every measure is defined."""
    n, zero = len(means), not np.any(np.asarray(means) > 0)
    out = {}
    if n == 1:
        out["entropy"] = UNDEFINED["one_neuron_entropy"]
    elif n_energy_tokens == 0:
        out["entropy"] = UNDEFINED["no_energy"]
    if zero:
        out["gini"] = UNDEFINED["all_zero"]
    if n == 1 or zero:
        out["hoyer"] = UNDEFINED["one_neuron_hoyer" if n == 1 else "all_zero"]
    return out


def optimal_threshold(a, target: float = 0.5) -> float:
    """The smallest τ among the |a| with at least `target` of all |a| ≤ τ."""
    if not 0.0 < _finite_number("target fraction", target) <= 1.0:
        raise ValueError(f"target fraction {target} must lie in (0, 1]")
    return float(abs_quantiles(a, [target])[0])


def dead_neurons(a, eps: float = DEAD_EPS) -> np.ndarray:
    """Indices of the neurons with |a| < eps on every token."""
    return np.flatnonzero(np.abs(_as_2d(a)).max(axis=0) < _finite_number("eps", eps))


def comprehensive_sparsity(a, threshold: float, eps: float = DEAD_EPS, percentiles=PERCENTILES,
                           targets=TARGET_FRACTIONS) -> dict:
    """Every statistic of the module doc for one layer's activations held in memory (the reference the
    streamed statistics are tested against)."""
    a = _as_2d(a)
    x = _abs32(a)
    fractions = [p / 100.0 for p in percentiles] + list(targets)
    tau = abs_quantiles(a, fractions)
    h = token_entropy(a)
    return _summarise(
        n_tokens=a.shape[0], means=neuron_means(a), variances=a.var(axis=0), max_abs=np.abs(a).max(axis=0),
        entropy_sum=float(np.nansum(h)), entropy_count=int(np.isfinite(h).sum()),
        zero_tokens=int((np.abs(a).max(axis=1) == 0).sum()),
        entropy_hist=np.histogram(h[np.isfinite(h)], ENTROPY_BINS)[0],
        percentiles=percentiles, tau_p=tau[:len(percentiles)], targets=targets, tau_t=tau[len(percentiles):],
        at_or_below_t=np.array([(x <= t).sum() for t in tau[len(percentiles):]]),
        threshold=threshold, eps=eps)


def _percentile_table(percentiles, tau, means) -> dict:
    return {"percentiles": list(percentiles), "thresholds": [float(t) for t in tau],
            "sparsity": [float((means < t).mean()) for t in tau]}


def _summarise(n_tokens, means, variances, max_abs, entropy_sum, entropy_count, zero_tokens, entropy_hist,
               percentiles, tau_p, targets, tau_t, at_or_below_t, threshold, eps) -> dict:
    """The result dict shared by the in-memory and the streamed computation. "gini", "hoyer",
    "entropy"["sparsity"] and "entropy"["mean_entropy"] are None where undefined, and "undefined" maps each
    such measure to its reason (`undefined_measures`; an empty dict when all are defined)."""
    threshold, eps = _finite_number("threshold", threshold), _finite_number("eps", eps)
    n = len(means)
    dead = np.flatnonzero(max_abs < eps)
    mean_h = entropy_sum / entropy_count if entropy_count else None
    return {
        "n_tokens": int(n_tokens), "n_neurons": int(n),
        "traditional": {"threshold": float(threshold), "sparsity": float((means < threshold).mean()),
                        "note": SCALE_NOTE},
        "percentile": _percentile_table(percentiles, tau_p, means),
        "entropy": {"sparsity": None if mean_h is None else 1.0 - mean_h, "mean_entropy": mean_h,
                    "n_zero_tokens": int(zero_tokens),
                    "histogram_edges": ENTROPY_BINS, "histogram_counts": np.asarray(entropy_hist, dtype=np.int64)},
        "gini": gini(means), "hoyer": hoyer(means),
        "optimal_threshold": {"targets": list(targets), "thresholds": [float(t) for t in tau_t],
                              "fraction_at_or_below": [float(c) / (n_tokens * n) for c in at_or_below_t],
                              "neuron_sparsity": [float((means < t).mean()) for t in tau_t]},
        "dead_neurons": {"eps": float(eps), "count": int(len(dead)), "fraction": len(dead) / n, "indices": dead},
        "activation_variance": {"mean": float(np.mean(variances)), "median": float(np.median(variances)),
                                "max": float(np.max(variances))},
        "neuron_mean_abs": means, "neuron_variance": variances,
        "undefined": undefined_measures(means, entropy_count),
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
    """Running statistics of one layer's activations, fed chunk by chunk of tokens (T, N).

    Pass 1: `update(chunk)` for every chunk. If quantiles are wanted, pass 2: `start_refine(fractions)`,
    then `refine(chunk)` for the same chunks again. `result(...)` gives what `comprehensive_sparsity`
    gives for all chunks stacked."""

    n_neurons: int
    n_tokens: int = 0
    mean: np.ndarray = None  # (N,) running mean of a (Chan's parallel update)
    m2: np.ndarray = None  # (N,) running Σ (a − mean)²
    sum_abs: np.ndarray = None  # (N,)
    max_abs: np.ndarray = None  # (N,)
    entropy_sum: float = 0.0
    entropy_count: int = 0  # tokens with a defined H
    zero_tokens: int = 0  # tokens whose activations are all 0
    entropy_hist: np.ndarray = None
    hist_hi: np.ndarray = None  # (65536,) counts of the top 16 bits of |a| (float32)
    fractions: list = field(default_factory=list)
    _ranks: list = field(default_factory=list)  # [(fraction, rank, hi bin, rank within the bin)]
    _hist_lo: dict = field(default_factory=dict)  # hi bin -> (65536,) counts of the low 16 bits

    def __post_init__(self):
        n = self.n_neurons
        self.mean, self.m2, self.sum_abs = np.zeros(n), np.zeros(n), np.zeros(n)
        self.max_abs = np.zeros(n)
        self.entropy_hist = np.zeros(len(ENTROPY_BINS) - 1, dtype=np.int64)
        self.hist_hi = np.zeros(1 << 16, dtype=np.int64)

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
        self.sum_abs += absa.sum(axis=0)
        np.maximum(self.max_abs, absa.max(axis=0), out=self.max_abs)
        self.zero_tokens += int((absa.max(axis=1) == 0).sum())
        h = _token_entropy(a)
        ok = np.isfinite(h)
        self.entropy_sum += float(h[ok].sum())
        self.entropy_count += int(ok.sum())
        self.entropy_hist += np.histogram(h[ok], ENTROPY_BINS)[0]
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
               targets=TARGET_FRACTIONS) -> dict:
        tau = self.quantiles()
        if len(tau) != len(percentiles) + len(targets):
            raise ValueError("start_refine must be given the percentiles / 100 followed by the targets")
        return _summarise(
            n_tokens=self.n_tokens, means=self.sum_abs / self.n_tokens, variances=self.m2 / self.n_tokens,
            max_abs=self.max_abs, entropy_sum=self.entropy_sum, entropy_count=self.entropy_count,
            zero_tokens=self.zero_tokens, entropy_hist=self.entropy_hist, percentiles=percentiles,
            tau_p=tau[:len(percentiles)], targets=targets, tau_t=tau[len(percentiles):],
            at_or_below_t=np.array([self.count_at_or_below(t) for t in tau[len(percentiles):]]),
            threshold=threshold, eps=eps)


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

    def __init__(self, n_neurons: int, cache_bytes: int | None = None):
        self.n_neurons = n_neurons
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
        row = {key: self.accs.setdefault(key, SparsityAccumulator(self.n_neurons)).update(a) for key, a in c.items()}
        if self.kept is not None:
            self.used += sum(b.nbytes for b in row.values())
            if self.used > self.budget:
                logger.info("sparsity: the first pass's |a| exceed %d bytes; the second pass recomputes them",
                            self.budget)
                self.kept = None
            else:
                self.kept.append(row)

    def finish(self, threshold: float, eps: float = DEAD_EPS, percentiles=PERCENTILES, targets=TARGET_FRACTIONS,
               again=None) -> dict:
        """Pass 2 and the results ({key: dict} for keyed chunks, else one dict). `again`: a function
        returning the chunks once more, needed only when not `kept_all`."""
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
        out = {key: acc.result(threshold, eps, percentiles, targets) for key, acc in self.accs.items()}
        return out if self.keyed else out[None]


def stream_sparsity(chunks, n_neurons: int, threshold: float, eps: float = DEAD_EPS,
                    percentiles=PERCENTILES, targets=TARGET_FRACTIONS, cache_bytes: int | None = None) -> dict:
    """`comprehensive_sparsity` over the chunks from `chunks()`: a function returning a fresh iterable of
    (T, N) arrays, or of {key: (T, N) array} dicts (then the result is {key: dict}).

    The quantiles need a second pass over the same values. While the float32 bit patterns of every |a|
    seen (4 bytes a value) fit in `cache_bytes` (default: a quarter of the free host memory), pass 1 keeps
    them and pass 2 reads them back, so `chunks()` is called once (for a model: one forward per text).
    Past that, the kept patterns are dropped at once and `chunks()` is called a second time. The numbers
    are the same either way (`SparsityStream`)."""
    stream = SparsityStream(n_neurons, cache_bytes)
    for c in chunks():
        stream.feed(c)
    return stream.finish(threshold, eps, percentiles, targets, again=chunks)


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


def _float_tolerance(model, full_precision: float) -> float:
    import torch

    return full_precision if next(model.parameters()).dtype in (torch.float32, torch.float64) else 1e-2


def check_sites(model, sites: dict, ids, acts: dict, what: str) -> None:
    """ReconstructionError unless `acts` equal the model's own forward's sites within float rounding
    (`site_difference` ≤ 1e-5 in float32/64, 1e-2 in half precision)."""
    from ssm import ReconstructionError

    worst, tolerance = site_difference(model, sites, ids, acts), _float_tolerance(model, 1e-5)
    if worst > tolerance:
        raise ReconstructionError(f"{what} differs from the model's own forward by {worst:.3g} (relative) > "
                                  f"{tolerance:g} at the {next(iter(sites.values())).name} site")


def layer_activation_chunks(model, adapter, input_ids, layers, site: str | None = None, progress: bool = False,
                            desc: str = "activations"):
    """A function returning a fresh generator of {layer: (L_i, N) float32 numpy} per text: the neuron
    site of every requested layer captured in one forward per text (stopped after the last of them).

    Mamba models run `ssm.blocked_inference` (transformers' own mixer operations in the same order,
    cache-blocked: the same numbers, about twice as fast at batch 1 on a CPU). The first text is also
    captured through the model's own forward, and the two must agree (ReconstructionError otherwise).
    `input_ids` and `layers` are checked as in `layer_sparsity`, before any forward."""
    from tqdm.auto import tqdm

    from causal_analysis import check_layers, check_token_ids

    input_ids = check_token_ids(input_ids, "input_ids")
    sites = site_map(adapter, list(dict.fromkeys(check_layers(adapter, layers))), site)
    blocked = adapter.ssm_kind == "mamba1"  # Mamba-1 mixers run the blocked forward, checked once
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
                 dead_eps: float = DEAD_EPS):
        from causal_analysis import check_layers

        self.model, self.adapter, self.input_ids = model, adapter, input_ids
        self.layers = list(dict.fromkeys(check_layers(adapter, layers)))
        self.threshold = (default_threshold(adapter.family) if sparsity_threshold is None
                          else _finite_number("sparsity_threshold", sparsity_threshold))
        self.eps = _finite_number("dead_eps", dead_eps)
        self.sites = site_map(adapter, self.layers)
        self.stream = SparsityStream(next(iter(self.sites.values())).size)
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
            return layer_sparsity(self.model, self.adapter, self.input_ids, self.layers, self.threshold, self.eps)
        return _layer_entries(self.adapter, self.sites, self.stream.finish(self.threshold, self.eps))


def _layer_entries(adapter, sites: dict, stats: dict) -> dict:
    return {la: {"layer": la, "relative_depth": la / max(1, adapter.n_layers - 1), "site": s.name, **stats[la]}
            for la, s in sites.items()}


def layer_sparsity(model, adapter, input_ids, layers, sparsity_threshold: float | None = None,
                   dead_eps: float = DEAD_EPS, site: str | None = None, progress: bool = False) -> dict:
    """{layer: comprehensive sparsity dict} of the neuron site of each layer over the texts, streamed
    (every layer captured in the same forward; one forward per text while the first pass's |a| fit the
    memory budget of `stream_sparsity`, else two). `sparsity_threshold` (default: the family's) and
    `dead_eps`: as the options of those names.

    Refused before any forward (ValueError): `input_ids` not a non-empty list of (1, L_i) token-id tensors,
    `layers` not a non-empty list of layer indices (a layer given twice is measured once), a threshold or
    eps that is not a finite number."""
    from causal_analysis import check_layers, check_token_ids

    input_ids = check_token_ids(input_ids, "input_ids")
    threshold = (default_threshold(adapter.family) if sparsity_threshold is None
                 else _finite_number("sparsity_threshold", sparsity_threshold))
    eps = _finite_number("dead_eps", dead_eps)
    layers = list(dict.fromkeys(check_layers(adapter, layers)))
    sites = site_map(adapter, layers, site)
    n = next(iter(sites.values())).size
    stats = stream_sparsity(layer_activation_chunks(model, adapter, input_ids, layers, site, progress), n,
                            threshold, eps)
    return _layer_entries(adapter, sites, stats)


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


def plot_entropy(entries, plots_dir, name: str) -> str:
    fig, axes = _figure()
    ax = axes[0][0]
    for i, (lab, s) in enumerate(entries):
        e = s["entropy"]
        counts = np.asarray(e["histogram_counts"], dtype=float)
        edges = np.asarray(e["histogram_edges"])
        ax.stairs(counts / max(1.0, counts.sum()), edges, color=f"C{i}", lw=2,
                  label=f"{_label(lab, s)}: sparsity 1 − mean H = {shown(e['sparsity'])}")
    ax.set(xlabel="normalised entropy H of a token's activation energy (1 = spread evenly)",
           ylabel="fraction of tokens", title="Entropy sparsity")
    ax.legend(fontsize=8)
    return _save(fig, plots_dir, name)


def plot_gini(entries, plots_dir, name: str) -> str:
    """Lorenz curves of the per-neuron mean |a|, with Gini and Hoyer."""
    fig, axes = _figure()
    ax = axes[0][0]
    for i, (lab, s) in enumerate(entries):
        c = np.sort(np.asarray(s["neuron_mean_abs"], dtype=float))
        cum = np.concatenate([[0.0], np.cumsum(c) / c.sum()]) if c.sum() > 0 else np.zeros(len(c) + 1)
        ax.plot(np.linspace(0, 1, len(cum)), cum, color=f"C{i}",
                label=f"{_label(lab, s)}: Gini {shown(s['gini'])}, Hoyer {shown(s['hoyer'])}")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="uniform (Gini 0)")
    ax.set(xlabel="fraction of neurons (ascending mean |a|)", ylabel="fraction of total mean |a|",
           title="Gini: Lorenz curve of per-neuron mean |a|")
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
        lambda s: f"{s['traditional']['sparsity']:.3f} below {s['traditional']['threshold']:g}", plots_dir, name,
        "log10 mean |a| per neuron", "Traditional sparsity (absolute threshold, dashed): scale-dependent",
        lines=lambda s: s["traditional"]["threshold"])


def plot_activation_variance(entries, plots_dir, name: str) -> str:
    return _log_histograms(entries, lambda s: s["neuron_variance"],
                           lambda s: f"mean {s['activation_variance']['mean']:.3g}", plots_dir, name,
                           "log10 variance over tokens, per neuron", "Activation variance")


MULTILAYER_METRICS = (("traditional", lambda s: s["traditional"]["sparsity"]),
                      ("percentile p50", lambda s: s["percentile"]["sparsity"][s["percentile"]["percentiles"].index(50)]),
                      ("entropy", lambda s: s["entropy"]["sparsity"]),
                      ("Gini", lambda s: s["gini"]), ("Hoyer", lambda s: s["hoyer"]),
                      ("dead fraction", lambda s: s["dead_neurons"]["fraction"]))


def multilayer_table(per_layer: dict) -> dict:
    """{metric: [value per layer]} plus layers and relative depths: the numbers `plot_multilayer` shows (None
    where the measure is undefined at that layer: its layer dict's "undefined" says why)."""
    layers = sorted(per_layer)
    out = {"layers": layers, "relative_depth": [per_layer[la]["relative_depth"] for la in layers]}
    out.update({m: [None if (v := f(per_layer[la])) is None else float(v) for la in layers]
                for m, f in MULTILAYER_METRICS})
    out["activation_variance_mean"] = [per_layer[la]["activation_variance"]["mean"] for la in layers]
    return out


def plot_multilayer(models: list[tuple[str, dict]], plots_dir, name: str, relative: bool = False) -> str:
    """Every method against layer (or relative depth), one line per model: `models` = [(label, {layer: dict})]."""
    import matplotlib.pyplot as plt

    metrics = [m for m, _ in MULTILAYER_METRICS] + ["activation_variance_mean"]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    for i, (lab, per_layer) in enumerate(models):
        t = multilayer_table(per_layer)
        x = t["relative_depth"] if relative else t["layers"]
        for ax, m in zip(axes.ravel(), metrics):
            ax.plot(x, _plotted(t[m]), "o-", color=f"C{i}", label=lab)
    for ax, m in zip(axes.ravel(), metrics):
        ax.set_title(m.replace("_", " "), fontsize=10)
        ax.set_xlabel("relative depth (layer / (layers − 1))" if relative else "layer")
        ax.legend(fontsize=7)
    axes[1][2].set_yscale("log")
    axes.ravel()[-1].axis("off")
    fig.suptitle("Sparsity across layers")
    fig.tight_layout()
    from utils import save_figure

    return save_figure(fig, plots_dir, name)


def sparsity_plots(entries, models_by_layer, plots_dir, prefix: str, tag: str = "", relative: bool = False
                   ) -> list[str]:
    """The full sparsity plot set: percentile, entropy, Gini, optimal threshold, traditional and
    activation variance for `entries` (one layer per model; file names end in `tag`), and the
    multi-layer plot for `models_by_layer` = [(label, {layer: dict})]."""
    return [plot_percentile(entries, plots_dir, f"{prefix}_sparsity_percentile{tag}"),
            plot_entropy(entries, plots_dir, f"{prefix}_sparsity_entropy{tag}"),
            plot_gini(entries, plots_dir, f"{prefix}_sparsity_gini{tag}"),
            plot_optimal_threshold(entries, plots_dir, f"{prefix}_sparsity_optimal_threshold{tag}"),
            plot_traditional(entries, plots_dir, f"{prefix}_sparsity_traditional{tag}"),
            plot_activation_variance(entries, plots_dir, f"{prefix}_activation_variance{tag}"),
            plot_multilayer(models_by_layer, plots_dir, f"{prefix}_sparsity_multilayer", relative)]


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
    layers = sorted({*ctx.layers, *chosen_layers(ctx)})
    return SparsityRead(ctx.model, ctx.adapter, layers, ctx.tokens.input_ids, ctx.opts.sparsity_threshold,
                      ctx.opts.dead_eps)


def _stage_run(ctx, read: dict):
    """Every sparsity method for the neuron site at --layer, and across --sparsity_layers, from the text
    pass's sites (`passes`: where they came from is recorded as "measured_in")."""
    from functools import partial

    multi = chosen_layers(ctx)
    stats = read["stats"]
    single = stats[ctx.layer]
    chosen = {la: stats[la] for la in multi}
    results = {"site": single["site"], "layer": ctx.layer, "sparsity_layers": multi, "single": single,
               "layers": chosen, "multilayer": multilayer_table(chosen), "note": SCALE_NOTE,
               "definitions": __doc__, "measured_in": read["measured_in"]}
    return results, [partial(sparsity_plots, [(ctx.prefix, single)], [(ctx.prefix, chosen)], ctx.plots_dir,
                             ctx.prefix, tag=f"_layer{ctx.layer}")]


def sparsity_line(s: dict) -> str:
    """One layer's sparsity measures on one line."""
    p50 = s["percentile"]["sparsity"][s["percentile"]["percentiles"].index(50)]
    return (f"traditional {s['traditional']['sparsity']:.3f} (< {s['traditional']['threshold']:g}), percentile-50 "
            f"{p50:.3f}, entropy {shown(s['entropy']['sparsity'], '.3f')}, Gini {shown(s['gini'], '.3f')}, Hoyer "
            f"{shown(s['hoyer'], '.3f')}, dead {s['dead_neurons']['count']}")


def sparsity_summary(r: dict) -> str:
    s = r["single"]
    where = f"; measured in {r['measured_in']}" if "measured_in" in r else ""  # (results of older versions lack it)
    lines = [f"    site {r['site']} ({s['n_neurons']} neurons), {s['n_tokens']} tokens{where}",
             f"    layer {r['layer']}: {sparsity_line(s)}"]
    lines += [f"    layer {la}: {sparsity_line(st)}" for la, st in r["layers"].items() if la != r["layer"]]
    lines.append(f"    note: {r['note']}")
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("sparsity", _stage_run, sparsity_summary, reader=_stage_reader, per_layer=True))


_register()
