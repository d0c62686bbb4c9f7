"""Mamba neuron analysis: command line and pipeline.

    python main.py --model PATH_OR_HUB_ID [--layer 0] [--save_results] ...

`run_comprehensive_analysis` runs the analysis stages in order and fills one `analysis_results` dict;
`main` prints its summary, and with --save_results writes it as JSON. Exit status: 0 all stages ran
(or did not apply), 1 a stage failed (listed in the summary), 2 bad input.
Heavy imports live inside functions so that `--help` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from models import DEFAULT_MODELS  # light: models.py imports torch/transformers only inside functions

logger = logging.getLogger("mamba_neurons")

# Fixed stage names, in run order.
ALL_STAGES = ("delta", "causal", "inter_layer", "cross_layer", "attention", "sparsity", "efficiency", "comparison")
MAMBA_ONLY_STAGES = {"delta", "attention"}
ATTENTION_METHODS = ("attention_weighted", "gradient_guided", "rollout")
DEFAULT_MODEL = DEFAULT_MODELS["mamba"][0]
DEFAULT_MAX_LENGTH = 256
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SEED_RANGE = (0, 2 ** 32 - 1)  # numpy's seed range (torch's is wider)
MIN_TEXTS = {"delta": 2}  # the delta ranking is a variance across texts: one text cannot rank anything


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad input (main prints them, exit 2)."""

    def error(self, message):
        from utils import UserInputError

        raise UserInputError(f"{message}; see python main.py --help")


def _finite_float(text: str) -> float:
    """argparse type: a float that is neither nan nor ±inf (no flag may turn a result into NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a finite value")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        description="Open up a Mamba language model neuron by neuron (and hold it against a Transformer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"Hugging Face hub id or local save_pretrained folder. Supported: Mamba-1 "
                        f"(MambaForCausalLM), GPT-2, GPT-NeoX/Pythia. Default: {DEFAULT_MODEL}, or the "
                        "shipped reference Mamba (reference_models/mamba) when that is neither cached nor reachable")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (analyses compute in float32)")
    g = p.add_argument_group("texts")
    g.add_argument("--texts_file", default=None,
                   help="text file, one text per line (blank lines skipped); default: WikiText-2 v1 train "
                        "through `datasets`, or the repo's data/offline_texts.txt when that is unreachable")
    g.add_argument("--text_limit", type=int, default=100, help="use at most this many texts (>= 1)")
    g.add_argument("--max_length", type=int, default=None,
                   help=f"truncate each text to this many tokens (default {DEFAULT_MAX_LENGTH}, or a Transformer's "
                        "positions when it has fewer; more than its positions is an error)")
    g = p.add_argument_group("analysis")
    g.add_argument("--layer", type=int, default=0, help="layer to analyse (0-based)")
    g.add_argument("--top_k", type=int, default=10, help="how many top neurons to report")
    g.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help=f"run only these stages (space or comma separated): {', '.join(ALL_STAGES)}; "
                        "default: every stage available in this version")
    g.add_argument("--enable_attention", action="store_true",
                   help="run the attention stage (hidden attention and attention neurons; Mamba only)")
    g.add_argument("--attention_methods", nargs="+", default=list(ATTENTION_METHODS), metavar="METHOD",
                   help=f"attention-neuron methods: {', '.join(ATTENTION_METHODS)}")
    g = p.add_argument_group("causal (ablation)")
    g.add_argument("--prompts_file", default=None,
                   help="prompts for the causal stages, one per line; default: five factual prompts")
    g.add_argument("--causal_site", default=None,
                   help="site to ablate: Mamba mixer_out (default), ssm, residual; Transformers mlp, attn_out, "
                        "mlp_out (default), residual")
    g.add_argument("--causal_dims", type=int, nargs="+", default=None, metavar="DIM",
                   help="limit the causal scan to these dimensions (default: every dimension of the site); "
                        "also the dimensions of inter_layer / cross_layer (default: the causal stage's top 3)")
    g.add_argument("--ablation", default="zero", help="zero (multiply by --intervention_scale) or mean")
    g.add_argument("--intervention_scale", type=_finite_float, default=0.0, help="factor for --ablation zero (0 = zero)")
    g.add_argument("--causal_batch_size", type=int, default=None,
                   help="ablations per forward pass (default: chosen from free memory)")
    g = p.add_argument_group("sparsity, efficiency, comparison")
    g.add_argument("--sparsity_layers", type=int, nargs="+", default=None, metavar="LAYER",
                   help="layers of the multi-layer sparsity analysis (default: 0 1 2, those the model has)")
    g.add_argument("--sparsity_threshold", type=_finite_float, default=None,
                   help="absolute threshold of traditional sparsity and of 'active' neurons (default: Mamba "
                        "0.01, Transformers 1e-5; scale-dependent)")
    g.add_argument("--dead_eps", type=_finite_float, default=1e-6, help="a neuron is dead when |a| < this on every token")
    g.add_argument("--compare_model", default=None,
                   help="the model the comparison stage holds the main model against: hub id or folder. "
                        "Default beside a Mamba: gpt2, or the shipped reference Transformer "
                        "(reference_models/transformer) when that is neither cached nor reachable; beside a "
                        "Transformer: state-spaces/mamba-130m-hf, or the reference Mamba")
    g.add_argument("--seq_lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048], metavar="L",
                   help="sequence lengths of the measured time / memory scaling curve")
    g.add_argument("--efficiency_budget", type=_finite_float, default=15.0,
                   help="seconds per model for the scaling curve; longer lengths are skipped (and recorded)")
    g = p.add_argument_group("output")
    g.add_argument("--save_results", action="store_true", help="write analysis_results as JSON to --output_dir")
    g.add_argument("--output_dir", default="analysis_outputs", help="folder for the JSON results")
    g.add_argument("--plots_dir", default="plots", help="folder for the PNG plots")
    g.add_argument("--seed", type=int, default=0,
                   help=f"random seed (torch, numpy, random), {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    g.add_argument("--log_level", default="WARNING", help=", ".join(LOG_LEVELS))
    g.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
@dataclass
class StageContext:
    model: object
    tokenizer: object
    adapter: object
    tokens: object  # utils.TokenizedTexts
    layer: int
    top_k: int
    plots_dir: str
    prefix: str  # model label used in plot file names
    progress: bool
    attention_methods: tuple = ATTENTION_METHODS
    causal: dict = None  # prompts, site, dims, ablation, intervention_scale, batch_size
    results: dict = None  # the results of the stages run so far
    texts: tuple = ()  # the texts as strings (the comparison model tokenizes them itself)
    options: dict = None  # sparsity_layers, threshold, dead_eps, compare_model, seq_lengths, budget, device, dtype
    stages: tuple = ()  # the stages of this run, in order
    shared: dict = None  # what a stage measured for a later one, kept out of the results (not in the JSON)


def stage_delta(ctx: StageContext):
    import delta_extraction as de

    stats = de.delta_channel_statistics(ctx.model, ctx.tokenizer, ctx.tokens.input_ids, ctx.layer, ctx.progress)
    plots = [de.plot_delta_variance(stats, ctx.top_k, ctx.plots_dir, ctx.prefix),
             de.plot_delta_heatmap(stats, ctx.plots_dir, ctx.prefix)]
    return stats.to_dict(ctx.top_k), plots


def stage_attention(ctx: StageContext):
    """Hidden attention at --layer over every text; each method's channel scores averaged over texts."""
    from tqdm.auto import tqdm

    import attention_neurons as an

    analyzer = an.MambaAttentionNeurons(ctx.model)  # NotApplicable for Transformers
    layer = ctx.layer
    sums = {m: [0.0, 0.0] for m in ctx.attention_methods}  # method -> [Σ activations, Σ importance]
    first, worst = {}, 0.0
    for k, ids in enumerate(tqdm(ctx.tokens.input_ids, desc=f"attention layer {layer}", disable=not ctx.progress)):
        ts = analyzer.text_scores(ids, layer, ctx.attention_methods)  # α streamed by channel group, verified
        worst = max(worst, ts.reconstruction.relative_error)
        for m in ctx.attention_methods:
            s = ts.scores[m]
            sums[m][0] = sums[m][0] + s.neuron_activations
            sums[m][1] = sums[m][1] + s.neuron_importance
            if k == 0:
                first[m] = s.token_map
        if k == 0:
            vector = ts.attention_vectors[0].cpu().numpy()  # (L, L) channel-mean α, first text
    n = len(ctx.tokens.input_ids)
    results = {"layer": layer, "n_texts": n, "max_reconstruction_error": worst,
               "attention_vector_first_text": vector, "methods": {}}
    plots = [an.plot_attention_vector(vector, layer, ctx.plots_dir, ctx.prefix)]
    for m in ctx.attention_methods:
        neurons = {layer: an.NeuronScores(m, sums[m][0] / n, sums[m][1] / n, first[m])}
        results["methods"][m] = {**analyzer.analyze_neuron_behavior(neurons, layer, ctx.top_k),
                                 "neuron_activations": neurons[layer].neuron_activations,
                                 "neuron_importance": neurons[layer].neuron_importance,
                                 "token_map_first_text": first[m]}
        plots.append(analyzer.visualize_neurons(neurons, layer, ctx.plots_dir, ctx.prefix, ctx.top_k))
    results["definitions"] = {m: an.DEFINITIONS[m] for m in ctx.attention_methods}
    return results, plots


