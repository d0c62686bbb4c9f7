"""Mamba neuron analysis: the command line.

    python main.py --model PATH_OR_HUB_ID [--layer 0] [--save_results] ...

`main` checks every input before the first stage, builds one `options.Options` from the flags (whose
schema generates them), runs the
stages (`pipeline.run_pipeline`; `run_comprehensive_analysis`, the library entry point, is importable from
here too), prints each stage's summary as it ends, writes the HTML report (and with --save_results the
results as JSON), and ends with one line naming what it wrote and the report to open. Exit status: 0 all stages ran (or did not apply), 1 a stage failed (listed in the
summary), 2 bad input.
Heavy imports live inside functions so that `--help` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from models import DEFAULT_MODELS  # light: models.py imports torch/transformers only inside functions
from naming import layer_tag, model_prefix, report_path, results_path  # light
from options import check_plan  # light
from pipeline import ALL_STAGES, complete_plan, resolve_stages, run_pipeline, stage_entries, stage_text, too_few_texts  # light
from pipeline import run_comprehensive_analysis  # noqa: F401  (the library entry point, kept importable from main)

logger = logging.getLogger("mamba_neurons")

DEFAULT_MODEL = DEFAULT_MODELS["mamba"][0]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SEED_RANGE = (0, 2 ** 32 - 1)  # numpy's seed range (torch's is wider)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each default once: added only where the help does not state it and there is one to state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad input (main prints them, exit 2)."""

    def error(self, message):
        from utils import UserInputError

        raise UserInputError(f"{message}; see python main.py --help")


