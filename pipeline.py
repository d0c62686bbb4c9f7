"""The analysis pipeline: the stages, their registry, and `run_comprehensive_analysis`.

A stage is one entry of `STAGES` (`Stage`: its name, the function that runs it, the one that prints its
summary, the model families it applies to, and the stages whose results it reads), so that a new stage is
written in one place; the run order follows from those stated needs. Options travel as one typed
`Options` object, built once (by main.py from the command line, or from `run_comprehensive_analysis`'s
arguments). Heavy imports live inside functions, so importing this module costs nothing (main.py's
`--help` answers at once).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from models import SSM_FAMILIES  # a light module: no torch at import

logger = logging.getLogger("mamba_neurons")

ATTENTION_METHODS = ("attention_weighted", "gradient_guided", "rollout")


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Every option of a run, typed, each default stated once here. main.py builds one from the command
    line; `run_comprehensive_analysis` from its arguments. None means "the default of the model or of the
    analysis", as the field's comment says."""

    layer: int = 0
    layers: tuple | None = None  # --layers: the per-layer stages run at each (layer is then the first of them)
    top_k: int = 10
    max_length: int = 256
    plots_dir: str = "plots"
    prefix: str = "model"  # model label used in plot file names
    progress: bool = True
    attention_methods: tuple = ATTENTION_METHODS
    attention_layers: tuple | None = None  # --attention_layers: the attention stage's layers beside --layer
    # causal stages (causal, inter_layer, cross_layer, and the comparison's causal part)
    prompts: tuple | None = None  # None: causal_analysis.DEFAULT_PROMPTS
    causal_site: str | None = None  # None: the model's default causal site
    causal_dims: tuple | None = None  # None: every dimension (causal); the causal stage's top 3 (inter/cross)
    ablation: str = "zero"
    intervention_scale: float = 0.0
    causal_batch_size: int | None = None  # None: chosen from free memory
    # sparsity, efficiency, comparison
    sparsity_layers: tuple | None = None  # None: 0 1 2, those the model has
    sparsity_threshold: float | None = None  # None: the family's default
    dead_eps: float = 1e-6
    seq_lengths: tuple | None = None  # None: efficiency.SEQ_LENGTHS
    efficiency_budget: float = 15.0
    compare_model: str | None = None  # None: the other family's default model
    compare_source: object = None  # models.ModelSource, when main resolved it (and warned about a fallback)
    compare_warning: str | None = None
    compare_files: object = None  # models.inspect_model's result for the comparison model, when main has it
    compare_loaded: object = None  # models.LoadedModel of the comparison model, when main loaded (and checked) it
    device: object = "cpu"
    dtype: object = "float32"

    @property
    def prompt_list(self) -> list[str]:
        from causal_analysis import DEFAULT_PROMPTS

        return list(self.prompts or DEFAULT_PROMPTS)


_WHOLE_AT_LEAST = {"layer": 0, "top_k": 1, "max_length": 1, "causal_batch_size": 1, "text_limit": 1}
_WHOLE_LISTS = {"layers": 0, "attention_layers": 0, "causal_dims": 0, "sparsity_layers": 0, "seq_lengths": 1}
_FLOATS = {"intervention_scale": None, "sparsity_threshold": "at_least_0", "dead_eps": "positive",
           "efficiency_budget": "positive"}


def check_option_values(values: dict, flag: str = "") -> None:
    """Refuse option values no stage could answer, with a UserInputError (a ValueError) naming the option
    (`flag` + its name: "--top_k" from main.py, "top_k" from the library) and the fix: whole numbers (not
    bools, not 1.5) at or above their least value, lists of them that are not empty, finite floats in
    their range, known methods and ablations, prompts as a list of strings. Only the names present in
    `values` are checked; a None value means "the default". Ranges that depend on the model (a layer
    below its layer count, a dim below a site's width) are checked by the adapter."""
    from utils import UserInputError, finite_number, text_list, whole_number

    def whole(name, v, least):
        try:
            whole_number(f"{flag}{name}", v, low=least)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None

    for name, v in values.items():
        if v is None:
            continue
        if name in _WHOLE_AT_LEAST:
            whole(name, v, _WHOLE_AT_LEAST[name])
        elif name in _WHOLE_LISTS:
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise UserInputError(f"{flag}{name} {v!r}: give a list of whole numbers")
            items = list(v)
            if not items:
                raise UserInputError(f"{flag}{name}: an empty list; give at least one value or leave it out")
            for item in items:
                whole(name, item, _WHOLE_LISTS[name])
        elif name in _FLOATS:
            try:
                finite_number(f"{flag}{name}", v)
            except ValueError as exc:
                raise UserInputError(str(exc)) from None
            if _FLOATS[name] == "positive" and v <= 0:
                raise UserInputError(f"{flag}{name} {v}: must be positive")
            if _FLOATS[name] == "at_least_0" and v < 0:
                raise UserInputError(f"{flag}{name} {v}: must be at least 0")
        elif name == "attention_methods":
            methods = [v] if isinstance(v, str) else list(v)
            if not methods:
                raise UserInputError(f"{flag}{name}: an empty list; choose from {', '.join(ATTENTION_METHODS)}")
            bad = [m for m in methods if m not in ATTENTION_METHODS]
            if bad or isinstance(v, str):
                raise UserInputError(f"{flag}{name} {(bad or [v])[0]}: "
                                     f"{'give a list of methods' if not bad else 'unknown'}; choose from "
                                     f"{', '.join(ATTENTION_METHODS)}")
        elif name == "ablation":
            if v not in ("zero", "mean"):
                raise UserInputError(f"{flag}{name} {v}: unknown; choose zero or mean")
        elif name == "prompts":
            try:
                text_list(v, "prompts")
            except ValueError as exc:
                raise UserInputError(f"{flag}{exc}") from None
    if values.get("ablation") == "mean" and values.get("intervention_scale") not in (None, 0, 0.0):
        raise UserInputError(f"{flag}intervention_scale {values['intervention_scale']}: applies to the zero ablation "
                             f"only (the mean ablation sets the dimension to its mean); leave it out with "
                             f"{flag}ablation mean")


