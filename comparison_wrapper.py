"""Mamba vs Transformer: both models through the same measurements on the same texts.

Each model is profiled on its own tokenization of the same texts: the sparsity of its neuron site at
every layer (streamed), efficiency (parameters, neurons, measured time and memory against sequence
length, analytic FLOPs), when the main model's causal stage ran, the causal impacts of the other
model at the layer of the same relative depth, and with the attention stage, both models' attention
neurons. The other model's numbers are a run of the pipeline on it (`other_options`); `side_by_side`, a
pure function, sets the two sides together. Layers are matched by relative depth
layer / (n_layers − 1), always through the model adapters, never by raw hidden-state index.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

import stats
from utils import nested

logger = logging.getLogger(__name__)


@dataclass
class ModelRun:
    """One side of the comparison."""

    label: str
    model: object
    tokenizer: object
    adapter: object
    source: str = ""  # local, hub-cache, hub or reference


def relative_depth(layer: int, n_layers: int) -> float:
    return layer / max(1, n_layers - 1)


def matched_layer(rel: float, n_layers: int) -> int:
    """The layer of `n_layers` closest to relative depth `rel` (ties to the lower layer)."""
    return int(min(n_layers - 1, max(0, np.floor(rel * (n_layers - 1) + 0.5 - 1e-9))))


def resolve_compare_model(name: str | None, main_family: str):
    """(ModelSource, warning or None): the named model, or by default the other family's default model
    (gpt2 beside a Mamba, mamba-130m beside a Transformer), falling back to the shipped reference model
    of that family exactly as --model does."""
    from models import SSM_FAMILIES, resolve_default_model, resolve_model_source

    if name is None:
        return resolve_default_model("transformer" if main_family in SSM_FAMILIES else "mamba")
    return resolve_model_source(name, "--compare_model"), None


@dataclass
class Side:
    """One model's measurements, as the comparison sets them side by side: its label, adapter and where it
    came from, and its stage results (each a results dict, or None where that stage did not run)."""

    label: str
    adapter: object
    source: str  # "main", or the other model's origin: local, hub-cache, hub or reference
    layer: int
    texts: dict  # the run's "texts" entry (n_tokens, max_length, n_truncated)
    sparsity_by_layer: dict  # {layer: sparsity dict} for every layer
    sparsity_measured_in: str
    efficiency: dict
    causal: dict | None = None
    attention: dict | None = None
    faithfulness: dict | None = None
    faithfulness_skipped: str | None = None  # why the other model has no faithfulness results
    census: dict | None = None


def side_profile(side: Side) -> dict:
    """The "models" entry of one side."""
    import sparsity as sp

    n = side.adapter.n_layers
    return {"label": side.label, "family": side.adapter.family, "source": side.source, "n_layers": n,
            "layer": side.layer, "relative_depth": relative_depth(side.layer, n), "n_tokens": side.texts["n_tokens"],
            "max_length": side.texts["max_length"], "n_truncated": side.texts["n_truncated"],
            "sparsity_by_layer": side.sparsity_by_layer, "sparsity_measured_in": side.sparsity_measured_in,
            "multilayer": sp.multilayer_table(side.sparsity_by_layer), "efficiency": side.efficiency}


def _efficiency_ratio(neurons: dict) -> str | None:
    """The efficiency ratio with its note where it is uninformative at its threshold (None where absent)."""
    r = neurons.get("efficiency_ratio")
    if r is None:
        return None
    return f"{r:.4g}" + ("" if neurons.get("efficiency_ratio_informative", True) else
                         f" ({neurons.get('efficiency_ratio_note') or 'uninformative at its threshold'})")


def _shown_interval(f, layer: dict) -> str | None:
    """'value [low, high]' of one sparsity measure's interval dict at a layer (None where undefined or absent)."""
    try:
        d = f(layer)
    except (KeyError, TypeError):
        return None
    return None if d is None or d.get("value") is None else stats.shown(d, ".4g")


