"""One self-contained HTML file per run: provenance, every stage's summary, top-neuron and comparison
tables, stage errors, and the run's plots embedded (base64 PNG). No network, no CDN, no external file: it
opens from a headless server, a laptop or an e-mail attachment. The PNG files stay where the run wrote them.

`build_report(results, summaries, plots_dirs)` builds the page from the run's `analysis_results` (as
main.py saves it as JSON) and each stage's summary text (what main.py printed for it), and says which
plots it left out; `render_report` returns the page alone, `write_report` writes it atomically. An inline
script marks the page once loaded (`data-images-ok` / `data-images-broken` on <body>) and flags a plot
that did not decode, so a broken page says so instead of showing a gap.

What is embedded: only the PNG plots of the runs reported, from their plots folders (`check_plot`): a
path listed under a stage's "plots" is embedded only if it is a regular file (never opened otherwise: a
FIFO would block), its real path (symlinks followed) lies directly in the entry's plots folder, its name
ends in .png and its first 8 bytes are the PNG signature. Every other path is named in the report as left
out, with the reason. The plots folder of an entry: `plots_folders(results)` (the run's
run["plots_dir"]; in a merge of saved runs, run["layer_plots_dirs"][layer] for the per-layer entries).

`load_results_file` reads a saved results JSON for `--report`, refusing (UserInputError, one line naming
the file) a folder, a FIFO or device, a file over `MAX_RESULTS_BYTES`, text that is not UTF-8 or not JSON.
"""
from __future__ import annotations

import base64
import html
import os
import stat
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PLOT_BYTES = 64 * 2 ** 20  # a plot of this tool is well under 1 MB
MAX_RESULTS_BYTES = 512 * 2 ** 20
MAX_RESULTS_DEPTH = 64  # a results file of this tool nests about 8 levels
NO_PLOTS_DIR = "no plots folder recorded in its run metadata"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .85em; }
.ok { color: #1a7f37; } .error { color: #b00020; font-weight: bold; } .not_applicable { color: #777; }
.errorbox { border: 2px solid #b00020; background: #fdecee; padding: .6em; margin: .6em 0; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .8em; color: #555; } .broken { border: 2px dashed #b00020; padding: 1em; }
nav#contents { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: .4em 0;
  z-index: 10; font-size: .85em; line-height: 1.7; }
nav#contents a { margin-right: .7em; white-space: nowrap; }
#findings { border: 2px solid #1a7f37; background: #f3faf4; padding: .4em 1em; margin-top: .8em; }
#findings h2 { border: 0; margin-top: .3em; } #findings li { margin: .25em 0; }
details { margin: .5em 0; } summary { cursor: pointer; color: #333; }
dl.defs { font-size: .85em; } dl.defs dt { font-weight: bold; } dl.defs dd { margin: 0 0 .4em 1.2em; }
table.sortable th { cursor: pointer; } table.sortable th:after { content: " ↕"; color: #aaa; }
input.filter { margin: .3em 0; font-size: .85em; }
@media print { nav#contents, input.filter { display: none; } figure, table, pre, dl, li { break-inside: avoid; }
  img { max-height: 8.5in; width: auto; max-width: 100%; }
  h2, h3 { break-after: avoid; } details { display: block; } }
"""

# on load: count the plots that decoded; a plot that did not is replaced by a visible notice
SCRIPT = """
window.addEventListener("load", function () {
  var ok = 0, broken = 0;
  document.querySelectorAll("img").forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    broken += 1;
    var note = document.createElement("div");
    note.className = "broken error";
    note.textContent = "this plot did not decode: " + img.alt;
    img.replaceWith(note);
  });
  document.body.dataset.imagesOk = ok;
  document.body.dataset.imagesBroken = broken;
  // tables: a click on a header sorts by that column (numbers as numbers, again to reverse); a box filters rows
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var body = table.tBodies[0];
    table.querySelectorAll("th").forEach(function (th, col) {
      th.addEventListener("click", function () {
        var up = th.dataset.order !== "up";
        table.querySelectorAll("th").forEach(function (h) { delete h.dataset.order; });
        th.dataset.order = up ? "up" : "down";
        var rows = Array.prototype.slice.call(body.rows);
        var key = function (r) { var t = r.cells[col] ? r.cells[col].textContent.trim() : "";
                                 var x = parseFloat(t.replace(/\u2212/g, "-")); return isNaN(x) ? t : x; };
        rows.sort(function (a, b) {
          var x = key(a), y = key(b), c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0)
                                                                  : (typeof x === "number" ? -1 : 1);
          return up ? c : -c; });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
    var box = document.createElement("input");
    box.className = "filter"; box.placeholder = "filter rows";
    box.addEventListener("input", function () {
      var q = box.value.toLowerCase();
      Array.prototype.forEach.call(body.rows, function (r) {
        r.style.display = r.textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none"; });
    });
    table.parentNode.insertBefore(box, table);
  });
  document.body.dataset.ready = "1";
});
"""


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v) -> str:
    """A table cell: floats to 4 significant digits, everything else as text."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v, numeric: bool) -> str:
    if numeric and _is_number(v):
        return f"<td class=\"num\">{_esc(_fmt(v))}</td>"
    return f"<td>{_esc(_fmt(v))}</td>"


def _table(rows: list, numeric: bool = True) -> str:
    """An HTML table of dict rows (columns: the union of the rows' keys in first-seen order); numbers
    right-aligned when `numeric`. A row that is not a dict is shown as one "value" cell."""
    if not isinstance(rows, list) or not rows:
        return "<p>(none)</p>"
    rows = [r if isinstance(r, dict) else {"value": r} for r in rows]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c, ""), numeric) for c in columns) + "</tr>" for r in rows)
    return f"<table class=\"sortable\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dict -> [(dotted key, scalar or short list)], for the provenance table."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat(v, key + ".")
        elif isinstance(v, (list, tuple)):
            out.append((key, " ".join(str(x) for x in v)))
        else:
            out.append((key, v))
    return out