def check_plan(stages, opts: Options, flag: str = "") -> None:
    """Refuse a run whose stages cannot all run, before the first one does: inter_layer and cross_layer
    choose their dimensions from --causal_dims or the causal stage's top ones."""
    from utils import UserInputError

    lacking = [s for s in ("inter_layer", "cross_layer") if s in stages]
    if lacking and not opts.causal_dims and "causal" not in stages:
        raise UserInputError(f"the {lacking[0]} stage needs dimensions: give {flag}causal_dims, or run the causal "
                             "stage too (it chooses its top 3)")


@dataclass
class StageContext:
    """What a stage gets: the model, the tokenized texts, the options, and (through `upstream`) the results
    of the stages it declared in its `needs`."""

    model: object
    tokenizer: object
    adapter: object
    tokens: object  # utils.TokenizedTexts
    opts: Options
    results: dict  # the results of the stages run so far
    texts: tuple = ()  # the texts as strings (the comparison model tokenizes them itself)
    stages: tuple = ()  # the stages of this run, in order
    shared: dict = None  # {stage: {key: value}}: what a stage measured for a later one, kept out of the JSON
    current: str = ""  # the stage running now

    # the options every stage reads, by their short names
    layer = property(lambda self: self.opts.layer)
    top_k = property(lambda self: self.opts.top_k)
    plots_dir = property(lambda self: self.opts.plots_dir)
    prefix = property(lambda self: self.opts.prefix)
    progress = property(lambda self: self.opts.progress)

    def _declared(self, name: str) -> None:
        if name not in STAGES[self.current].needs:
            raise RuntimeError(f"stage {self.current} reads stage {name} without declaring it in its needs")

    def upstream(self, name: str) -> dict | None:
        """The results of stage `name` (one of this stage's needs) if it ran in this run and succeeded."""
        self._declared(name)
        entry = self.results.get(name) or self.results.get("layers", {}).get(self.layer, {}).get(name, {})
        return entry["results"] if entry.get("status") == "ok" else None

    def kept(self) -> dict:
        """The running stage's own store, kept across its runs at several layers (--layers) and readable by
        the stages that need it (`shared_by`); not written to the results."""
        return self.shared.setdefault(self.current, {})

    def shared_by(self, name: str, key: str):
        """What stage `name` (one of this stage's needs) kept under `key`, or None."""
        self._declared(name)
        return self.shared.get(name, {}).get(key)


def stage_delta(ctx: StageContext):
    import delta_extraction as de

    kept = ctx.kept()  # with --layers: every chosen layer in the first run, one forward a text
    if "stats" not in kept:
        kept["stats"] = de.delta_statistics_by_layer(ctx.model, ctx.tokenizer, ctx.tokens.input_ids,
                                                     ctx.opts.layers or [ctx.layer], ctx.progress)
    stats = kept["stats"][ctx.layer]
    plots = [de.plot_delta_variance(stats, ctx.top_k, ctx.plots_dir, ctx.prefix),
             de.plot_delta_heatmap(stats, ctx.plots_dir, ctx.prefix)]
    return stats.to_dict(ctx.top_k), plots


def attention_layers(opts: Options) -> list[int]:
    """The attention stage's layers: --layer and every --attention_layers layer."""
    return sorted({opts.layer, *(opts.attention_layers or ())})


def stage_attention(ctx: StageContext):
    """Attention neurons at --layer (and every --attention_layers layer) over every text: each method's unit
    scores averaged over texts. Mamba: hidden attention of the channels; Transformer: the attention
    weights of the attention-output dims (attention_neurons.UNITS)."""
    import attention_neurons as an

    analyzer = an.attention_neurons_for(ctx.model)
    layer, methods, layers = ctx.layer, ctx.opts.attention_methods, attention_layers(ctx.opts)
    # with --layers, each text's rolled-out map of the previous chosen layer is kept, so that rollout at the
    # next one streams only the layers between them
    kept = ctx.kept()
    rolled = kept.setdefault("rolled", {}) if ctx.opts.layers else None  # text index -> (layer, R)
    feed = None
    if "sparsity" in ctx.stages and "gradient_guided" in methods and "sparsity_feed" not in kept:
        # the gradient pass is a full forward of every text: the sparsity stage reads its sites from it
        import sparsity as sp

        feed = kept["sparsity_feed"] = sp.ForwardFeed(ctx.model, ctx.adapter, ctx.tokens.input_ids,
                                                      sparsity_measured_layers(ctx))
    by_layer = an.attention_profile(analyzer, ctx.tokens.input_ids, layers, methods, ctx.top_k, ctx.progress,
                                    rolled, desc=f"attention layer{'s' if len(layers) > 1 else ''} "
                                                 f"{', '.join(map(str, layers))}", maps_at={layer}, feed=feed)
    family = "mamba" if ctx.adapter.is_ssm else "transformer"
    results = {**by_layer[layer], "units": analyzer.describe_units(),
               "definitions": {m: an.DEFINITIONS[m] for m in methods}}
    plots = [an.plot_attention_vector(results["attention_vector_first_text"], layer, ctx.plots_dir, ctx.prefix,
                                      family)]
    plots += [analyzer.visualize_neurons(an.neuron_scores(results, m), layer, ctx.plots_dir, ctx.prefix, ctx.top_k)
              for m in methods]
    if len(layers) > 1:
        results["attention_layers"] = layers
        results["by_layer"] = by_layer
        plots.append(an.plot_attention_depth([(ctx.prefix, ctx.adapter.n_layers, by_layer)], ctx.plots_dir,
                                             f"{ctx.prefix}_attention_by_layer_{layer_tag(layers[0], layers)}"))
    return results, plots


def attention_by_layer(results: dict) -> dict:
    """{layer: profile entry} of an attention stage's results (one layer, or every --attention_layers layer)."""
    return results.get("by_layer") or {results["layer"]: results}


def _causal_site(ctx: StageContext) -> str:
    return ctx.opts.causal_site or ctx.adapter.default_causal_site


