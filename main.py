"""Mamba neuron analysis: the command line.

    python main.py --model PATH_OR_HUB_ID [--layer 0] [--save_results] ...

`main` checks every input before the first stage, builds one `pipeline.Options` from the flags, runs the
stages (`pipeline.run_pipeline`; `run_comprehensive_analysis`, the library entry point, is importable from
here too), prints each stage's summary as it ends, and with --save_results writes the results as JSON
and an HTML report. Exit status: 0 all stages ran (or did not apply), 1 a stage failed (listed in the
summary), 2 bad input.
Heavy imports live inside functions so that `--help` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from models import DEFAULT_MODELS  # light: models.py imports torch/transformers only inside functions
from naming import layer_tag, model_prefix, report_path, results_path  # light
from pipeline import (ALL_STAGES, ATTENTION_METHODS, Options, check_option_values, check_plan,  # light
                      resolve_stages, run_pipeline, stage_entries, stage_text, too_few_texts)
from pipeline import run_comprehensive_analysis  # noqa: F401  (the library entry point, kept importable from main)

logger = logging.getLogger("mamba_neurons")

DEFAULT_MODEL = DEFAULT_MODELS["mamba"][0]
DEFAULT_MAX_LENGTH = 256
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SEED_RANGE = (0, 2 ** 32 - 1)  # numpy's seed range (torch's is wider)


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
                        f"(MambaForCausalLM), FalconMamba, Mamba-2, GPT-2, GPT-NeoX/Pythia. Default: {DEFAULT_MODEL}, or the "
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
    g.add_argument("--layer", type=int, default=None, help="layer to analyse (0-based; default 0)")
    g.add_argument("--layers", nargs="+", default=None, metavar="LAYERS",
                   help="analyse several layers in one run: numbers, ranges like 0-23, or all (space or comma "
                        "separated). The per-layer stages (delta, causal, attention, sparsity) run at each, sharing "
                        "the model, the texts and the sparsity forwards; the others (inter_layer, cross_layer, "
                        "efficiency, comparison) run once, at the first of them; depth profiles over relative "
                        "depth are added. Not together with --layer")
    g.add_argument("--top_k", type=int, default=10, help="how many top neurons to report")
    g.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help=f"run only these stages (space or comma separated): {', '.join(ALL_STAGES)}; "
                        "default: every stage available in this version")
    g.add_argument("--enable_attention", action="store_true",
                   help="run the attention stage: attention neurons (Mamba: channels and their hidden attention; "
                        "Transformers: attention-output dims and their head's attention weights); with the "
                        "comparison, also both models' attention side by side")
    g.add_argument("--attention_layers", nargs="+", default=None, metavar="LAYERS",
                   help="the attention stage's layers beside --layer: numbers, ranges like 0-3, or all (default: "
                        "--layer only); the comparison reads the other model at the same relative depths. Not "
                        "together with --layers (which runs the stage at each of its layers)")
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
    g.add_argument("--intervention_scale", type=_finite_float, default=None,
                   help="factor for --ablation zero (default 0: the dimension is set to 0); not with --ablation mean")
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
    g = p.add_argument_group("merging saved runs")
    g.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="instead of a run: merge saved results files of one model (one-layer runs of a shell loop, "
                        "--layers runs) into depth profiles, a merged JSON and an HTML report in --output_dir; no "
                        "model is loaded")
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
# Summary
# --------------------------------------------------------------------------------------------------
def print_header(results: dict) -> None:
    """The summary's first lines: model, layer, dtype, device, seed, texts."""
    run = results["run"]
    family = results["architecture"]["display_name"]
    print(f"\n=== {family} neuron analysis: {run['model']} ({run['model_class']}, {run['model_source']}) ===")
    where = f"layers {', '.join(map(str, run['layers']))}" if run.get("layers") else f"layer {run['layer']}"
    print(f"{where} | {run['dtype']} on {run['device']} | seed {run['seed']}")
    t = results["texts"]
    print(f"texts: {t['n_texts']} from {t['source']} | {t['n_tokens']} tokens | "
          f"{t['n_truncated']} truncated to {t['max_length']} tokens", flush=True)


def failed_stages(results: dict) -> list[str]:
    return [label for label, _, e in stage_entries(results) if e["status"] == "error"]