def _top_tables(stage_results: dict) -> list[tuple[str, list[dict]]]:
    """Every list of top neurons in a stage's results (its own "top_neurons", and one per method or per
    model one level down), titled by where it was found."""
    found = []
    if isinstance(stage_results.get("top_neurons"), list):
        found.append(("top neurons", stage_results["top_neurons"]))
    for key, sub in stage_results.items():
        if isinstance(sub, dict):
            for name, value in sub.items():
                if isinstance(value, dict) and isinstance(value.get("top_neurons"), list):
                    found.append((f"top neurons: {key} {name}", value["top_neurons"]))
    return found


def _flat_text(v) -> str:
    return "; ".join(f"{k}: {x}" for k, x in _flat(v)) if isinstance(v, dict) else ", ".join(map(str, v))


def _unit_space(results: dict) -> str | None:
    """What a stage's units are (its unit space), from its results."""
    units = results.get("units")
    if isinstance(units, dict) and units.get("unit"):
        return f"{units.get('n_units', '?')} {units['unit']}s" + (f": {units['definition']}" if units.get("definition") else "")
    if results.get("site") and results.get("n_neurons"):
        return f"the {results['n_neurons']} neurons of site {results['site']} (per layer)"
    if results.get("site") == "neurons":  # a hybrid's census: each layer's own neurons, of its own width
        return "each layer's own neurons (site neurons: a state-space layer's gated scan output, elsewhere the dense " \
               "MLP's hidden units), each layer of its own width"
    if results.get("site"):
        return f"the dimensions of site {results['site']}"
    if results.get("unit") and results.get("n_channels"):
        return f"the {results['n_channels']} {results['unit']}s of Δ"
    return None