def stage_causal(ctx: StageContext):
    """KL impact of ablating every dimension (or --causal_dims) of the site at --layer, over the prompts."""
    import numpy as np

    import causal_analysis as ca

    o, site = ctx.opts, _causal_site(ctx)
    scores = ca.causal_impact_scores(ctx.model, ctx.tokenizer, o.prompt_list, ctx.layer, site, o.intervention_scale,
                                     o.ablation, o.causal_dims, o.causal_batch_size, ctx.progress)
    dims = np.arange(len(scores)) if o.causal_dims is None else np.asarray(o.causal_dims)
    order = np.argsort(-scores, kind="stable")[:ctx.top_k]
    results = {"layer": ctx.layer, "site": site, "ablation": o.ablation,
               "intervention_scale": o.intervention_scale if o.ablation == "zero" else None,  # mean: not used
               "prompts": o.prompt_list, "n_dims": int(len(scores)),
               "top_neurons": [{"dim": int(dims[i]), "score": float(scores[i])} for i in order],
               "dims": dims, "scores": scores, "n_zero": int((scores == 0).sum()),
               "definition": "mean over prompts of KL(p_clean || p_ablated) of the next-token distribution "
                             "at the last position"}
    return results, ca.plot_causal_impacts(scores, dims, ctx.top_k, ctx.layer, site, ctx.plots_dir, ctx.prefix)


def _chosen_dims(ctx: StageContext, n: int = 3) -> list[int]:
    """Every --causal_dims dimension, else the causal stage's top `n`."""
    if ctx.opts.causal_dims:
        return list(ctx.opts.causal_dims)
    causal = ctx.upstream("causal")
    if causal is None:
        raise ValueError("needs --causal_dims or a successful causal stage to choose its dimensions")
    return [t["dim"] for t in causal["top_neurons"][:n]]


def stage_inter_layer(ctx: StageContext):
    """Impact of ablating each chosen dimension at every layer in turn (mean over the prompts)."""
    import causal_analysis as ca

    o, site = ctx.opts, _causal_site(ctx)
    dims = _chosen_dims(ctx)
    # one clean run per prompt for every layer; (layer, dim) ablations share passes
    per_layer = ca.causal_impact_by_layer(ctx.model, ctx.tokenizer, o.prompt_list, range(ctx.adapter.n_layers),
                                          site, o.intervention_scale, o.ablation, dims, o.causal_batch_size,
                                          ctx.progress)  # (n_layers, n_dims)
    curves = {d: [(layer, float(sc[i])) for layer, sc in enumerate(per_layer)] for i, d in enumerate(dims)}
    results = {"site": site, "dims": dims,
               "curves": {str(d): [{"layer": la, "relative_depth": la / max(1, ctx.adapter.n_layers - 1),
                                    "score": sc} for la, sc in c] for d, c in curves.items()}}
    return results, [ca.plot_inter_layer(curves, site, ctx.plots_dir, ctx.prefix)]


def stage_cross_layer(ctx: StageContext):
    """Ablate each chosen dimension at every source layer, read it in the residual stream after every
    target layer (last position), averaged over the prompts."""
    import numpy as np

    import causal_analysis as ca

    o, site = ctx.opts, _causal_site(ctx)
    site = site if ctx.adapter.site(site, 0).size == ctx.adapter.hidden_size else "residual"
    chosen = _chosen_dims(ctx)
    dims = [d for d in chosen if d < ctx.adapter.hidden_size]
    if not dims:
        raise ValueError(f"no chosen dimension lies in the residual stream (width {ctx.adapter.hidden_size})")
    per = [ca.cross_layer_matrix(ctx.model, ctx.tokenizer, p, dims, site, o.intervention_scale,
                                 batch_size=o.causal_batch_size) for p in o.prompt_list]
    m = {k: np.mean([x[k] for x in per], axis=0) for k in ("clean", "ablated", "change")}
    m.update(dims=per[0]["dims"], sources=per[0]["sources"], targets=per[0]["targets"])
    results = {"site": site, "readout": "residual stream after each target layer, last position, "
                                        "mean over prompts", **m,
               "left_out_dims": [d for d in chosen if d not in dims],
               "max_abs_change_before_source": float(max(np.abs(m["change"][:, s, :s]).max(initial=0.0)
                                                         for s in range(ctx.adapter.n_layers)))}
    return results, [ca.plot_cross_layer(m, site, ctx.plots_dir, ctx.prefix)]


def _sparsity_layers(ctx: StageContext) -> list[int]:
    chosen = ctx.opts.sparsity_layers
    if chosen is None:
        return [la for la in (0, 1, 2) if la < ctx.adapter.n_layers]
    return [ctx.adapter.check_layer(la) for la in chosen]


def sparsity_measured_layers(ctx: StageContext) -> list[int]:
    """The layers the sparsity stage measures (in its first run): every layer when the comparison runs
    (it needs them all: measured in the same forwards, so it need not run them again), else --layer (every
    --layers layer) and the --sparsity_layers."""
    if "comparison" in ctx.stages:
        return list(range(ctx.adapter.n_layers))
    return sorted({*(ctx.opts.layers or (ctx.layer,)), *_sparsity_layers(ctx)})


def stage_sparsity(ctx: StageContext):
    """Every sparsity method for the neuron site at --layer, and across --sparsity_layers (streamed). When
    the attention stage ran its gradient pass over the same texts, the sites are read from those forwards
    (`sparsity.ForwardFeed`, checked against the model's own forward on the first text), else measured here."""
    import sparsity as sp

    multi = _sparsity_layers(ctx)
    kept = ctx.kept()
    if "stats" not in kept:  # with --layers: every analysed layer in the first run, kept for the others
        feed = ctx.shared_by("attention", "sparsity_feed")
        stats = feed.result(ctx.opts.sparsity_threshold, ctx.opts.dead_eps) if feed is not None else None
        kept["stats"] = stats or sp.layer_sparsity(ctx.model, ctx.adapter, ctx.tokens.input_ids,
                                                   sparsity_measured_layers(ctx), ctx.opts.sparsity_threshold,
                                                   ctx.opts.dead_eps, progress=ctx.progress)
        kept["source"] = sp.measured_in(feed, "the attention stage's gradient forwards")
    stats = kept["stats"]
    single = stats[ctx.layer]
    chosen = {la: stats[la] for la in multi}
    plots = sp.sparsity_plots([(ctx.prefix, single)], [(ctx.prefix, chosen)], ctx.plots_dir, ctx.prefix,
                              tag=f"_layer{ctx.layer}")
    results = {"site": single["site"], "layer": ctx.layer, "sparsity_layers": multi, "single": single,
               "layers": chosen, "multilayer": sp.multilayer_table(chosen), "note": sp.SCALE_NOTE,
               "definitions": sp.__doc__, "measured_in": kept["source"]}
    return results, plots


