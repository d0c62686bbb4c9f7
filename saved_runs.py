"""Saved runs: checking and merging the results files of several runs of one model (`--report FILES`)
into one set of depth profiles, one merged JSON and one HTML report, without loading a model. Light:
the pipeline, the report and the plotting are imported inside the functions.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def merge_layer_results(runs: list[tuple[str, object]], said: list | None = None) -> tuple[dict, dict]:
    """({layer: {stage: entry}}, {layer: file}) from saved results [(file name, parsed JSON)]: one-layer
    runs (`--layer L`) and --layers runs alike, of one model. ValueError naming the file and what is wrong
    when one is not in the layout the merge reads (an object with "run" {"model", "model_class": strings;
    "notes": strings; "model_source", "resolved_path", "plots_dir": strings if given} and "architecture"
    {"n_layers": int >= 1}; its layers ints in 0..n_layers-1, from "layers" {"L": {stage: entry}} or
    run.layer; each per-layer stage entry an object with a "status" of ok (with "results", an object),
    error (with "error") or not_applicable (with "reason"), "plots" a list of paths), holds no per-layer
    stage results, or when the files hold different models. A layer in two files is read once: from the
    first when their values agree, else from the newer run (run.start_time); `said` gets a line for each.
    The values the depth
    profiles read are checked there (`depth_profiles._profile_metrics`). Which stages are per-layer:
    `pipeline.STAGES`."""
    import math

    from options import PER_LAYER
    from pipeline import STAGES  # at call time, so that pipeline may import this module without a cycle

    def kind(v) -> str:
        return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                type(None): "null"}.get(type(v), "a number")

    def show(v) -> str:
        text = repr(v)
        return text if len(text) <= 40 and not isinstance(v, (dict, list)) else kind(v)

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    layers, source, first, started = {}, {}, None, {}
    said = [] if said is None else said
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
                        raise bad(f"layers[{k!r}] holds {show(stage)}, not a per-layer stage ({', '.join(PER_LAYER)})")
                found[la] = ({f"layers[{k!r}].{stage}": stage for stage in by}, by)
        else:  # a --layer run: its per-layer stages at the top level
            la = layer_number(run.get("layer"), "run.layer") if "layer" in run else None
            by = {n: e for n, e in res.items() if n in STAGES and STAGES[n].per_layer}
            if la is None and by:
                raise bad("run.layer is missing: the layer of its stage results is not recorded")
            found = {} if la is None else {la: ({stage: stage for stage in by}, by)}
        if not any(by for _, by in found.values()):
            raise bad(f"holds no per-layer stage results ({', '.join(PER_LAYER)})")
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
            if la not in layers:
                layers[la], source[la] = by, name
                continue
            # a layer in two files (a --layer run beside a --layers run): one value if they agree, else the newest
            if _same_values(layers[la], by):
                said.append(f"layer {la} is in both {source[la]} and {name} with the same values: read from "
                             f"{source[la]}")
                continue
            here, there = str(run.get("start_time", "")), str(started[source[la]])
            if here > there:
                said.append(f"layer {la}: {source[la]} and {name} differ; kept the newer, {name} (started "
                             f"{here}); dropped {source[la]}'s")
                layers[la], source[la] = by, name
            else:
                said.append(f"layer {la}: {source[la]} and {name} differ; kept the newer, {source[la]} (started "
                             f"{there}); dropped {name}'s")
        started[name] = run.get("start_time", "")
    return dict(sorted(layers.items())), source


def _same_values(a: dict, b: dict) -> bool:
    """Two layers' stage entries hold the same results (their timings and plot paths aside)."""
    def core(by: dict) -> dict:
        return {n: {k: v for k, v in e.items() if k not in ("wall_time_s", "plots", "plots_not_written", "layer")}
                for n, e in by.items()}

    return core(a) == core(b)