def _unit_tables(name: str, r: dict) -> list[tuple[str, list[dict]]]:
    """Every unit's numbers as a full table (the top-k tables show the first few)."""
    out = []
    def columns(d: dict, keys, n: int) -> dict:  # the lists of length n among d's keys (a saved file may lack some)
        return {k: d[k] for k in keys if isinstance(d.get(k), list) and len(d[k]) == n}

    if name == "causal" and isinstance(r.get("dims"), list):
        n = len(r["dims"])
        cols = columns(r, ("scores", "scores_low", "scores_high", "delta_logp_top1"), n)
        names = {"scores": "mean KL", "scores_low": "low", "scores_high": "high", "delta_logp_top1": "Δ log p top-1"}
        if "scores" in cols:
            out.append(("every dimension's causal effect (KL and Δ log p in nats)",
                        [{"dim": d, **{names[k]: v[i] for k, v in cols.items()}} for i, d in enumerate(r["dims"])]))
    if name == "delta" and isinstance(r.get("per_channel"), dict):
        lists = [v for v in r["per_channel"].values() if isinstance(v, list)]
        n = len(lists[0]) if lists else 0
        cols = columns(r["per_channel"], list(r["per_channel"]), n)
        unit = r.get("unit") if isinstance(r.get("unit"), str) else "channel"
        if cols:
            out.append((f"every {unit}'s Δ statistics", [{unit: i, **{k: v[i] for k, v in cols.items()}}
                                                         for i in range(n)]))
    if name == "attention" and isinstance(r.get("methods"), dict):
        acts = {m: a.get("neuron_activations") for m, a in r["methods"].items() if isinstance(a, dict)}
        acts = {m: v for m, v in acts.items() if isinstance(v, list)}
        n = {len(v) for v in acts.values()}
        unit = (r.get("units") or {}).get("unit", "unit") if isinstance(r.get("units"), dict) else "unit"
        if len(n) == 1:
            out.append((f"every {unit}'s activation per method (per query token, texts weighted by tokens)",
                        [{unit: i, **{m: v[i] for m, v in acts.items()}} for i in range(n.pop())]))
    if name == "sparsity" and isinstance(r.get("single"), dict):
        cols = columns(r["single"], ("neuron_mean_abs", "neuron_variance"), len(r["single"].get("neuron_mean_abs") or []))
        if cols:
            out.append((f"every neuron's mean |a| and variance at layer {r.get('layer')}",
                        [{"neuron": i, **{k.replace("neuron_", ""): v[i] for k, v in cols.items()}}
                         for i in range(len(next(iter(cols.values()))))]))
    widths = [e.get("n_neurons") for e in r.get("layers", {}).values() if isinstance(e, dict)] \
        if name == "census" and isinstance(r.get("layers"), dict) else []
    if name == "census" and all(isinstance(w, int) for w in widths) and sum(widths) <= 20000:
        for la, e in r["layers"].items():
            t, p = (e.get("token"), e.get("position")) if isinstance(e, dict) else (None, None)
            if not (isinstance(t, dict) and isinstance(p, dict)):
                continue
            if isinstance(t.get("share_per_neuron"), list) and isinstance(p.get("share_per_neuron"), list) and len(
                    t["share_per_neuron"]) == len(p["share_per_neuron"]):
                out.append((f"layer {la}: every neuron's shares", [
                    {"neuron": i, "token share": t["share_per_neuron"][i],
                     "token cross-fitted": (t.get("cross_share_per_neuron") or [None] * (i + 1))[i],
                     "position share": p["share_per_neuron"][i],
                     "position cross-fitted": (p.get("cross_share_per_neuron") or [None] * (i + 1))[i]}
                    for i in range(len(t["share_per_neuron"]))]))
    return out


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _read_regular(path: str, st: os.stat_result, limit: int, follow: bool = True) -> bytes:
    """The first `limit` + 1 bytes of the regular file `path` (already stat'ed as `st`): opened without
    blocking (and, unless `follow`, without following a link), and checked to be the same regular file.
    OSError otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    fd = os.open(path, flags)
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise OSError(f"{path} changed while it was opened")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 2 ** 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_plot(path, folder) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) when the plot `path` may be embedded in a report whose entry has the plots
    folder `folder` (None: none recorded), else (None, why it is left out). A relative path (as the run
    printed it) that does not resolve into the folder from here is looked up there by its name (a path
    with `..` is not). Embedded only: a regular file
    (a FIFO, device or folder is never opened), whose real path (links followed) lies directly in the real
    `folder`, whose name ends in .png and whose first 8 bytes are the PNG signature."""
    if not isinstance(path, str) or not path:
        return None, "not a file name"
    if folder is None:
        return None, NO_PLOTS_DIR
    if not isinstance(folder, str) or not os.path.isabs(folder):
        return None, f"the plots folder recorded for it ({folder!r}) is not an absolute path"
    try:
        real, home = os.path.realpath(path), os.path.realpath(folder)
        if (not os.path.isabs(path) and os.path.dirname(real) != home and ".." not in Path(path).parts):
            # a relative path as the run printed it (plots/NAME.png), read from another folder: by its name
            real = os.path.realpath(os.path.join(folder, os.path.basename(path)))
    except (OSError, ValueError) as exc:  # e.g. a NUL in the name
        return None, f"its path cannot be resolved ({exc})"
    if os.path.dirname(real) != home:
        linked = real != os.path.abspath(path)
        return None, (f"a link to {real}, outside the run's plots folder {folder}" if linked
                      else f"not in the run's plots folder {folder}")
    if not (path.endswith(".png") and real.endswith(".png")):
        return None, "not a .png file"
    try:
        st = os.stat(real)
    except OSError as exc:
        return None, f"missing ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return None, f"{_kind(st.st_mode)}, not a regular file"
    if st.st_size > MAX_PLOT_BYTES:
        return None, f"{st.st_size} bytes, over the {MAX_PLOT_BYTES}-byte limit for a plot"
    try:
        data = _read_regular(real, st, MAX_PLOT_BYTES, follow=False)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    if len(data) > MAX_PLOT_BYTES:
        return None, f"over the {MAX_PLOT_BYTES}-byte limit for a plot"
    if data[:8] != PNG_SIGNATURE:
        return None, "not a PNG image (its first 8 bytes are not the PNG signature)"
    return data, None