def stage_efficiency(ctx: StageContext):
    """Parameters, neurons, active neurons at --layer, measured time / memory against sequence length."""
    import torch

    import efficiency as ef
    import sparsity as sp

    o = ctx.opts
    done = ctx.upstream("sparsity")
    if done is not None:
        stats = done["single"]
    else:
        stats = sp.layer_sparsity(ctx.model, ctx.adapter, ctx.tokens.input_ids, [ctx.layer], o.sparsity_threshold,
                                  o.dead_eps, progress=ctx.progress)[ctx.layer]
    pool = torch.cat([ids[0] for ids in ctx.tokens.input_ids]).cpu().numpy()
    res = ef.efficiency_metrics(ctx.model, ctx.adapter, pool, stats, o.seq_lengths or ef.SEQ_LENGTHS,
                                o.efficiency_budget, ctx.progress)
    plots = [ef.plot_efficiency([(ctx.prefix, res)], ctx.plots_dir, f"{ctx.prefix}_efficiency_layer{ctx.layer}"),
             ef.plot_scaling([(ctx.prefix, res)], ctx.plots_dir, f"{ctx.prefix}_scaling")]
    return res, plots


def stage_comparison(ctx: StageContext):
    """Both models through sparsity (every layer), efficiency, (when the causal stage ran) causal impacts
    and (with the attention stage) attention neurons, on the same texts; layers matched by relative depth."""
    import comparison_plots as cp
    import comparison_wrapper as cw
    from models import load_model_and_tokenizer

    o = ctx.opts
    if o.compare_source is not None:  # resolved (and its fallback warned about) by main
        source, warning = o.compare_source, o.compare_warning
    else:
        source, warning = cw.resolve_compare_model(o.compare_model, ctx.adapter.family)
    loaded = o.compare_loaded or load_model_and_tokenizer(source, o.device, o.dtype, "--compare_model",
                                                          files=o.compare_files)
    label = model_prefix(source.requested, source.origin, source.resolved_path)
    if label == ctx.prefix:
        label += "_compare"
    from models import get_adapter

    main_run = cw.ModelRun(ctx.prefix, ctx.model, ctx.tokenizer, ctx.adapter, "main")
    other = cw.ModelRun(label, loaded.model, loaded.tokenizer, get_adapter(loaded.model), source.origin)
    limit = ctx.adapter.max_positions
    same_tokens = limit is None or ctx.tokens.max_length <= limit  # as the comparison tokenizes the texts
    attention = None
    if "attention" in ctx.stages:  # both models' attention neurons, the main model's from its stage
        done = ctx.upstream("attention")
        if done is None:
            attention = {"skipped": "the attention stage did not succeed (its error is listed with it)"}
        else:
            by_layer = attention_by_layer(done)
            attention = {"methods": o.attention_methods, "main_layers": sorted(by_layer),
                         "main_by_layer": by_layer if same_tokens else None, "top_k": ctx.top_k}
    comp = cw.compare_models(main_run, other, list(ctx.texts), ctx.layer, ctx.tokens.max_length, o.sparsity_threshold,
                             o.dead_eps, _sparsity_layers(ctx), o.seq_lengths, o.efficiency_budget,
                             ctx.upstream("causal"), o.causal_batch_size, ctx.progress,
                             main_efficiency=ctx.upstream("efficiency"),
                             main_sparsity=ctx.shared_by("sparsity", "stats") if same_tokens else None,
                             attention=attention)
    comp["compare_model"] = {"requested": source.requested, "source": source.origin,
                             "resolved_path": source.resolved_path, "warning": warning}
    comp["methods_at_matched_layers"] = cp.methods_table(comp)
    return comp, cp.comparison_plots(comp, ctx.plots_dir, f"{ctx.prefix}_vs_{label}")


