"""The analysis pipeline: the runner and the stage registry, and `run_comprehensive_analysis`.

Each analysis module registers its own stages (`register(Stage(...))`: its run, its summary as text, its
plots, the families it applies to, the stages whose results it reads); `STAGE_MODULES` names them in run
order. A run makes two kinds of pass: the *text pass* (`passes.run_text_pass`), in which every text goes
through the model once (and once more with a backward where a stage needs a gradient) and each text
stage's reader consumes what it declared; and the *prompt pass* (`StageContext.clean_runs`), the prompts'
clean runs that the causal stages share. Then each stage's entry is made in run order. Options travel as
one typed `options.Options` object. Heavy imports live inside functions, so importing this module costs
nothing (main.py's `--help` answers at once).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

from depth_profiles import depth_profiles, depth_profiles_text, plot_depth_profiles  # light, like models
from naming import layer_tag  # light
from options import ATTENTION_METHODS, Options, check_option_values, check_plan  # noqa: F401 (light; re-exported)

logger = logging.getLogger("mamba_neurons")

@dataclass
class StageContext:
    """What a stage gets: the model, the tokenized texts, the options, the results of the stages it declared
    in its `needs` (`upstream`), the prompt pass's clean runs (`clean_runs`), and, for the comparison, the
    other model (`compare`)."""

    model: object
    tokenizer: object
    adapter: object
    tokens: object  # utils.TokenizedTexts
    opts: Options
    results: dict  # the results of the stages run so far
    texts: tuple = ()  # the texts as strings (the comparison's other model tokenizes them itself)
    stages: tuple = ()  # the stages of this run, in order
    layers: tuple = ()  # the per-layer stages' layers: --layer, or every --layers layer
    compare: object = None  # comparison_wrapper.CompareModel, when the caller loaded it
    current: str = ""  # the stage running now
    _cleans: dict = dataclasses.field(default_factory=dict)  # site -> the prompt pass's clean runs

    # the options every stage reads, by their short names
    layer = property(lambda self: self.opts.layer)
    top_k = property(lambda self: self.opts.top_k)
    plots_dir = property(lambda self: self.opts.plots_dir)
    prefix = property(lambda self: self.opts.prefix)
    progress = property(lambda self: self.opts.progress)

    def upstream(self, name: str) -> dict | None:
        """The results of stage `name` (one of this stage's needs) if it ran in this run and succeeded."""
        if name not in STAGES[self.current].needs:
            raise RuntimeError(f"stage {self.current} reads stage {name} without declaring it in its needs")
        entry = self.results.get(name) or self.results.get("layers", {}).get(self.layer, {}).get(name, {})
        return entry["results"] if entry.get("status") == "ok" else None

    def clean_runs(self, site: str) -> list:
        """The prompt pass: one clean run per prompt keeping the input and `site`'s activations of every layer
        that has the site (every layer but a hybrid's of another kind), made once per run and site and read by
        every causal stage."""
        if site not in self._cleans:
            import causal_analysis as ca
            from sparsity import site_layers

            layers, _ = site_layers(self.adapter, range(self.adapter.n_layers), site)  # a hybrid's: those with it
            self._cleans[site] = ca.clean_runs(self.model, self.tokenizer, self.opts.prompt_list, layers, site)
        return self._cleans[site]


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


# the stages whose rankings the faithfulness stage checks, by what the family has (added when none is in the run)
RANKING_STAGES = {"ssm": ("delta", "sparsity"), "transformer": ("attention",)}


def complete_plan(stages, family: str | None = None, enable_attention: bool = False) -> tuple[list[str], dict]:
    """(the stages in run order, {stage added: why}): a stage asked for whose results another stage asked for
    needs is added, never silently missing: the attention stage when `enable_attention` (--enable_attention)
    asks for it, and, for a faithfulness stage with no ranking to check in the run, the stages whose rankings
    it checks on `family` (`RANKING_STAGES`; none while the family is not known). The other needs are
    optional parts (the comparison's causal part, say), and the stages that read them say when they are left
    out."""
    from models import SSM_FAMILIES

    stages, added = list(stages), {}
    if enable_attention and "attention" not in stages:
        added["attention"] = "--enable_attention asks for the attention stage"
    ranking = set().union(*RANKING_STAGES.values())
    if "faithfulness" in stages and family is not None and not ranking & {*stages, *added}:
        for name in RANKING_STAGES["ssm" if family in SSM_FAMILIES else "transformer"]:
            added[name] = "the faithfulness stage checks its ranking, and no stage with a ranking was asked for"
    return [s for s in ALL_STAGES if s in stages or s in added], added


# The documented names of the library call (the design documents' snippets), beside the primary ones
DOCUMENTED_ANALYSES = {"attention_neurons": "attention"}  # results["analysis_results"][name] -> the stage's results


def run_comprehensive_analysis(model, tokenizer, texts, stages=None, options: Options | None = None, on_start=None,
                               on_stage=None, compare=None, **fields) -> dict:
    """Run the stages in order on `texts` (strings) and return `analysis_results`:
    {"texts": {...}, STAGE: {"status": "ok"|"not_applicable"|"error", "wall_time_s", "results"|"reason"|
    "error", "plots"}, "analysis_results": {STAGE: its results (its entry when it did not succeed),
    "attention_neurons": the attention stage's}}. A failing stage is recorded and the others go on. Input
    that no stage could use (a bare string for `texts`, too few texts for a stage asked for, a text without
    tokens, token ids beyond the model's vocabulary) raises UserInputError before the first stage.
    `on_start(results)` is called once the texts are tokenized, `on_stage(name, entry)` as each stage ends.

    `stages`: default the command line's default stages with the attention stage (`--enable_attention`); the
    comparison among them only when its other model is given (`compare`) or named (`compare_model`):
    otherwise it is left out and `stages_left_out` says why, and asking for it by name is refused. Plots
    are written only to a folder given as `plots_dir`; no other model is loaded and nothing else written.

    The options: each `Options` field by its name (`layer=1, top_k=5, causal_dims=[3, 4],
    sparsity_threshold=0.5, ...`: the command line's flag names; `layer_idx` is the design documents' name
    for `layer`), or `options`, an `Options` object holding every option. `compare`: the comparison's other
    model (`comparison_wrapper.CompareModel`); otherwise the model `compare_model` names is loaded when the
    comparison runs."""
    from options import FIELDS
    from utils import UserInputError

    if "layer_idx" in fields:
        if "layer" in fields:
            raise TypeError("give layer or layer_idx (its documented name), not both")
        fields["layer"] = fields.pop("layer_idx")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are the fields of options.Options: "
                        f"{', '.join(FIELDS)}")
    if options is not None and fields:
        raise TypeError(f"give the options as an Options object or by name, not both ({', '.join(fields)})")
    if options is None:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        if fields.get("plots_dir") is not None:
            fields["plots_dir"] = str(fields["plots_dir"])  # a pathlib.Path too
        options = Options(**fields)
    left_out = {}
    if compare is None and options.compare_model is None:
        no_model = "its other model was not given: pass compare=comparison_wrapper.CompareModel(...) or compare_model="
        if stages is None:
            stages = [s for s in resolve_stages(None) if s != "comparison"]
            left_out["comparison"] = no_model + "'gpt2' (a hub id or folder)"
        elif "comparison" in resolve_stages(stages):
            raise UserInputError(f"the comparison stage: {no_model}'gpt2' (a hub id or folder), or leave it out of "
                                 "stages")
    results = run_pipeline(model, tokenizer, texts, options, stages, on_start, on_stage, compare)
    if left_out:
        results["stages_left_out"] = left_out
    results["analysis_results"] = _analysis_view(results, options.layers)
    return results