def _causal_opts(ctx: StageContext) -> dict:
    from causal_analysis import DEFAULT_PROMPTS

    c = ctx.causal or {}
    return {"site": c.get("site") or ctx.adapter.default_causal_site, "prompts": c.get("prompts") or DEFAULT_PROMPTS,
            "dims": c.get("dims"),
            "ablation": c.get("ablation", "zero"), "scale": c.get("intervention_scale", 0.0),
            "batch_size": c.get("batch_size")}


def stage_causal(ctx: StageContext):
    """KL impact of ablating every dimension (or --causal_dims) of the site at --layer, over the prompts."""
    import numpy as np

    import causal_analysis as ca

    o = _causal_opts(ctx)
    scores = ca.causal_impact_scores(ctx.model, ctx.tokenizer, o["prompts"], ctx.layer, o["site"], o["scale"],
                                     o["ablation"], o["dims"], o["batch_size"], ctx.progress)
    dims = np.arange(len(scores)) if o["dims"] is None else np.asarray(o["dims"])
    order = np.argsort(-scores, kind="stable")[:ctx.top_k]
    results = {"layer": ctx.layer, "site": o["site"], "ablation": o["ablation"], "intervention_scale": o["scale"],
               "prompts": o["prompts"], "n_dims": int(len(scores)),
               "top_neurons": [{"dim": int(dims[i]), "score": float(scores[i])} for i in order],
               "dims": dims, "scores": scores, "n_zero": int((scores == 0).sum()),
               "definition": "mean over prompts of KL(p_clean || p_ablated) of the next-token distribution "
                             "at the last position"}
    return results, ca.plot_causal_impacts(scores, dims, ctx.top_k, ctx.layer, o["site"], ctx.plots_dir, ctx.prefix)


