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


def side_profile(side: Side) -> dict:
    """The "models" entry of one side."""
    import sparsity as sp

    n = side.adapter.n_layers
    return {"label": side.label, "family": side.adapter.family, "source": side.source, "n_layers": n,
            "layer": side.layer, "relative_depth": relative_depth(side.layer, n), "n_tokens": side.texts["n_tokens"],
            "max_length": side.texts["max_length"], "n_truncated": side.texts["n_truncated"],
            "sparsity_by_layer": side.sparsity_by_layer, "sparsity_measured_in": side.sparsity_measured_in,
            "multilayer": sp.multilayer_table(side.sparsity_by_layer), "efficiency": side.efficiency}


ATTENTION_NOTE = ("units: Mamba's channels (hidden attention α^c) and a Transformer's attention-output dims (their "
                  "head's softmax weights), scored by the same formulas; diversity is scale-free and compares "
                  "directly, mean activations are of the same kind but their scale is model-specific")


def side_by_side(main: Side, other: Side, sparsity_layers, attention_skipped: str | None = None) -> dict:
    """The comparison of two models' stage results on the same texts, with layers matched by relative
    depth (a pure function of the two sides). `sparsity_layers`: the main run's --sparsity_layers (each
    side lists those it has); the causal part is there when both sides have causal results, the attention
    part when both have attention results (or {"skipped": `attention_skipped`})."""
    import attention_neurons as an

    sides = [side_profile(main), side_profile(other)]
    out = {"models": sides, "matched_layers": {main.label: main.layer, other.label: other.layer},
           "relative_depth": relative_depth(main.layer, main.adapter.n_layers),
           "sparsity_layers": {s["label"]: [la for la in sparsity_layers if la < s["n_layers"]] for s in sides},
           "threshold_note": "each model's traditional threshold is its family default unless "
                             "--sparsity_threshold was given (then the same for both)"}
    if main.causal is not None and other.causal is not None:
        out["causal"] = {
            main.label: {"layer": main.layer, "site": main.causal["site"], "scores": np.asarray(main.causal["scores"])},
            other.label: {"layer": other.layer, "site": other.causal["site"], "scores": other.causal["scores"]},
            "prompts": main.causal["prompts"], "ablation": main.causal.get("ablation", "zero")}
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
        out["attention"] = {"methods": list(main.attention["definitions"]), "note": ATTENTION_NOTE, "models": models,
                            "matched_layers": {main.label: main.layer, other.label: other.layer}}
    out["summary"] = summary_rows(out)
    return out


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
    return sp.SparsityRead(ctx.model, ctx.adapter, range(ctx.adapter.n_layers), ctx.tokens.input_ids,
                           o.sparsity_threshold, o.dead_eps)


def other_options(opts, main_adapter, other_adapter, layer: int, stages, prefix: str):
    """The options of the other model's run: the main run's, with its layers at the same relative depths
    (the attention stage's too), every layer's sparsity, the other model's default causal site and every
    one of its dimensions, and no layers of the main model's shape."""
    import dataclasses

    import attention_neurons as an

    def matched(la: int) -> int:
        return matched_layer(relative_depth(la, main_adapter.n_layers), other_adapter.n_layers)

    limit = other_adapter.max_positions
    return dataclasses.replace(
        opts, layer=matched(layer), layers=None, prefix=prefix, max_length=min(opts.max_length, limit or opts.max_length),
        attention_layers=tuple(sorted({matched(la) for la in an.stage_layers(opts, layer)})) if "attention" in stages
        else None, causal_site=None, causal_dims=None, sparsity_layers=tuple(range(other_adapter.n_layers)))