def _analysis_view(results: dict, layers) -> dict:
    """{stage: its results, or its entry when it did not succeed}, at the first layer of a --layers run
    (each layer's entries stay under results["layers"]), with the documented names beside the stages'."""
    entries = dict(results["layers"][min(results["layers"])]) if layers is not None else {}
    entries.update({k: v for k, v in results.items() if isinstance(v, dict) and "status" in v})
    view = {name: e["results"] if e["status"] == "ok" else e for name, e in entries.items()}
    view.update({alias: view[name] for alias, name in DOCUMENTED_ANALYSES.items() if name in view})
    return view


def run_pipeline(model, tokenizer, texts, opts: Options, stages=None, on_start=None, on_stage=None,
                 compare=None, write_plots: bool = True) -> dict:
    """`run_comprehensive_analysis` with the options as one `Options` object. `compare`: the comparison's
    other model (`comparison_wrapper.CompareModel`), when the caller loaded it; `write_plots`: False for a
    run whose plots nobody reads (the comparison's run on the other model); none are written without
    `opts.plots_dir`.

    The text stages (those with a `reader`) read one text pass (`passes.run_text_pass`) over every text;
    the causal stages share one prompt pass (`StageContext.clean_runs`); then each stage's entry is made
    in run order (`ALL_STAGES`), per layer for the per-layer stages of a --layers run."""
    from models import NotApplicable, get_adapter
    from passes import run_text_pass
    from utils import UserInputError, check_vocab_ids, text_list, tokenize_texts

    adapter = get_adapter(model)
    check_option_values({f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})
    adapter.check_layer(opts.layer)
    texts = text_list(texts)
    stages, added = complete_plan(resolve_stages(stages), adapter.family)
    write_plots = write_plots and opts.plots_dir is not None
    check_plan(stages, opts.causal_dims)
    short = too_few_texts(stages, adapter.family, len(texts))
    if short:
        raise UserInputError(f"the {short[0]} stage needs at least {short[1]} texts; got {len(texts)}")
    tokens = tokenize_texts(tokenizer, texts, opts.max_length)
    vocab = model.get_input_embeddings().num_embeddings
    for i, ids in enumerate(tokens.input_ids):
        check_vocab_ids(ids[0].tolist(), vocab, f"text {i + 1} ({texts[i][:40]!r})")
    results: dict = {"texts": {"n_texts": len(texts), "n_tokens": int(sum(tokens.lengths)),
                               "max_length": opts.max_length, "n_truncated": tokens.n_truncated},
                     "architecture": adapter.describe(), "stages_added": added}
    layers = opts.layers
    if layers is not None:  # every per-layer stage at each layer, then the others once, at the first layer
        layers = tuple(sorted({adapter.check_layer(la) for la in layers}))
        opts = dataclasses.replace(opts, layers=layers, layer=layers[0])
        results["layers"] = {la: {} for la in layers}
        plan = [(n, la) for la in layers for n in stages if STAGES[n].per_layer]
        plan += [(n, None) for n in stages if not STAGES[n].per_layer]
    else:
        plan = [(n, None) for n in stages]
    ctx = StageContext(model, tokenizer, adapter, tokens, opts, results, tuple(texts), tuple(stages),
                       layers or (opts.layer,), compare)
    if on_start is not None:
        on_start(results)

    # the text pass: every text stage's reader, fed text by text
    readers, early = {}, {}  # early: {stage: entry} of text stages that could not start
    for name in stages:
        if STAGES[name].reader is not None:
            ctx.current = name
            reader = _attempt(name, lambda: STAGES[name].reader(ctx), NotApplicable)
            if isinstance(reader, dict):
                early[name] = reader
            elif reader is not None:  # None: it reads nothing in this run
                readers[name] = reader
    read = run_text_pass(model, adapter, tokens.input_ids, readers, opts.progress) if readers else None
    if read is not None:
        results["passes"] = {"text": {"stages": list(readers), "forwards": read.forwards,
                                      "wall_time_s": round(read.wall_time_s, 4),
                                      "read_s": {n: round(t, 4) for n, t in read.read_s.items()},
                                      "sites_from": read.sites_from}}

    for name, layer in plan:
        ctx.opts = opts if layer is None else dataclasses.replace(opts, layer=layer)
        ctx.current = name
        stage = STAGES[name]
        if name in early:
            entry = dict(early[name])
        elif stage.reader is not None and name not in readers:
            entry = _run_stage(name, lambda: stage.run(ctx, None), NotApplicable, write_plots)
        elif stage.reader is not None and name in read.errors:
            entry = {"status": "error", "error": read.errors[name], "wall_time_s": 0.0}
        elif stage.reader is not None:
            entry = _run_stage(name, lambda: stage.run(ctx, read.results[name]), NotApplicable, write_plots)
            # its reading of the pass, split evenly over its layers' entries (they were read together)
            share = read.read_s.get(name, 0.0) / (len(ctx.layers) if stage.per_layer else 1)
            entry["wall_time_s"] = round(entry["wall_time_s"] + share, 4)
        else:
            entry = _run_stage(name, lambda: stage.run(ctx), NotApplicable, write_plots)
        if layer is None:
            results[name] = entry
        else:
            entry["layer"] = layer
            results["layers"][layer][name] = entry
        if on_stage is not None:
            on_stage(name, entry)
    if layers is not None and any(STAGES[n].per_layer for n in stages):
        entry = _run_stage("depth_profiles", lambda: _depth_profiles_stage(results, adapter, opts), NotApplicable,
                           write_plots)
        results["depth_profiles"] = entry
        if on_stage is not None:
            on_stage("depth_profiles", entry)
    return results