def _chosen_dims(ctx: StageContext, o: dict, n: int = 3) -> list[int]:
    """Every --causal_dims dimension, else the causal stage's top `n`."""
    if o["dims"]:
        return list(o["dims"])
    causal = (ctx.results or {}).get("causal", {})
    if causal.get("status") != "ok":
        raise ValueError("needs --causal_dims or a successful causal stage to choose its dimensions")
    return [t["dim"] for t in causal["results"]["top_neurons"][:n]]


def stage_inter_layer(ctx: StageContext):
    """Impact of ablating each chosen dimension at every layer in turn (mean over the prompts)."""
    import causal_analysis as ca

    o = _causal_opts(ctx)
    dims = _chosen_dims(ctx, o)
    # one clean run per prompt for every layer; (layer, dim) ablations share passes
    per_layer = ca.causal_impact_by_layer(ctx.model, ctx.tokenizer, o["prompts"], range(ctx.adapter.n_layers),
                                          o["site"], o["scale"], o["ablation"], dims, o["batch_size"],
                                          ctx.progress)  # (n_layers, n_dims)
    curves = {d: [(layer, float(sc[i])) for layer, sc in enumerate(per_layer)] for i, d in enumerate(dims)}
    results = {"site": o["site"], "dims": dims,
               "curves": {str(d): [{"layer": la, "relative_depth": la / max(1, ctx.adapter.n_layers - 1),
                                    "score": sc} for la, sc in c] for d, c in curves.items()}}
    return results, [ca.plot_inter_layer(curves, o["site"], ctx.plots_dir, ctx.prefix)]


def stage_cross_layer(ctx: StageContext):
    """Ablate each chosen dimension at every source layer, read it in the residual stream after every
    target layer (last position), averaged over the prompts."""
    import numpy as np

    import causal_analysis as ca

    o = _causal_opts(ctx)
    site = o["site"] if ctx.adapter.site(o["site"], 0).size == ctx.adapter.hidden_size else "residual"
    chosen = _chosen_dims(ctx, o)
    dims = [d for d in chosen if d < ctx.adapter.hidden_size]
    if not dims:
        raise ValueError(f"no chosen dimension lies in the residual stream (width {ctx.adapter.hidden_size})")
    per = [ca.cross_layer_matrix(ctx.model, ctx.tokenizer, p, dims, site, o["scale"], batch_size=o["batch_size"])
           for p in o["prompts"]]
    m = {k: np.mean([x[k] for x in per], axis=0) for k in ("clean", "ablated", "change")}
    m.update(dims=per[0]["dims"], sources=per[0]["sources"], targets=per[0]["targets"])
    results = {"site": site, "readout": "residual stream after each target layer, last position, "
                                        "mean over prompts", **m,
               "left_out_dims": [d for d in chosen if d not in dims],
               "max_abs_change_before_source": float(max(np.abs(m["change"][:, s, :s]).max(initial=0.0)
                                                         for s in range(ctx.adapter.n_layers)))}
    return results, [ca.plot_cross_layer(m, site, ctx.plots_dir, ctx.prefix)]


def _sparsity_layers(ctx: StageContext) -> list[int]:
    chosen = (ctx.options or {}).get("sparsity_layers")
    if chosen is None:
        return [la for la in (0, 1, 2) if la < ctx.adapter.n_layers]
    return [ctx.adapter.check_layer(la) for la in chosen]


def stage_sparsity(ctx: StageContext):
    """Every sparsity method for the neuron site at --layer, and across --sparsity_layers (streamed)."""
    import sparsity as sp

    o = ctx.options or {}
    multi = _sparsity_layers(ctx)
    # the comparison needs every layer: measured here in the same forwards, so it need not run them again
    every = "comparison" in ctx.stages
    layers = range(ctx.adapter.n_layers) if every else sorted({ctx.layer, *multi})
    stats = sp.layer_sparsity(ctx.model, ctx.adapter, ctx.tokens.input_ids, layers,
                              o.get("threshold"), o.get("dead_eps", sp.DEAD_EPS), progress=ctx.progress)
    if every and ctx.shared is not None:
        ctx.shared["sparsity_every_layer"] = stats
    single = stats[ctx.layer]
    chosen = {la: stats[la] for la in multi}
    plots = sp.sparsity_plots([(ctx.prefix, single)], [(ctx.prefix, chosen)], ctx.plots_dir, ctx.prefix,
                              tag=f"_layer{ctx.layer}")
    results = {"site": single["site"], "layer": ctx.layer, "sparsity_layers": multi, "single": single,
               "layers": chosen, "multilayer": sp.multilayer_table(chosen), "note": sp.SCALE_NOTE,
               "definitions": sp.__doc__}
    return results, plots


def stage_efficiency(ctx: StageContext):
    """Parameters, neurons, active neurons at --layer, measured time / memory against sequence length."""
    import torch

    import efficiency as ef
    import sparsity as sp

    o = ctx.options or {}
    done = (ctx.results or {}).get("sparsity", {})
    if done.get("status") == "ok":
        stats = done["results"]["single"]
    else:
        stats = sp.layer_sparsity(ctx.model, ctx.adapter, ctx.tokens.input_ids, [ctx.layer], o.get("threshold"),
                                  o.get("dead_eps", sp.DEAD_EPS), progress=ctx.progress)[ctx.layer]
    pool = torch.cat([ids[0] for ids in ctx.tokens.input_ids]).cpu().numpy()
    res = ef.efficiency_metrics(ctx.model, ctx.adapter, pool, stats, o.get("seq_lengths") or ef.SEQ_LENGTHS,
                                o.get("budget", 15.0), ctx.progress)
    plots = [ef.plot_efficiency([(ctx.prefix, res)], ctx.plots_dir, f"{ctx.prefix}_efficiency_layer{ctx.layer}"),
             ef.plot_scaling([(ctx.prefix, res)], ctx.plots_dir, f"{ctx.prefix}_scaling")]
    return res, plots