def merge_saved_runs(files: list[str], output_dir: str, plots_dir: str) -> int:
    """--report FILES (`files`): the saved results of several runs of one model -> depth profiles (plot),
    one merged JSON and one HTML report, written to `output_dir` / `plots_dir` (--output_dir / --plots_dir).
    Returns the exit status: 0, or 1 when an output cannot be written; UserInputError (exit 2) for unusable
    files: every file is read and checked (`report.load_results_file`, `merge_layer_results`) before
    anything is written. The report embeds the PNG plots of each per-layer entry from the plots folder
    recorded in its file's run metadata (run.plots_dir), and the merge's own plot from --plots_dir; any
    other plot is left out, named on stdout and in the report."""
    from depth_profiles import depth_profiles, plot_depth_profiles
    from naming import layer_tag, model_prefix
    from pipeline import stage_text
    from report import build_report, load_results_file
    from utils import UserInputError, check_writable_dir, to_jsonable, use_agg_backend, write_json, write_text

    runs, seen = [], {}
    for name in files:
        data, identity = load_results_file(name, "--report")  # missing, folder, FIFO, huge, not UTF-8 / JSON
        if identity in seen:
            raise UserInputError(f"--report {name}: given twice (the same file as {seen[identity]}); give each "
                                 "file once")
        seen[identity] = name
        runs.append((name, data))

    def is_merge(res) -> bool:
        return isinstance(res, dict) and isinstance(res.get("run"), dict) and bool(res["run"].get("merged_from"))

    merged_before = [name for name, res in runs if is_merge(res)]
    for name in merged_before:  # `--report analysis_outputs/*.json` run twice: the earlier merge is not an input
        print(f"note: skipped {name}, itself a merge of saved runs")
    runs = [(name, res) for name, res in runs if name not in merged_before]
    if not runs:
        raise UserInputError("--report: every file given is itself a merge; give the results files of the runs")
    merge_notes = []
    try:
        layers, source = merge_layer_results(runs, merge_notes)  # every file's layout, one model, each layer once
    except ValueError as exc:
        raise UserInputError(f"--report: {exc}") from None
    plots_dir = os.path.abspath(os.path.expanduser(plots_dir))
    output_dir = os.path.expanduser(output_dir)
    check_writable_dir(plots_dir, "--plots_dir")
    check_writable_dir(output_dir, "--output_dir")
    by_name = dict(runs)
    first_name, first = runs[0]
    run = {**first["run"], "merged_from": [name for name, _ in runs], "layers": list(layers),
           "layer_sources": {la: source[la] for la in layers}, "notes": [*first["run"].get("notes", []), *merge_notes],
           "plots_dir": plots_dir,  # the merge's own plot; each layer's plots: its file's plots folder
           "layer_plots_dirs": {str(la): by_name[source[la]]["run"].get("plots_dir") for la in layers}}
    try:
        prefix = model_prefix(run["model"], run.get("model_source") or "", run.get("resolved_path"))
    except (OSError, ValueError) as exc:  # e.g. a model name too long for a file name
        raise UserInputError(f"--report {first_name}: its model name {run['model'][:60]!r} does not make a file "
                             f"name ({getattr(exc, 'strerror', None) or exc})") from None
    tag = layer_tag(min(layers), list(layers))
    json_path = Path(output_dir) / f"{prefix}_{tag}_merged_results.json"
    html_path = Path(output_dir) / f"{prefix}_{tag}_merged_report.html"
    run["results_file"] = json_path.name  # the merged report links to its own JSON (beside it), not the first run's
    plot_name = f"{prefix}_depth_profiles_{tag}_merged"
    if max(len(f"{n}.png".encode()) for n in (plot_name, html_path.name, json_path.name)) > 240:
        raise UserInputError(f"--report {first_name}: the merged files' names ({plot_name}.png) would be too long "
                             "for a file system; merge fewer layers, or a model of a shorter name")
    profiles = depth_profiles(layers, first["architecture"]["n_layers"], first["architecture"].get("layer_kinds"))
    use_agg_backend()
    try:
        plot = plot_depth_profiles(profiles, plots_dir, plot_name)
        merged = {"run": run, "texts": first.get("texts", {}), "architecture": first["architecture"],
                  "layers": layers,
                  "depth_profiles": {"status": "ok", "results": profiles, "plots": [plot], "wall_time_s": 0.0}}
        summary = stage_text("depth_profiles", merged["depth_profiles"])
        page, left_out = build_report(to_jsonable(merged), {"depth_profiles": summary})
        write_json(json_path, merged)
        write_text(html_path, page)
    except OSError as exc:  # e.g. the disk is full: one line, as for a run
        print(f"error: merged report not written to {output_dir} ({exc.strerror or exc})", file=sys.stderr)
        return 1
    print(summary, end="")
    for note in merge_notes:
        print(f"note: {note}")
    for path, why in left_out:  # one line each, whatever a file's plot names hold
        line = f"note: left out {path}: {why}"
        print("".join(c if c.isprintable() else repr(c)[1:-1] for c in line))
    print(f"results: {json_path}\nreport: {html_path}")
    return 0