def stage_entries(results: dict) -> list[tuple[str, str, dict]]:
    """Every stage entry of a results dict, in run order: (label, stage name, entry); the per-layer
    entries of a --layers run labelled "stage, layer L", then the others (and the depth profiles)."""
    out = [(f"{name}, layer {la}", name, e) for la, by in results.get("layers", {}).items() for name, e in by.items()]
    return out + [(k, k, v) for k, v in results.items() if isinstance(v, dict) and "status" in v]


def _attempt(name: str, make, not_applicable):
    """`make()`, or the stage's entry when it does not apply or fails."""
    try:
        return make()
    except not_applicable as exc:
        return {"status": "not_applicable", "reason": str(exc), "wall_time_s": 0.0}
    except Exception as exc:  # the stage fails with its error; the others go on
        logger.debug("stage %s failed", name, exc_info=True)
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "wall_time_s": 0.0}


def _run_stage(name: str, run, not_applicable, write_plots: bool = True) -> dict:
    """One stage's entry: {"status", "results" + "plots" | "reason" | "error", "wall_time_s"}. `run()`
    returns (results, plots), plots a list of functions that each write one plot (or several) and return
    its path (or their paths); they are called here, when `write_plots`."""
    logger.info("stage %s: started", name)
    t0 = time.perf_counter()
    from utils import NOT_WRITTEN

    not_written = len(NOT_WRITTEN)
    try:
        out, plot_fns = run()
        plots = []
        for write in plot_fns if write_plots else ():
            path = write()
            plots += path if isinstance(path, list) else [path]
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