def _efficiency_if_done(ctx: StageContext):
    done = (ctx.results or {}).get("efficiency", {})
    return done["results"] if done.get("status") == "ok" else None


def stage_comparison(ctx: StageContext):
    """Both models through sparsity (every layer), efficiency and (when the causal stage ran) causal
    impacts, on the same texts; layers matched by relative depth."""
    import comparison_plots as cp
    import comparison_wrapper as cw
    from models import load_model_and_tokenizer

    o = ctx.options or {}
    if o.get("compare_source") is not None:  # resolved (and its fallback warned about) by main
        source, warning = o["compare_source"], o.get("compare_warning")
    else:
        source, warning = cw.resolve_compare_model(o.get("compare_model"), ctx.adapter.family)
    loaded = load_model_and_tokenizer(source, o.get("device", "cpu"), o.get("dtype", "float32"), "--compare_model",
                                      files=o.get("compare_files"))
    label = model_prefix(source.requested, source.origin)
    if label == ctx.prefix:
        label += "_compare"
    from models import get_adapter

    main_run = cw.ModelRun(ctx.prefix, ctx.model, ctx.tokenizer, ctx.adapter, "main")
    other = cw.ModelRun(label, loaded.model, loaded.tokenizer, get_adapter(loaded.model), source.origin)
    causal = (ctx.results or {}).get("causal", {})
    limit = ctx.adapter.max_positions
    same_tokens = limit is None or ctx.tokens.max_length <= limit  # as the comparison tokenizes the texts
    comp = cw.compare_models(main_run, other, list(ctx.texts), ctx.layer, ctx.tokens.max_length, o.get("threshold"),
                             o.get("dead_eps", 1e-6), _sparsity_layers(ctx), o.get("seq_lengths"),
                             o.get("budget", 15.0), causal["results"] if causal.get("status") == "ok" else None,
                             ctx.causal, ctx.progress, main_efficiency=_efficiency_if_done(ctx),
                             main_sparsity=(ctx.shared or {}).get("sparsity_every_layer") if same_tokens else None)
    comp["compare_model"] = {"requested": source.requested, "source": source.origin,
                             "resolved_path": source.resolved_path, "warning": warning}
    comp["methods_at_matched_layers"] = cp.methods_table(comp)
    return comp, cp.comparison_plots(comp, ctx.plots_dir, f"{ctx.prefix}_vs_{label}")


STAGE_FUNCTIONS = {"delta": stage_delta, "causal": stage_causal, "inter_layer": stage_inter_layer,
                   "cross_layer": stage_cross_layer, "attention": stage_attention, "sparsity": stage_sparsity,
                   "efficiency": stage_efficiency, "comparison": stage_comparison}


def resolve_stages(requested: list[str] | None, family: str | None = None, enable_attention: bool = True
                   ) -> list[str]:
    """Stage names to run, in pipeline order: by default every available stage (the attention stage only
    with `enable_attention`). UserInputError for unknown or not-yet-available names, or for an explicitly
    requested Mamba-only stage on a Transformer."""
    from utils import UserInputError

    if requested is None:
        return [s for s in ALL_STAGES if s in STAGE_FUNCTIONS and (enable_attention or s != "attention")]
    names = [n.strip() for item in requested for n in item.split(",") if n.strip()]
    if not names:
        raise UserInputError(f"--stages {' '.join(requested)!r}: names no stage; choose from {', '.join(ALL_STAGES)}")
    for n in names:
        if n not in ALL_STAGES:
            raise UserInputError(f"--stages {n}: unknown stage; choose from {', '.join(ALL_STAGES)}")
        if n not in STAGE_FUNCTIONS:
            raise UserInputError(f"--stages {n}: this stage is not available in this version; "
                                 f"available: {', '.join(STAGE_FUNCTIONS)}")
        if family is not None and family != "mamba" and n in MAMBA_ONLY_STAGES:
            raise UserInputError(f"--stages {n}: a Mamba-only analysis, not applicable to {family}; "
                                 "drop it from --stages or pass a Mamba model")
    return [s for s in ALL_STAGES if s in names]