def resolve_stages(requested: list[str] | None, family: str | None = None, enable_attention: bool = True
                   ) -> list[str]:
    """Stage names to run, in pipeline order: by default every stage (the attention stage only with
    `enable_attention`). UserInputError for unknown names, or for an explicitly requested stage that does
    not apply to the model's family (`family`)."""
    from utils import UserInputError

    if requested is None:
        return [s for s in ALL_STAGES if enable_attention or s != "attention"]
    names = [n.strip() for item in requested for n in item.split(",") if n.strip()]
    if not names:
        raise UserInputError(f"--stages {' '.join(requested)!r}: names no stage; choose from {', '.join(ALL_STAGES)}")
    for n in names:
        if n not in STAGES:
            raise UserInputError(f"--stages {n}: unknown stage; choose from {', '.join(ALL_STAGES)}")
        if family is not None and not STAGES[n].applies_to(family):
            raise UserInputError(f"--stages {n}: a {'/'.join(sorted(STAGES[n].families))}-only analysis, not "
                                 f"applicable to {family}; drop it from --stages or pass a Mamba model")
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
    called once the texts are tokenized, `on_stage(name, entry)` as each stage ends (main prints them).

    The options: `layer`, `top_k`, ... as named; `causal`: {"prompts", "site", "dims", "ablation",
    "intervention_scale", "batch_size"}; `options`: {"sparsity_layers", "threshold", "dead_eps",
    "compare_model", "seq_lengths", "budget", "device", "dtype"}, or an `Options` object holding every
    option (then the other option arguments are not used)."""
    if not isinstance(options, Options):
        c, o = dict(causal or {}), dict(options or {})
        names = {"prompts": "prompts", "site": "causal_site", "dims": "causal_dims", "ablation": "ablation",
                 "intervention_scale": "intervention_scale", "batch_size": "causal_batch_size",
                 "sparsity_layers": "sparsity_layers", "threshold": "sparsity_threshold", "dead_eps": "dead_eps",
                 "compare_model": "compare_model", "seq_lengths": "seq_lengths", "budget": "efficiency_budget",
                 "device": "device", "dtype": "dtype", "compare_source": "compare_source",
                 "compare_warning": "compare_warning", "compare_files": "compare_files",
                 "compare_loaded": "compare_loaded"}
        unknown = sorted((set(c) | set(o)) - set(names))
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}; known: {', '.join(names)}")
        given = {names[k]: tuple(v) if isinstance(v, list) else v for k, v in {**o, **c}.items() if v is not None}
        options = Options(layer=layer, top_k=top_k, max_length=max_length, plots_dir=str(plots_dir), prefix=prefix,
                          progress=progress, attention_methods=tuple(attention_methods), **given)
    return run_pipeline(model, tokenizer, texts, options, stages, on_start, on_stage)


def run_pipeline(model, tokenizer, texts, opts: Options, stages=None, on_start=None, on_stage=None) -> dict:
    """`run_comprehensive_analysis` with the options as one `Options` object."""
    from models import NotApplicable, get_adapter
    from utils import UserInputError, check_vocab_ids, text_list, tokenize_texts

    adapter = get_adapter(model)
    check_option_values({f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})
    adapter.check_layer(opts.layer)
    texts = text_list(texts)
    stages = resolve_stages(stages)
    check_plan(stages, opts)
    short = too_few_texts(stages, adapter.family, len(texts))
    if short:
        raise UserInputError(f"the {short[0]} stage needs at least {short[1]} texts; got {len(texts)}")
    tokens = tokenize_texts(tokenizer, texts, opts.max_length)
    vocab = model.get_input_embeddings().num_embeddings
    for i, ids in enumerate(tokens.input_ids):
        check_vocab_ids(ids[0].tolist(), vocab, f"text {i + 1} ({texts[i][:40]!r})")
    results: dict = {"texts": {"n_texts": len(texts), "n_tokens": int(sum(tokens.lengths)),
                               "max_length": opts.max_length, "n_truncated": tokens.n_truncated},
                     "architecture": adapter.describe()}
    layers = opts.layers
    if layers is not None:  # every per-layer stage at each layer, then the others once, at the first layer
        layers = tuple(sorted({adapter.check_layer(la) for la in layers}))  # ascending: rollout builds on the last
        opts = dataclasses.replace(opts, layers=layers, layer=layers[0])
        results["layers"] = {la: {} for la in layers}
        plan = [(n, la) for la in layers for n in stages if STAGES[n].per_layer]
        plan += [(n, None) for n in stages if not STAGES[n].per_layer]
    else:
        plan = [(n, None) for n in stages]
    ctx = StageContext(model, tokenizer, adapter, tokens, opts, results, tuple(texts), tuple(stages), {})
    if on_start is not None:
        on_start(results)
    for name, layer in plan:
        ctx.opts = opts if layer is None else dataclasses.replace(opts, layer=layer)
        ctx.current = name
        entry = _run_stage(name, lambda: STAGES[name].run(ctx), NotApplicable)
        if layer is None:
            results[name] = entry
        else:
            entry["layer"] = layer
            results["layers"][layer][name] = entry
        if on_stage is not None:
            on_stage(name, entry)
    if layers is not None and any(STAGES[n].per_layer for n in stages):
        entry = _run_stage("depth_profiles", lambda: _depth_profiles_stage(results, adapter, opts), NotApplicable)
        results["depth_profiles"] = entry
        if on_stage is not None:
            on_stage("depth_profiles", entry)
    return results


def stage_entries(results: dict) -> list[tuple[str, str, dict]]:
    """Every stage entry of a results dict, in run order: (label, stage name, entry); the per-layer
    entries of a --layers run labelled "stage, layer L", then the others (and the depth profiles)."""
    out = [(f"{name}, layer {la}", name, e) for la, by in results.get("layers", {}).items() for name, e in by.items()]
    return out + [(k, k, v) for k, v in results.items() if isinstance(v, dict) and "status" in v]


def _run_stage(name: str, run, not_applicable) -> dict:
    """One stage's entry: {"status", "results" + "plots" | "reason" | "error", "wall_time_s"}."""
    logger.info("stage %s: started", name)
    t0 = time.perf_counter()
    from utils import NOT_WRITTEN

    not_written = len(NOT_WRITTEN)
    try:
        out, plots = run()
        entry = {"status": "ok", "results": out, "plots": plots}
        failed = dict(NOT_WRITTEN[not_written:])  # the stage's numbers are kept; its lost plots are named
        if failed:
            entry["plots"] = [p for p in plots if p not in failed]
            entry["plots_not_written"] = [{"path": p, "error": why} for p, why in failed.items()]
    except not_applicable as exc:
        entry = {"status": "not_applicable", "reason": str(exc)}
    except Exception as exc:  # a failed stage is recorded with its error; the other stages go on
        logger.debug("stage %s failed", name, exc_info=True)
        entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    entry["wall_time_s"] = round(time.perf_counter() - t0, 4)
    return entry


def too_few_texts(stages, family: str, n_texts: int) -> tuple[str, int] | None:
    """(stage, texts it needs) for the first stage asked for that `n_texts` texts are too few for (its
    `min_texts`; a stage that does not apply to `family` does not run), else None."""
    for name in stages:
        stage = STAGES[name]
        if n_texts < stage.min_texts and stage.applies_to(family):
            return name, stage.min_texts
    return None


def model_prefix(name: str, origin: str = "", resolved_path: str | None = None) -> str:
    """A file-name-safe label for a model, used in every output file's name: a hub id with '/' -> '_'
    ('state-spaces_mamba-130m-hf'); 'reference_mamba' for the shipped reference model; a local folder
    (`origin` "local") its name and the first 8 hex digits of the SHA-256 of its absolute path
    (`resolved_path`), so that folders of the same name (runA/final, runB/final) never share a file."""
    import hashlib

    p = Path(name)
    label = p.name if origin in ("local", "reference") or p.is_dir() else name.replace("/", "_")
    label = re.sub(r"[^\w.\-]+", "_", f"reference_{label}" if origin == "reference" else label) or "model"
    if origin == "local":
        where = str(Path(resolved_path or name).resolve())
        label += "-" + hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return label