def _image(path, folder, left_out: list) -> str:
    """A plot embedded as a data URI, or, when `check_plot` refuses it, a visible note (added to `left_out`)."""
    data, why = check_plot(path, folder)
    if data is None:
        left_out.append((str(path), why))
        return f"<div class=\"broken error\">plot left out: {_esc(path)}: {_esc(why)}</div>"
    b64 = base64.b64encode(data).decode("ascii")
    return (f"<figure><img alt=\"{_esc(Path(path).name)}\" src=\"data:image/png;base64,{b64}\">"
            f"<figcaption>{_esc(path)}</figcaption></figure>")


def plots_folders(results: dict) -> dict[str, str | None]:
    """{entry label (as `pipeline.stage_entries` names it): the folder its plots must lie in, None where
    none is recorded}: the run's run["plots_dir"]; for the per-layer entries of a merge of saved runs
    (`main.py --report`), run["layer_plots_dirs"][str(layer)], the plots folder of the file it came from."""
    run = results.get("run") if isinstance(results.get("run"), dict) else {}
    own = run.get("plots_dir")
    by_layer = run.get("layer_plots_dirs")
    out = {}
    layers = results.get("layers") if isinstance(results.get("layers"), dict) else {}
    for la, by in layers.items():
        folder = by_layer.get(str(la)) if isinstance(by_layer, dict) else own
        for name in (by if isinstance(by, dict) else {}):
            out[f"{name}, layer {la}"] = folder
    for key, value in results.items():
        if isinstance(value, dict) and "status" in value:
            out[key] = own
    return out


def _anchor(label: str) -> str:
    return _esc(label.replace(", layer ", "-layer"))