def plots_not_written(results: dict) -> list[str]:
    return [p["path"] for _, _, e in stage_entries(results) for p in e.get("plots_not_written", [])]


def print_footer(results: dict) -> None:
    for note in results["run"].get("notes", []):
        print(f"note: {note}")
    errors = failed_stages(results)
    if errors:
        print(f"FAILED stages: {'; '.join(errors)}")
    lost = plots_not_written(results)
    if lost:
        print(f"plots NOT written (the stages' numbers are kept): {', '.join(lost)}")



# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def run_metadata(args, argv, loaded, device, dtype, start) -> dict:
    import platform

    import numpy
    import torch
    import transformers

    return {"argv": argv, "model": args.model, "model_source": loaded.source.origin,
            "resolved_path": loaded.source.resolved_path, "model_class": type(loaded.model).__name__,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "seed": args.seed,
            "layer": args.layer, "layers": args.layers, "attention_layers": args.attention_layers, "top_k": args.top_k,
            "plots_dir": str(Path(args.plots_dir).resolve()),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": numpy.__version__},
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "notes": []}


def main(argv: list[str] | None = None) -> int:
    """The command line. Returns the exit status: 0 ok, 1 a stage failed, 2 bad input, 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    from utils import WRITTEN, UserInputError

    written_before = len(WRITTEN)
    previous = signal.signal(signal.SIGTERM, _terminated) if _in_main_thread() else None
    try:
        args = build_parser().parse_args(argv)
        level = args.log_level.upper()
        if level not in LOG_LEVELS:
            raise UserInputError(f"--log_level {args.log_level}: unknown; choose one of {', '.join(LOG_LEVELS)}")
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec"):  # their DEBUG lines are not ours
            logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING))
        return merge_reports(args) if args.report is not None else _main(args, argv)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: one line; files are written atomically (a temporary
        # file, renamed when whole, removed on the way out), so none is half-written and none is left behind
        print(_interrupted_message(WRITTEN[written_before:], exc), file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `python main.py | head`: the reader left; no traceback for that
        _silence_stdout()
        return 141
    except OSError as exc:
        if exc.filename is not None:  # a file of ours could not be written: not an error in our output
            raise
        # the summary could not be written (stdout on a full disk): say so on stderr, in one line
        _silence_stdout()
        print(f"error: the summary could not be written to standard output ({exc.strerror or exc})",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`), raised in the main thread so that it ends a run as Ctrl-C does."""


def _terminated(signum, frame):
    raise Terminated()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit raises nothing."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _interrupted_message(written: list[str], exc: BaseException) -> str:
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    if not written:
        return f"{what}; nothing written"
    folders = sorted({str(Path(p).parent) for p in written})
    return (f"{what}; no results file written (the {len(written)} plots of the stages that finished are in "
            f"{', '.join(folders)})")


def check_values(args) -> list[str]:
    """Every check of the flag values that needs no file and no model (run first: it costs nothing).
    Drops repeated values from the list flags (a dimension is scanned once); returns notes on what it
    changed."""
    from utils import UserInputError

    check_option_values({name: getattr(args, name) for name in (
        "text_limit", "top_k", "max_length", "causal_batch_size", "causal_dims", "sparsity_layers", "seq_lengths",
        "intervention_scale", "sparsity_threshold", "dead_eps", "efficiency_budget", "attention_methods",
        "ablation")}, "--")
    if args.intervention_scale is None:  # not given: the zero ablation's default factor
        args.intervention_scale = 0.0
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise UserInputError(f"--seed {args.seed}: must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]} (numpy's seed range)")
    if args.layers is not None:
        if args.layer is not None:
            raise UserInputError(f"--layer {args.layer} and --layers {' '.join(args.layers)}: give one of them "
                                 "(--layers with one layer gives the several-layer layout)")
        parse_layers(args.layers, None)  # the syntax now; the range once the model's layer count is known
    elif args.layer is None:
        args.layer = 0
    if args.attention_layers is not None:
        if args.layers is not None:
            raise UserInputError(f"--attention_layers {' '.join(args.attention_layers)} and --layers: --layers already "
                                 "runs the attention stage at each of its layers; give one of them")
        parse_layers(args.attention_layers, None, "--attention_layers")
    notes = []
    for flag in ("causal_dims", "attention_methods", "sparsity_layers", "seq_lengths"):
        values = getattr(args, flag)
        if values is not None and len(set(values)) < len(values):
            setattr(args, flag, list(dict.fromkeys(values)))
            notes.append(f"--{flag}: repeated values dropped (each is analysed once): {getattr(args, flag)}")
    return notes


