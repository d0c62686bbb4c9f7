"""The neuron census: dead, token and positional neurons at every layer's neuron site, after Voita et al.
2023 ("Neurons in LLMs: dead, n-gram, positional").

Shapes: T texts, read one at a time (L tokens each); N neurons of a layer's site (`sparsity.neuron_site`:
a Mamba's ssm channels, the inner width e; a Transformer's MLP neurons); k groups (distinct tokens, or
positions); the texts split in two halves (texts 0, 2, 4, ... and 1, 3, 5, ...).

Per neuron of every layer, streamed over the text pass (running group sums only: `LayerCensus`), three
tests, each over its own positions (`plan_groups`):
- token: positions 1, 2, ... whose token occurs at least twice there in the texts (position 0 is left out:
  the first token is special in every model, and a first-token neuron is not a token neuron);
- position: positions 0 .. P − 1, those reached by at least two texts;
- position without the first: positions 1 .. P − 1 (a position code, not a first-token detector).
A text enters a test with at least two of its positions.
1. **dead**: |a| < --dead_eps on every token (as the sparsity stage counts them); a dead neuron has no share.
2. **within-text deviations**: in each test, each text's mean over that test's positions is subtracted, so
   that a neuron that tracks only which text it reads (its topic) counts as neither kind, and a spike at a
   position left out of a test cannot leak into it.
3. **share**: how much of the deviations' variance the group (the token, or the position) explains: the
   one-way analysis of variance's adjusted η², ε² = 1 − (SS_within / df_within) / (SS_total / df_total),
   about 0 for a neuron the group does not drive however many groups there are (plain η² = SS_between /
   SS_total grows with their number: with k groups of noise its expectation is (k − 1) / (n − 1)).
   df_between = k − 1, df_within = n − k − (T − 1) (n positions; the T text means removed cost T − 1).
4. **cross-fitted share**: the same share out of sample: the group means of one half of the texts
   predict the other half's deviations, both ways: 1 − Σ (d − m_other half[g])² / Σ d². The texts are
   independent, so this is about 0 or below without an effect however dependent the positions of one
   text are (a Mamba channel's activations are autocorrelated along the text, which inflates the in-sample
   share and the F-test); a group seen in one half only is predicted by 0.
5. **p**: the F-test's P(F ≥ observed), F = (SS_between / df_between) / (SS_within / df_within). Nominal:
   it assumes independent positions, and activations that drift along a text make it too small.
6. A neuron is a **token (positional) neuron** when p < --census_alpha / N (Bonferroni over the layer's N
   neurons, nominal), and both its share and its cross-fitted share are at least --census_min_share. Counts
   per layer; a neuron can be of both kinds.

Why the F-test rather than a permutation null: a permutation null needs every activation kept, or each
permutation's group sums (draws × k × N per layer), while the F-test needs one set of group sums; on
independent (shuffled) activations its p-values are calibrated (the suite checks the false-positive rate),
and the cross-fitted share guards the counts where positions are not independent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

import stats

logger = logging.getLogger(__name__)

CENSUS_BYTES = 1 << 30  # the group sums' memory (float64, every layer, both halves): positions, then tokens
TOP_TOKENS = 5  # each top token neuron's tokens listed
PLOTTED_TOKENS = 20  # the strongest token neuron's tokens in its plot
PLOTTED_POSITIONAL = 3  # the strongest positional neurons in their plot
TESTS = ("token", "position", "position_without_first")

DEFINITIONS = {
    "site": "each layer's neuron site: a Mamba's ssm channels (the inner width), a Transformer's MLP neurons; a "
            "hybrid's neurons: at a layer with a state-space mixer its ssm channels, elsewhere its dense MLP's "
            "hidden units (each layer's entry: layer_kind, site_description)",
    "tests": "token: positions ≥ 1 whose token occurs at least twice there; position: positions 0..P−1 reached "
             "by at least two texts; position_without_first: positions 1..P−1; a text enters a test with at "
             "least two of its positions",
    "deviation": "a neuron's activation minus its mean over the text's positions in the test",
    "share": "adjusted η² of the deviations with the group (the token, or the position): 1 − (SS_within/df_within)"
             "/(SS_total/df_total); about 0 when the group does not drive the neuron, 1 when it determines it",
    "cross_share": "the share out of sample: each half of the texts' deviations predicted by the other half's group "
                   "means, 1 − Σ(d − m_other[g])²/Σd²; about 0 or below without an effect, whatever the dependence "
                   "between the positions of a text",
    "p": "the F-test's P(F ≥ observed), df_between = k − 1, df_within = n − k − (T − 1) (k groups, n positions, "
         "T texts); nominal: it assumes independent positions",
    "kind": "token (positional) neuron: p below alpha / N (Bonferroni over the layer's N neurons, nominal), and "
            "share and cross_share both at least min_share; dead: |a| < eps on every token (no share)",
    "top_tokens": "the tokens with the largest mean deviation in absolute value (count: the token's positions in "
                  "the test)",
}


@dataclass(frozen=True)
class Plan:
    """One test's positions: per text, each position's group (L,) (−1: not in the test), the group sizes in
    each half of the texts (2, k), and how many texts are in it."""

    group_of: list  # per text, (L,) int64
    counts: np.ndarray  # (2, k)
    n_texts: int


@dataclass(frozen=True)
class Groups:
    """The three tests' plans (`TESTS`), known before the pass from the token ids, with the token of each
    token group (k,) (the most frequent first, as many as `CENSUS_BYTES` allows), the positions P of the
    position tests, the texts' tokens in all, and the repeated tokens left out for the memory budget."""

    plans: dict  # {test: Plan}
    token_ids: np.ndarray  # (k,)
    positions: int
    n_tokens: int
    tokens_left_out: int


