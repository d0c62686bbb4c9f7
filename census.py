"""The neuron census: dead, token and positional neurons at every layer's neuron site, after Voita et al.
2023 ("Neurons in LLMs: dead, n-gram, positional").

Shapes: T texts, read one at a time (L tokens each); N neurons of a layer's site (`sparsity.neuron_site`:
a Mamba's ssm channels, the inner width e; a Transformer's MLP neurons); k groups (distinct tokens, or
positions).

Per neuron of every layer, streamed over the text pass (running sums only: `LayerCensus`):
1. **dead**: |a| < --dead_eps on every token (as the sparsity stage counts them).
2. **within-text deviations**: each text's own mean activation is subtracted (per neuron), so that a
   neuron that tracks only which text it reads (its topic) is counted as neither kind.
3. **token share**: how much of a neuron's within-text variance the current token's identity explains.
   The one-way analysis of variance with the token as the group, over the positions whose token occurs
   at least twice in the texts (a token seen once has no spread of its own). The share is the adjusted
   η², ε² = 1 − (SS_within / df_within) / (SS_total / df_total): about 0 for a neuron the token does not
   drive, however many distinct tokens there are (plain η² = SS_between / SS_total grows with the number
   of groups: with k groups of pure noise its expectation is (k − 1) / (n − 1)). Its p-value is the
   F-test's, P(F ≥ observed), F = (SS_between / df_between) / (SS_within / df_within), df_between =
   k − 1, df_within = n − k − (T − 1) (the T text means removed cost T − 1 more).
4. **position share**: the same with the absolute position (0, 1, ...) as the group, over the positions
   at least two texts reach; and again without position 0 (the first token is special in every model:
   no history in a Mamba, the attention sink in a Transformer).
5. A neuron is a **token (positional) neuron** when its p-value is below --census_alpha / N (Bonferroni
   over the layer's N neurons: at most a census_alpha chance of any false one in a layer) and its share
   is at least --census_min_share. Counts per layer; a neuron can be both kinds.

Why the F-test rather than a permutation null: a permutation null needs every activation kept, or each
permutation's group sums (draws × k × N per layer), while the F-test needs one set of group sums; for
these sample sizes its p-value is what the permutation test approximates, and the suite checks its
false-positive rate on shuffled activations. The statistics assume the positions within a group are
independent; positions of one text are not (the text means removed take out their shared level).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

import stats

logger = logging.getLogger(__name__)

CENSUS_BYTES = 1 << 30  # the group sums' memory (float64, every layer): the most frequent tokens that fit
TOP_TOKENS = 5  # each top token neuron's tokens listed
PLOTTED_TOKENS = 20  # the strongest token neuron's tokens in its plot
PLOTTED_POSITIONAL = 3  # the strongest positional neurons in their plot

DEFINITIONS = {
    "site": "each layer's neuron site: a Mamba's ssm channels (the inner width), a Transformer's MLP neurons",
    "deviation": "a neuron's activation minus its mean over the text it is in (each text's own level removed)",
    "token_share": "adjusted η² of the within-text deviation with the current token as the group, over the "
                   "positions whose token occurs at least twice: 1 − (SS_within/df_within)/(SS_total/df_total); "
                   "about 0 when the token does not drive the neuron, 1 when it determines it",
    "position_share": "the same with the absolute position as the group, over the positions at least two texts "
                      "reach; position_share_without_first leaves position 0 out",
    "p": "the F-test's P(F ≥ observed), df_between = k − 1, df_within = n − k − (T − 1) (k groups, n positions, "
         "T texts)",
    "kind": "token (positional) neuron: p below alpha / N (Bonferroni over the layer's N neurons) and share at "
            "least min_share; dead: |a| < eps on every token",
    "top_tokens": "the tokens with the largest mean deviation in absolute value (count: the token's positions)",
}


@dataclass(frozen=True)
class Groups:
    """Which positions enter each test, known before the pass from the token ids: `token_of` {token id:
    group} for the tokens seen at least twice (the most frequent first, as many as `CENSUS_BYTES` allows),
    their counts `token_counts` (k,), `positions` P (the positions at least two texts reach, as many as
    fit) with `position_counts` (P,)."""

    token_of: dict
    token_ids: np.ndarray  # (k,) the token of each group
    token_counts: np.ndarray  # (k,)
    token_texts: int  # texts with at least one position in the token test
    positions: int
    position_counts: np.ndarray  # (P,)
    n_tokens: int
    tokens_left_out: int  # repeated tokens beyond the memory budget (their positions leave the token test)


def plan_groups(input_ids, n_neurons: int, n_layers: int, budget: int = CENSUS_BYTES) -> Groups:
    """The groups of both tests from the texts' token ids (a list of (1, L) tensors)."""
    seqs = [ids.reshape(-1).cpu().numpy() for ids in input_ids]
    lengths = np.array([len(s) for s in seqs])
    per_group = n_neurons * n_layers * 8  # bytes of one group's sums, every layer
    reach = np.array([(lengths > p).sum() for p in range(int(lengths.max()))])  # texts reaching position p
    positions = int((reach >= 2).sum())
    positions = min(positions, max(1, budget // 2 // per_group))
    ids, counts = np.unique(np.concatenate(seqs), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    repeated = order[counts[order] >= 2]
    room = max(0, (budget - positions * per_group) // per_group)
    kept = repeated[:room]
    token_of = {int(ids[g]): i for i, g in enumerate(kept)}
    texts = sum(any(int(t) in token_of for t in s) for s in seqs)
    return Groups(token_of, ids[kept], counts[kept], texts, positions, reach[:positions], int(lengths.sum()),
                  len(repeated) - len(kept))


class LayerCensus:
    """One layer's running sums (float64): the max |a| (dead), and per test the group sums of the within-text
    deviations S (k, N) and their sum of squares Q (N) over the positions in the test (and at position 0)."""

    def __init__(self, n_neurons: int, groups: Groups):
        n = n_neurons
        self.max_abs = torch.zeros(n, dtype=torch.float64)
        self.tok_S = torch.zeros(len(groups.token_ids), n, dtype=torch.float64)
        self.tok_Q = torch.zeros(n, dtype=torch.float64)
        self.pos_S = torch.zeros(groups.positions, n, dtype=torch.float64)
        self.pos_Q = torch.zeros(n, dtype=torch.float64)
        self.first_Q = torch.zeros(n, dtype=torch.float64)  # at position 0

    def add(self, a: torch.Tensor, token_group: torch.Tensor, positions: int) -> None:
        """One text's activations a (L, N) float64, each position's token group (L,) (−1: not in the test)."""
        self.max_abs = torch.maximum(self.max_abs, a.abs().amax(0))
        dev = a - a.mean(0)  # (L, N) within-text deviations
        inside = token_group >= 0
        self.tok_S.index_add_(0, token_group[inside], dev[inside])
        self.tok_Q += dev[inside].square().sum(0)
        p = min(positions, dev.shape[0])
        self.pos_S[:p] += dev[:p]
        self.pos_Q += dev[:p].square().sum(0)
        self.first_Q += dev[0].square()


def group_test(S: np.ndarray, counts: np.ndarray, Q: np.ndarray, n_texts: int, scale: np.ndarray) -> dict:
    """The one-way analysis of variance of each neuron's deviations by group, from the group sums S (k, N),
    the group sizes `counts` (k,), the sum of squares Q (N) and the texts they come from; `scale` (N): each
    neuron's largest |a| (a neuron with no spread on that scale has no share). {"share" (N) adjusted η²,
    "eta_squared" (N), "p" (N) (NaN where undefined), "df": [between, within], "undefined": why or None}."""
    k, n = len(counts), int(counts.sum())
    df_b, df_w = k - 1, n - k - (n_texts - 1)
    nan = np.full(S.shape[1], np.nan)
    if k < 2 or df_w < 1:
        why = (f"{k} group{'s' if k != 1 else ''}: nothing to compare" if k < 2 else
               f"{n} positions in {k} groups from {n_texts} texts leave no degrees of freedom within the groups")
        return {"share": nan, "eta_squared": nan, "p": nan, "df": [df_b, df_w], "undefined": why}
    total = S.sum(0)  # (N,)
    ss_total = Q - total ** 2 / n
    ss_between = (S ** 2 / counts[:, None]).sum(0) - total ** 2 / n
    ss_within = np.maximum(ss_total - ss_between, 0.0)
    defined = ss_total > 1e-12 * n * np.maximum(scale, 1e-300) ** 2  # a neuron with spread at its own scale
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(defined, 1.0 - (ss_within / df_w) / (ss_total / (df_b + df_w)), np.nan)
        eta = np.where(defined, ss_between / ss_total, np.nan)
        f = np.where(defined, (ss_between / df_b) / (ss_within / df_w), np.nan)
    p = np.full_like(f, np.nan)
    p[defined] = stats.f_survival(f[defined], df_b, df_w)
    return {"share": share, "eta_squared": eta, "p": p, "df": [df_b, df_w], "undefined": None}


class CensusReader:
    """The census stage's reader of the text pass: every layer's neuron site (`request`), each text's
    activations into each layer's `LayerCensus` (`read`), the tests per layer (`finish`)."""

    def __init__(self, adapter, input_ids, layers=None):
        import sparsity as sp

        self.adapter = adapter
        self.layers = list(range(adapter.n_layers)) if layers is None else list(layers)
        self.sites = sp.site_map(adapter, self.layers)
        self.n_neurons = next(iter(self.sites.values())).size
        self.groups = plan_groups(input_ids, self.n_neurons, len(self.layers))
        self.census = {la: LayerCensus(self.n_neurons, self.groups) for la in self.layers}
        self.n_texts = 0

    @property
    def request(self):
        from passes import TextRequest

        return TextRequest(sites=frozenset(self.layers))

    def read(self, text) -> None:
        ids = text.ids.reshape(-1).tolist()
        group = torch.tensor([self.groups.token_of.get(t, -1) for t in ids], dtype=torch.long)  # (L,)
        for la in self.layers:
            a = torch.from_numpy(np.asarray(text.sites[la])).to(torch.float64)  # (L, N)
            self.census[la].add(a, group, self.groups.positions)
        self.n_texts += 1

    def finish(self) -> dict:
        g = self.groups
        out = {}
        for la, c in self.census.items():
            scale = c.max_abs.numpy()
            pos_S, first_Q = c.pos_S.numpy(), c.first_Q.numpy()
            with_first = group_test(pos_S, g.position_counts, c.pos_Q.numpy(), self.n_texts, scale)
            without = group_test(pos_S[1:], g.position_counts[1:], c.pos_Q.numpy() - first_Q,
                                 int(g.position_counts[1]) if g.positions > 1 else 0, scale)
            out[la] = {"max_abs": scale, "site": self.sites[la].name,
                       "token": group_test(c.tok_S.numpy(), g.token_counts, c.tok_Q.numpy(), g.token_texts, scale),
                       "position": with_first, "position_without_first": without,
                       "token_means": c.tok_S.numpy() / np.maximum(g.token_counts, 1)[:, None],  # (k, N)
                       "position_means": pos_S / np.maximum(g.position_counts, 1)[:, None]}  # (P, N)
        return {"layers": out, "groups": g, "n_texts": self.n_texts}


def classify(test: dict, alpha: float, min_share: float, n_neurons: int, dead: np.ndarray) -> np.ndarray:
    """(N,) bool: the neurons of the kind (p < alpha / N and share ≥ min_share; never a dead one)."""
    with np.errstate(invalid="ignore"):
        return (test["p"] < alpha / n_neurons) & (test["share"] >= min_share) & ~dead


def _decoded(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def _top_tokens(means: np.ndarray, groups: Groups, neuron: int, tokenizer, n: int) -> list[dict]:
    col = means[:, neuron]  # (k,)
    order = np.argsort(-np.abs(col), kind="stable")[:n]
    return [{"token": _decoded(tokenizer, groups.token_ids[g]), "token_id": int(groups.token_ids[g]),
             "count": int(groups.token_counts[g]), "mean_deviation": float(col[g])} for g in order]


def _none_for_nan(a: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64)]


def _kind_entry(test: dict, is_kind: np.ndarray, alpha: float, n: int, top_k: int, extra=None) -> dict:
    """One kind at one layer: its count and share of the layer's neurons, how many pass the test at any
    share, the top neurons by share, and the per-neuron shares and p-values."""
    with np.errstate(invalid="ignore"):
        significant = int((test["p"] < alpha / n).sum())
    share = test["share"]
    finite = np.isfinite(share)
    order = [int(i) for i in np.argsort(-np.where(finite, share, -np.inf), kind="stable")[:top_k] if finite[i]]
    top = [{"neuron": i, "share": float(share[i]), "p": float(test["p"][i]), "is_kind": bool(is_kind[i]),
            **(extra(i) if extra else {})} for i in order]
    return {"count": int(is_kind.sum()), "fraction": float(is_kind.sum()) / n, "significant_any_share": significant,
            "undefined_neurons": int((~finite).sum()), "df": test["df"], "undefined": test["undefined"],
            "median_share": None if not finite.any() else float(np.median(share[finite])), "top": top,
            "share_per_neuron": _none_for_nan(share), "p_per_neuron": _none_for_nan(test["p"])}


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
        token = classify(r["token"], alpha, min_share, n, dead)
        pos = classify(r["position"], alpha, min_share, n, dead)
        pos_wo = classify(r["position_without_first"], alpha, min_share, n, dead)
        tokens = _kind_entry(r["token"], token, alpha, n, top_k,
                             lambda i: {"top_tokens": _top_tokens(r["token_means"], g, i, tokenizer, TOP_TOKENS)})
        without = r["position_without_first"]["share"]
        position = _kind_entry(r["position"], pos, alpha, n, top_k,
                               lambda i: {"share_without_first": None if not np.isfinite(without[i])
                                          else float(without[i])})
        position["count_without_first"] = int(pos_wo.sum())
        position["fraction_without_first"] = float(pos_wo.sum()) / n
        position["undefined_without_first"] = r["position_without_first"]["undefined"]
        layers[la] = {"layer": la, "relative_depth": la / max(1, adapter.n_layers - 1), "site": r["site"],
                      "n_neurons": n, "dead": {"count": int(dead.sum()), "fraction": float(dead.sum()) / n,
                                               "indices": [int(i) for i in np.flatnonzero(dead)]},
                      "token": tokens, "position": position}
        if tokens["top"] and (strongest_token is None or tokens["top"][0]["share"] > strongest_token["share"]):
            i = tokens["top"][0]["neuron"]
            strongest_token = {"layer": la, "neuron": i, "share": tokens["top"][0]["share"],
                               "p": tokens["top"][0]["p"], "is_kind": tokens["top"][0]["is_kind"],
                               "tokens": _top_tokens(r["token_means"], g, i, tokenizer, PLOTTED_TOKENS)}
        positional += [{"layer": la, "neuron": t["neuron"], "share": t["share"], "p": t["p"], "is_kind": t["is_kind"],
                        "share_without_first": t["share_without_first"],
                        "means_by_position": _none_for_nan(r["position_means"][:, t["neuron"]])}
                       for t in position["top"][:PLOTTED_POSITIONAL]]
    positional = sorted(positional, key=lambda t: -t["share"])[:PLOTTED_POSITIONAL]
    first = [la for la, e in layers.items() if e["position"]["count"]]
    first_wo = [la for la, e in layers.items() if e["position"]["count_without_first"]]
    return {"site": next(iter(layers.values()))["site"], "n_neurons": next(iter(layers.values()))["n_neurons"],
            "n_layers": len(layers), "n_texts": read["n_texts"], "n_tokens": g.n_tokens,
            "alpha": alpha, "min_share": min_share, "dead_eps": dead_eps,
            "level": f"p < {alpha:g} / N per neuron (Bonferroni over a layer's N neurons: at most a {alpha:g} chance "
                     f"of any false one per layer) and share ≥ {min_share:g}",
            "token_test": {"groups": len(g.token_ids), "positions": int(g.token_counts.sum()),
                           "positions_fraction": float(g.token_counts.sum()) / max(1, g.n_tokens),
                           "tokens_left_out": g.tokens_left_out,
                           "note": "positions whose token occurs at least twice" + (
                               f"; {g.tokens_left_out} more repeated tokens left out (the group sums' memory budget)"
                               if g.tokens_left_out else "")},
            "position_test": {"positions": g.positions, "note": "positions 0.. reached by at least two texts"},
            "position_encoding": adapter.position_encoding,
            "absolute_position_input": adapter.position_embedding_path is not None,
            "positional_from_layer": first[0] if first else None,
            "positional_from_layer_without_first": first_wo[0] if first_wo else None,
            "layers": layers, "by_depth": by_depth(layers),
            "strongest": {"token": strongest_token, "positional": positional},
            "definitions": DEFINITIONS}


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
                                      "within-text deviations by token (or position).", 150),
             fontsize=7, va="bottom")
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    return save_figure(fig, plots_dir, name)


def plot_strongest(results: dict, plots_dir, name: str) -> str:
    """The strongest token neuron's mean deviation per token, and the strongest positional neurons' mean
    deviation per position."""
    import matplotlib.pyplot as plt

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
        ax0.set(ylabel="mean deviation from the text's mean",
                title=f"strongest token neuron: layer {t['layer']} #{t['neuron']}, share {t['share']:.2f}"
                      + ("" if t["is_kind"] else " (below the level)"))
    for i, p in enumerate(results["strongest"]["positional"]):
        y = np.array([np.nan if v is None else v for v in p["means_by_position"]])
        wo = "undefined" if p["share_without_first"] is None else f"{p['share_without_first']:.2f}"
        ax1.plot(range(len(y)), y, color=f"C{i + 3}", label=f"layer {p['layer']} #{p['neuron']}: share {p['share']:.2f} "
                 f"({wo} without position 0)" + ("" if p["is_kind"] else "; below the level"))
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(xlabel="position (token index in the text)", ylabel="mean deviation from the text's mean",
            title="strongest positional neurons")
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


def positional_finding(r: dict) -> str:
    """Where positional neurons appear, said for a model without a position embedding as a finding."""
    if not r["position_test"]["positions"]:
        return "the position test is undefined: no position is reached by two texts (give at least two)"
    none = r["positional_from_layer"] is None
    told = r["position_encoding"] or "no position input (positions only through the recurrence's order)"
    head = f"{told}: " if r["absolute_position_input"] else f"{told}, yet " if not none else f"{told}; "
    if none:
        weaker = max(e["position"]["significant_any_share"] for e in r["layers"].values())
        top = r["strongest"]["positional"]
        tail = ("" if not weaker else f" (the position test passes at smaller shares for up to {weaker} neurons of a "
                f"layer; the largest share is {top[0]['share']:.2f}, layer {top[0]['layer']} #{top[0]['neuron']})")
        return f"{head}positional neurons at the level at no layer{tail}"
    wo = r["positional_from_layer_without_first"]
    return (f"{head}positional neurons from layer {r['positional_from_layer']}; leaving position 0 out, "
            + (f"from layer {wo}" if wo is not None else "at no layer"))


def table_rows(r: dict) -> list[dict]:
    """The census per layer, one row each (the report's table): each kind's count at the level, and in
    brackets how many pass the test at any share."""
    rows = []
    for la, e in r["layers"].items():
        t, p = e["token"], e["position"]
        rows.append({"layer": la, "relative depth": round(e["relative_depth"], 3), "neurons": e["n_neurons"],
                     "dead": e["dead"]["count"], "token": t["count"], "token (p only)": t["significant_any_share"],
                     "median token share": t["median_share"], "positional": p["count"],
                     "positional (p only)": p["significant_any_share"],
                     "positional without position 0": p["count_without_first"],
                     "median position share": p["median_share"]})
    return rows


def _p(p: float) -> str:
    return "< 1e-300" if p == 0 else f"{p:.1e}"


def census_summary(r: dict) -> str:
    tt, pt = r["token_test"], r["position_test"]
    lines = [f"    site {r['site']} ({r['n_neurons']} neurons per layer, {r['n_layers']} layers), {r['n_tokens']} "
             f"tokens, {r['n_texts']} texts; each neuron's within-text deviations (its text's mean removed)",
             f"    a kind counts where {r['level']}; share: adjusted η² (definitions)",
             f"    token test: {tt['groups']} tokens seen twice or more, {tt['positions']} positions "
             f"({_pct(tt['positions_fraction'])} of the tokens){'; ' + tt['note'].split('; ', 1)[1] if tt['tokens_left_out'] else ''}; "
             + (f"position test: positions 0-{pt['positions'] - 1} (reached by at least two texts)" if pt["positions"]
                else "position test: undefined (no position is reached by two texts)"),
             "    layer | dead | token (p only) | positional (p only) | positional without position 0   [p only: the "
             "neurons that pass the test at any share]"]
    for row in table_rows(r):
        lines.append(f"    {row['layer']:>5} | {row['dead']:>4} | {row['token']:>5} ({row['token (p only)']}) | "
                     f"{row['positional']:>10} ({row['positional (p only)']}) | {row['positional without position 0']}")
    lines.append(f"    {positional_finding(r)}")
    t = r["strongest"]["token"]
    if t is not None:
        toks = ", ".join(f"{x['token']!r} {x['mean_deviation']:+.3g} (n={x['count']})" for x in t["tokens"][:TOP_TOKENS])
        lines.append(f"    strongest token neuron: layer {t['layer']} #{t['neuron']}, share {t['share']:.2f}, "
                     f"p {_p(t['p'])}{'' if t['is_kind'] else ' (below the level)'}: {toks}")
    for p in r["strongest"]["positional"][:1]:
        lines.append(f"    strongest positional neuron: layer {p['layer']} #{p['neuron']}, share {p['share']:.2f}, "
                     f"p {_p(p['p'])}{'' if p['is_kind'] else ' (below the level)'}")
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("census", _stage_run, census_summary, reader=_stage_reader))


_register()