def run_comprehensive_analysis(model, tokenizer, texts, layer: int = 0, top_k: int = 10, stages=None,
                               plots_dir="plots", max_length: int = 256, prefix: str = "model",
                               progress: bool = True, attention_methods=ATTENTION_METHODS, causal=None,
                               options=None, on_start=None, on_stage=None) -> dict:
    """Run the stages in order on `texts` (strings) and return `analysis_results`:
    {"texts": {...}, STAGE: {"status": "ok"|"not_applicable"|"error", "wall_time_s", "results"|"reason"|
    "error", "plots"}}. A failing stage is recorded and the others go on. Input that no stage could use
    (a bare string for `texts`, too few texts for a stage asked for, a text without tokens, token ids
    beyond the model's vocabulary) raises UserInputError before the first stage. `on_start(results)` is
    called once the texts are tokenized, `on_stage(name, entry)` as each stage ends (main prints them)."""
    from models import NotApplicable, get_adapter
    from utils import UserInputError, text_list, tokenize_texts

    adapter = get_adapter(model)
    adapter.check_layer(layer)
    texts = text_list(texts)
    stages = resolve_stages(stages)
    short = too_few_texts(stages, adapter.is_mamba, len(texts))
    if short:
        raise UserInputError(f"the {short[0]} stage needs at least {short[1]} texts; got {len(texts)}")
    tokens = tokenize_texts(tokenizer, texts, max_length)
    vocab = model.get_input_embeddings().num_embeddings
    top = max(int(ids.max()) for ids in tokens.input_ids)
    if top >= vocab:
        raise UserInputError(f"the tokenizer gives token id {top}, beyond the model's {vocab} embeddings: "
                             "tokenizer and model do not belong together")
    results: dict = {"texts": {"n_texts": len(texts), "n_tokens": int(sum(tokens.lengths)),
                               "max_length": max_length, "n_truncated": tokens.n_truncated},
                     "architecture": adapter.describe()}
    ctx = StageContext(model, tokenizer, adapter, tokens, layer, top_k, str(plots_dir), prefix, progress,
                       tuple(attention_methods), causal or {}, results, tuple(texts), options or {}, tuple(stages),
                       {})
    if on_start is not None:
        on_start(results)
    for name in stages:
        logger.info("stage %s: started", name)
        t0 = time.perf_counter()
        try:
            out, plots = STAGE_FUNCTIONS[name](ctx)
            entry = {"status": "ok", "results": out, "plots": plots}
        except NotApplicable as exc:
            entry = {"status": "not_applicable", "reason": str(exc)}
        except Exception as exc:  # a failed stage is recorded with its error; the other stages go on
            logger.debug("stage %s failed", name, exc_info=True)
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        entry["wall_time_s"] = round(time.perf_counter() - t0, 4)
        results[name] = entry
        if on_stage is not None:
            on_stage(name, entry)
    return results


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def print_header(results: dict) -> None:
    """The summary's first lines: model, layer, dtype, device, seed, texts."""
    run = results["run"]
    family = results["architecture"]["display_name"]
    print(f"\n=== {family} neuron analysis: {run['model']} ({run['model_class']}, {run['model_source']}) ===")
    print(f"layer {run['layer']} | {run['dtype']} on {run['device']} | seed {run['seed']}")
    t = results["texts"]
    print(f"texts: {t['n_texts']} from {t['source']} | {t['n_tokens']} tokens | "
          f"{t['n_truncated']} truncated to {t['max_length']} tokens", flush=True)


def stage_text(name: str, e: dict) -> str:
    """One stage's summary as main prints it (and the HTML report shows it)."""
    import contextlib
    import io

    head = f"[{name}] {e['status']} ({e['wall_time_s']:.2f} s)"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if e["status"] == "not_applicable":
            print(f"{head}: {e['reason']}")
        elif e["status"] == "error":
            print(f"{head}: {e['error']}")
        else:
            print(head)
            SUMMARIES.get(name, lambda r: None)(e["results"])
            for p in e.get("plots", []):
                print(f"    plot: {p}")
    return buf.getvalue()


def print_stage(name: str, e: dict) -> None:
    """One stage's summary (main prints it as soon as the stage ends)."""
    print(stage_text(name, e), end="")
    sys.stdout.flush()  # a user watching a long run (or a tee'd log) sees each stage when it ends


def print_footer(results: dict, stages: list[str]) -> None:
    for note in results["run"].get("notes", []):
        print(f"note: {note}")
    errors = [n for n in stages if results[n]["status"] == "error"]
    if errors:
        print(f"FAILED stages: {', '.join(errors)}")


def summarize_delta(r: dict) -> None:
    rec = r["reconstruction"]
    print(f"    {r['n_channels']} channels, {r['n_texts']} texts, {r['n_tokens']} tokens; mixer reconstruction "
          f"max rel. error {rec['max_relative_error']:.2e} (tolerance {rec['tolerance']:.0e})")
    print("    top delta-sensitive channels (variance across texts of mean Δ | mean Δ | within-text var):")
    for n in r["top_neurons"]:
        print(f"      channel {n['channel']:>5}: {n['variance']:.4e} | {n['mean_delta']:.4e} | "
              f"{n['token_variance']:.4e}")


def summarize_attention(r: dict) -> None:
    print(f"    hidden attention over {r['n_texts']} texts; (α x + D x) reconstruction max rel. error "
          f"{r['max_reconstruction_error']:.2e}")
    for m, a in r["methods"].items():
        top = ", ".join(f"{t['channel']} ({t['activation']:.3g})" for t in a["top_neurons"][:5])
        print(f"    {m}: {a['num_neurons']} channels, mean activation {a['mean_activation']:.4g} "
              f"(std {a['activation_std']:.3g}), diversity {a['neuron_diversity']:.3f}; top: {top}")


def summarize_causal(r: dict) -> None:
    print(f"    {r['n_dims']} dims of {r['site']} at layer {r['layer']}, {len(r['prompts'])} prompts, "
          f"{r['ablation']} ablation; {r['n_zero']} dims with impact exactly 0")
    print("    top causal dims (mean KL): " + ", ".join(f"{t['dim']} ({t['score']:.3e})" for t in r["top_neurons"]))


def summarize_inter_layer(r: dict) -> None:
    for d, curve in r["curves"].items():
        best = max(curve, key=lambda c: c["score"])
        print(f"    dim {d}: largest impact at layer {best['layer']} ({best['score']:.3e})")


def summarize_cross_layer(r: dict) -> None:
    print(f"    dims {list(map(int, r['dims']))} of {r['site']}; largest |change| before the source layer: "
          f"{r['max_abs_change_before_source']:.1e} (causality: must be 0)")
    if r["left_out_dims"]:
        print(f"    dims {r['left_out_dims']} left out: beyond the residual stream's width")