def _stage_section(label: str, name: str, entry: dict, summary: str, folder, left_out: list) -> str:
    status = entry.get("status", "?")
    parts = [f"<h2 id=\"stage-{_anchor(label)}\">{_esc(label)} <span class=\"{_esc(status)}\">{_esc(status)}</span> "
             f"({_esc(_fmt(entry.get('wall_time_s')))} s)</h2>"]
    if status == "error":
        parts.append(f"<div class=\"errorbox\">{_esc(entry.get('error', ''))}</div>")
    elif status == "not_applicable":
        parts.append(f"<p>{_esc(entry.get('reason', ''))}</p>")
    results = entry.get("results") if isinstance(entry.get("results"), dict) else {}
    space = _unit_space(results)
    if space:
        parts.append(f"<p><b>units</b>: {_esc(space)}</p>")
    if summary:
        parts.append(f"<pre>{_esc(summary.rstrip())}</pre>")
    if isinstance(results.get("definitions"), dict) and results["definitions"]:
        items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v if not isinstance(v, (dict, list)) else _flat_text(v))}</dd>"
                        for k, v in results["definitions"].items())
        parts.append(f"<details><summary>definitions (as in the JSON)</summary><dl class=\"defs\">{items}</dl></details>")
    if name == "comparison" and results.get("summary"):
        parts.append("<h3>comparison table</h3>" + _table(results["summary"]))
    if name == "faithfulness" and results.get("table"):
        from faithfulness import table_rows

        parts.append("<h3>rankings against the ground truth</h3>" + _table(table_rows(results)))
    if name == "census" and results.get("layers"):
        from census import table_rows as census_rows

        parts.append("<h3>neurons of each kind per layer</h3>" + _table(census_rows(results)))
    if name == "depth_profiles" and results.get("left_out"):
        parts.append("<h3>values left out of the profiles</h3>" + _table(results["left_out"], numeric=False))
    for title, rows in _top_tables(results):
        parts.append(f"<h3>{_esc(title)}</h3>" + _table(rows))
    if name == "causal" and isinstance(results.get("clean_predictions"), list):
        parts.append("<h3>prompts and their clean predictions (top 3, p)</h3>" + _table(
            [{"prompt": c.get("prompt"), "clean top-3": ", ".join(f"{t['token']!r} {t['p']:.2f}" for t in c.get("top", [])[:3])}
             for c in results["clean_predictions"] if isinstance(c, dict)], numeric=False))
    for title, rows in _unit_tables(name, results):
        parts.append(f"<details><summary>{_esc(title)} ({len(rows)} rows: sort and filter)</summary>{_table(rows)}</details>")
    plots = entry.get("plots") or []
    parts += [_image(p, folder, left_out) for p in (plots if isinstance(plots, list) else [plots])]
    return "\n".join(parts)


def _top(t: dict, key: str, unit: str) -> str:
    import stats

    return f"{unit} {t.get('channel', t.get('dim', t.get('unit', '?')))}: {stats.shown({'value': t[key], 'low': t.get('low'), 'high': t.get('high')})}"


def _headline_delta(r: dict) -> str:
    t = r["top_neurons"][0]
    floor = ("the noise floor undefined (texts of one token)" if r.get("n_above_noise_floor") is None else
             f"{r['n_above_noise_floor']} of {r['n_channels']} above the noise floor, an upper bound (the floor assumes "
             f"independent tokens; {r['expected_above_by_chance']:.3g} expected by chance)")
    return (f"Δ: top {r.get('unit', 'channel')} by η² (between-text share of Δ's variance) "
            f"{_top(t, 'score', r.get('unit', 'channel'))}; {floor}")


def _headline_causal(r: dict) -> str:
    import stats

    t = r["top_neurons"][0]
    dl = {"value": t["delta_logp_top1"], "low": t.get("delta_logp_top1_low"), "high": t.get("delta_logp_top1_high")}
    paths = "".join(f"; {path} ablated whole: KL {stats.shown(e['kl'])} nats"
                    for path, e in (r.get("path_effects") or {}).items())  # Falcon-H1's parallel paths
    return (f"causal ({r['site']}, layer {r['layer']}, {r['n_prompts']} prompts): largest mean KL "
            f"{_top(t, 'score', 'dim')} nats; its Δ log p(clean top-1) {stats.shown(dl)} nats{paths}")


