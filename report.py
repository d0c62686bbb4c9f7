"""One self-contained HTML file per run: provenance, every stage's summary, top-neuron and comparison
tables, stage errors, and every plot embedded (base64 PNG). No network, no CDN, no external file: it opens
from a headless server, a laptop or an e-mail attachment. The PNG files stay where the run wrote them.

`render_report(results, summaries)` builds the page from the run's `analysis_results` (as main.py saves
it as JSON) and each stage's summary text (what main.py printed for it); `write_report` writes it
atomically. An inline script marks the page once loaded (`data-images-ok` / `data-images-broken` on
<body>) and flags a plot that did not decode, so a broken page says so instead of showing a gap.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

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


def _table(rows: list[dict], numeric: bool = True) -> str:
    """An HTML table of dict rows (columns: the union of the rows' keys in first-seen order); numbers
    right-aligned when `numeric`."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c, ""), numeric) for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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


def _image(path: str) -> str:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        return f"<div class=\"broken error\">plot missing: {_esc(path)} ({_esc(exc.strerror or exc)})</div>"
    b64 = base64.b64encode(data).decode("ascii")
    return (f"<figure><img alt=\"{_esc(p.name)}\" src=\"data:image/png;base64,{b64}\">"
            f"<figcaption>{_esc(path)}</figcaption></figure>")


def _anchor(label: str) -> str:
    return _esc(label.replace(", layer ", "-layer"))


def _stage_section(label: str, name: str, entry: dict, summary: str) -> str:
    status = entry.get("status", "?")
    parts = [f"<h2 id=\"stage-{_anchor(label)}\">{_esc(label)} <span class=\"{_esc(status)}\">{_esc(status)}</span> "
             f"({_fmt(entry.get('wall_time_s'))} s)</h2>"]
    if status == "error":
        parts.append(f"<div class=\"errorbox\">{_esc(entry.get('error', ''))}</div>")
    elif status == "not_applicable":
        parts.append(f"<p>{_esc(entry.get('reason', ''))}</p>")
    if summary:
        parts.append(f"<pre>{_esc(summary.rstrip())}</pre>")
    results = entry.get("results") or {}
    if name == "comparison" and results.get("summary"):
        parts.append("<h3>comparison table</h3>" + _table(results["summary"]))
    for title, rows in _top_tables(results):
        parts.append(f"<h3>{_esc(title)}</h3>" + _table(rows))
    parts += [_image(p) for p in entry.get("plots", [])]
    return "\n".join(parts)


def render_report(results: dict, summaries: dict | None = None) -> str:
    """The page for one run. `results`: main.py's analysis_results ("run", "texts", "architecture" and one
    entry per stage: {"status", "wall_time_s", "results" | "error" | "reason", "plots"}); `summaries`:
    {stage: the summary text main.py printed for it}."""
    from pipeline import stage_entries

    summaries = summaries or {}
    run, texts = results.get("run", {}), results.get("texts", {})
    entries = stage_entries(results)  # (label, stage, entry); a --layers run's per-layer entries first
    family = results.get("architecture", {}).get("display_name", "")
    where = (f"layers {', '.join(map(str, run['layers']))}" if run.get("layers")
             else f"layer {run.get('layer', '?')}")
    title = f"{family} neuron analysis: {run.get('model', '?')}, {where}"
    rows = "".join(f"<tr><td><a href=\"#stage-{_anchor(lab)}\">{_esc(lab)}</a></td>"
                   f"<td class=\"{_esc(e['status'])}\">{_esc(e['status'])}</td>"
                   f"{_cell(e.get('wall_time_s'), True)}"
                   f"<td>{_esc(e.get('error') or e.get('reason') or '')}</td></tr>" for lab, _, e in entries)
    overview = ("<table><thead><tr><th>stage</th><th>status</th><th>seconds</th><th>error or reason</th></tr>"
                f"</thead><tbody>{rows}</tbody></table>")
    failed = [lab for lab, _, e in entries if e["status"] == "error"]
    banner = (f"<div class=\"errorbox\">FAILED stages: {_esc('; '.join(failed))}: their numbers are missing "
              "from this report; the other stages ran.</div>") if failed else ""
    notes = "".join(f"<li>{_esc(n)}</li>" for n in run.get("notes", []))
    provenance = _table([{"field": k, "value": v} for k, v in _flat({**run, "texts": texts}) if k != "notes"],
                        numeric=False)
    body = "\n".join([f"<h1>{_esc(title)}</h1>", banner, "<h2>stages</h2>", overview,
                      f"<h2>notes</h2><ul>{notes}</ul>" if notes else "",
                      "<h2>provenance</h2>", provenance,
                      *(_stage_section(lab, name, e, summaries.get(lab, "")) for lab, name, e in entries)])
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head>\n<body>\n{body}\n</body></html>\n")


def write_report(path, results: dict, summaries: dict | None = None) -> Path:
    """Atomically write the report of one run to `path`."""
    from utils import write_text

    return write_text(path, render_report(results, summaries))