# --------------------------------------------------------------------------------------------------
# Depth profiles (--layers): each per-layer stage's headline numbers over relative depth
# --------------------------------------------------------------------------------------------------
def _profile_metrics(stage: str, r) -> tuple[dict, dict]:
    """({metric: value}, {metric: why it is left out}): the headline numbers of one per-layer stage's
    results `r` at one layer. A value the profile reads that is missing, undefined (None) or not a finite
    number (a list of them, for Δ's text variances and the causal scores) is left out with the reason."""
    import math

    import numpy as np

    missing = object()

    def at(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return missing
            d = d[k]
        return d

    def number(v) -> bool:  # a finite int or float (numpy's too), not a bool
        return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                and math.isfinite(v))

    def why_not_number(v, what: str) -> str:
        if v is missing:
            return f"{what} is missing"
        return f"{what} is undefined (null)" if v is None else f"{what} is not a finite number"

    def numbers(v, what: str):
        if v is missing or v is None:
            return None, why_not_number(v, what)
        if isinstance(v, np.ndarray):  # a run's own results, before they are saved as JSON
            if v.ndim != 1 or not v.size or v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.number):
                return None, f"{what} is not a non-empty list of numbers"
            v = v.astype(np.float64)
            return (v, None) if np.isfinite(v).all() else (None, f"{what} holds a value that is not a finite number")
        if not isinstance(v, (list, tuple)) or not v:
            return None, f"{what} is not a non-empty list of numbers"
        if not all(number(x) for x in v):
            return None, f"{what} holds a value that is not a finite number"
        return np.asarray(v, dtype=np.float64), None

    if stage in ("delta", "causal"):
        names, field = (("delta: max text variance", "delta: median text variance"), ("per_channel", "text_variance")
                        ) if stage == "delta" else (("causal: max impact", "causal: median impact"), ("scores",))
        v, why = numbers(at(r, *field), ".".join(field))
        if why is not None:
            return {}, dict.fromkeys(names, why)
        return {names[0]: float(v.max()), names[1]: float(np.median(v))}, {}
    if stage == "attention":
        methods = at(r, "methods")
        if not isinstance(methods, dict) or not methods:
            return {}, {"attention: diversity": "methods is missing or not a non-empty object"}
        out, left = {}, {}
        for m, a in methods.items():
            d = at(a, "neuron_diversity")
            if number(d):
                out[f"attention: diversity, {m}"] = float(d)
            else:
                left[f"attention: diversity, {m}"] = why_not_number(d, f"methods.{m}.neuron_diversity")
        return out, left
    if stage != "sparsity":
        return {}, {}
    import sparsity as sp

    single = at(r, "single")
    out, left = {}, {}
    for name, f in sp.MULTILAYER_METRICS:
        metric = f"sparsity: {name}"
        if not isinstance(single, dict):
            left[metric] = "single is missing or not an object"
            continue
        try:
            v = f(single)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            left[metric] = f"single: the fields of {name} are missing or of the wrong type"
            continue
        if number(v):
            out[metric] = float(v)
        else:
            left[metric] = why_not_number(v, f"single: {name}")
    return out, left


PROFILE_DEFINITIONS = {
    "delta": "max and median over channels of the across-text variance of the per-text mean of Δ",
    "causal": "max and median over the site's dimensions of the causal impact (mean KL over the prompts)",
    "attention": "neuron diversity of each method (normalised entropy of the channel activations, 1 = uniform)",
    "sparsity": "each sparsity measure of the layer's neuron site (as in the sparsity stage's multi-layer table)",
}


def depth_profiles(layer_results: dict, n_layers: int) -> dict:
    """{"layers", "relative_depth", "metrics": {metric: [value per layer, None where its stage did not
    succeed or the value is left out]}, "left_out": [{"layer", "metric", "reason"}] (values that are
    missing, undefined or not finite numbers: `_profile_metrics`), "definitions"} from {layer: {stage:
    entry}} (the per-layer stages of a --layers run)."""
    layers = sorted(layer_results)
    per = {la: {} for la in layers}
    left_out = []
    for la in layers:
        for stage, entry in layer_results[la].items():
            if isinstance(entry, dict) and entry.get("status") == "ok":
                got, why = _profile_metrics(stage, entry.get("results"))
                per[la].update(got)
                left_out += [{"layer": la, "metric": m, "reason": w} for m, w in why.items()]
    names = list(dict.fromkeys([*(m for la in layers for m in per[la]), *(x["metric"] for x in left_out)]))
    return {"layers": layers, "relative_depth": [la / max(1, n_layers - 1) for la in layers],
            "metrics": {m: [per[la].get(m) for la in layers] for m in names}, "left_out": left_out,
            "definitions": PROFILE_DEFINITIONS}