def _sparsity_line(s: dict) -> str:
    p50 = s["percentile"]["sparsity"][s["percentile"]["percentiles"].index(50)]
    return (f"traditional {s['traditional']['sparsity']:.3f} (< {s['traditional']['threshold']:g}), percentile-50 "
            f"{p50:.3f}, entropy {s['entropy']['sparsity']:.3f}, Gini {s['gini']:.3f}, Hoyer {s['hoyer']:.3f}, "
            f"dead {s['dead_neurons']['count']}")


def summarize_sparsity(r: dict) -> None:
    s = r["single"]
    print(f"    site {r['site']} ({s['n_neurons']} neurons), {s['n_tokens']} tokens")
    print(f"    layer {r['layer']}: {_sparsity_line(s)}")
    for la, st in r["layers"].items():
        if la != r["layer"]:
            print(f"    layer {la}: {_sparsity_line(st)}")
    print(f"    note: {r['note']}")


def summarize_efficiency(r: dict) -> None:
    p, n = r["parameters"], r["neurons"]
    print(f"    parameters {p['total']:,} (embeddings {p['embeddings']:,}, layers {p['layers']:,}, head "
          f"{p['lm_head']:,}{', tied' if p['tied_embeddings'] else ''}); {n['per_layer']} neurons per layer "
          f"({n['site']}), {n['total']} in all")
    if "active" in n:
        print(f"    layer {n['layer']}: {n['active']} active (mean |a| > {n['threshold']:g}), efficiency ratio "
              f"{n['efficiency_ratio']:.3f}")
    for pt in r["scaling"]["points"]:
        print(f"    L={pt['seq_len']:>5}: {pt['time_s'] * 1e3:9.1f} ms, peak {pt['peak_memory_bytes'] / 2 ** 20:8.1f} MiB,"
              f" {pt['flops_per_token'] / 1e6:.2f} MFLOP/token")
    for sk in r["scaling"]["skipped"]:
        print(f"    L={sk['seq_len']:>5}: skipped ({sk['reason']})")


def summarize_comparison(r: dict) -> None:
    labels = [s["label"] for s in r["models"]]
    c = r["compare_model"]
    print(f"    compared with {c['requested']} ({c['source']})" + (f"; {c['warning']}" if c["warning"] else ""))
    width = max(len(row["metric"]) for row in r["summary"])
    print("    " + " " * width + " | " + " | ".join(f"{lab:>24}" for lab in labels))
    for row in r["summary"]:
        print(f"    {row['metric']:<{width}} | " + " | ".join(f"{str(row[lab]):>24}" for lab in labels))


SUMMARIES = {"delta": summarize_delta, "attention": summarize_attention, "causal": summarize_causal,
             "inter_layer": summarize_inter_layer, "cross_layer": summarize_cross_layer,
             "sparsity": summarize_sparsity, "efficiency": summarize_efficiency, "comparison": summarize_comparison}


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def model_prefix(name: str, origin: str = "") -> str:
    """A file-name-safe label for a model: hub id with '/' -> '_', or a folder's name
    ('reference_mamba' for the shipped reference model)."""
    p = Path(name)
    label = p.name if p.is_dir() else name.replace("/", "_")
    label = f"reference_{label}" if origin == "reference" else label
    return re.sub(r"[^\w.\-]+", "_", label) or "model"


def run_metadata(args, argv, loaded, device, dtype, start) -> dict:
    import platform

    import numpy
    import torch
    import transformers

    return {"argv": argv, "model": args.model, "model_source": loaded.source.origin,
            "resolved_path": loaded.source.resolved_path, "model_class": type(loaded.model).__name__,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "seed": args.seed,
            "layer": args.layer, "top_k": args.top_k,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": numpy.__version__},
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "notes": []}