def build_parser() -> argparse.ArgumentParser:
    """The command line: the run's own flags here (model, texts, stages, outputs), every analysis option's
    flag from its `options.Options` field (`options.add_flags`)."""
    from options import add_flags

    p = _Parser(
        description="Open up a state-space language model (Mamba, or a hybrid of state-space and attention layers) "
                    "neuron by neuron, and hold it against a Transformer.",
        formatter_class=_Help)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"Hugging Face hub id or local save_pretrained folder. Supported: Mamba-1 "
                        f"(MambaForCausalLM), FalconMamba, Mamba-2, GPT-2, GPT-NeoX/Pythia, and the hybrids Jamba, Bamba, "
                        f"Granite 4.0, Zamba2, Nemotron-H, Falcon-H1. Default: {DEFAULT_MODEL}, or the "
                        "shipped reference Mamba (reference_models/mamba) when that is neither cached nor reachable")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (analyses compute in float32)")
    groups = {None: p, "model": g}
    g = groups["texts"] = p.add_argument_group("texts")
    g.add_argument("--texts_file", default=None,
                   help="text file, one text per line (blank lines skipped); default: WikiText-2 v1 train "
                        "through `datasets`, or the repo's data/offline_texts.txt when that is unreachable")
    g.add_argument("--text_limit", type=int, default=100, help="use at most this many texts (>= 1)")
    g = groups["analysis"] = p.add_argument_group("analysis")
    g.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help=f"run only these stages (space or comma separated): {', '.join(ALL_STAGES)}; "
                        "default: every stage available in this version")
    g.add_argument("--enable_attention", action="store_true",
                   help="run the attention stage: attention neurons (Mamba: channels and their hidden attention; "
                        "Transformers: attention-output dims and their head's attention weights); with the "
                        "comparison, also both models' attention side by side")
    g = groups["causal (ablation)"] = p.add_argument_group("causal (ablation)")
    g.add_argument("--prompts_file", default=None,
                   help="prompts for the causal and faithfulness stages, one per line; default: the 24 of data/default_prompts.txt")
    groups["sparsity, efficiency, comparison"] = p.add_argument_group("sparsity, efficiency, comparison")
    g = groups["merging saved runs"] = p.add_argument_group("merging saved runs")
    g.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="instead of a run: merge saved results files of one model (one-layer runs of a shell loop, "
                        "--layers runs) into depth profiles, a merged JSON and an HTML report in --output_dir; no "
                        "model is loaded")
    g = groups["output"] = p.add_argument_group("output")
    g.add_argument("--save_results", action="store_true", help="also write analysis_results as JSON to --output_dir "
                                                                "(the HTML report is written on every run)")
    g.add_argument("--output_dir", default="analysis_outputs", help="folder for the HTML report and the JSON results")
    g.add_argument("--seed", type=int, default=0,
                   help=f"random seed (torch, numpy, random), {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    g.add_argument("--log_level", default="WARNING", help=", ".join(LOG_LEVELS))
    g.add_argument("--no_progress", action="store_true", help="hide progress bars")
    add_flags(groups)
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
    boot = run.get("intervals") or {}
    print(f"{where} | {run['dtype']} on {run['device']} | seed {run['seed']}"
          + (f" | [low, high]: 95% bootstrap intervals, {boot['resamples']} resamples" if boot else ""))
    t = results["texts"]
    print(f"texts: {t['n_texts']} from {t['source']} | {t['n_tokens']} tokens | "
          f"{t['n_truncated']} truncated to {t['max_length']} tokens", flush=True)


def failed_stages(results: dict) -> list[str]:
    return [label for label, _, e in stage_entries(results) if e["status"] == "error"]


def plots_not_written(results: dict) -> list[str]:
    return [p["path"] for _, _, e in stage_entries(results) for p in e.get("plots_not_written", [])]


def print_footer(results: dict) -> None:
    text_pass = results.get("passes", {}).get("text")
    if text_pass:
        print(f"text pass: {text_pass['forwards']} forwards over {results['texts']['n_texts']} texts, "
              f"{results['run']['stage_timings_s']['text_pass']:.2f} s outside the stages' reading (read by "
              f"{', '.join(text_pass['stages'])})")
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
def run_metadata(args, argv, loaded, opts, device, dtype, start) -> dict:
    import platform

    import numpy
    import torch
    import transformers

    return {"argv": argv, "model": loaded.source.requested, "model_source": loaded.source.origin,
            "resolved_path": loaded.source.resolved_path, "model_class": type(loaded.model).__name__,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "seed": args.seed,
            "layer": opts.layer, "layers": None if opts.layers is None else list(opts.layers),
            "attention_layers": None if opts.attention_layers is None else list(opts.attention_layers),
            "top_k": opts.top_k, "plots_dir": str(Path(opts.plots_dir).resolve()),
            "intervals": {"level": 0.95, "method": "percentile bootstrap over texts (text stages) or prompts "
                                                   "(causal stages)", "resamples": opts.bootstrap_resamples,
                          "seed": opts.seed},
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


def check_run_flags(args) -> None:
    """The run's own flags that need no file (the options' values: `options.check_given`)."""
    from options import check_option_values
    from utils import UserInputError

    check_option_values({"text_limit": args.text_limit}, "--")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise UserInputError(f"--seed {args.seed}: must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]} (numpy's seed range)")


def check_text_count(stages, family: str, n_texts: int, texts_file, text_limit: int) -> None:
    """Refuse, naming the flag that limited them, a text set too small for a stage asked for."""
    from utils import UserInputError

    short = too_few_texts(stages, family, n_texts)
    if short:
        stage, need = short
        given = (f"--texts_file {texts_file} gives {n_texts}" if texts_file is not None and n_texts < text_limit
                 else f"--text_limit {text_limit}")
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


def merge_reports(args) -> int:
    """--report FILES: merge the saved results of several runs of one model (`saved_runs.merge_saved_runs`:
    the depth profiles' plot, one merged JSON and one HTML report). Exit 0, 1 when an output cannot be
    written, or 2 for unusable files."""
    from saved_runs import merge_saved_runs

    from options import CLI_PLOTS_DIR

    return merge_saved_runs(args.report, args.output_dir, getattr(args, "plots_dir", CLI_PLOTS_DIR))


def check_result_paths(output_dir, save: bool, prefix: str, layer: int, layers) -> tuple[Path, Path]:
    """The results JSON and HTML report paths: the report (written on every run) and, with --save_results
    (`save`), the JSON may not be a folder or any other non-regular file."""
    from utils import UserInputError

    tag = layer_tag(layer, layers)
    paths = results_path(output_dir, prefix, tag), report_path(output_dir, prefix, tag)
    for kind, path, written in zip(("results file", "report"), paths, (save, True)):
        if written and (path.exists() or path.is_symlink()) and not path.is_file():
            raise UserInputError(f"--output_dir {output_dir}: the {kind} {path} is "
                                 f"{'a folder' if path.is_dir() else 'not a regular file'}; "
                                 "move it away or choose another --output_dir")
    return paths


def check_replacing(json_path: Path, stages: list[str], output_dir) -> str | None:
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
        raise UserInputError(f"--output_dir {output_dir}: {json_path} holds an earlier run of this model and "
                             f"layer with results of {', '.join(lost)}, which this run does not run; move the file "
                             f"away, choose another --output_dir, or run those stages too")
    return f"replaced {json_path} (an earlier run of this model and layer, started {when})"


def _main(args, argv) -> int:
    """Everything that can be checked is checked before the first stage, the cheap checks first: flag
    values, input files, output folders; then the model's config, tokenizer and weight files, and the
    options resolved against its shape (`options.resolve`: layers, site, dims, positions), the prompts; the
    texts; the comparison model. Only then do the weights load. Warnings are printed once every check has
    passed, so that a refusal is one line. Nothing here changes `args`."""
    import options as op

    start = time.time()
    warnings = {}
    from utils import check_writable_dir, expand_path, load_texts, read_texts_file

    given = op.given(args)
    # "--plots_dir=~/x" reaches us as is
    files_given = {flag: None if (v := getattr(args, flag)) is None else str(expand_path(v, f"--{flag}"))
                   for flag in ("texts_file", "prompts_file", "output_dir")}
    given["plots_dir"] = str(expand_path(given["plots_dir"], "--plots_dir")) if "plots_dir" in given else op.CLI_PLOTS_DIR
    texts_file, prompts_file, output_dir = files_given["texts_file"], files_given["prompts_file"], files_given["output_dir"]
    op.check_given(given)
    check_run_flags(args)
    stages, _ = complete_plan(resolve_stages(args.stages, enable_attention=args.enable_attention),
                              enable_attention=args.enable_attention)
    check_plan(stages, given.get("causal_dims"), "--")
    prompts = None if prompts_file is None else read_texts_file(prompts_file, flag="--prompts_file")
    if texts_file is not None:
        textset = load_texts(texts_file, args.text_limit)  # missing / empty / not UTF-8: fail now
    check_writable_dir(given["plots_dir"], "--plots_dir")
    check_writable_dir(output_dir, "--output_dir")  # the report, on every run

    from models import config_adapter, inspect_model, resolve_default_model, resolve_model_source
    from utils import resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.model is None:
        source, warnings["model"] = resolve_default_model("mamba")
    else:  # missing folder / unknown id while offline: fail in well under a second
        source = resolve_model_source(args.model)
    prefix = model_prefix(source.requested, source.origin, source.resolved_path)
    if "layers" not in given:  # the file names are known now (with --layers, once the layer count is)
        check_result_paths(output_dir, args.save_results, prefix, given.get("layer", 0), None)
    files = inspect_model(source, "--model")  # config, tokenizer, weight files: before the weights load
    adapter = config_adapter(files.config)
    stages, added = complete_plan(resolve_stages(args.stages, adapter.family, args.enable_attention) if args.stages
                                  is not None else stages, adapter.family, args.enable_attention)
    # progress bars only on a terminal: redirected to a file they would run into the next line
    opts, notes = op.resolve(given, adapter, stages, prefix=prefix, progress=not args.no_progress and _terminal(),
                             seed=args.seed,
                             prompts=None if prompts is None else tuple(prompts))
    json_path, html_path = check_result_paths(output_dir, args.save_results, prefix, opts.layer, opts.layers)
    replacing = check_replacing(json_path, stages, output_dir) if args.save_results else None
    where = f"--prompts_file {prompts_file}" if prompts else "the default prompts"
    if set(op.PROMPT_STAGES) & set(stages):
        check_prompts(files.tokenizer, opts.prompt_list, files.config, where)

    if texts_file is None:  # the default corpus: from the datasets cache or hub, else the shipped texts
        textset = load_texts(None, args.text_limit)
        warnings["texts"] = textset.warning
    check_text_count(stages, adapter.family, len(textset.texts), texts_file, args.text_limit)
    texts_from = f"--texts_file {texts_file}" if texts_file else "the default texts"
    check_text_tokens(files.tokenizer, textset.texts, opts.max_length, files.config, texts_from)
    compare_source = compare_warning = compare_files = None
    if "comparison" in stages or opts.compare_model is not None:  # a missing or broken one fails here
        from comparison_wrapper import resolve_compare_model

        compare_source, compare_warning = resolve_compare_model(opts.compare_model, adapter.family)
        warnings["compare"] = compare_warning
        compare_files = inspect_model(compare_source, "--compare_model")
        if "comparison" in stages and {"causal", "faithfulness"} & set(stages):
            # the comparison runs these on the other model, on the same prompts
            check_prompts(compare_files.tokenizer, opts.prompt_list, compare_files.config,
                          f"{where} on --compare_model {compare_source.requested}")
        if "comparison" in stages:
            check_text_tokens(compare_files.tokenizer, textset.texts, opts.max_length, compare_files.config,
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

    results = {"run": run_metadata(args, argv, loaded, opts, device, dtype, start)}
    results["run"]["notes"] += [n for n in (warnings.get("model"), *notes, replacing) if n]
    results["run"]["notes"] += [f"stage {name} added: {why}" for name, why in added.items()]

    def on_start(partial: dict) -> None:  # the header as soon as the texts are tokenized
        partial["texts"].update(source=textset.source, warning=textset.warning)
        print_header({"run": results["run"], **partial})

    summaries = {}  # stage -> its printed summary, for the HTML report

    def on_stage(name: str, entry: dict) -> None:
        text = stage_text(name, entry)
        summaries[f"{name}, layer {entry['layer']}" if "layer" in entry else name] = text
        print(text, end="", flush=True)  # each stage as soon as it ends

    results.update(run_pipeline(loaded.model, loaded.tokenizer, textset.texts, opts, stages, on_start, on_stage,
                                compare))
    results["stages_added"] = {**added, **results["stages_added"]}  # those added here (the run had every one)
    timings = results["run"]["stage_timings_s"] = {}  # per stage, summed over the layers of --layers
    for _, name, e in stage_entries(results):
        timings[name] = round(timings.get(name, 0.0) + e["wall_time_s"], 4)
    text_pass = results.get("passes", {}).get("text")
    if text_pass:  # a text stage's entries include its reading of the pass; the pass's forwards are their own
        timings["text_pass"] = round(text_pass["wall_time_s"] - sum(text_pass["read_s"].values()), 4)
    results["run"]["total_time_s"] = round(time.time() - start, 3)
    print_footer(results)
    failed = bool(failed_stages(results) or plots_not_written(results))
    from report import write_report

    outputs = [("results", json_path, lambda p: write_json(p, results))] if args.save_results else []
    if args.save_results:
        results["run"]["results_file"] = json_path.name  # the report links to it (the same folder)
    outputs.append(("report", html_path, lambda p: write_report(p, to_jsonable(results), summaries)))
    for kind, path, write in outputs:
        try:
            write(path)
        except OSError as exc:  # e.g. the disk filled up during the run: say so in one line
            print(f"error: {kind} not written to {path} ({exc.strerror or exc})", file=sys.stderr)
            return 1
    print(closing_line(results, html_path, json_path if args.save_results else None))
    return 1 if failed else 0


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def closing_line(results: dict, report: Path, results_file: Path | None) -> str:
    """The run's last line: how the stages ended, what was written, and the one file to open."""
    entries = stage_entries(results)
    counts = {}
    for _, _, e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    ended = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items())
    plots = [p for _, _, e in entries for p in e.get("plots", [])]
    folders = sorted({str(Path(p).parent) for p in plots})
    wrote = (f"{len(plots)} plots in {', '.join(folders)}" if plots else "no plots") + (
        f", the results {results_file}" if results_file else " (the JSON with --save_results)")
    return f"done: {len(entries)} stage entries ({ended}); wrote {wrote}; open the report: {report}"


def cli() -> None:
    """The `mamba-neurons` console command (pyproject.toml): `main` with the process's arguments."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