def plot_depth_profiles(profiles: dict, plots_dir, name: str) -> str:
    """One panel per metric against relative depth; a layer where the metric's stage did not succeed is
    left out of its panel."""
    import math

    import matplotlib.pyplot as plt

    from utils import save_figure

    metrics = profiles["metrics"]
    cols = min(4, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, constrained_layout=True)
    x = profiles["relative_depth"]
    for ax, (metric, values) in zip(axes.ravel(), metrics.items()):
        pts = [(xi, v) for xi, v in zip(x, values) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("relative depth (layer / (layers - 1))", fontsize=8)
        ax.set_xlim(-0.05, 1.05)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes.ravel()[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"Depth profiles, layers {', '.join(map(str, profiles['layers']))}")
    return save_figure(fig, plots_dir, name)


def layer_tag(layer: int, layers: list[int] | None) -> str:
    """The results files' name part: layer3, or for --layers e.g. layers0-3_5 (runs of layers as ranges)."""
    if layers is None:
        return f"layer{layer}"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, [*layers[1:], None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = cur
    return "layers" + "_".join(runs)


def merge_layer_results(runs: list[tuple[str, object]]) -> tuple[dict, dict]:
    """({layer: {stage: entry}}, {layer: file}) from saved results [(file name, parsed JSON)]: one-layer
    runs (`--layer L`) and --layers runs alike, of one model. ValueError naming the file and what is wrong
    when one is not in the layout the merge reads (an object with "run" {"model", "model_class": strings;
    "notes": strings; "model_source", "resolved_path", "plots_dir": strings if given} and "architecture"
    {"n_layers": int >= 1}; its layers ints in 0..n_layers-1, from "layers" {"L": {stage: entry}} or
    run.layer; each per-layer stage entry an object with a "status" of ok (with "results", an object),
    error (with "error") or not_applicable (with "reason"), "plots" a list of paths), holds no per-layer
    stage results, or when the files hold different models or the same layer twice. The values the depth
    profiles read are checked there (`_profile_metrics`)."""
    import math

    def kind(v) -> str:
        return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                type(None): "null"}.get(type(v), "a number")

    def show(v) -> str:
        text = repr(v)
        return text if len(text) <= 40 and not isinstance(v, (dict, list)) else kind(v)

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    layers, source, first = {}, {}, None
    for name, res in runs:
        def bad(what: str) -> ValueError:
            return ValueError(f"{name}: {what}")

        if not isinstance(res, dict):
            raise bad(f"not a results file of this tool (the JSON is {kind(res)}, not an object)")
        run, arch = res.get("run"), res.get("architecture")
        for field, value in (("run", run), ("architecture", arch)):
            if not isinstance(value, dict):
                raise bad(f"not a results file of this tool (no {field} metadata)" if value is None
                          else f'"{field}" is {kind(value)}, not an object')
        for field in ("model", "model_class"):
            if not isinstance(run.get(field), str) or not run[field]:
                raise bad(f"run.{field} is {'missing' if field not in run else show(run[field])}, not a name")
        for field in ("model_source", "resolved_path", "plots_dir"):
            if run.get(field) is not None and not isinstance(run[field], str):
                raise bad(f"run.{field} is {kind(run[field])}, not a string")
        for field in ("model", "model_class", "model_source", "resolved_path", "plots_dir"):
            if "\0" in (run.get(field) or ""):
                raise bad(f"run.{field} holds a NUL character: not a name")
        notes = run.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise bad("run.notes is not a list of strings")
        if "texts" in res and not isinstance(res["texts"], dict):
            raise bad(f'"texts" is {kind(res["texts"])}, not an object')
        n_layers = arch.get("n_layers")
        if not is_int(n_layers) or n_layers < 1:
            raise bad(f"architecture.n_layers is {'missing' if 'n_layers' not in arch else show(n_layers)}, "
                      "not a whole number >= 1")
        key = (run["model"], run["model_class"], n_layers)
        if first is None:
            first = (name, key)
        elif key != first[1]:
            def printable(t) -> str:  # one line, whatever the names hold
                return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(t))

            raise ValueError(f"{name} holds {printable(key[0])} ({printable(key[1])}), {first[0]} holds "
                             f"{printable(first[1][0])} ({printable(first[1][1])}): merge the results of one model")

        def layer_number(v, where: str, key: bool = False) -> int:  # a JSON object's key is a string
            la = v
            if key and isinstance(v, str) and v.isascii() and v.isdigit() and str(int(v)) == v:
                la = int(v)
            if not is_int(la) or not 0 <= la < n_layers:
                raise bad(f"{where} is {show(v)}: not a layer of this {n_layers}-layer model "
                          f"(a whole number 0..{n_layers - 1})")
            return la

        if "layers" in res:  # a --layers run: {"L": {stage: entry}}
            if not isinstance(res["layers"], dict):
                raise bad(f'"layers" is {kind(res["layers"])}, not an object')
            found = {}
            for k, by in res["layers"].items():
                la = layer_number(k, "a key of \"layers\"", key=True)
                if not isinstance(by, dict):
                    raise bad(f"layers[{k!r}] is {kind(by)}, not an object of stage entries")
                for stage in by:
                    if stage not in STAGES or not STAGES[stage].per_layer:
                        raise bad(f"layers[{k!r}] holds {show(stage)}, not a per-layer stage (delta, causal, "
                                  "attention, sparsity)")
                found[la] = ({f"layers[{k!r}].{stage}": stage for stage in by}, by)
        else:  # a --layer run: its per-layer stages at the top level
            la = layer_number(run.get("layer"), "run.layer") if "layer" in run else None
            by = {n: e for n, e in res.items() if n in STAGES and STAGES[n].per_layer}
            if la is None and by:
                raise bad("run.layer is missing: the layer of its stage results is not recorded")
            found = {} if la is None else {la: ({stage: stage for stage in by}, by)}
        if not any(by for _, by in found.values()):
            raise bad("holds no per-layer stage results (delta, causal, attention, sparsity)")
        for la, (labels, by) in found.items():
            for where, stage in labels.items():
                e = by[stage]
                if not isinstance(e, dict):
                    raise bad(f"{where} is {kind(e)}, not a stage entry (an object)")
                status = e.get("status")
                if status not in ("ok", "error", "not_applicable"):
                    raise bad(f"{where}.status is {'missing' if 'status' not in e else show(status)}, not one of "
                              "ok, error, not_applicable")
                needs = {"ok": ("results", dict, "an object"), "error": ("error", str, "a string"),
                         "not_applicable": ("reason", str, "a string")}[status]
                if not isinstance(e.get(needs[0]), needs[1]):
                    raise bad(f"{where}.{needs[0]} is {'missing' if needs[0] not in e else kind(e[needs[0]])}, "
                              f"not {needs[2]} (the entry's status is {status})")
                plots = e.get("plots", [])
                if not isinstance(plots, list) or not all(isinstance(p, str) for p in plots):
                    raise bad(f"{where}.plots is not a list of file names")
                t = e.get("wall_time_s", 0.0)
                if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)):
                    raise bad(f"{where}.wall_time_s is {show(t)}, not a number of seconds")
                if "layer" in e and not (is_int(e["layer"]) and e["layer"] == la):
                    raise bad(f"{where}.layer is {show(e['layer'])}, but the entry is filed under layer {la}")
        for la, (_, by) in found.items():
            if la in layers:
                raise ValueError(f"layer {la} is in both {source[la]} and {name}: give each layer once")
            layers[la], source[la] = by, name
    return dict(sorted(layers.items())), source


def _depth_profiles_stage(results: dict, adapter, opts: Options):
    profiles = depth_profiles(results["layers"], adapter.n_layers)
    if not profiles["metrics"]:
        raise ValueError("no per-layer stage succeeded at any layer: nothing to profile")
    name = f"{opts.prefix}_depth_profiles_{layer_tag(opts.layer, list(profiles['layers']))}"
    return profiles, [plot_depth_profiles(profiles, opts.plots_dir, name)]


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------
def stage_text(name: str, e: dict) -> str:
    """One stage's summary as main prints it (and the HTML report shows it)."""
    import contextlib
    import io

    label = f"{name}, layer {e['layer']}" if "layer" in e else name
    head = f"[{label}] {e['status']} ({e['wall_time_s']:.2f} s)"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if e["status"] == "not_applicable":
            print(f"{head}: {e['reason']}")
        elif e["status"] == "error":
            print(f"{head}: {e['error']}")
        else:
            print(head)
            (STAGES[name].summarize if name in STAGES else summarize_depth_profiles)(e["results"])
            for p in e.get("plots", []):
                print(f"    plot: {p}")
            for p in e.get("plots_not_written", []):
                print(f"    plot NOT written: {p['path']} ({p['error']})")
    return buf.getvalue()


