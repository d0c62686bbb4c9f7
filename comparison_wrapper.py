"""Mamba vs Transformer: both models through the same measurements on the same texts.

Each model is profiled on its own tokenization of the same texts: the sparsity of its neuron site at
every layer (streamed), efficiency (parameters, neurons, measured time and memory against sequence
length, analytic FLOPs), when the main model's causal stage ran, the causal impacts of the other
model at the layer of the same relative depth, and with the attention stage, both models' attention
neurons (`compare_attention`). Layers are matched by relative depth
layer / (n_layers − 1), always through the model adapters, never by raw hidden-state index.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

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


def model_tokens(run: ModelRun, texts, max_length: int):
    """The texts tokenized for one side (at most `max_length` tokens, and at most the model's positions)."""
    from utils import tokenize_texts

    limit = run.adapter.max_positions
    return tokenize_texts(run.tokenizer, texts, min(max_length, limit or max_length))


def profile_model(run: ModelRun, texts, layer: int, max_length: int, threshold: float | None, eps: float,
                  seq_lengths, budget_s: float, progress: bool = False, efficiency: dict | None = None,
                  sparsity: dict | None = None, sparsity_source: str = "its own forwards") -> dict:
    """Every layer's sparsity, the multi-layer table and the efficiency metrics of one model. `efficiency`
    and `sparsity` ({layer: dict} for every layer): already measured for this model on these texts with
    the same threshold and eps (e.g. by the efficiency and sparsity stages), and then not measured again.
    Recorded as "sparsity_measured_in": `sparsity_source`, where the given `sparsity` was measured, or with
    none given, how (and why) it is measured here (`sparsity.measured_in`)."""
    import torch

    import efficiency as ef
    import sparsity as sp

    tokens = model_tokens(run, texts, max_length)
    if sparsity is not None and set(sparsity) == set(range(run.adapter.n_layers)):
        per_layer = sparsity
    else:
        sparsity_source = sparsity_source if sparsity is None else "its own forwards"
        per_layer = sp.layer_sparsity(run.model, run.adapter, tokens.input_ids, range(run.adapter.n_layers),
                                      threshold, eps, progress=progress)
    pool = torch.cat([ids[0] for ids in tokens.input_ids]).cpu().numpy()
    eff = efficiency or ef.efficiency_metrics(run.model, run.adapter, pool, per_layer[layer], seq_lengths, budget_s,
                                              progress)
    return {"label": run.label, "family": run.adapter.family, "source": run.source, "n_layers": run.adapter.n_layers,
            "layer": layer, "relative_depth": relative_depth(layer, run.adapter.n_layers),
            "n_tokens": int(sum(tokens.lengths)), "max_length": tokens.max_length, "n_truncated": tokens.n_truncated,
            "sparsity_by_layer": per_layer, "sparsity_measured_in": sparsity_source,
            "multilayer": sp.multilayer_table(per_layer), "efficiency": eff}


def compare_models(main: ModelRun, other: ModelRun, texts, layer: int, max_length: int = 256,
                   threshold: float | None = None, eps: float = 1e-6, sparsity_layers=(0, 1, 2),
                   seq_lengths=None, budget_s: float = 15.0, causal: dict | None = None,
                   causal_batch_size: int | None = None, progress: bool = False, main_efficiency: dict | None = None,
                   main_sparsity: dict | None = None, attention: dict | None = None) -> dict:
    """Both models through the same measurements. `layer` is the main model's; the other model is read
    at the layer of the same relative depth. `causal`: the main model's causal-stage results (scores
    over a site); when given, the other model's impacts are computed at its matched layer with the same
    prompts and ablation, on its default site. `main_efficiency`: the main model's efficiency metrics if
    already measured (with the same threshold); `main_sparsity`: its sparsity at every layer, likewise.
    `attention`: `compare_attention`'s keyword arguments (methods, main_layers, main_by_layer, top_k), or
    {"skipped": reason} to record why there is no attention part. The attention part runs first: its
    gradient pass is a full forward of each text by the other model, and the other model's sparsity at
    every layer is read from those forwards (`sparsity.ForwardFeed`) instead of forwards of its own."""
    import efficiency as ef
    import sparsity as sp

    seq_lengths = seq_lengths or ef.SEQ_LENGTHS
    rel = relative_depth(layer, main.adapter.n_layers)
    other_layer = matched_layer(rel, other.adapter.n_layers)
    att, other_sparsity, other_source = attention, None, "its own forwards"
    if attention is not None and "skipped" not in attention:
        feed = None
        if "gradient_guided" in attention["methods"]:
            feed = sp.ForwardFeed(other.model, other.adapter, model_tokens(other, texts, max_length).input_ids,
                                  range(other.adapter.n_layers))
        att = compare_attention(main, other, texts, max_length, layer, progress=progress, other_feed=feed,
                                **attention)
        other_sparsity = feed and feed.result(threshold, eps)
        other_source = sp.measured_in(feed, "the attention part's gradient forwards")
    sides = [profile_model(run, texts, la, max_length, threshold, eps, seq_lengths, budget_s, progress, eff, spars,
                           source)
             for run, la, eff, spars, source in (
                 (main, layer, main_efficiency, main_sparsity,
                  "its own forwards" if main_sparsity is None else "the sparsity stage"),
                 (other, other_layer, None, other_sparsity, other_source))]
    out = {"models": sides, "matched_layers": {main.label: layer, other.label: other_layer},
           "relative_depth": rel,
           "sparsity_layers": {s["label"]: [la for la in sparsity_layers if la < s["n_layers"]] for s in sides},
           "threshold_note": "each model's traditional threshold is its family default unless "
                             "--sparsity_threshold was given (then the same for both)"}
    if causal is not None:
        import causal_analysis as ca

        scores = ca.causal_impact_scores(other.model, other.tokenizer, causal["prompts"], other_layer, None,
                                         causal["intervention_scale"], causal["ablation"], None, causal_batch_size,
                                         progress)
        out["causal"] = {
            main.label: {"layer": layer, "site": causal["site"], "scores": np.asarray(causal["scores"])},
            other.label: {"layer": other_layer, "site": other.adapter.default_causal_site, "scores": scores},
            "prompts": causal["prompts"], "ablation": causal.get("ablation", "zero")}
    if att is not None:
        out["attention"] = att
    out["summary"] = summary_rows(out)
    return out


ATTENTION_NOTE = ("units: Mamba's channels (hidden attention α^c) and a Transformer's attention-output dims (their "
                  "head's softmax weights), scored by the same formulas; diversity is scale-free and compares "
                  "directly, mean activations are of the same kind but their scale is model-specific")


def compare_attention(main: ModelRun, other: ModelRun, texts, max_length: int, layer: int, methods, main_layers,
                      main_by_layer: dict | None = None, top_k: int = 10, progress: bool = False,
                      other_feed=None) -> dict:
    """Both models' attention neurons (`attention_neurons.attention_profile`, each on its own tokenization of
    the texts): the main model at `main_layers` (`layer`, the main model's --layer, among them), the other at
    the layers of the same relative depths. `main_by_layer`: the main model's profile at `main_layers` if
    already measured on these texts (the attention stage's, whose first-text maps are at `layer`), then not
    measured again. Returns {"methods", "note", "matched_layers" (`layer` and its match: the summary rows and
    the maps), "models": {label: {"family", "units", "n_layers", "layers", "relative_depth", "by_layer":
    {layer: profile entry}}}}; the entries at the matched layers hold the first text's attention vector (L, L).
    `other_feed`: a `sparsity.ForwardFeed` given the other model's gradient forwards."""
    import attention_neurons as an

    main_layers = sorted({layer, *main_layers})
    other_layers = sorted({matched_layer(relative_depth(la, main.adapter.n_layers), other.adapter.n_layers)
                           for la in main_layers})
    matched = {main.label: layer, other.label: matched_layer(relative_depth(layer, main.adapter.n_layers),
                                                             other.adapter.n_layers)}
    models = {}
    for run, layers, done, feed in ((main, main_layers, main_by_layer, None), (other, other_layers, None, other_feed)):
        analyzer = an.attention_neurons_for(run.model)
        if done is None:
            done = an.attention_profile(analyzer, model_tokens(run, texts, max_length).input_ids, layers, methods,
                                        top_k, progress, desc=f"attention {run.label}", maps_at={matched[run.label]},
                                        feed=feed)
        models[run.label] = {"family": run.adapter.family, "units": analyzer.describe_units(),
                             "n_layers": run.adapter.n_layers, "layers": layers,
                             "relative_depth": [relative_depth(la, run.adapter.n_layers) for la in layers],
                             "by_layer": {la: done[la] for la in layers}}
    return {"methods": list(methods), "note": ATTENTION_NOTE, "models": models, "matched_layers": matched}


def _rounded(value, digits: int = 4):
    """A measure for the summary table, rounded; None (undefined: the entry's "undefined" says why) stays None."""
    return None if value is None else round(value, digits)


def summary_rows(comparison: dict) -> list[dict]:
    """The numbers of the summary table, one row per metric with one value per model. A measure undefined
    for a model (entropy sparsity, Gini, Hoyer, an attention method's diversity or mean activation) is
    None in its row."""
    rows = []
    sides = comparison["models"]

    def add(name, f):
        rows.append({"metric": name, **{s["label"]: f(s) for s in sides}})

    add("family", lambda s: s["family"])
    add("layers", lambda s: s["n_layers"])
    add("matched layer (relative depth)", lambda s: f"{s['layer']} ({s['relative_depth']:.2f})")
    add("parameters (M)", lambda s: round(s["efficiency"]["parameters"]["total"] / 1e6, 3))
    add("neurons per layer", lambda s: s["efficiency"]["neurons"]["per_layer"])
    add("active neurons", lambda s: s["efficiency"]["neurons"].get("active"))
    add("efficiency ratio", lambda s: round(s["efficiency"]["neurons"].get("efficiency_ratio", float("nan")), 4))
    layer_stats = {s["label"]: s["sparsity_by_layer"][s["layer"]] for s in sides}
    add("traditional sparsity (threshold)", lambda s: f"{layer_stats[s['label']]['traditional']['sparsity']:.3f} "
                                                      f"({layer_stats[s['label']]['traditional']['threshold']:g})")
    add("entropy sparsity", lambda s: _rounded(layer_stats[s["label"]]["entropy"]["sparsity"]))
    add("Gini", lambda s: _rounded(layer_stats[s["label"]]["gini"]))
    add("Hoyer", lambda s: _rounded(layer_stats[s["label"]]["hoyer"]))
    add("dead neurons", lambda s: layer_stats[s["label"]]["dead_neurons"]["count"])
    add("mean activation variance", lambda s: f"{layer_stats[s['label']]['activation_variance']['mean']:.3g}")

    measured = [{p["seq_len"]: p for p in s["efficiency"]["scaling"]["points"]} for s in sides]
    common = set.intersection(*(set(m) for m in measured))
    if common:  # the longest length measured on both models
        L = max(common)
        add(f"forward time at L={L} (ms)", lambda s: round(measured[sides.index(s)][L]["time_s"] * 1e3, 2))
        add(f"peak activation memory at L={L} (MiB)",
            lambda s: round(measured[sides.index(s)][L]["peak_memory_bytes"] / 2 ** 20, 2))
    add("FLOPs per token at L=256 (M)", lambda s: round(s["efficiency"]["flops_per_token_at_256"]["total"] / 1e6, 2))
    if "causal" in comparison:
        c = comparison["causal"]
        add("max causal impact (mean KL)", lambda s: f"{np.max(c[s['label']]['scores']):.3e}")
        add("median causal impact (mean KL)", lambda s: f"{np.median(c[s['label']]['scores']):.3e}")
    att = comparison.get("attention")
    if att is not None and "skipped" not in att:
        at = {s["label"]: att["models"][s["label"]]["by_layer"][att["matched_layers"][s["label"]]] for s in sides}
        add("attention: layer (units)", lambda s: f"{att['matched_layers'][s['label']]} "
                                                  f"({att['models'][s['label']]['units']['n_units']} "
                                                  f"{att['models'][s['label']]['units']['unit']}s)")
        for m in att["methods"]:
            add(f"attention {m}: mean activation",
                lambda s: None if (v := at[s["label"]]["methods"][m]["mean_activation"]) is None else f"{v:.3e}")
            add(f"attention {m}: diversity", lambda s: _rounded(at[s["label"]]["methods"][m]["neuron_diversity"]))
    return rows