def _headline_attention(r: dict) -> str:
    import stats

    parts = []
    for m, a in r["methods"].items():
        top = a["top_neurons"][0] if a.get("top_neurons") else None
        parts.append(f"{m}: mean {stats.shown({'value': a['mean_activation'], 'low': a.get('mean_activation_low'), 'high': a.get('mean_activation_high')})}"
                     + (f", top {_top(top, 'activation', r['units']['unit'])}" if top else ""))
    kind = (f", {'softmax heads' if r.get('path') == 'attention' else 'hidden attention'} of a layer of kind "
            f"{r['layer_kind']}") if "layer_kind" in r else ""  # a hybrid's layer
    line = f"attention ({r['units']['n_units']} {r['units']['unit']}s{kind}): " + "; ".join(parts)
    if "attention_path" in r:  # Falcon-H1: the same layer's softmax heads
        line += " | the same layer's attention path: " + _headline_attention(r["attention_path"])
    return line


def _headline_sparsity(r: dict) -> str:
    import stats

    s = r["single"]
    return (f"sparsity ({r['site']}, layer {r['layer']}): population Gini {stats.shown(s['population']['gini'])}, usage Gini "
            f"{stats.shown(s['usage']['gini'])}, dead {s['dead_neurons']['count']} of {s['n_neurons']}")


def _headline_census(r: dict) -> str:
    from census import positional_finding

    t = r["totals"]
    site = "neurons" if r["site"] == "neurons" else f"{r['site']} neurons"  # a hybrid's site is named neurons
    width = f"{r['n_neurons']} {site}" if r.get("n_neurons") else f"{site}, each layer's own width"
    return (f"census ({r['n_layers']} layers of {width}): token neurons {t['token']} of "
            f"{t['neurons']}, positional {t['positional']}; {positional_finding(r)}")


def _headline_faithfulness(r: dict) -> str:
    import stats

    rows = sorted((t for t in r["table"] if t.get("normalised_area", {}).get("value") is not None),
                  key=lambda t: -t["normalised_area"]["value"])  # largest area first
    if not rows:
        return "faithfulness: no ranking has a defined area"

    def numbers(t):
        return (f"{t['ranking']} ({t['space']}): normalised deletion area {stats.shown(t['normalised_area'], '.2f')} "
                f"(1 = the ground truth, 0 = random), Spearman ρ {stats.shown(t['spearman'], '.2f')}")

    def low(t):
        v = t["normalised_area"].get("low")
        return -float("inf") if v is None else v

    def high(t):
        v = t["normalised_area"].get("high")
        return float("inf") if v is None else v

    above = [t for t in rows if low(t) > 0]  # intervals that lie above random
    head = f"faithfulness (layer {r['layer']}): "
    if not above:
        return head + f"no ranking is told apart from random by its interval; the largest area is {numbers(rows[0])}"
    best = above[0]
    if all(low(best) > high(t) for t in rows if t is not best):  # its interval above every other ranking's
        return head + f"the ranking that best finds the units that matter is {numbers(best)}"
    return head + (f"{len(above)} of {len(rows)} rankings are told apart from random by their intervals "
                   f"({', '.join(t['ranking'] for t in above)}), none from all the others; the largest area of "
                   f"those is {numbers(best)}")


def _headline_comparison(r: dict) -> str:
    labels = [m["label"] for m in r["models"]]
    rows = {row["metric"]: row for row in r["summary"]}
    groups = ("population Gini", "usage Gini", "max causal impact", "census: token", "census: positional", "faithfulness")
    picks = [m for g in groups for m in [next((m for m in rows if m.startswith(g)), None)] if m]  # each group's first row
    return f"comparison ({' vs '.join(labels)}): " + "; ".join(
        f"{m}: " + " vs ".join(str(rows[m][lab]) for lab in labels) for m in picks)