def _num(v, spec: str) -> str:
    """A number as `spec` formats it, or "undefined" for a measure undefined for its input (None)."""
    return "undefined" if v is None else format(v, spec)


def summarize_delta(r: dict) -> None:
    rec = r["reconstruction"]
    unit = r.get("unit", "channel")
    print(f"    {r['n_channels']} {unit}s, {r['n_texts']} texts, {r['n_tokens']} tokens; mixer reconstruction "
          f"max rel. error {rec['max_relative_error']:.2e} (tolerance {rec['tolerance']:.0e})")
    print(f"    top delta-sensitive {unit}s (variance across texts of mean Δ | mean Δ | within-text var):")
    for n in r["top_neurons"]:
        print(f"      {unit} {n['channel']:>5}: {n['variance']:.4e} | {n['mean_delta']:.4e} | "
              f"{_num(n['token_variance'], '.4e')}")
    for field, why in (r.get("undefined") or {}).items():
        print(f"    {field}: {why}")


def _unit_label(t: dict) -> str:
    """A top neuron's index, with its head for a Transformer's attention-output dims."""
    return f"{t['channel']}" + (f"/h{t['head']}" if "head" in t else "")


def summarize_attention(r: dict) -> None:
    units = r.get("units") or {"unit": "channel"}
    unit = units["unit"]
    if unit == "channel" and "n_heads" in units:  # Mamba-2
        print(f"    hidden attention over {r['n_texts']} texts; units: the {units['n_units']} channels of the inner "
              f"width ({units['n_heads']} heads x {units['head_dim']}), each mixed by its head's α; (α x + D x) "
              f"through the gated norm: max rel. error {r['max_reconstruction_error']:.2e}")
    elif unit == "channel":
        print(f"    hidden attention over {r['n_texts']} texts; units: channels of the inner width; (α x + D x) "
              f"reconstruction max rel. error {r['max_reconstruction_error']:.2e}")
    else:
        print(f"    attention over {r['n_texts']} texts; units: the {units['n_units']} attention-output dims "
              f"({units['n_heads']} heads x {units['head_dim']}), each mixed by its head's weights; (A v) through "
              f"the output projection: max rel. error {r['max_reconstruction_error']:.2e}")
    for la, e in attention_by_layer(r).items():
        where = f"layer {la} " if "by_layer" in r else ""
        for m, a in e["methods"].items():
            top = ", ".join(_unit_label(t) + f" ({t['activation']:.3g})" for t in a["top_neurons"][:5])
            print(f"    {where}{m}: {a['num_neurons']} {unit}s, mean activation {_num(a['mean_activation'], '.4g')} "
                  f"(std {_num(a['activation_std'], '.3g')}), diversity {_num(a['neuron_diversity'], '.3f')}; "
                  f"top: {top or 'none (no ranking)'}")
            for field, why in (a.get("undefined") or {}).items():
                print(f"      {field}: {why}")


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
            f"{p50:.3f}, entropy {_num(s['entropy']['sparsity'], '.3f')}, Gini {_num(s['gini'], '.3f')}, Hoyer "
            f"{_num(s['hoyer'], '.3f')}, dead {s['dead_neurons']['count']}")


def summarize_sparsity(r: dict) -> None:
    s = r["single"]
    where = f"; measured in {r['measured_in']}" if "measured_in" in r else ""  # (results of older versions lack it)
    print(f"    site {r['site']} ({s['n_neurons']} neurons), {s['n_tokens']} tokens{where}")
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
    att = r.get("attention")
    if att is not None:
        print(f"    attention: {att['skipped'] if 'skipped' in att else att['note']}")



# --------------------------------------------------------------------------------------------------
# The registry: one entry per stage
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One analysis stage. `run(ctx)` returns (results dict, [plot paths]); `summarize(results)` prints its
    summary lines; `families`: the model families it applies to (None: every family); `needs`: the stages
    whose results (or shared measurements) it reads when they ran in the same run: they run before it, and
    reading any other stage's results is an error; `min_texts`: the fewest texts it can work with;
    `per_layer`: with --layers it runs at each chosen layer (its results under "layers"), the others once."""

    name: str
    run: Callable
    summarize: Callable
    families: frozenset | None = None
    needs: tuple = ()
    min_texts: int = 1
    per_layer: bool = False  # with --layers, runs at each chosen layer (the others run once)

    def applies_to(self, family: str) -> bool:
        return self.families is None or family in self.families


def _ordered(stages: list[Stage]) -> dict[str, Stage]:
    """{name: Stage} in run order: the listed order, except that a stage runs after every stage it needs."""
    by_name = {s.name: s for s in stages}
    order: list[str] = []

    def visit(name: str, path: tuple = ()) -> None:
        if name in path:
            raise ValueError(f"stages need each other in a cycle: {' -> '.join((*path, name))}")
        if name not in order:
            for need in by_name[name].needs:
                if need not in by_name:
                    raise ValueError(f"stage {name} needs {need}, which is not a stage")
                visit(need, (*path, name))
            order.append(name)

    for s in stages:
        visit(s.name)
    return {name: by_name[name] for name in order}


STAGES = _ordered([
    # the delta ranking is a variance across texts: one text cannot rank anything
    Stage("delta", stage_delta, summarize_delta, families=SSM_FAMILIES, min_texts=2, per_layer=True),
    Stage("causal", stage_causal, summarize_causal, per_layer=True),
    Stage("inter_layer", stage_inter_layer, summarize_inter_layer, needs=("causal",)),
    Stage("cross_layer", stage_cross_layer, summarize_cross_layer, needs=("causal",)),
    Stage("attention", stage_attention, summarize_attention, per_layer=True),
    Stage("sparsity", stage_sparsity, summarize_sparsity, needs=("attention",), per_layer=True),
    Stage("efficiency", stage_efficiency, summarize_efficiency, needs=("sparsity",)),
    Stage("comparison", stage_comparison, summarize_comparison,
          needs=("causal", "sparsity", "efficiency", "attention")),
])
ALL_STAGES = tuple(STAGES)  # in run order


def summarize_depth_profiles(r: dict) -> None:
    print(f"    over layers {', '.join(map(str, r['layers']))}:")
    for metric, values in r["metrics"].items():
        shown = ", ".join("-" if v is None else f"{v:.3g}" for v in values)
        print(f"      {metric}: {shown}")