def _stage_run(ctx, read: dict):
    """Both models through sparsity (every layer), efficiency, (when the causal stage ran) causal impacts
    and (with the attention stage) attention neurons, on the same texts; layers matched by relative depth.
    The other model's numbers are a run of the pipeline on it (`run_pipeline`, no plots) with
    `other_options`; the main model's are this run's stages (its efficiency measured here when that stage
    is not in the run)."""
    from functools import partial

    import comparison_plots as cp
    import efficiency as ef
    from models import get_adapter
    from naming import model_prefix
    from pipeline import run_pipeline

    o = ctx.opts
    main_sparsity = read["stats"]
    weight = next(ctx.model.parameters())  # the other model goes where the main model is, in its dtype
    compare = ctx.compare or load_compare_model(o.compare_model, ctx.adapter.family, weight.device, weight.dtype)
    model, tokenizer, source = compare.loaded
    label = model_prefix(source.requested, source.origin, source.resolved_path)
    if label == ctx.prefix:
        label += "_compare"
    other_adapter = get_adapter(model)
    causal, attention = ctx.upstream("causal"), ctx.upstream("attention")
    skipped = None
    if "attention" in ctx.stages and attention is None:
        skipped = "the attention stage did not succeed (its error is listed with it)"
    stages = ["sparsity", "efficiency", *(["causal"] if causal is not None else []),
              *(["attention"] if attention is not None else [])]
    opts = other_options(o, ctx.adapter, other_adapter, ctx.layer, stages, label)
    res = run_pipeline(model, tokenizer, list(ctx.texts), opts, stages, write_plots=False)
    failed = [f"{n}: {res[n].get('error') or res[n].get('reason')}" for n in stages if res[n]["status"] != "ok"]
    if failed:
        raise ValueError(f"the other model's {failed[0]}")
    other = Side(label, other_adapter, source.origin, opts.layer, res["texts"], res["sparsity"]["results"]["layers"],
                 res["sparsity"]["results"]["measured_in"], res["efficiency"]["results"],
                 res.get("causal", {}).get("results"), res.get("attention", {}).get("results"))
    efficiency = ctx.upstream("efficiency")
    if efficiency is None:  # not in this run: measured as the efficiency stage would
        import torch

        pool = torch.cat([ids[0] for ids in ctx.tokens.input_ids]).cpu().numpy()
        efficiency = ef.efficiency_metrics(ctx.model, ctx.adapter, pool, main_sparsity[ctx.layer],
                                           seq_lengths=o.seq_lengths or ef.SEQ_LENGTHS,
                                           efficiency_budget=o.efficiency_budget, progress=ctx.progress)
    main = Side(ctx.prefix, ctx.adapter, "main", ctx.layer, ctx.results["texts"], main_sparsity,
                read["measured_in"], efficiency, causal, attention)
    comp = side_by_side(main, other, _sparsity_layers(ctx), skipped)
    comp["compare_model"] = {"requested": source.requested, "source": source.origin,
                             "resolved_path": source.resolved_path, "warning": compare.warning}
    comp["methods_at_matched_layers"] = cp.methods_table(comp)
    return comp, [partial(cp.comparison_plots, comp, ctx.plots_dir, f"{ctx.prefix}_vs_{label}")]


def _sparsity_layers(ctx) -> list[int]:
    import sparsity as sp

    return sp.chosen_layers(ctx)


def comparison_summary(r: dict) -> str:
    labels = [s["label"] for s in r["models"]]
    c = r["compare_model"]
    lines = [f"    compared with {c['requested']} ({c['source']})" + (f"; {c['warning']}" if c["warning"] else "")]
    width = max(len(row["metric"]) for row in r["summary"])
    lines.append("    " + " " * width + " | " + " | ".join(f"{lab:>24}" for lab in labels))
    lines += [f"    {row['metric']:<{width}} | " + " | ".join(f"{str(row[lab]):>24}" for lab in labels)
              for row in r["summary"]]
    att = r.get("attention")
    if att is not None:
        lines.append(f"    attention: {att['skipped'] if 'skipped' in att else att['note']}")
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("comparison", _stage_run, comparison_summary, reader=_stage_reader,
                   needs=("causal", "sparsity", "efficiency", "attention")))


_register()