HEADLINES = {"delta": _headline_delta, "causal": _headline_causal, "attention": _headline_attention,
             "sparsity": _headline_sparsity, "census": _headline_census, "faithfulness": _headline_faithfulness,
             "comparison": _headline_comparison}


def findings(entries) -> list[str]:
    """The summary panel's lines: each stage's headline numbers with their intervals, and every failure."""
    out = []
    for label, name, e in entries:
        status = e.get("status")
        if status == "error":
            out.append(f"FAILED: {label}: {e.get('error', '')}")
        elif status == "ok" and name in HEADLINES and isinstance(e.get("results"), dict):
            try:
                line = HEADLINES[name](e["results"])
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):  # an older version's results: see its section
                continue
            out.append(line if ", layer" not in label else f"[{label.split(', ', 1)[1]}] {line}")
    return out


def build_report(results: dict, summaries: dict | None = None, plots_dirs: dict | None = None
                 ) -> tuple[str, list[tuple[str, str]]]:
    """(the page for one run, [(plot path, why it was left out)]). `results`: main.py's analysis_results
    ("run", "texts", "architecture" and one entry per stage: {"status", "wall_time_s", "results" | "error" |
    "reason", "plots"}); `summaries`: {stage label: the summary text main.py printed for it}; `plots_dirs`:
    {stage label: the folder its plots must lie in}, over `plots_folders(results)` (the recorded ones)."""
    from pipeline import stage_entries

    summaries = summaries or {}
    folders = {**plots_folders(results), **(plots_dirs or {})}
    run = results.get("run") if isinstance(results.get("run"), dict) else {}
    texts = results.get("texts", {})
    entries = stage_entries(results)  # (label, stage, entry); a --layers run's per-layer entries first
    arch = results.get("architecture") if isinstance(results.get("architecture"), dict) else {}
    family = arch.get("display_name", "")
    where = (f"layers {', '.join(map(str, run['layers']))}" if isinstance(run.get("layers"), list) and run["layers"]
             else f"layer {run.get('layer', '?')}")
    title = f"{family} neuron analysis: {run.get('model', '?')}, {where}"
    rows = "".join(f"<tr><td><a href=\"#stage-{_anchor(lab)}\">{_esc(lab)}</a></td>"
                   f"<td class=\"{_esc(e.get('status'))}\">{_esc(e.get('status'))}</td>"
                   f"{_cell(e.get('wall_time_s'), True)}"
                   f"<td>{_esc(e.get('error') or e.get('reason') or '')}</td></tr>" for lab, _, e in entries)
    overview = ("<table><thead><tr><th>stage</th><th>status</th><th>seconds</th><th>error or reason</th></tr>"
                f"</thead><tbody>{rows}</tbody></table>")
    failed = [lab for lab, _, e in entries if e.get("status") == "error"]
    banner = (f"<div class=\"errorbox\">FAILED stages: {_esc('; '.join(failed))}: their numbers are missing "
              "from this report; the other stages ran.</div>") if failed else ""
    notes = run.get("notes") if isinstance(run.get("notes"), list) else []
    notes = "".join(f"<li>{_esc(n)}</li>" for n in notes)
    provenance = _table([{"field": k, "value": v} for k, v in _flat({**run, "texts": texts}) if k != "notes"
                         and v is not None], numeric=False)
    left_out: list[tuple[str, str]] = []
    # a merge of saved runs: the depth profiles first
    entries = sorted(entries, key=lambda x: x[1] != "depth_profiles") if "layer_plots_dirs" in run else entries
    sections = [_stage_section(lab, name, e, summaries.get(lab, ""), folders.get(lab), left_out)
                for lab, name, e in entries]
    left = "".join(f"<li>{_esc(p)}: {_esc(why)}</li>" for p, why in left_out)
    lines = findings(entries)
    kinds = arch.get("layer_kinds")
    if isinstance(kinds, list) and kinds:  # a hybrid: which layer is which, before the numbers
        lines.insert(0, f"layer kinds ({family}): " + ", ".join(f"{la} {k}" for la, k in enumerate(kinds))
                     + "; a stage is not applicable at a layer of a kind it does not apply to (its entry says why)")
    json_file = run.get("results_file")
    panel = (f"<section id=\"findings\"><h2>What was found</h2><ul>{''.join(f'<li>{_esc(x)}</li>' for x in lines)}</ul>"
             "<p>Intervals: [low, high] are 95% bootstrap intervals over texts or prompts. Every stage's section "
             "below has its definitions, its full tables and its plots"
             + (f"; the numbers are in <a href=\"{_esc(json_file)}\">{_esc(json_file)}</a>" if json_file else
                "; run with --save_results for the JSON") + ".</p></section>")
    nav = ("<nav id=\"contents\"><a href=\"#findings\">findings</a>"
           + "".join(f"<a href=\"#stage-{_anchor(lab)}\">{_esc(lab)}</a>" for lab, _, _ in entries)
           + "<a href=\"#stages\">stage table</a><a href=\"#provenance\">provenance</a></nav>")
    body = "\n".join([f"<h1>{_esc(title)}</h1>", nav, banner, panel, *sections,
                      "<h2 id=\"stages\">stages</h2>", overview,
                      f"<h2>notes</h2><ul>{notes}</ul>" if notes else "",
                      (f"<h2 id=\"plots-left-out\">plots left out</h2><p>This report embeds only the PNG plots of "
                       f"the runs it reports, from their plots folders.</p><ul>{left}</ul>") if left else "",
                      "<h2 id=\"provenance\">provenance</h2>",
                      f"<details><summary>the run's settings, versions and texts</summary>{provenance}</details>"])
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head>\n<body>\n{body}\n</body></html>\n")
    return page, left_out