def main(argv: list[str] | None = None) -> int:
    """The command line. Returns the exit status: 0 ok, 1 a stage failed, 2 bad input, 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    from utils import WRITTEN, UserInputError

    written_before = len(WRITTEN)
    try:
        args = build_parser().parse_args(argv)
        level = args.log_level.upper()
        if level not in LOG_LEVELS:
            raise UserInputError(f"--log_level {args.log_level}: unknown; choose one of {', '.join(LOG_LEVELS)}")
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec"):  # their DEBUG lines are not ours
            logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING))
        return _main(args, argv)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line; files are written atomically, so none is half-written
        print(_interrupted_message(WRITTEN[written_before:]), file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python main.py | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _interrupted_message(written: list[str]) -> str:
    if not written:
        return "interrupted; nothing written"
    folders = sorted({str(Path(p).parent) for p in written})
    return (f"interrupted; no results file written (the {len(written)} plots of the stages that finished are in "
            f"{', '.join(folders)})")


def check_values(args) -> list[str]:
    """Every check of the flag values that needs no file and no model (run first: it costs nothing).
    Drops repeated values from the list flags (a dimension is scanned once); returns notes on what it
    changed."""
    from utils import UserInputError

    for flag, value in (("--text_limit", args.text_limit), ("--top_k", args.top_k),
                        ("--max_length", args.max_length), ("--causal_batch_size", args.causal_batch_size)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} {value}: must be at least 1")
    for flag, value in (("--seq_lengths", min(args.seq_lengths)), ("--efficiency_budget", args.efficiency_budget),
                        ("--dead_eps", args.dead_eps)):
        if value <= 0:
            raise UserInputError(f"{flag} {value}: must be positive")
    if args.sparsity_threshold is not None and args.sparsity_threshold < 0:
        raise UserInputError(f"--sparsity_threshold {args.sparsity_threshold}: must be at least 0")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise UserInputError(f"--seed {args.seed}: must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]} (numpy's seed range)")
    bad = [m for m in args.attention_methods if m not in ATTENTION_METHODS]
    if bad:
        raise UserInputError(f"--attention_methods {bad[0]}: unknown; choose from {', '.join(ATTENTION_METHODS)}")
    if args.ablation not in ("zero", "mean"):
        raise UserInputError(f"--ablation {args.ablation}: unknown; choose zero or mean")
    notes = []
    for flag in ("causal_dims", "attention_methods", "sparsity_layers", "seq_lengths"):
        values = getattr(args, flag)
        if values is not None and len(set(values)) < len(values):
            setattr(args, flag, list(dict.fromkeys(values)))
            notes.append(f"--{flag}: repeated values dropped (each is analysed once): {getattr(args, flag)}")
    return notes


def too_few_texts(stages, is_mamba: bool, n_texts: int) -> tuple[str, int] | None:
    """(stage, texts it needs) for the first stage asked for that `n_texts` texts are too few for (see
    MIN_TEXTS; a Mamba-only stage does not run on a Transformer), else None."""
    for stage, need in MIN_TEXTS.items():
        if stage in stages and n_texts < need and (is_mamba or stage not in MAMBA_ONLY_STAGES):
            return stage, need
    return None


def check_text_count(stages, is_mamba: bool, n_texts: int, args) -> None:
    """Refuse, naming the flag that limited them, a text set too small for a stage asked for."""
    from utils import UserInputError

    short = too_few_texts(stages, is_mamba, n_texts)
    if short:
        stage, need = short
        given = (f"--texts_file {args.texts_file} gives {n_texts}" if args.texts_file is not None
                 and n_texts < args.text_limit else f"--text_limit {args.text_limit}")
        raise UserInputError(f"{given}: the {stage} stage needs at least {need} texts (its ranking is a variance "
                             f"across texts); give more texts or drop {stage} from --stages")


def check_prompts(tokenizer, prompts, limit: int | None, where: str) -> None:
    """Every prompt must give at least one token and fit the model's positions (`limit`, None: no limit)."""
    from utils import UserInputError

    for i, p in enumerate(prompts):
        n = len(tokenizer(p, add_special_tokens=False)["input_ids"])
        if n == 0:
            raise UserInputError(f"{where}: prompt {i + 1} ({p[:40]!r}) tokenizes to no tokens; remove it")
        if limit is not None and n > limit:
            raise UserInputError(f"{where}: prompt {i + 1} ({p[:40]!r}) has {n} tokens, more than the model's "
                                 f"{limit} positions; shorten it")


def check_model_flags(args, adapter, stages) -> int:
    """The flags that depend on the model's shape (layer, site, dims, layers, positions), checked from its
    config. Returns the max_length to use: --max_length, else the default capped at a Transformer's
    positions."""
    from utils import UserInputError

    adapter.check_layer(args.layer)
    if args.causal_site is not None:
        adapter.site(args.causal_site, args.layer)  # unknown site for this family: UserInputError
    width = adapter.site(args.causal_site or adapter.default_causal_site, args.layer).size
    bad_dims = [d for d in args.causal_dims or [] if not 0 <= d < width]
    if bad_dims:
        raise UserInputError(f"--causal_dims {bad_dims[0]}: out of range for this site of width {width}; "
                             f"valid dims are 0..{width - 1}")
    d = adapter.hidden_size
    if "cross_layer" in stages and args.causal_dims and min(args.causal_dims) >= d:
        raise UserInputError(f"--causal_dims {args.causal_dims[0]}: cross_layer reads the residual stream, of width "
                             f"{d}; give a dim below {d} as well, or drop cross_layer from --stages")
    bad_layers = [la for la in args.sparsity_layers or [] if not 0 <= la < adapter.n_layers]
    if bad_layers:
        raise UserInputError(f"--sparsity_layers {bad_layers[0]}: out of range for this {adapter.family} model "
                             f"with {adapter.n_layers} layers; valid layers are 0..{adapter.n_layers - 1}")
    limit = adapter.max_positions
    if args.max_length is not None and limit is not None and args.max_length > limit:
        raise UserInputError(f"--max_length {args.max_length}: this {adapter.family} model has {limit} positions; "
                             f"use --max_length {limit} or less")
    return args.max_length or min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)


def results_path(output_dir, prefix: str, layer: int) -> Path:
    return Path(output_dir) / f"{prefix}_layer{layer}_results.json"


def report_path(output_dir, prefix: str, layer: int) -> Path:
    """The HTML report, beside the results JSON."""
    return Path(output_dir) / f"{prefix}_layer{layer}_report.html"