ATTENTION_NOTE = ("units: a state-space layer's channels (hidden attention α^c) or an attention layer's output dims "
                  "(their head's softmax weights), each side's by the kind of its matched layer, scored by the same "
                  "formulas, per query token; diversity is scale-free and "
                  "compares directly; mean activations are of the same kind but their scale is each model's own (a "
                  "Δ-weighted decay times a Mamba channel's scan input against a convex mix of a Transformer's "
                  "values); rollout scores lie in [0, 0.5] (a hybrid has no rollout: its layers below mix by different "
                  "mechanisms); methods only one side has are left out of the rows")


def side_by_side(main: Side, other: Side, sparsity_layers, attention_skipped: str | None = None,
                 site_note: str | None = None, n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """The comparison of two models' stage results on the same texts, with layers matched by relative
    depth (a pure function of the two sides). `sparsity_layers`: the main run's --sparsity_layers (each
    side lists those it has); the causal part is there when both sides have causal results (each side's
    site stated; `site_note`: why the sites are not of the same kind, from `paired_site`; intervals over
    the prompts, `n_resamples` draws with `seed`), the attention part when both have attention results
    (or {"skipped": `attention_skipped`})."""
    import attention_neurons as an

    sides = [side_profile(main), side_profile(other)]
    out = {"models": sides, "matched_layers": {main.label: main.layer, other.label: other.layer},
           "relative_depth": relative_depth(main.layer, main.adapter.n_layers),
           # each side lists those it has neurons at (a hybrid's layer may have none)
           "sparsity_layers": {s["label"]: [la for la in sparsity_layers if la in s["sparsity_by_layer"]] for s in sides},
           "threshold_note": "each model's traditional threshold is its family default unless "
                             "--sparsity_threshold was given (then the same for both)"}
    if main.causal is not None and other.causal is not None:
        out["causal"] = causal_side_by_side(main, other, site_note, n_resamples, seed)
    if attention_skipped is not None:
        out["attention"] = {"skipped": attention_skipped}
    elif main.attention is not None and other.attention is not None:
        models = {}
        for side in (main, other):
            by_layer = {la: {k: v for k, v in e.items() if k not in ("units", "definitions")}  # said once, below
                        for la, e in an.attention_by_layer(side.attention).items()}
            layers = sorted(by_layer)
            models[side.label] = {"family": side.adapter.family, "units": side.attention["units"],
                                  "n_layers": side.adapter.n_layers, "layers": layers,
                                  "relative_depth": [relative_depth(la, side.adapter.n_layers) for la in layers],
                                  "by_layer": by_layer}
        both = [m for m in main.attention["definitions"] if m in other.attention["definitions"]]
        out["attention"] = {"methods": both, "note": ATTENTION_NOTE, "models": models,
                            "matched_layers": {main.label: main.layer, other.label: other.layer}}
        one_side = {m: f"only {side.label} has it" for side in (main, other) for m in side.attention["definitions"]
                    if m not in both}
        if one_side:  # e.g. rollout, which a hybrid does not run
            out["attention"]["methods_left_out"] = one_side
        paths = {side.label: "the matched layer's attention path (Falcon-H1: the softmax heads beside its state-space "
                             "mixer) is in that model's own attention section, not in these rows (its state-space "
                             "path's hidden attention is)"
                 for side in (main, other) if "attention_path" in side.attention}
        if paths:
            out["attention"]["not_compared"] = paths
    if main.faithfulness is not None and other.faithfulness is not None:
        out["faithfulness"] = faithfulness_side_by_side(main, other)
    elif main.faithfulness is not None:
        out["faithfulness"] = {"skipped": f"{other.label}: {other.faithfulness_skipped or 'no faithfulness results'}"}
    if main.census is not None and other.census is not None:
        out["census"] = census_side_by_side(main, other)
    elif main.census is not None:
        out["census"] = {"skipped": f"{other.label}: its census did not succeed"}
    out["summary"] = summary_rows(out)
    return out


def census_side_by_side(main: Side, other: Side) -> dict:
    """Each model's census over relative depth (the share of each layer's neurons of each kind), with the
    level both were counted at and where positional neurons first appear."""
    from census import positional_finding

    models = {side.label: {"site": side.census["site"], "n_neurons": side.census["n_neurons"],
                           "by_depth": side.census["by_depth"], "finding": positional_finding(side.census),
                           "token_test": side.census["token_test"], "totals": side.census["totals"]["fractions"]}
              for side in (main, other)}
    return {"level": main.census["level"], "models": models,
            "note": "each model's own neuron site (a Mamba's ssm channels, a Transformer's MLP neurons, a hybrid's "
                    "neurons: each layer's ssm channels or dense MLP units by its kind) on its own "
                    "tokenization of the same texts, with the same census_alpha and census_min_share (the "
                    "Bonferroni level alpha / N uses each model's own N); layers set side by side by relative "
                    "depth"}


def faithfulness_side_by_side(main: Side, other: Side) -> dict:
    """Each side's faithfulness table (every ranking of its units against its own ground truth: Spearman,
    precision@k, normalised deletion area) and its spaces (site, unit, units), set side by side by ranking
    name: which method finds the units that matter on each model."""
    sides = {}
    for side in (main, other):
        f = side.faithfulness
        sides[side.label] = {"layer": side.layer, "table": f["table"], "left_out": f["left_out"],
                             "spaces": {n: {"site": s["site"], "unit": s["unit"], "n_units": s["n_units"],
                                            "ground_truth_from": s["ground_truth"]["from"],
                                            "n_sets_ablated": s["n_sets_ablated"]} for n, s in f["spaces"].items()}}
    names = list(dict.fromkeys(row["ranking"] for side in sides.values() for row in side["table"]))
    rows = [{"ranking": n, **{label: next((r for r in side["table"] if r["ranking"] == n), None)
                              for label, side in sides.items()}} for n in names]
    return {"models": sides, "rankings": rows,
            "note": "each model's rankings against its own ground truth (its units ablated one at a time at its own "
                    "unit site, on the same prompts); the normalised area is scale-free (1 = as good as that model's "
                    "ground truth ranking, 0 = random), but the units differ (a state-space layer's channels, an "
                    "attention layer's output dims) and so do their number and the k grid: read a difference "
                    "between the models as one of methods on different units, not on like units"}


def paired_site(main_adapter, main_site: str, other_adapter) -> tuple[str, str | None]:
    """(the other model's causal site, note or None): the other model's site of the same kind as `main_site`
    (models.SITE_KINDS: the block's write to the residual stream, the residual stream, the inner neurons).
    A site of a kind the other family lacks (a Transformer's attn_out or mlp_out, one part of its block's
    write, beside a Mamba, whose block writes one part) is paired with the other model's block write, and
    the note says so."""
    from models import SITE_KINDS

    kind = main_adapter.sites[main_site].kind
    same = other_adapter.sites.get(main_site)
    if same is not None and same.kind == kind:  # the same site (two Transformers: the same component)
        return main_site, None
    other = other_adapter.site_of_kind(kind)
    if other is not None:
        return other, None
    other = other_adapter.site_of_kind("write")
    return other, (f"{main_adapter.display_name}'s {main_site} is of kind '{kind}' ({SITE_KINDS[kind]}); "
                   f"{other_adapter.display_name} has no site of that kind, so its whole block write, {other}, "
                   f"stands beside it: not like with like (run --causal_site {main_adapter.site_of_kind('write')} "
                   "for the block write on both sides)")


def site_entry(adapter, site: str) -> dict:
    """What one side's causal site is: its name, kind and description."""
    spec = adapter.sites[site]
    return {"site": site, "site_kind": spec.kind, "site_description": spec.description}


def causal_side_by_side(main: Side, other: Side, site_note: str | None = None,
                        n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Each side's causal site (name, kind, description), layer and per-dimension mean KL with its interval,
    and the max and median over dimensions of the mean KL with intervals over the prompts (the statistic on
    each resample of the prompts' per-prompt KL; both sides use the same prompts and the same draws). A side
    without per-prompt scores (a result of an older run) has its max and median without interval."""
    out = {"pairing": "same kind" if site_note is None else "different kinds", "note": site_note,
           "prompts": main.causal["prompts"], "ablation": main.causal.get("ablation", "zero")}
    res = None
    for side in (main, other):
        c = side.causal
        scores = np.asarray(c["scores"], dtype=np.float64)
        entry = {"layer": side.layer, **site_entry(side.adapter, c["site"]), "n_dims": int(scores.shape[0]),
                 "scores": scores, "scores_low": c.get("scores_low"), "scores_high": c.get("scores_high")}
        ids = np.asarray(c["dims"]) if c.get("dims") is not None else np.arange(scores.shape[0])  # --causal_dims
        per_prompt = c.get("scores_per_prompt")
        if per_prompt is not None:
            kl = np.asarray(per_prompt, dtype=np.float64)  # (n_prompts, n_dims)
            res = res if res is not None and res.n == kl.shape[0] else stats.Resamples.draw(
                kl.shape[0], n_resamples, seed, "prompts")
            means = res.means(kl)  # (R, n_dims)
            top = int(np.argmax(scores))  # the top dimension, held fixed: a bootstrap of the max over dims is
            # biased upward (its point sits below its own interval), so the interval is the top dim's own
            entry["max_impact"] = {**stats.interval(scores[top], means[:, top], res), "dim": int(ids[top])}
            entry["median_impact"] = stats.interval(float(np.median(scores)), np.median(means, axis=1), res)
        else:
            entry["max_impact"] = {"value": float(scores.max()), "low": None, "high": None,
                                   "dim": int(ids[int(np.argmax(scores))])}
            entry["median_impact"] = {"value": float(np.median(scores)), "low": None, "high": None}
        out[side.label] = entry
    out["interval_method"] = None if res is None else res.method()
    out["definitions"] = {
        "scores": "per dimension of the side's site: the mean over prompts of KL(p_clean ‖ p_ablated) at the "
                  "last position (the causal stage's), with scores_low/high its 95% interval",
        "max_impact": "the largest mean KL over the site's dimensions, at dimension `dim`; its interval is that "
                      "dimension's own over the prompts (the dimension held fixed: a bootstrap of the max over "
                      "dimensions is biased upward and would not cover it)",
        "median_impact": "the median over the site's dimensions of the mean KL; interval: the median of the "
                         "resampled per-prompt means",
        "site_kind": "what the site is (models.SITE_KINDS): the block's write to the residual stream, the "
                     "residual stream, the inner neurons, or one component of a Transformer block's write",
    }
    return out


def _time_rows(add, sides, points_of, what: str, memory: bool) -> None:
    """Forward time (and peak memory, GFLOP/s) at the longest length measured on both sides' `points_of`."""
    measured = [{p["seq_len"]: p for p in (points_of(s) or [])} for s in sides]
    common = set.intersection(*(set(m) for m in measured))
    if not common:
        return
    L = max(common)
    add(f"forward time at L={L} (ms), {what}", lambda s: round(measured[sides.index(s)][L]["time_s"] * 1e3, 2))
    if memory:
        add(f"peak activation memory at L={L} (MiB)",
            lambda s: round(measured[sides.index(s)][L]["peak_memory_bytes"] / 2 ** 20, 2))
    add(f"achieved GFLOP/s at L={L}, {what}",
        lambda s: None if (g := measured[sides.index(s)][L].get("achieved_gflops_per_s")) is None else round(g, 3))


def _rounded(value, digits: int = 4):
    """A measure for the summary table, rounded; None (undefined: the entry's "undefined" says why) stays None."""
    return None if value is None else round(value, digits)


def summary_rows(comparison: dict) -> list[dict]:
    """The numbers of the summary table, one row per metric with one value per model. A measure undefined
    for a model (entropy sparsity, Gini, Hoyer, an attention method's diversity or mean activation) is
    None in its row."""
    import sparsity as sp

    rows = []
    sides = comparison["models"]

    def add(name, f):
        rows.append({"metric": name, **{s["label"]: f(s) for s in sides}})

    add("family", lambda s: s["family"])
    add("layers", lambda s: s["n_layers"])
    add("matched layer (relative depth)", lambda s: f"{s['layer']} ({s['relative_depth']:.2f})")
    timed = all(s["efficiency"] for s in sides)  # (saved comparisons of an earlier version may lack it)
    if timed:
        add("parameters (M)", lambda s: round(s["efficiency"]["parameters"]["total"] / 1e6, 3))
        add("neurons per layer (a hybrid: at its matched layer)", lambda s: s["efficiency"]["neurons"]["per_layer"])
        add("active neurons", lambda s: s["efficiency"]["neurons"].get("active"))
        add("efficiency ratio", lambda s: _efficiency_ratio(s["efficiency"]["neurons"]))
    layer_stats = {s["label"]: s["sparsity_by_layer"][s["layer"]] for s in sides}

    def traditional(s) -> str:
        t = layer_stats[s["label"]]["traditional"]
        return f"{t['sparsity']:.3f} ({t['threshold']:g})" + ("" if t.get("informative", True) else
                                                             f": uninformative at threshold {t['threshold']:g}")

    add("traditional sparsity (threshold)", traditional)
    for metric, f in sp.MULTILAYER_METRICS:  # each measure under its own name (population vs usage, H vs 1 − H)
        if metric in sp.MULTILAYER_INTERVALS and metric != "traditional":  # traditional: the row above
            add(metric + " [95%]", lambda s, m=metric: _shown_interval(sp.MULTILAYER_INTERVALS[m],
                                                                       layer_stats[s["label"]]))
    add("dead neurons", lambda s: layer_stats[s["label"]]["dead_neurons"]["count"])
    add("mean activation variance", lambda s: f"{layer_stats[s['label']]['activation_variance']['mean']:.3g}")

    if timed:
        eff = {s["label"]: s["efficiency"] for s in sides}
        add("timed implementation", lambda s: nested(eff[s["label"]], "scaling", "implementation", "name"))
        curves = {s["label"]: nested(eff[s["label"]], "architecture_curve", "curve") or "scaling" for s in sides}
        if any(c != "scaling" for c in curves.values()):
            add("architecture curve (implementation)",
                lambda s: f"{curves[s['label']]} ({nested(eff[s['label']], curves[s['label']], 'implementation', 'name')})"
                          + ("" if nested(eff[s["label"]], "architecture_curve", "exact") is not False else
                             ": the closest, still a Python loop"))
        _time_rows(add, sides, lambda s: nested(eff[s["label"]], "scaling", "points"), "the model's own forward", True)
        if any(c != "scaling" for c in curves.values()):
            _time_rows(add, sides, lambda s: nested(eff[s["label"]], curves[s["label"]], "points"), "architecture curve",
                       False)
        add("FLOPs per token at L=256 (M)", lambda s: round(s["efficiency"]["flops_per_token_at_256"]["total"] / 1e6, 2))
    if "causal" in comparison:
        c = comparison["causal"]
        add("causal site (kind, layer)", lambda s: f"{c[s['label']]['site']} ({c[s['label']]['site_kind']}, "
                                                   f"layer {c[s['label']]['layer']})")
        add("max causal impact (mean KL; top dim's interval)",
            lambda s: f"{stats.shown(c[s['label']]['max_impact'], '.3e')} (dim {c[s['label']]['max_impact']['dim']})")
        add("median causal impact (mean KL)", lambda s: stats.shown(c[s["label"]]["median_impact"], ".3e"))
    att = comparison.get("attention")
    if att is not None and "skipped" not in att:
        at = {s["label"]: att["models"][s["label"]]["by_layer"][att["matched_layers"][s["label"]]] for s in sides}
        add("attention: layer (units)", lambda s: f"{att['matched_layers'][s['label']]} "
                                                  f"({att['models'][s['label']]['units']['n_units']} "
                                                  f"{att['models'][s['label']]['units']['unit']}s)")
        for m in att["methods"]:
            add(f"attention {m}: mean activation [95%]",
                lambda s: None if (a := at[s["label"]]["methods"][m])["mean_activation"] is None else stats.shown(
                    {"value": a["mean_activation"], "low": a.get("mean_activation_low"),
                     "high": a.get("mean_activation_high")}, ".3e"))
            add(f"attention {m}: diversity [95%]",
                lambda s: None if (a := at[s["label"]]["methods"][m])["neuron_diversity"] is None else stats.shown(
                    {"value": a["neuron_diversity"], "low": a.get("neuron_diversity_low"),
                     "high": a.get("neuron_diversity_high")}, ".4f"))
    cz = comparison.get("census")
    if cz is not None and "skipped" not in cz:
        for kind, key in (("token", "token"), ("positional", "positional"),
                          ("positional without position 0", "positional_without_first"), ("dead", "dead")):
            add(f"census: {kind} neurons (share of all layers' neurons)",
                lambda s, key=key: f"{100 * cz['models'][s['label']]['totals'][key]:.1f}%")
    fz = comparison.get("faithfulness")
    if fz is not None and "skipped" not in fz:
        for row in fz["rankings"]:
            add(f"faithfulness: {row['ranking']} (ρ; area)",
                lambda s, row=row: _faithfulness_cell(row.get(s["label"])))
    return rows


def _faithfulness_cell(row: dict | None) -> str | None:
    """One side's faithfulness of one ranking, 'ρ … ; area …' (or that the model has no such ranking)."""
    if row is None:
        return "no such ranking"

    where = f" ({row['space']})" if row["space"] == "heads" else ""  # Mamba-2's Δ ranks heads, the rest channels
    return f"ρ {stats.shown(row['spearman'], '.2f')}; area {stats.shown(row['normalised_area'], '.2f')}{where}"


# --------------------------------------------------------------------------------------------------
# The comparison stage: the pipeline run again on the other model, then `side_by_side`
# --------------------------------------------------------------------------------------------------
@dataclass
class CompareModel:
    """The other model of a comparison, loaded (and checked whole) before the run: what main.py hands to
    the pipeline. `warning`: why it is not the model asked for (a fallback), or None."""

    loaded: object  # models.LoadedModel
    warning: str | None = None


def load_compare_model(name: str | None, main_family: str, device="cpu", dtype="float32") -> CompareModel:
    """`resolve_compare_model` and load it (the library path; main.py loads it before the first stage)."""
    from models import load_model_and_tokenizer

    source, warning = resolve_compare_model(name, main_family)
    return CompareModel(load_model_and_tokenizer(source, device, dtype, "--compare_model"), warning)


def _stage_reader(ctx):
    """The main model's sparsity at every layer (the comparison's "sparsity_by_layer"), read in the same
    text pass as the other text stages."""
    import sparsity as sp

    o = ctx.opts
    layers, _ = sp.site_layers(ctx.adapter, range(ctx.adapter.n_layers))  # a hybrid's: those with neurons
    return sp.SparsityRead(ctx.model, ctx.adapter, layers, ctx.tokens.input_ids, o.sparsity_threshold, o.dead_eps)


def other_options(opts, main_adapter, other_adapter, layer: int, stages, prefix: str):
    """The options of the other model's run: the main run's, with its layers at the same relative depths
    (the attention stage's too), every layer's sparsity, the other model's causal site of the same kind as
    the main run's (`paired_site`) and every one of its dimensions, and no layers of the main model's
    shape."""
    import dataclasses

    import attention_neurons as an

    def matched(la: int) -> int:
        return matched_layer(relative_depth(la, main_adapter.n_layers), other_adapter.n_layers)

    limit = other_adapter.max_positions
    return dataclasses.replace(
        opts, layer=matched(layer), layers=None, prefix=prefix, max_length=min(opts.max_length, limit or opts.max_length),
        attention_layers=tuple(sorted({matched(la) for la in an.stage_layers(opts, layer)})) if "attention" in stages
        else None, causal_site=paired_site(main_adapter, opts.causal_site or main_adapter.default_causal_site,
                                           other_adapter)[0],
        causal_dims=None, sparsity_layers=tuple(range(other_adapter.n_layers)))


def _stage_run(ctx, read: dict):
    """Both models through sparsity (every layer), efficiency, (when the causal stage ran) causal impacts
    and (with the attention stage) attention neurons, on the same texts; layers matched by relative depth.
    The other model's numbers are a run of the pipeline on it (`run_pipeline`, no plots) with
    `other_options`; the main model's are this run's stages (its efficiency measured here when that stage
    is not in the run)."""
    from functools import partial

    import comparison_plots as cp
    import efficiency as ef
    import sparsity as sp
    from models import NotApplicable, get_adapter
    from naming import model_prefix
    from pipeline import run_pipeline

    o = ctx.opts
    main_sparsity = read["stats"]
    if ctx.layer not in main_sparsity:  # a hybrid's layer without neurons of its own: nothing to pair
        ctx.adapter.site(sp.neuron_site(ctx.adapter), ctx.layer)  # raises NotApplicable with the layer's kind
    weight = next(ctx.model.parameters())  # the other model goes where the main model is, in its dtype
    compare = ctx.compare or load_compare_model(o.compare_model, ctx.adapter.family, weight.device, weight.dtype)
    model, tokenizer, source = compare.loaded
    label = model_prefix(source.requested, source.origin, source.resolved_path)
    if label == ctx.prefix:
        label += "_compare"
    other_adapter = get_adapter(model)
    causal, attention = ctx.upstream("causal"), ctx.upstream("attention")
    faithfulness, census = ctx.upstream("faithfulness"), ctx.upstream("census")
    skipped = None
    if "attention" in ctx.stages and attention is None:
        skipped = "the attention stage did not succeed (its error is listed with it)"
    stages = [*(["delta"] if faithfulness is not None and other_adapter.is_ssm and "delta" in ctx.stages else []),
              "sparsity", "efficiency", *(["causal"] if causal is not None else []),
              *(["attention"] if attention is not None else []), *(["census"] if census is not None else []),
              *(["faithfulness"] if faithfulness is not None else [])]
    opts = other_options(o, ctx.adapter, other_adapter, ctx.layer, stages, label)
    res = run_pipeline(model, tokenizer, list(ctx.texts), opts, stages, write_plots=False)
    # on the other model, delta is there only as a ranking for faithfulness (which says when it is missing), and
    # faithfulness or the census failing (or faithfulness finding no ranking to check) leaves the rest of the
    # comparison (which says so)
    if "attention" in stages and res["attention"]["status"] == "not_applicable":  # a hybrid's feed-forward layer
        skipped = f"{label}: {res['attention']['reason']}"
    if res["sparsity"]["status"] == "not_applicable":  # a hybrid's matched layer without neurons of its own
        raise NotApplicable(f"the other model's layer matched by depth has no neuron site to pair: "
                            f"{res['sparsity']['reason']}; choose another --layer")
    failed = [f"{n}: {res[n].get('error') or res[n].get('reason')}" for n in stages
              if res[n]["status"] != "ok" and n not in ("delta", "faithfulness", "census")
              and not (n == "attention" and res[n]["status"] == "not_applicable")]
    if failed:
        raise ValueError(f"the other model's {failed[0]}")
    other = Side(label, other_adapter, source.origin, opts.layer, res["texts"], res["sparsity"]["results"]["layers"],
                 res["sparsity"]["results"]["measured_in"], res["efficiency"]["results"],
                 res.get("causal", {}).get("results"), res.get("attention", {}).get("results"),
                 res.get("faithfulness", {}).get("results"),
                 res.get("faithfulness", {}).get("reason") or res.get("faithfulness", {}).get("error"),
                 res.get("census", {}).get("results"))
    efficiency = ctx.upstream("efficiency")
    if efficiency is None:  # not in this run: measured as the efficiency stage would
        import torch

        pool = torch.cat([ids[0] for ids in ctx.tokens.input_ids]).cpu().numpy()
        efficiency = ef.efficiency_metrics(ctx.model, ctx.adapter, pool, main_sparsity[ctx.layer],
                                           seq_lengths=o.seq_lengths or ef.SEQ_LENGTHS,
                                           efficiency_budget=o.efficiency_budget, progress=ctx.progress)
    main = Side(ctx.prefix, ctx.adapter, "main", ctx.layer, ctx.results["texts"], main_sparsity,
                read["measured_in"], efficiency, causal, attention, faithfulness, census=census)
    site_note = None
    if causal is not None:
        site_note = paired_site(ctx.adapter, causal["site"], other_adapter)[1]
    comp = side_by_side(main, other, _sparsity_layers(ctx), skipped, site_note, o.bootstrap_resamples, o.seed)
    comp["compare_model"] = {"requested": source.requested, "source": source.origin,
                             "resolved_path": source.resolved_path, "warning": compare.warning}
    comp["methods_at_matched_layers"] = cp.methods_table(comp)
    comp["parts_left_out"] = parts_left_out(ctx.stages, {"causal": causal, "attention": attention,
                                                         "faithfulness": faithfulness, "census": census})
    return comp, [partial(cp.comparison_plots, comp, ctx.plots_dir, f"{ctx.prefix}_vs_{label}")]


PART_FLAGS = {"causal": "add causal to --stages", "attention": "add --enable_attention",
              "faithfulness": "add faithfulness to --stages", "census": "add census to --stages"}


def parts_left_out(stages, results: dict) -> dict:
    """{part: why} for each part of the comparison that reads a main-model stage (causal, attention,
    faithfulness) and is not in it: the stage is not in the run (with the flag that adds it), or did not
    succeed."""
    return {part: (f"the {part} stage is not in this run ({PART_FLAGS[part]})" if part not in stages else
                   f"the {part} stage did not succeed (its entry says why)")
            for part, r in results.items() if r is None}


def _sparsity_layers(ctx) -> list[int]:
    """--sparsity_layers (each side keeps those it has neurons at: `side_by_side`)."""
    import sparsity as sp

    return sp.chosen_layers(ctx)


def comparison_summary(r: dict) -> str:
    labels = [s["label"] for s in r["models"]]
    c = r["compare_model"]
    lines = [f"    compared with {c['requested']} ({c['source']})" + (f"; {c['warning']}" if c["warning"] else "")]
    width = max(len(row["metric"]) for row in r["summary"])
    col = max(24, *(len(str(row[lab])) for row in r["summary"] for lab in labels), *(len(lab) for lab in labels))
    lines.append("    " + " " * width + " | " + " | ".join(f"{lab:>{col}}" for lab in labels))
    lines += [f"    {row['metric']:<{width}} | " + " | ".join(f"{str(row[lab]):>{col}}" for lab in labels)
              for row in r["summary"]]
    cz = r.get("causal")
    if cz is not None:
        sites = "; ".join(f"{lab}: {cz[lab]['site']} at layer {cz[lab]['layer']} ({cz[lab]['site_description']})"
                          for lab in labels)
        lines.append(f"    causal sites ({cz['pairing']}): {sites}")
        if cz.get("note"):
            lines.append(f"    causal note: {cz['note']}")
    att = r.get("attention")
    if att is not None:
        lines.append(f"    attention: {att['skipped'] if 'skipped' in att else att['note']}")
        lines += [f"    attention {m}: left out of the rows ({why})" for m, why in (att.get("methods_left_out") or {}).items()]
        lines += [f"    attention, {lab}: {why}" for lab, why in (att.get("not_compared") or {}).items()]
    fz = r.get("faithfulness")
    if fz is not None:
        lines.append(f"    faithfulness: {fz['skipped'] if 'skipped' in fz else fz['note']}")
    cz = r.get("census")
    if cz is not None:
        lines.append(f"    census: {cz['skipped']}" if "skipped" in cz else f"    census ({cz['level']}): "
                     + "; ".join(f"{lab}: {m['finding']}" for lab, m in cz["models"].items()))
    from efficiency import CURVE_KEYS, skipped_note

    for m in r["models"]:  # lengths a scaling curve did not run, and why (the summary table shows only times)
        for curve in CURVE_KEYS if m["efficiency"] else ():
            note = skipped_note(f"efficiency, {m['label']} ({curve.replace('_', ' ')})", m["efficiency"].get(curve) or {})
            if note:
                lines.append(f"    {note}")
    for part, why in (r.get("parts_left_out") or {}).items():
        lines.append(f"    left out of the comparison: {part}: {why}")
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("comparison", _stage_run, comparison_summary, reader=_stage_reader,
                   needs=("causal", "sparsity", "census", "faithfulness", "efficiency", "attention")))


_register()