def render_report(results: dict, summaries: dict | None = None, plots_dirs: dict | None = None) -> str:
    """The page for one run (`build_report` without the list of plots left out)."""
    return build_report(results, summaries, plots_dirs)[0]


def write_report(path, results: dict, summaries: dict | None = None, plots_dirs: dict | None = None) -> Path:
    """Atomically write the report of one run to `path`."""
    from utils import write_text

    return write_text(path, render_report(results, summaries, plots_dirs))


def load_results_file(name: str, flag: str = "--report") -> tuple[object, tuple[int, int]]:
    """(the parsed JSON of the saved results file `name`, its (device, inode)). UserInputError naming
    `flag` and the file, without blocking, when it is missing, a folder, a FIFO, device or socket, over
    `MAX_RESULTS_BYTES`, unreadable, not UTF-8 or not JSON. Its layout is not checked here
    (`saved_runs.merge_layer_results` does)."""
    import json

    from utils import UserInputError

    where, hint = f"{flag} {name}", "give results files (analysis_outputs/*_results.json)"
    try:
        path = os.path.expanduser(name)
        st = os.stat(path)
    except FileNotFoundError:
        raise UserInputError(f"{where}: no such file; {hint}") from None
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{where}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserInputError(f"{where}: is {_kind(st.st_mode)}, not a regular file; {hint}")
    if st.st_size > MAX_RESULTS_BYTES:
        raise UserInputError(f"{where}: {st.st_size} bytes, over the {MAX_RESULTS_BYTES}-byte limit for a "
                             "results file")
    try:
        data = _read_regular(path, st, MAX_RESULTS_BYTES)
    except OSError as exc:
        raise UserInputError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_RESULTS_BYTES:
        raise UserInputError(f"{where}: over the {MAX_RESULTS_BYTES}-byte limit for a results file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; an int of too many digits; deep nesting
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise UserInputError(f"{where}: not a results JSON ({msg})") from None
    if _depth(data) > MAX_RESULTS_DEPTH:  # what reads it (to_jsonable, json.dumps) recurses
        raise UserInputError(f"{where}: nested deeper than {MAX_RESULTS_DEPTH} levels: not a results file of "
                             "this tool")
    return data, (st.st_dev, st.st_ino)


def _depth(value) -> int:
    """How deeply `value` (parsed JSON) nests lists and objects, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_RESULTS_DEPTH:
                break
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest
