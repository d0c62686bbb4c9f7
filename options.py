"""The options of a run: one schema, from the command-line flag to the function that reads it.

Each field of `Options` carries its default, its help, its flag's parsing (type, nargs, metavar) and the
stages that read it (`option`); `add_flags` generates the argument parser's flags from them, so an option
has one name from `--flag` to `Options.flag` to the analysis function's keyword argument. `check_given`
refuses values no stage could answer (cheap: before any file or model is read); `resolve` turns the given
flags into the run's `Options` once the model's shape is known (layer lists, ranges, positions) and says
in notes what it changed. Neither changes its input. Resources that are resolved rather than chosen (the
model and the comparison model's files, the device, the texts and prompts as read from their files) are
not options. Light: no torch at import (main.py's --help answers at once).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ATTENTION_METHODS = ("attention_weighted", "gradient_guided", "rollout")  # attention_neurons.METHODS (tested)
ATTENTION_TARGETS = ("likelihood", "last_argmax")  # attention_neurons.TARGETS (tested)
INTERVAL_STAGES = ("delta", "causal", "inter_layer", "attention", "sparsity", "faithfulness", "comparison")
DEFAULT_MAX_LENGTH = 256
CLI_PLOTS_DIR = "plots"  # main.py's plots folder when --plots_dir is not given (the library writes none)
PER_LAYER = ("delta", "causal", "attention", "sparsity", "faithfulness")
CAUSAL = ("causal", "inter_layer", "cross_layer")
PROMPT_STAGES = (*CAUSAL, "faithfulness")  # the stages that ablate over the prompts


def option(default, help: str, group: str = "analysis", stages=(), flag: bool = True, **parse):
    """A field of `Options` with its schema: `help` (the flag's help; the default is added to it unless
    the help states it), `group` (of the --help listing), `stages` (the stages that read it), `flag`
    (False: set by the library or main.py, no flag) and `parse`: argparse's type / nargs / metavar."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "stages": tuple(stages),
                                                        "flag": flag, "parse": parse})


def _finite_float(text: str) -> float:
    """argparse type: a float that is neither nan nor ±inf (no flag may turn a result into NaN)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a finite value")
    return value


@dataclass(frozen=True)
class Options:
    """Every option of a run, typed, each default stated once here. None means "the default of the model
    or of the analysis", as the help says. Built by `resolve` from the command line, or by the library."""

    layer: int = option(0, "layer to analyse (0-based)", stages=PER_LAYER + CAUSAL + ("efficiency", "comparison"),
                        type=int)
    layers: tuple | None = option(
        None, "analyse several layers in one run: numbers, ranges like 0-23, or all (space or comma separated). "
              "The per-layer stages (delta, causal, attention, sparsity) run at each, from one text pass and one "
              "prompt pass; the others (inter_layer, cross_layer, efficiency, comparison) run once, at the first "
              "of them; depth profiles over relative depth are added. Not together with --layer (default: --layer "
              "only)", stages=PER_LAYER, nargs="+", metavar="LAYERS")
    top_k: int = option(10, "how many top neurons to report", stages=("delta", "causal", "attention", "faithfulness"),
                        type=int)
    max_length: int = option(DEFAULT_MAX_LENGTH, f"truncate each text to this many tokens (default {DEFAULT_MAX_LENGTH},"
                                                 " or a Transformer's positions when it has fewer; more than its "
                                                 "positions is an error)", "texts", stages=("all",), type=int)
    plots_dir: str | None = option(None, f"folder for the PNG plots (default: {CLI_PLOTS_DIR}; from the library, "
                                         "run_comprehensive_analysis writes plots only when given a folder)", "output",
                                   stages=("all",))
    prefix: str = option("model", "the model's label in output file names", flag=False)
    progress: bool = option(True, "show progress bars", flag=False)
    attention_methods: tuple = option(ATTENTION_METHODS, f"attention-neuron methods: {', '.join(ATTENTION_METHODS)}",
                                      stages=("attention",), nargs="+", metavar="METHOD")
    attention_target: str = option(
        "likelihood", "what gradient_guided's gradient is of: likelihood (the text's own log-likelihood of its next "
                      "tokens, summed over every position: every query token has a target) or last_argmax (the "
                      "log-probability of the most likely next token at the last position: one token, strongly "
                      "target-dependent)", stages=("attention",))
    attention_layers: tuple | None = option(
        None, "the attention stage's layers beside --layer: numbers, ranges like 0-3, or all (default: --layer "
              "only); the comparison reads the other model at the same relative depths. Not together with "
              "--layers (which runs the stage at each of its layers)", stages=("attention",), nargs="+",
        metavar="LAYERS")
    prompts: tuple | None = option(None, "the causal stages' prompts (default: causal_analysis.DEFAULT_PROMPTS)",
                                   flag=False)
    causal_site: str | None = option(None, "site to ablate: Mamba mixer_out (default), ssm, residual; Transformers "
                                           "mlp, attn_out, attn_heads (the attention neurons' units), mlp_out, block_out (default: the block's "
                                           "write, output − input, the counterpart of "
                                           "Mamba's mixer_out), residual; hybrids, as Transformers, block_out and residual at every layer, plus "
                                           "ssm and neurons (the layers that have them), attn_heads "
                                           "(attention layers), Falcon-H1's ssm_path and attn_path",
                                     "causal (ablation)",
                                     stages=CAUSAL)
    causal_dims: tuple | None = option(
        None, "limit the causal scan to these dimensions (default: every dimension of the site); also the "
              "dimensions of inter_layer / cross_layer (default: the causal stage's top 3)", "causal (ablation)",
        stages=CAUSAL, type=int, nargs="+", metavar="DIM")
    ablation: str = option("zero", "zero (multiply by --intervention_scale) or mean", "causal (ablation)",
                           stages=PROMPT_STAGES)
    intervention_scale: float | None = option(None, "factor for --ablation zero (default 0: the dimension is set to "
                                                    "0); not with --ablation mean", "causal (ablation)", stages=PROMPT_STAGES,
                                              type=_finite_float)
    causal_batch_size: int | None = option(None, "ablations per forward pass (default: chosen from free memory)",
                                           "causal (ablation)", stages=PROMPT_STAGES, type=int)
    faithfulness_max_k: int | None = option(
        None, "the largest k of the deletion curves (k = 1, 2, 4, ... up to it; default: every unit)", "faithfulness",
        stages=("faithfulness",), type=int, metavar="K")
    faithfulness_draws: int = option(50, "random sets of k units drawn for each k of the deletion curves' random "
                                         "baseline (its mean and central 95%%)", "faithfulness",
                                     stages=("faithfulness",), type=int, metavar="N")
    sparsity_layers: tuple | None = option(None, "layers of the multi-layer sparsity analysis (default: 0 1 2, those "
                                                 "the model has)", "sparsity, efficiency, comparison",
                                           stages=("sparsity", "comparison"), type=int, nargs="+", metavar="LAYER")
    sparsity_threshold: float | None = option(
        None, "absolute threshold of traditional sparsity and of 'active' neurons (default: Mamba 0.01, Transformers "
              "1e-5; scale-dependent)", "sparsity, efficiency, comparison",
        stages=("sparsity", "efficiency", "comparison"), type=_finite_float)
    dead_eps: float = option(1e-6, "a neuron is dead when |a| < this on every token",
                             "sparsity, efficiency, comparison", stages=("sparsity", "census", "efficiency", "comparison"),
                             type=_finite_float)
    census_alpha: float = option(0.05, "the census's significance level per layer: a neuron is a token or positional "
                                       "neuron when its F-test p-value is below census_alpha / N (Bonferroni over the "
                                       "layer's N neurons)", "census", stages=("census",), type=_finite_float,
                                 metavar="ALPHA")
    census_min_share: float = option(0.5, "the census's least share of a neuron's within-text variance (adjusted η²) "
                                          "that the token (or the position) must explain for it to count",
                                     "census", stages=("census",), type=_finite_float, metavar="SHARE")
    compare_model: str | None = option(
        None, "the model the comparison stage holds the main model against: hub id or folder. Default beside a "
              "Mamba: gpt2, or the shipped reference Transformer (reference_models/transformer) when that is "
              "neither cached nor reachable; beside a Transformer: state-spaces/mamba-130m-hf, or the reference "
              "Mamba", "sparsity, efficiency, comparison", stages=("comparison",))
    seq_lengths: tuple = option((64, 128, 256, 512, 1024, 2048), "sequence lengths of the measured time / memory "
                                                                 "scaling curve", "sparsity, efficiency, comparison",
                                stages=("efficiency", "comparison"), type=int, nargs="+", metavar="L")
    efficiency_budget: float = option(15.0, "seconds per model for the scaling curves (a Mamba-1 model's own "
                                            "forward and its fast scan share it evenly); longer lengths are "
                                            "skipped (and recorded)", "sparsity, efficiency, comparison",
                                      stages=("efficiency", "comparison"), type=_finite_float)

    bootstrap_resamples: int = option(1000, "resamples of the bootstrap behind every 95%% interval and rank stability "
                                            "(texts or prompts drawn with replacement; seeded by --seed)",
                                      stages=INTERVAL_STAGES, type=int)
    seed: int = option(0, "the seed of the run (main.py's --seed): the bootstrap's draws", flag=False)

    @property
    def prompt_list(self) -> list[str]:
        from causal_analysis import DEFAULT_PROMPTS

        return list(self.prompts or DEFAULT_PROMPTS)


FIELDS = {f.name: f for f in dataclasses.fields(Options)}
FLAGS = tuple(name for name, f in FIELDS.items() if f.metadata["flag"])


def add_flags(groups: dict) -> None:
    """Add a flag for every option with one (`FLAGS`) to the argparse groups {title: group} (a title not
    in `groups` is added to the parser given as groups[None]). A flag not given stays out of the namespace
    (argparse.SUPPRESS), so that `given` tells what the user chose."""
    import argparse

    for name in FLAGS:
        f = FIELDS[name]
        meta = f.metadata
        title = meta["group"]
        if title not in groups:
            groups[title] = groups[None].add_argument_group(title)
        default = f.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = meta["help"] if "default" in meta["help"] or default is None else f"{meta['help']} (default: {shown})"
        if meta["stages"] and meta["stages"] != ("all",):
            help_text += f" [read by: {', '.join(meta['stages'])}]"
        groups[title].add_argument(f"--{name}", default=argparse.SUPPRESS, help=help_text, **meta["parse"])


def given(args) -> dict:
    """{option: value} of the option flags given on the command line (lists as tuples)."""
    values = {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}


_WHOLE_AT_LEAST = {"layer": 0, "top_k": 1, "max_length": 1, "causal_batch_size": 1, "text_limit": 1,
                   "bootstrap_resamples": 100, "seed": 0, "faithfulness_max_k": 1, "faithfulness_draws": 20}
_WHOLE_LISTS = {"layers": 0, "attention_layers": 0, "causal_dims": 0, "sparsity_layers": 0, "seq_lengths": 1}
_FLOATS = {"intervention_scale": None, "sparsity_threshold": "at_least_0", "dead_eps": "positive",
           "efficiency_budget": "positive", "census_alpha": "probability", "census_min_share": "share"}
_LAYER_SPECS = ("layers", "attention_layers")  # on the command line: numbers, ranges and "all"


def check_option_values(values: dict, flag: str = "") -> None:
    """Refuse option values no stage could answer, with a UserInputError (a ValueError) naming the option
    (`flag` + its name: "--top_k" from main.py, "top_k" from the library) and the fix: whole numbers (not
    bools, not 1.5) at or above their least value, lists of them that are not empty, finite floats in
    their range, known methods and ablations, prompts as a list of strings. Only the names present in
    `values` are checked; a None value means "the default". Ranges that depend on the model (a layer
    below its layer count, a dim below a site's width) are checked by `resolve` and the adapter."""
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
            if _FLOATS[name] == "probability" and not 0 < v < 1:
                raise UserInputError(f"{flag}{name} {v}: must lie strictly between 0 and 1 (a significance level)")
            if _FLOATS[name] == "share" and not 0 < v <= 1:
                raise UserInputError(f"{flag}{name} {v}: must lie in (0, 1] (a share of the variance)")
        elif name == "attention_methods":
            methods = [v] if isinstance(v, str) else list(v)
            if not methods:
                raise UserInputError(f"{flag}{name}: an empty list; choose from {', '.join(ATTENTION_METHODS)}")
            bad = [m for m in methods if m not in ATTENTION_METHODS]
            if bad or isinstance(v, str):
                raise UserInputError(f"{flag}{name} {(bad or [v])[0]}: "
                                     f"{'give a list of methods' if not bad else 'unknown'}; choose from "
                                     f"{', '.join(ATTENTION_METHODS)}")
        elif name == "attention_target":
            if v not in ATTENTION_TARGETS:
                raise UserInputError(f"{flag}{name} {v}: unknown; choose {' or '.join(ATTENTION_TARGETS)}")
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


def check_plan(stages, causal_dims, flag: str = "") -> None:
    """Refuse a run whose stages cannot all run, before the first one does: inter_layer and cross_layer
    choose their dimensions from --causal_dims or the causal stage's top ones."""
    from utils import UserInputError

    lacking = [s for s in ("inter_layer", "cross_layer") if s in stages]
    if lacking and not causal_dims and "causal" not in stages:
        raise UserInputError(f"the {lacking[0]} stage needs dimensions: give {flag}causal_dims, or run the causal "
                             "stage too (it chooses its top 3)")


def parse_layers(specs, n_layers: int | None, flag: str = "--layers") -> list[int]:
    """--layers (or `flag`): numbers, ranges a-b (both ends included) and `all`, space or comma separated, as
    a sorted list without repeats. With `n_layers` None only the syntax is checked (returns [])."""
    from utils import UserInputError

    items = [t.strip() for s in specs for t in str(s).split(",") if t.strip()]
    if not items:
        raise UserInputError(f"{flag} {' '.join(map(str, specs))!r}: names no layer; give numbers, ranges like 0-3, "
                             "or all")
    layers = set()
    for item in items:
        if item == "all":
            layers.update(range(n_layers or 0))
            continue
        lo, sep, hi = item.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise UserInputError(f"{flag} {item}: not a layer number, a range like 0-3, or all") from None
        if a > b:
            raise UserInputError(f"{flag} {item}: an empty range; write the lower layer first ({b}-{a})")
        if n_layers is None:  # the syntax only: no range is built before its bounds are known to be valid
            continue
        if not (0 <= a and b < n_layers):
            raise UserInputError(f"{flag} {item}: out of range for this model with {n_layers} layers; valid "
                                 f"layers are 0..{n_layers - 1}")
        layers.update(range(a, b + 1))
    return sorted(layers) if n_layers is not None else []


def check_given(values: dict, flag: str = "--") -> list[str]:
    """The checks of the given option values that need no file and no model (run first: they cost
    nothing): every value (`check_option_values`), --layer beside --layers, --attention_layers beside
    --layers, the layer lists' syntax. Returns notes on the repeated values `resolve` will drop."""
    from utils import UserInputError

    # --layer's range needs the model's layer count: `resolve` checks it, naming the valid layers
    check_option_values({n: v for n, v in values.items() if n not in (*_LAYER_SPECS, "layer")}, flag)
    if values.get("layers") is not None:
        if values.get("layer") is not None:
            raise UserInputError(f"{flag}layer {values['layer']} and {flag}layers {' '.join(values['layers'])}: give "
                                 "one of them (--layers with one layer gives the several-layer layout)")
        parse_layers(values["layers"], None, f"{flag}layers")  # the syntax now; the range with the model's layers
    if values.get("attention_layers") is not None:
        if values.get("layers") is not None:
            raise UserInputError(f"{flag}attention_layers {' '.join(values['attention_layers'])} and {flag}layers: "
                                 f"{flag}layers already runs the attention stage at each of its layers; give one of "
                                 "them")
        parse_layers(values["attention_layers"], None, f"{flag}attention_layers")
    return [f"{flag}{name}: repeated values dropped (each is analysed once): {list(dict.fromkeys(v))}"
            for name in ("causal_dims", "attention_methods", "sparsity_layers", "seq_lengths")
            if (v := values.get(name)) is not None and len(set(v)) < len(v)]


def resolve(values: dict, adapter, stages, flag: str = "--", **fixed) -> tuple[Options, list[str]]:
    """(the run's Options, notes) from the given option values and the model's adapter (built from its
    config: no weights needed): `check_given`; the layer lists resolved against the layer count (--layers
    sets --layer to its first); every layer, site and dimension checked against the model; repeated values
    dropped (said in the notes); max_length defaulted to 256 or a Transformer's positions (said when
    capped). `fixed`: the fields set by the caller, not by a flag (prefix, progress, prompts)."""
    from utils import UserInputError

    notes = check_given(values, flag)
    v = {n: (tuple(dict.fromkeys(x)) if n in ("causal_dims", "attention_methods", "sparsity_layers", "seq_lengths")
             and x is not None else x) for n, x in values.items()}
    if v.get("layers") is not None:
        v["layers"] = tuple(parse_layers(v["layers"], adapter.n_layers, f"{flag}layers"))
        v["layer"] = v["layers"][0]
    if v.get("attention_layers") is not None:
        if "attention" not in stages:
            raise UserInputError(f"{flag}attention_layers {' '.join(values['attention_layers'])}: the attention stage "
                                 "is not in this run; add --enable_attention (or attention to --stages)")
        v["attention_layers"] = tuple(parse_layers(v["attention_layers"], adapter.n_layers, f"{flag}attention_layers"))
    layer = adapter.check_layer(v.get("layer", 0) if v.get("layer") is not None else 0)
    v["layer"] = layer
    from models import NotApplicable

    site = v.get("causal_site") or adapter.default_causal_site
    asked = v.get("layers") or (layer,)  # every layer of the run: a hybrid's may differ in width, or lack the site
    which = f"{flag}layers {' '.join(map(str, asked))}" if v.get("layers") else f"{flag}layer {layer}"
    widths, why = {}, {}
    for la in asked:
        try:
            widths[la] = adapter.site(site, la).size  # an unknown site: UserInputError
        except NotApplicable as exc:  # a hybrid's layer without that site (e.g. ssm at an attention layer)
            why[la] = str(exc)
    if not widths:
        from sparsity import site_layers

        have, _ = site_layers(adapter, range(adapter.n_layers), site)
        there = (f"choose layers among {', '.join(map(str, have))}" if have else
                 "no layer of this model has it in this version")
        raise UserInputError(f"{flag}causal_site {site}: not at {which}: {next(iter(why.values()))}; {there}, or "
                             "another --causal_site (block_out and residual exist at every layer)") from None
    for la, width in widths.items():
        bad_dims = [d for d in v.get("causal_dims") or () if not 0 <= d < width]
        if bad_dims:
            where = f" at layer {la}" if len(set(widths.values())) > 1 else ""
            raise UserInputError(f"{flag}causal_dims {bad_dims[0]}: out of range for site {site} of width {width}{where}; "
                                 f"valid dims are 0..{width - 1}")
    d = adapter.hidden_size
    if "cross_layer" in stages and v.get("causal_dims") and min(v["causal_dims"]) >= d:
        raise UserInputError(f"{flag}causal_dims {v['causal_dims'][0]}: cross_layer reads the residual stream, of "
                             f"width {d}; give a dim below {d} as well, or drop cross_layer from --stages")
    bad_layers = [la for la in v.get("sparsity_layers") or () if not 0 <= la < adapter.n_layers]
    if bad_layers:
        raise UserInputError(f"{flag}sparsity_layers {bad_layers[0]}: out of range for this {adapter.family} model "
                             f"with {adapter.n_layers} layers; valid layers are 0..{adapter.n_layers - 1}")
    limit = adapter.max_positions
    if v.get("max_length") is not None:
        if limit is not None and v["max_length"] > limit:
            raise UserInputError(f"{flag}max_length {v['max_length']}: this {adapter.family} model has {limit} "
                                 f"positions; use {flag}max_length {limit} or less")
    else:
        v["max_length"] = min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
        if v["max_length"] != DEFAULT_MAX_LENGTH:
            notes.append(f"texts truncated to this model's {v['max_length']} positions (the default "
                         f"{flag}max_length is {DEFAULT_MAX_LENGTH})")
    return Options(**v, **fixed), notes