def _main(args, argv) -> int:
    """Everything that can be checked is checked before the first stage, the cheap checks first: flag
    values, input files, output folders; then the model's config, tokenizer and weight files, and the flags
    that depend on its shape (layer, site, dims, layers, positions, prompts); the texts; the comparison
    model. Only then do the weights load. Warnings are printed once every check has passed, so that a
    refusal is one line."""
    start = time.time()
    warnings = {}
    from utils import UserInputError, check_writable_dir, load_texts, read_texts_file

    for flag in ("texts_file", "prompts_file", "plots_dir", "output_dir"):  # "--plots_dir=~/x" reaches us as is
        if getattr(args, flag) is not None:
            setattr(args, flag, str(Path(getattr(args, flag)).expanduser()))
    notes = check_values(args)
    stages = resolve_stages(args.stages, enable_attention=args.enable_attention)
    prompts = None if args.prompts_file is None else read_texts_file(args.prompts_file, flag="--prompts_file")
    if args.texts_file is not None:
        textset = load_texts(args.texts_file, args.text_limit)  # missing / empty / not UTF-8: fail now
    check_writable_dir(args.plots_dir, "--plots_dir")
    if args.save_results:
        check_writable_dir(args.output_dir, "--output_dir")

    from models import config_adapter, inspect_model, max_positions, resolve_default_model, resolve_model_source
    from utils import resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.model is None:
        source, warnings["model"] = resolve_default_model("mamba")
    else:  # missing folder / unknown id while offline: fail in well under a second
        source = resolve_model_source(args.model)
    args.model = source.requested
    prefix = model_prefix(args.model, source.origin)
    json_path = results_path(args.output_dir, prefix, args.layer)
    html_path = report_path(args.output_dir, prefix, args.layer)
    for kind, path in (("results file", json_path), ("report", html_path)):
        if args.save_results and path.is_dir():
            raise UserInputError(f"--output_dir {args.output_dir}: the {kind} {path} is a folder; "
                                 "move it away or choose another --output_dir")
    files = inspect_model(source, "--model")  # config, tokenizer, weight files: before the weights load
    adapter = config_adapter(files.config)
    if args.stages is not None:
        stages = resolve_stages(args.stages, adapter.family)
    elif args.enable_attention and not adapter.is_mamba:
        raise UserInputError(f"--enable_attention: the attention stage is Mamba-only in this version, not applicable "
                             f"to {adapter.family}; drop --enable_attention or pass a Mamba model")
    max_length = check_model_flags(args, adapter, stages)
    if max_length != (args.max_length or DEFAULT_MAX_LENGTH):
        notes.append(f"texts truncated to this model's {max_length} positions (the default --max_length is "
                     f"{DEFAULT_MAX_LENGTH})")
    from causal_analysis import DEFAULT_PROMPTS

    where = f"--prompts_file {args.prompts_file}" if prompts else "the default prompts"
    if {"causal", "inter_layer", "cross_layer"} & set(stages):
        check_prompts(files.tokenizer, prompts or DEFAULT_PROMPTS, adapter.max_positions, where)

    if args.texts_file is None:  # the default corpus: from the datasets cache or hub, else the shipped texts
        textset = load_texts(None, args.text_limit)
        warnings["texts"] = textset.warning
    check_text_count(stages, adapter.is_mamba, len(textset.texts), args)
    compare_source = compare_warning = compare_files = None
    if "comparison" in stages or args.compare_model is not None:  # a missing or broken one fails here
        from comparison_wrapper import resolve_compare_model

        compare_source, compare_warning = resolve_compare_model(args.compare_model, adapter.family)
        warnings["compare"] = compare_warning
        compare_files = inspect_model(compare_source, "--compare_model")
        if {"causal", "comparison"} <= set(stages):  # the comparison scores the same prompts on the other model
            check_prompts(compare_files.tokenizer, prompts or DEFAULT_PROMPTS, max_positions(compare_files.config),
                          f"{where} on --compare_model {compare_source.requested}")

    import transformers

    from models import load_model_and_tokenizer
    from utils import set_seed, to_jsonable, use_agg_backend, write_json

    transformers.logging.set_verbosity_error()  # kernel-fallback notices; errors still surface
    transformers.logging.disable_progress_bar()  # stderr stays clean for our one-line errors
    use_agg_backend()
    set_seed(args.seed)
    for key in ("model", "compare", "texts"):  # every check has passed
        if warnings.get(key):
            print(f"warning: {warnings[key]}", file=sys.stderr)
    loaded = load_model_and_tokenizer(source, device, dtype, files=files)

    results = {"run": run_metadata(args, argv, loaded, device, dtype, start)}
    results["run"]["notes"] += [n for n in (warnings.get("model"), *notes) if n]

    def on_start(partial: dict) -> None:  # the header as soon as the texts are tokenized
        partial["texts"].update(source=textset.source, warning=textset.warning)
        print_header({"run": results["run"], **partial})

    summaries = {}  # stage -> its printed summary, for the HTML report

    def on_stage(name: str, entry: dict) -> None:
        summaries[name] = stage_text(name, entry)
        print(summaries[name], end="", flush=True)  # each stage as soon as it ends

    results.update(run_comprehensive_analysis(
        loaded.model, loaded.tokenizer, textset.texts, layer=args.layer, top_k=args.top_k, stages=stages,
        plots_dir=args.plots_dir, max_length=max_length, prefix=prefix,
        progress=not args.no_progress, attention_methods=args.attention_methods,
        causal={"prompts": prompts, "site": args.causal_site, "dims": args.causal_dims, "ablation": args.ablation,
                "intervention_scale": args.intervention_scale, "batch_size": args.causal_batch_size},
        options={"sparsity_layers": args.sparsity_layers, "threshold": args.sparsity_threshold,
                 "dead_eps": args.dead_eps, "compare_model": args.compare_model, "seq_lengths": args.seq_lengths,
                 "budget": args.efficiency_budget, "device": device, "dtype": dtype,
                 "compare_source": compare_source, "compare_warning": compare_warning,
                 "compare_files": compare_files}, on_start=on_start, on_stage=on_stage))
    results["run"]["stage_timings_s"] = {s: results[s]["wall_time_s"] for s in stages}
    results["run"]["total_time_s"] = round(time.time() - start, 3)
    print_footer(results, stages)
    failed = any(results[s]["status"] == "error" for s in stages)
    if args.save_results:
        from report import write_report

        for kind, path, write in (("results", json_path, lambda p: write_json(p, results)),
                                  ("report", html_path, lambda p: write_report(p, to_jsonable(results), summaries))):
            try:
                write(path)
            except OSError as exc:  # e.g. the disk filled up during the run: say so in one line
                print(f"error: {kind} not written to {path} ({exc.strerror or exc})", file=sys.stderr)
                return 1
        print(f"results: {json_path}\nreport: {html_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