def _plan(groups_of: list) -> Plan:
    """A test's plan from each text's groups (−1 outside): a text with fewer than two positions in it
    leaves it."""
    groups_of = [g if (g >= 0).sum() >= 2 else np.full_like(g, -1) for g in groups_of]
    k = max([int(g.max()) + 1 for g in groups_of if len(g)] + [0])
    counts = np.zeros((2, k), dtype=np.int64)
    for t, g in enumerate(groups_of):
        counts[t % 2] += np.bincount(g[g >= 0], minlength=k)
    return Plan(groups_of, counts, sum(int((g >= 0).any()) for g in groups_of))


def plan_groups(input_ids, n_neurons: int, n_layers: int, budget: int = CENSUS_BYTES) -> Groups:
    """The three tests' positions from the texts' token ids (a list of (1, L) tensors)."""
    seqs = [ids.reshape(-1).cpu().numpy() for ids in input_ids]
    lengths = np.array([len(s) for s in seqs])
    per_group = n_neurons * n_layers * 8 * 2  # bytes of one group's sums, every layer, both halves
    long = lengths[lengths >= 2]
    positions = int(sum((long > p).sum() >= 2 for p in range(int(lengths.max()))))
    positions = min(positions, max(2, budget // 2 // (2 * per_group)))  # two position tests
    position_of = [np.where(np.arange(L) < positions, np.arange(L), -1) for L in lengths]
    later = [np.where(g >= 1, g - 1, -1) for g in position_of]
    rest = np.concatenate([s[1:] for s in seqs]) if any(len(s) > 1 for s in seqs) else np.zeros(0, np.int64)
    ids, counts = np.unique(rest, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    repeated = order[counts[order] >= 2]
    kept = repeated[:max(0, (budget - 2 * positions * per_group) // per_group)]
    token_of = np.full(int(max(ids.max() if len(ids) else 0, max(s.max() for s in seqs))) + 1, -1, dtype=np.int64)
    token_of[ids[kept]] = np.arange(len(kept))
    token_groups = [np.concatenate([[-1], token_of[s[1:]]]) if len(s) else s.astype(np.int64) for s in seqs]
    return Groups({"token": _plan(token_groups), "position": _plan(position_of), "position_without_first":
                   _plan(later)}, ids[kept], positions, int(lengths.sum()), len(repeated) - len(kept))


class LayerCensus:
    """One layer's running sums (float64): the largest |a| over every position and over positions ≥ 1, and per
    test and half of the texts the group sums of the deviations S (2, k, N) and their sum of squares Q (2, N)."""

    def __init__(self, n_neurons: int, groups: Groups):
        f64 = dict(dtype=torch.float64)
        self.max_abs = torch.zeros(n_neurons, **f64)
        self.max_rest = torch.zeros(n_neurons, **f64)  # over positions ≥ 1
        self.S = {t: torch.zeros(2, groups.plans[t].counts.shape[1], n_neurons, **f64) for t in TESTS}
        self.Q = {t: torch.zeros(2, n_neurons, **f64) for t in TESTS}

    def add(self, a: torch.Tensor, group_of: dict, half: int) -> None:
        """One text's activations a (L, N) float64; `group_of` {test: (L,) long groups, −1 outside}."""
        self.max_abs = torch.maximum(self.max_abs, a.abs().amax(0))
        if a.shape[0] > 1:
            self.max_rest = torch.maximum(self.max_rest, a[1:].abs().amax(0))
        for t, g in group_of.items():
            inside = g >= 0
            if not bool(inside.any()):
                continue
            x = a[inside]  # (n_t, N) the text's positions in the test
            dev = x - x.mean(0)
            if t == "token":
                self.S[t][half].index_add_(0, g[inside], dev)
            else:  # the position tests' groups are the positions in order: 0, 1, ... (n_t of them)
                self.S[t][half][:dev.shape[0]] += dev
            self.Q[t][half] += dev.square().sum(0)


def group_test(S: np.ndarray, counts: np.ndarray, Q: np.ndarray, n_texts: int, scale: np.ndarray) -> dict:
    """One test for every neuron, from each half's group sums of the deviations S (2, k, N), group sizes
    `counts` (2, k) and sums of squares Q (2, N), and the texts in it; `scale` (N): each neuron's largest
    |a| over the test's positions (a neuron with no spread on that scale has no share). {"share" (N)
    adjusted η², "cross_share" (N), "eta_squared" (N), "p" (N) (NaN where undefined), "df": [between,
    within], "undefined": why or None, "cross_undefined": why or None}."""
    S, counts = S[:, counts.sum(0) > 0], counts[:, counts.sum(0) > 0]  # groups with positions
    c = counts.sum(0)  # (k,)
    k, n = len(c), int(c.sum())
    df_b, df_w = k - 1, n - k - (n_texts - 1)
    nan = np.full(S.shape[2], np.nan)
    out = {"share": nan, "cross_share": nan, "eta_squared": nan, "p": nan, "df": [df_b, df_w], "undefined": None,
           "cross_undefined": None}
    if k < 2 or df_w < 1:
        out["undefined"] = out["cross_undefined"] = (
            f"{k} group{'s' if k != 1 else ''}: nothing to compare" if k < 2 else
            f"{n} positions in {k} groups from {n_texts} texts leave no degrees of freedom within the groups")
        return out
    S_all, Q_all = S.sum(0), Q.sum(0)  # (k, N), (N,)
    total = S_all.sum(0)
    ss_total = Q_all - total ** 2 / n
    ss_between = (S_all ** 2 / c[:, None]).sum(0) - total ** 2 / n
    ss_within = np.maximum(ss_total - ss_between, 0.0)
    defined = ss_total > 1e-12 * n * np.maximum(scale, 1e-300) ** 2  # a neuron with spread at its own scale
    with np.errstate(divide="ignore", invalid="ignore"):
        out["share"] = np.where(defined, 1.0 - (ss_within / df_w) / (ss_total / (df_b + df_w)), np.nan)
        out["eta_squared"] = np.where(defined, ss_between / ss_total, np.nan)
        f = np.where(defined, (ss_between / df_b) / (ss_within / df_w), np.nan)
    out["p"] = np.full_like(f, np.nan)
    out["p"][defined] = stats.f_survival(f[defined], df_b, df_w)
    if (counts.sum(1) == 0).any():
        out["cross_undefined"] = "one half of the texts has no position in this test"
        return out
    residual = 0.0
    for h in (0, 1):  # half h's means predict the other half's deviations
        o = 1 - h
        m = np.divide(S[h], counts[h][:, None], out=np.zeros_like(S[h]), where=counts[h][:, None] > 0)  # (k, N)
        residual = residual + Q[o] - 2 * (S[o] * m).sum(0) + (counts[o][:, None] * m ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["cross_share"] = np.where(defined, 1.0 - residual / Q_all, np.nan)
    return out


class CensusReader:
    """The census stage's reader of the text pass: every layer's neuron site (`request`), each text's
    activations into each layer's `LayerCensus` (`read`, texts in order: text t is in half t % 2), the tests
    per layer (`finish`)."""

    def __init__(self, adapter, input_ids, layers=None):
        import sparsity as sp

        self.adapter = adapter
        # a hybrid's layers without a neuron site (a mixture of experts, attention alone) are left out, with why
        self.layers, self.skipped = sp.site_layers(adapter, range(adapter.n_layers) if layers is None else layers)
        if not self.layers:
            from models import NotApplicable

            raise NotApplicable(next(iter(self.skipped.values())))
        self.sites = sp.site_map(adapter, self.layers)
        self.n_neurons = max(s.size for s in self.sites.values())  # the widest layer's, for the memory budget
        self.groups = plan_groups(input_ids, self.n_neurons, len(self.layers))
        self.census = {la: LayerCensus(self.sites[la].size, self.groups) for la in self.layers}
        self.n_texts = 0

    @property
    def request(self):
        from passes import TextRequest

        return TextRequest(sites=frozenset(self.layers))

    def read(self, text) -> None:
        t = self.n_texts
        group_of = {name: torch.from_numpy(plan.group_of[t]) for name, plan in self.groups.plans.items()}
        for la in self.layers:
            a = torch.from_numpy(np.asarray(text.sites[la])).to(torch.float64)  # (L, N)
            self.census[la].add(a, group_of, t % 2)
        self.n_texts += 1

    def finish(self) -> dict:
        g = self.groups
        out = {}
        for la, c in self.census.items():
            scale = {"token": c.max_rest, "position": c.max_abs, "position_without_first": c.max_rest}
            out[la] = {"max_abs": c.max_abs.numpy(), "site": self.sites[la].name,
                       "sums": {t: (c.S[t].numpy(), g.plans[t].counts) for t in TESTS},
                       **{t: group_test(c.S[t].numpy(), g.plans[t].counts, c.Q[t].numpy(), g.plans[t].n_texts,
                                        scale[t].numpy()) for t in TESTS}}
        return {"layers": out, "groups": g, "n_texts": self.n_texts, "layers_without_site": self.skipped}


def group_means(sums, neuron: int) -> np.ndarray:
    """(k,) one neuron's mean deviation per group over both halves (NaN for a group without positions)."""
    S, counts = sums
    c = counts.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, S[:, :, neuron].sum(0) / c, np.nan)


def classify(test: dict, alpha: float, min_share: float, n_neurons: int, dead: np.ndarray) -> np.ndarray:
    """(N,) bool: the neurons of the kind (p < alpha / N, share and cross-fitted share ≥ min_share; never a
    dead one)."""
    with np.errstate(invalid="ignore"):
        return ((test["p"] < alpha / n_neurons) & (test["share"] >= min_share) & (test["cross_share"] >= min_share)
                & ~dead)


def _decoded(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def _top_tokens(sums, groups: Groups, neuron: int, tokenizer, n: int) -> list[dict]:
    col = group_means(sums, neuron)  # (k,)
    count = sums[1].sum(0)
    order = [g for g in np.argsort(-np.abs(np.nan_to_num(col, nan=0.0)), kind="stable") if count[g] > 0][:n]
    return [{"token": _decoded(tokenizer, groups.token_ids[g]), "token_id": int(groups.token_ids[g]),
             "count": int(count[g]), "mean_deviation": float(col[g])} for g in order]


def _none_for_nan(a: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64)]


def _float(v) -> float | None:
    return None if not np.isfinite(v) else float(v)


def _without_dead(test: dict, dead: np.ndarray) -> dict:
    """The test with a dead neuron's share, cross-fitted share and p undefined (|a| below eps is not a code)."""
    return {**test, **{f: np.where(dead, np.nan, test[f]) for f in ("share", "cross_share", "eta_squared", "p")}}


def _kind_entry(test: dict, is_kind: np.ndarray, alpha: float, n: int, top_k: int, extra=None) -> dict:
    """One kind at one layer: its count and share of the layer's neurons, how many pass the nominal test at
    any share, the top neurons by share, and the per-neuron shares, cross-fitted shares and p-values."""
    with np.errstate(invalid="ignore"):
        nominal = int((test["p"] < alpha / n).sum())
    share, cross = test["share"], test["cross_share"]
    finite = np.isfinite(share)
    order = [int(i) for i in np.argsort(-np.where(finite, share, -np.inf), kind="stable")[:top_k] if finite[i]]
    top = [{"neuron": i, "share": float(share[i]), "cross_share": _float(cross[i]), "p": float(test["p"][i]),
            "is_kind": bool(is_kind[i]), **(extra(i) if extra else {})} for i in order]
    return {"count": int(is_kind.sum()), "fraction": float(is_kind.sum()) / n, "nominal_p_only": nominal,
            "undefined_neurons": int((~finite).sum()), "df": test["df"], "undefined": test["undefined"],
            "cross_undefined": test["cross_undefined"],
            "median_share": None if not finite.any() else float(np.median(share[finite])), "top": top,
            "share_per_neuron": _none_for_nan(share), "cross_share_per_neuron": _none_for_nan(cross),
            "p_per_neuron": _none_for_nan(test["p"])}


def census_results(read: dict, adapter, tokenizer, alpha: float, min_share: float, dead_eps: float,
                   top_k: int = 10) -> dict:
    """The stage's results from the reader's `finish()`: per layer, each kind's count and share, its top
    neurons (a token neuron with its top tokens), the per-neuron shares and p-values; over the layers,
    where positional neurons first appear, and the strongest neurons of each kind for the plots."""
    g = read["groups"]
    layers, strongest_token, positional = {}, None, []
    for la, r in read["layers"].items():
        n = len(r["max_abs"])
        dead = r["max_abs"] < dead_eps
        tests = {t: _without_dead(r[t], dead) for t in TESTS}
        kinds = {t: classify(tests[t], alpha, min_share, n, dead) for t in TESTS}
        tokens = _kind_entry(tests["token"], kinds["token"], alpha, n, top_k,
                             lambda i: {"top_tokens": _top_tokens(r["sums"]["token"], g, i, tokenizer, TOP_TOKENS)})
        wo = tests["position_without_first"]
        position = _kind_entry(tests["position"], kinds["position"], alpha, n, top_k,
                               lambda i: {"share_without_first": _float(wo["share"][i]),
                                          "cross_share_without_first": _float(wo["cross_share"][i])})
        position.update(count_without_first=int(kinds["position_without_first"].sum()),
                        fraction_without_first=float(kinds["position_without_first"].sum()) / n,
                        undefined_without_first=wo["undefined"],
                        without_first=_kind_entry(wo, kinds["position_without_first"], alpha, n, 0))
        layers[la] = {"layer": la, "relative_depth": la / max(1, adapter.n_layers - 1), "site": r["site"],
                      "layer_kind": adapter.layer_kind(la),
                      **({"site_description": adapter.neuron_path(la)[1]} if adapter.hybrid else {}),
                      "n_neurons": n, "dead": {"count": int(dead.sum()), "fraction": float(dead.sum()) / n,
                                               "indices": [int(i) for i in np.flatnonzero(dead)]},
                      "token": tokens, "position": position}
        if tokens["top"] and (strongest_token is None or tokens["top"][0]["share"] > strongest_token["share"]):
            top = tokens["top"][0]
            strongest_token = {"layer": la, **{f: top[f] for f in ("neuron", "share", "cross_share", "p", "is_kind")},
                               "tokens": _top_tokens(r["sums"]["token"], g, top["neuron"], tokenizer, PLOTTED_TOKENS)}
        positional += [{"layer": la, **{f: t[f] for f in ("neuron", "share", "cross_share", "p", "is_kind",
                                                           "share_without_first")},
                        "means_by_position": _none_for_nan(group_means(r["sums"]["position"], t["neuron"]))}
                       for t in position["top"][:PLOTTED_POSITIONAL]]
    positional = sorted(positional, key=lambda t: -t["share"])[:PLOTTED_POSITIONAL]
    first = [la for la, e in layers.items() if e["position"]["count"]]
    first_wo = [la for la, e in layers.items() if e["position"]["count_without_first"]]
    plans = g.plans
    token_positions = int(plans["token"].counts.sum())
    widths = {e["n_neurons"] for e in layers.values()}
    return {"site": next(iter(layers.values()))["site"],
            "n_neurons": widths.pop() if len(widths) == 1 else None,  # None: the layers differ (each layer's entry)
            "n_layers": len(layers), "layers_without_site": read.get("layers_without_site") or {}, "n_texts": read["n_texts"], "n_tokens": g.n_tokens,
            "alpha": alpha, "min_share": min_share, "dead_eps": dead_eps,
            "level": f"p < {alpha:g} / N (the F-test, Bonferroni over a layer's N neurons; nominal: it assumes "
                     f"independent positions) and both the share and the cross-fitted share ≥ {min_share:g}",
            "token_test": {"groups": int((plans["token"].counts.sum(0) > 0).sum()), "positions": token_positions,
                           "positions_fraction": token_positions / max(1, g.n_tokens),
                           "texts": plans["token"].n_texts, "tokens_left_out": g.tokens_left_out,
                           "note": "positions 1, 2, ... whose token occurs at least twice there" + (
                               f"; {g.tokens_left_out} more repeated tokens left out (the group sums' memory budget)"
                               if g.tokens_left_out else "")},
            "position_test": {"positions": g.positions, "texts": plans["position"].n_texts,
                              "texts_without_first": plans["position_without_first"].n_texts,
                              "note": "positions 0 .. P − 1 reached by at least two texts"},
            "position_encoding": adapter.position_encoding,
            "absolute_position_input": adapter.position_embedding_path is not None,
            "positional_from_layer": first[0] if first else None,
            "positional_from_layer_without_first": first_wo[0] if first_wo else None,
            "layers": layers, "by_depth": by_depth(layers), "totals": totals(layers),
            "strongest": {"token": strongest_token, "positional": positional},
            "definitions": DEFINITIONS}


def totals(layers: dict) -> dict:
    """Each kind's count over every layer's neurons together, and its share of them."""
    rows = list(layers.values())
    counts = {"neurons": sum(e["n_neurons"] for e in rows), "dead": sum(e["dead"]["count"] for e in rows),
              "token": sum(e["token"]["count"] for e in rows), "positional": sum(e["position"]["count"] for e in rows),
              "positional_without_first": sum(e["position"]["count_without_first"] for e in rows)}
    return {**counts, "fractions": {k: v / counts["neurons"] for k, v in counts.items() if k != "neurons"}}


def by_depth(layers: dict) -> dict:
    """Each kind's share of a layer's neurons over relative depth (the plots' and the comparison's rows)."""
    rows = list(layers.values())
    return {"layers": [e["layer"] for e in rows], "relative_depth": [e["relative_depth"] for e in rows],
            "dead": [e["dead"]["fraction"] for e in rows], "token": [e["token"]["fraction"] for e in rows],
            "positional": [e["position"]["fraction"] for e in rows],
            "positional_without_first": [e["position"]["fraction_without_first"] for e in rows]}


# --------------------------------------------------------------------------------------------------
# Plots: they only read the results
# --------------------------------------------------------------------------------------------------
KIND_STYLES = (("dead", "dead", "C7"), ("token", "token", "C0"), ("positional", "positional", "C3"),
               ("positional_without_first", "positional without position 0", "C1"))


def plot_by_depth(series: list, plots_dir, name: str, level: str) -> str:
    """Each kind's share of the neurons over relative depth, one line style per model: `series` =
    [(label, by_depth dict)]."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    import textwrap

    fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
    for m, (label, d) in enumerate(series):
        for key, kind, colour in KIND_STYLES:
            ax.plot(d["relative_depth"], d[key], ("o-", "s--", "^:")[m % 3], color=colour,
                    label=f"{label}: {kind}", alpha=0.9 if key != "positional_without_first" else 0.6)
    ax.set(xlabel="relative depth (layer / (layers − 1))", ylabel="share of the layer's neurons", ylim=(-0.02, 1.02),
           title="Neuron census over depth")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.text(0.01, 0.0, textwrap.fill(f"A neuron is counted as a kind where {level}; share: adjusted η² of its "
                                      "within-text deviations by token (or position); cross-fitted: across two "
                                      "halves of the texts.", 150),
             fontsize=7, va="bottom")
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    return save_figure(fig, plots_dir, name)


def plot_strongest(results: dict, plots_dir, name: str) -> str:
    """The strongest token neuron's mean deviation per token, and the strongest positional neurons' mean
    deviation per position."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from utils import save_figure

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    t = results["strongest"]["token"]
    if t is None:
        ax0.text(0.5, 0.5, "no token test defined", ha="center", va="center")
        ax0.axis("off")
    else:
        toks = t["tokens"]
        ax0.bar(range(len(toks)), [x["mean_deviation"] for x in toks], color="C0")
        ax0.set_xticks(range(len(toks)), [f"{x['token']!r} ({x['count']})" for x in toks], rotation=70, fontsize=7)
        ax0.axhline(0, color="grey", lw=0.8)
        ax0.set(ylabel="mean deviation from the text's mean\n(the site's activation units)",
                title=f"strongest token neuron: layer {t['layer']} #{t['neuron']}, share {t['share']:.2f} "
                      f"(cross-fitted {_cross(t['cross_share'])})"
                      + ("" if t["is_kind"] else " (below the level)"))
    for i, p in enumerate(results["strongest"]["positional"]):
        y = np.array([np.nan if v is None else v for v in p["means_by_position"]])
        wo = "undefined" if p["share_without_first"] is None else f"{p['share_without_first']:.2f}"
        ax1.plot(range(len(y)), y, color=f"C{i + 3}", label=f"layer {p['layer']} #{p['neuron']}: share {p['share']:.2f}, cross-fitted {_cross(p['cross_share'])} "
                 f"({wo} without position 0)" + ("" if p["is_kind"] else "; below the level"))
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(xlabel="position (token index in the text)",
            ylabel="mean deviation from the text's mean\n(the site's activation units)",
            title="strongest positional neurons")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    if results["strongest"]["positional"]:
        ax1.legend(fontsize=7)
    return save_figure(fig, plots_dir, name)


# --------------------------------------------------------------------------------------------------
# The census stage (a text stage: it reads every layer's neuron site in the text pass)
# --------------------------------------------------------------------------------------------------
def _stage_reader(ctx):
    return CensusReader(ctx.adapter, ctx.tokens.input_ids)


def _stage_run(ctx, read: dict):
    from functools import partial

    o = ctx.opts
    results = census_results(read, ctx.adapter, ctx.tokenizer, o.census_alpha, o.census_min_share, o.dead_eps,
                             ctx.top_k)
    d, p = ctx.plots_dir, ctx.prefix
    return results, [partial(plot_by_depth, [(p, results["by_depth"])], d, f"{p}_census_by_depth", results["level"]),
                     partial(plot_strongest, results, d, f"{p}_census_strongest")]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _cross(v) -> str:
    return "undefined" if v is None else f"{v:.2f}"


def positional_finding(r: dict) -> str:
    """Where positional neurons appear, said for a model without a position embedding as a finding."""
    if not r["position_test"]["positions"]:
        return "the position test is undefined: no position is reached by two texts (give at least two)"
    none = r["positional_from_layer"] is None
    told = r["position_encoding"] or "no position input (positions only through the recurrence's order)"
    head = f"{told}: " if r["absolute_position_input"] else f"{told}, yet " if not none else f"{told}; "
    if none:
        top = r["strongest"]["positional"]
        tail = ("" if not top else f" (the largest position share is {top[0]['share']:.2f}, cross-fitted "
                f"{_cross(top[0]['cross_share'])}: layer {top[0]['layer']} #{top[0]['neuron']})")
        return f"{head}positional neurons at the level at no layer{tail}"
    wo = r["positional_from_layer_without_first"]
    return (f"{head}positional neurons from layer {r['positional_from_layer']}; leaving position 0 out, "
            + (f"from layer {wo}" if wo is not None else "at no layer"))


def table_rows(r: dict) -> list[dict]:
    """The census per layer, one row each (the report's table): each kind's count at the level, and how many
    pass the nominal F-test alone at any share."""
    rows = []
    for la, e in r["layers"].items():
        t, p = e["token"], e["position"]
        rows.append({"layer": la, "relative depth": round(e["relative_depth"], 3), "neurons": e["n_neurons"],
                     "dead": e["dead"]["count"], "token": t["count"], "token (nominal p only)": t["nominal_p_only"],
                     "median token share": t["median_share"], "positional": p["count"],
                     "positional (nominal p only)": p["nominal_p_only"],
                     "positional without position 0": p["count_without_first"],
                     "median position share": p["median_share"]})
    return rows


def _p(p: float) -> str:
    return "< 1e-300" if p == 0 else f"{p:.1e}"


def census_summary(r: dict) -> str:
    tt, pt = r["token_test"], r["position_test"]
    per_layer = (f"{r['n_neurons']} neurons per layer" if r["n_neurons"] is not None else
                 "each layer's own neurons, of its own width")
    lines = [f"    site {r['site']} ({per_layer}, {r['n_layers']} layers), {r['n_tokens']} "
             f"tokens, {r['n_texts']} texts; each neuron's deviations from its text's mean over each test's positions",
             f"    a kind counts where {r['level']}; share: adjusted η²; cross-fitted: one half of the texts' group "
             f"means predicting the other half's (definitions)",
             f"    token test: {tt['groups']} tokens seen twice or more after the first position, {tt['positions']} "
             f"positions ({_pct(tt['positions_fraction'])} of the tokens)"
             f"{'; ' + tt['note'].split('; ', 1)[1] if tt['tokens_left_out'] else ''}; "
             + (f"position test: positions 0-{pt['positions'] - 1} (reached by at least two texts)" if pt["positions"]
                else "position test: undefined (no position is reached by two texts)"),
             "    layer | dead | token (nominal p only) | positional (nominal p only) | positional without position 0"
             "   [nominal p only: the F-test alone, at any share; it assumes independent positions]"]
    for row in table_rows(r):
        lines.append(f"    {row['layer']:>5} | {row['dead']:>4} | {row['token']:>5} ({row['token (nominal p only)']}) | "
                     f"{row['positional']:>10} ({row['positional (nominal p only)']}) | "
                     f"{row['positional without position 0']}")
    lines += [f"    layer {la}: not in the census ({why})" for la, why in (r.get("layers_without_site") or {}).items()]
    lines.append(f"    {positional_finding(r)}")
    t = r["strongest"]["token"]
    if t is not None:
        toks = ", ".join(f"{x['token']!r} {x['mean_deviation']:+.3g} (n={x['count']})" for x in t["tokens"][:TOP_TOKENS])
        lines.append(f"    strongest token neuron: layer {t['layer']} #{t['neuron']}, share {t['share']:.2f} (cross-"
                     f"fitted {_cross(t['cross_share'])}), p {_p(t['p'])}{'' if t['is_kind'] else ' (below the level)'}: "
                     f"{toks}")
    for p in r["strongest"]["positional"][:1]:
        lines.append(f"    strongest positional neuron: layer {p['layer']} #{p['neuron']}, share {p['share']:.2f} (cross-"
                     f"fitted {_cross(p['cross_share'])}), p {_p(p['p'])}{'' if p['is_kind'] else ' (below the level)'}")
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("census", _stage_run, census_summary, reader=_stage_reader))


_register()