def _depth_profiles_stage(results: dict, adapter, opts: Options):
    from functools import partial

    kinds = [adapter.layer_kind(la) for la in range(adapter.n_layers)] if adapter.hybrid else None
    profiles = depth_profiles(results["layers"], adapter.n_layers, kinds)
    if not profiles["metrics"]:
        raise ValueError("no per-layer stage succeeded at any layer: nothing to profile")
    name = f"{opts.prefix}_depth_profiles_{layer_tag(opts.layer, list(profiles['layers']))}"
    return profiles, [partial(plot_depth_profiles, profiles, opts.plots_dir, name)]


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------
def stage_text(name: str, e: dict) -> str:
    """One stage's summary as main prints it (and the HTML report shows it): a head line, the stage's own
    summary (`Stage.summary`), and its plots."""
    label = f"{name}, layer {e['layer']}" if "layer" in e else name
    head = f"[{label}] {e['status']} ({e['wall_time_s']:.2f} s)"
    if e["status"] == "not_applicable":
        return f"{head}: {e['reason']}\n"
    if e["status"] == "error":
        return f"{head}: {e['error']}\n"
    body = STAGES[name].summary(e["results"]) if name in STAGES else depth_profiles_text(e["results"])
    lines = [f"    plot: {p}" for p in e.get("plots", [])]
    lines += [f"    plot NOT written: {p['path']} ({p['error']})" for p in e.get("plots_not_written", [])]
    return head + "\n" + body + "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------------