def check_text_count(stages, family: str, n_texts: int, args) -> None:
    """Refuse, naming the flag that limited them, a text set too small for a stage asked for."""
    from utils import UserInputError

    short = too_few_texts(stages, family, n_texts)
    if short:
        stage, need = short
        given = (f"--texts_file {args.texts_file} gives {n_texts}" if args.texts_file is not None
                 and n_texts < args.text_limit else f"--text_limit {args.text_limit}")
        raise UserInputError(f"{given}: the {stage} stage needs at least {need} texts (its ranking is a variance "
                             f"across texts); give more texts or drop {stage} from --stages")


def check_prompts(tokenizer, prompts, config, where: str) -> None:
    """Every prompt must give at least one token, fit the model's positions (a Transformer's; a Mamba has
    no limit) and give only token ids within the model's embedding table (`config.vocab_size`)."""
    from models import max_positions
    from utils import UserInputError, check_vocab_ids, token_prefix

    limit = max_positions(config)
    for i, p in enumerate(prompts):
        ids, longer = token_prefix(tokenizer, p, limit or 10 ** 6)
        if not ids:
            raise UserInputError(f"{where}: prompt {i + 1} ({p[:40]!r}) tokenizes to no tokens; remove it")
        if longer:
            raise UserInputError(f"{where}: prompt {i + 1} ({p[:40]!r}) has more tokens than the model's "
                                 f"{limit} positions; shorten it")
        check_vocab_ids(ids, int(config.vocab_size), f"{where}: prompt {i + 1} ({p[:40]!r})")


def check_text_tokens(tokenizer, texts, max_length: int, config, where: str) -> None:
    """Every text's first `max_length` token ids must lie within the model's embedding table."""
    from utils import check_vocab_ids, token_prefix

    for i, t in enumerate(texts):
        check_vocab_ids(token_prefix(tokenizer, t, max_length)[0], int(config.vocab_size),
                        f"{where}: text {i + 1} ({t[:40]!r})")


def parse_layers(specs: list[str], n_layers: int | None, flag: str = "--layers") -> list[int]:
    """--layers (or `flag`): numbers, ranges a-b (both ends included) and `all`, space or comma separated, as a sorted
    list without repeats. With `n_layers` None only the syntax is checked (returns [])."""
    from utils import UserInputError

    items = [t.strip() for s in specs for t in s.split(",") if t.strip()]
    if not items:
        raise UserInputError(f"{flag} {' '.join(specs)!r}: names no layer; give numbers, ranges like 0-3, or all")
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


def check_model_flags(args, adapter, stages) -> int:
    """The flags that depend on the model's shape (layer, site, dims, layers, positions), checked from its
    config. Returns the max_length to use: --max_length, else the default capped at a Transformer's
    positions."""
    from utils import UserInputError

    if args.layers is not None:
        args.layers = parse_layers(args.layers, adapter.n_layers)
        args.layer = args.layers[0]
    if args.attention_layers is not None:
        if "attention" not in stages:
            raise UserInputError(f"--attention_layers {' '.join(args.attention_layers)}: the attention stage is not "
                                 "in this run; add --enable_attention (or attention to --stages)")
        args.attention_layers = parse_layers(args.attention_layers, adapter.n_layers, "--attention_layers")
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


def merge_reports(args) -> int:
    """--report FILES: merge the saved results of several runs of one model (`saved_runs.merge_saved_runs`:
    the depth profiles' plot, one merged JSON and one HTML report). Exit 0, 1 when an output cannot be
    written, or 2 for unusable files."""
    from saved_runs import merge_saved_runs

    return merge_saved_runs(args.report, args.output_dir, args.plots_dir)


def check_result_paths(args, prefix: str) -> tuple[Path, Path]:
    """The results JSON and HTML report paths; with --save_results, neither may be a folder or any other
    non-regular file."""
    from utils import UserInputError

    tag = layer_tag(args.layer, args.layers)
    paths = results_path(args.output_dir, prefix, tag), report_path(args.output_dir, prefix, tag)
    for kind, path in zip(("results file", "report"), paths):
        if args.save_results and (path.exists() or path.is_symlink()) and not path.is_file():
            raise UserInputError(f"--output_dir {args.output_dir}: the {kind} {path} is "
                                 f"{'a folder' if path.is_dir() else 'not a regular file'}; "
                                 "move it away or choose another --output_dir")
    return paths


def check_replacing(json_path: Path, stages: list[str], args) -> str | None:
    """Before the first stage: what this run's results file would replace. The file names tell models
    (and layers) apart, so an existing file is an earlier run of this model at this layer. Refused when
    that run holds results of stages this run does not run (it would silently lose them); otherwise a
    note naming the file replaced (None when there is none)."""
    import json

    from utils import UserInputError

    if not json_path.is_file():
        return None
    try:
        old = json.loads(json_path.read_text(encoding="utf-8"))
        ran = {name for _, name, e in stage_entries(old) if e.get("status") == "ok"}
        when = (old.get("run") or {}).get("start_time", "at an unknown time")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError, KeyError):
        return f"replaced {json_path}, which was not a readable results file"
    lost = sorted(ran - set(stages) - {"depth_profiles"}, key=lambda n: (ALL_STAGES + (n,)).index(n))
    if lost:
        raise UserInputError(f"--output_dir {args.output_dir}: {json_path} holds an earlier run of this model and "
                             f"layer with results of {', '.join(lost)}, which this run does not run; move the file "
                             f"away, choose another --output_dir, or run those stages too")
    return f"replaced {json_path} (an earlier run of this model and layer, started {when})"


def _main(args, argv) -> int:
    """Everything that can be checked is checked before the first stage, the cheap checks first: flag
    values, input files, output folders; then the model's config, tokenizer and weight files, and the flags
    that depend on its shape (layer, site, dims, layers, positions, prompts); the texts; the comparison
    model. Only then do the weights load. Warnings are printed once every check has passed, so that a
    refusal is one line."""
    start = time.time()
    warnings = {}
    from utils import check_writable_dir, expand_path, load_texts, read_texts_file

    for flag in ("texts_file", "prompts_file", "plots_dir", "output_dir"):  # "--plots_dir=~/x" reaches us as is
        if getattr(args, flag) is not None:
            setattr(args, flag, str(expand_path(getattr(args, flag), f"--{flag}")))
    notes = check_values(args)
    stages = resolve_stages(args.stages, enable_attention=args.enable_attention)
    check_plan(stages, args, "--")
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
    prefix = model_prefix(args.model, source.origin, source.resolved_path)
    if args.layers is None:  # the file names are known now (with --layers, once the layer count is)
        check_result_paths(args, prefix)
    files = inspect_model(source, "--model")  # config, tokenizer, weight files: before the weights load
    adapter = config_adapter(files.config)
    if args.stages is not None:
        stages = resolve_stages(args.stages, adapter.family)
    max_length = check_model_flags(args, adapter, stages)
    json_path, html_path = check_result_paths(args, prefix)
    replacing = check_replacing(json_path, stages, args) if args.save_results else None
    if max_length != (args.max_length or DEFAULT_MAX_LENGTH):
        notes.append(f"texts truncated to this model's {max_length} positions (the default --max_length is "
                     f"{DEFAULT_MAX_LENGTH})")
    from causal_analysis import DEFAULT_PROMPTS

    where = f"--prompts_file {args.prompts_file}" if prompts else "the default prompts"
    if {"causal", "inter_layer", "cross_layer"} & set(stages):
        check_prompts(files.tokenizer, prompts or DEFAULT_PROMPTS, files.config, where)

    if args.texts_file is None:  # the default corpus: from the datasets cache or hub, else the shipped texts
        textset = load_texts(None, args.text_limit)
        warnings["texts"] = textset.warning
    check_text_count(stages, adapter.family, len(textset.texts), args)
    texts_from = f"--texts_file {args.texts_file}" if args.texts_file else "the default texts"
    check_text_tokens(files.tokenizer, textset.texts, max_length, files.config, texts_from)
    compare_source = compare_warning = compare_files = None
    if "comparison" in stages or args.compare_model is not None:  # a missing or broken one fails here
        from comparison_wrapper import resolve_compare_model

        compare_source, compare_warning = resolve_compare_model(args.compare_model, adapter.family)
        warnings["compare"] = compare_warning
        compare_files = inspect_model(compare_source, "--compare_model")
        if {"causal", "comparison"} <= set(stages):  # the comparison scores the same prompts on the other model
            check_prompts(compare_files.tokenizer, prompts or DEFAULT_PROMPTS, compare_files.config,
                          f"{where} on --compare_model {compare_source.requested}")
        if "comparison" in stages:
            check_text_tokens(compare_files.tokenizer, textset.texts, max_length, compare_files.config,
                              f"{texts_from} on --compare_model {compare_source.requested}")

    import transformers

    from models import load_model_and_tokenizer
    from utils import set_seed, to_jsonable, use_agg_backend, write_json

    transformers.logging.set_verbosity_error()  # kernel-fallback notices; errors still surface
    transformers.logging.disable_progress_bar()  # stderr stays clean for our one-line errors
    use_agg_backend()
    set_seed(args.seed)
    # both models load whole (every tensor of the config's architecture read from the weights) or the run
    # ends here, before the first stage
    loaded = load_model_and_tokenizer(source, device, dtype, files=files)
    compare = None
    if "comparison" in stages:
        from comparison_wrapper import CompareModel

        compare = CompareModel(load_model_and_tokenizer(compare_source, device, dtype, "--compare_model",
                                                        files=compare_files), compare_warning)
    for key in ("model", "compare", "texts"):  # every check has passed
        if warnings.get(key):
            print(f"warning: {warnings[key]}", file=sys.stderr)

    results = {"run": run_metadata(args, argv, loaded, device, dtype, start)}
    results["run"]["notes"] += [n for n in (warnings.get("model"), *notes, replacing) if n]

    def on_start(partial: dict) -> None:  # the header as soon as the texts are tokenized
        partial["texts"].update(source=textset.source, warning=textset.warning)
        print_header({"run": results["run"], **partial})

    summaries = {}  # stage -> its printed summary, for the HTML report

    def on_stage(name: str, entry: dict) -> None:
        text = stage_text(name, entry)
        summaries[f"{name}, layer {entry['layer']}" if "layer" in entry else name] = text
        print(text, end="", flush=True)  # each stage as soon as it ends

    def tup(v):
        return None if v is None else tuple(v)

    opts = Options(layer=args.layer, layers=tup(args.layers), top_k=args.top_k, max_length=max_length, plots_dir=args.plots_dir, prefix=prefix,
                   progress=not args.no_progress, attention_methods=tuple(args.attention_methods),
                   attention_layers=tup(args.attention_layers),
                   prompts=tup(prompts), causal_site=args.causal_site, causal_dims=tup(args.causal_dims),
                   ablation=args.ablation, intervention_scale=args.intervention_scale,
                   causal_batch_size=args.causal_batch_size, sparsity_layers=tup(args.sparsity_layers),
                   sparsity_threshold=args.sparsity_threshold, dead_eps=args.dead_eps,
                   seq_lengths=tup(args.seq_lengths), efficiency_budget=args.efficiency_budget,
                   compare_model=args.compare_model, device=device, dtype=dtype)
    results.update(run_pipeline(loaded.model, loaded.tokenizer, textset.texts, opts, stages, on_start, on_stage,
                                compare))
    timings = results["run"]["stage_timings_s"] = {}  # per stage, summed over the layers of --layers
    for _, name, e in stage_entries(results):
        timings[name] = round(timings.get(name, 0.0) + e["wall_time_s"], 4)
    text_pass = results.get("passes", {}).get("text")
    if text_pass:  # a text stage's time includes its reading of the pass; the pass's forwards are their own
        for name, t in text_pass["read_s"].items():
            timings[name] = round(timings.get(name, 0.0) + t, 4)
        timings["text_pass"] = round(text_pass["wall_time_s"] - sum(text_pass["read_s"].values()), 4)
    results["run"]["total_time_s"] = round(time.time() - start, 3)
    print_footer(results)
    failed = bool(failed_stages(results) or plots_not_written(results))
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