# The registry: each analysis module registers its own stages (`register`) when it is imported
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One analysis stage, registered by the module that defines it.

    `run`: a model or prompt stage's `run(ctx)`, a text stage's `run(ctx, read)` (`read`: what its reader's
    `finish()` gave, for every layer of the run), returns (results dict at `ctx.layer`, [functions that each
    write one plot and return its path]); `summary(results)` returns its summary lines as text; `reader(ctx)`:
    a text stage's `passes.TextReader` for every layer of the run (None for the others); `families`: the
    model families it applies to (None: every family); `needs`: the stages whose results it reads when they
    ran in the same run (`StageContext.upstream`): they run before it, and reading any other stage's results
    is an error; `min_texts`: the fewest texts it can work with; `per_layer`: with --layers it runs at each
    chosen layer (its results under "layers"), the others once."""

    name: str
    run: Callable
    summary: Callable
    reader: Callable | None = None
    families: frozenset | None = None
    needs: tuple = ()
    min_texts: int = 1
    per_layer: bool = False

    def applies_to(self, family: str) -> bool:
        return self.families is None or family in self.families


# Every stage, in run order (a stage after those it needs), and the module that registers it: a new stage
# is a function in its analysis module, a `register(Stage(...))` there, and its name here.
STAGE_MODULES = {"delta": "delta_extraction", "causal": "causal_analysis", "inter_layer": "causal_analysis",
                 "cross_layer": "causal_analysis", "attention": "attention_neurons", "sparsity": "sparsity",
                 "census": "census", "faithfulness": "faithfulness", "efficiency": "efficiency", "comparison": "comparison_wrapper"}
ALL_STAGES = tuple(STAGE_MODULES)


class _Registry(dict):
    """{name: Stage}, each loaded (its module imported) when first asked for; `name in STAGES` is true for
    every stage of STAGE_MODULES."""

    def __missing__(self, name: str) -> Stage:
        if name not in STAGE_MODULES:
            raise KeyError(name)
        import importlib

        importlib.import_module(STAGE_MODULES[name])
        if not dict.__contains__(self, name):
            raise RuntimeError(f"module {STAGE_MODULES[name]} did not register stage {name}")
        return dict.__getitem__(self, name)

    def __contains__(self, name) -> bool:
        return name in STAGE_MODULES


STAGES = _Registry()


def register(stage: Stage) -> Stage:
    """Called by an analysis module for each stage it defines. Its name must be in STAGE_MODULES, and every
    stage it needs must come before it there."""
    if stage.name not in STAGE_MODULES:
        raise ValueError(f"stage {stage.name} is not in pipeline.STAGE_MODULES")
    late = [n for n in stage.needs if n not in STAGE_MODULES or ALL_STAGES.index(n) > ALL_STAGES.index(stage.name)]
    if late:
        raise ValueError(f"stage {stage.name} needs {late[0]}, which is not a stage before it")
    dict.__setitem__(STAGES, stage.name, stage)
    return stage
