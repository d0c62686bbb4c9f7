"""The HTML report: self-contained, the run's plots embedded (and any other path named as left out), errors
shown plainly; rendered in headless Chromium."""
import base64
import re
import shutil
import subprocess

import pytest

from report import PNG_SIGNATURE, build_report, render_report, write_report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")


def _png(path, color="tab:blue"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [0, 2, 1], color=color)
    fig.savefig(path, format="png")
    plt.close(fig)
    return str(path)


def _results(tmp_path, plots):
    return {
        "run": {"model": "m", "layer": 1, "seed": 3, "argv": ["--layer", "1"], "versions": {"torch": "x"},
                "notes": ["a note <b>kept as text</b>"], "plots_dir": str(tmp_path)},
        "texts": {"n_texts": 2, "n_tokens": 17},
        "architecture": {"display_name": "Mamba"},
        "delta": {"status": "ok", "wall_time_s": 1.25, "plots": plots,
                  "results": {"top_neurons": [{"channel": 7, "variance": 0.000123456}, {"channel": 3, "variance": 1e-5}]}},
        "attention": {"status": "ok", "wall_time_s": 2.0, "plots": [],
                      "results": {"methods": {"rollout": {"top_neurons": [{"channel": 11, "activation": 0.5}]}}}},
        "causal": {"status": "error", "wall_time_s": 0.5, "error": "RuntimeError: planted <script>alert(1)</script>"},
        "efficiency": {"status": "not_applicable", "wall_time_s": 0.0, "reason": "not for this model"},
        "comparison": {"status": "ok", "wall_time_s": 3.0, "plots": [],
                       "results": {"summary": [{"metric": "Gini", "a": 0.25, "b": 0.5}]}},
    }


def test_report_content_is_self_contained_and_shows_errors(tmp_path):
    plot = _png(tmp_path / "p.png")
    page = render_report(_results(tmp_path, [plot, str(tmp_path / "missing.png")]), {"delta": "[delta] ok\n  summary line"})
    # every plot is embedded byte for byte; nothing is fetched from anywhere
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert embedded == [base64.b64encode(open(plot, "rb").read()).decode()]
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert f"plot left out: {tmp_path / 'missing.png'}: missing (No such file or directory)" in page
    assert 'id="plots-left-out"' in page
    # errors plainly, escaped; the banner names the failed stage
    assert "FAILED stages: causal" in page
    assert "RuntimeError: planted &lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "not for this model" in page and "a note &lt;b&gt;kept as text&lt;/b&gt;" in page
    # summaries and tables: top neurons of a stage and of a method, the comparison table
    assert "summary line" in page
    assert "<td class=\"num\">0.0001235</td>" in page and "top neurons: methods rollout" in page
    assert "<h3>comparison table</h3>" in page and "<td>Gini</td>" in page
    for stage in ("delta", "attention", "causal", "efficiency", "comparison"):
        assert f'id="stage-{stage}"' in page and f'href="#stage-{stage}"' in page


def _render(path, tmp_path):
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,1400", f"--screenshot={shot}", path.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    return dom, shot


@needs_chromium
def test_chromium_renders_every_plot_and_flags_a_broken_one(tmp_path):
    import numpy as np
    from PIL import Image

    good = [_png(tmp_path / "a.png"), _png(tmp_path / "b.png", "tab:red")]
    (tmp_path / "bad.png").write_bytes(PNG_SIGNATURE + b"not really a png")  # passes the check, fails to decode
    page = write_report(tmp_path / "report.html", _results(tmp_path, good))
    dom, shot = _render(page, tmp_path)
    assert 'data-images-ok="2"' in dom and 'data-images-broken="0"' in dom, dom[:300]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1400, 1000) and pixels.min() < 100 and pixels.mean() > 150  # text on a white page

    page = write_report(tmp_path / "broken.html", _results(tmp_path, [*good, str(tmp_path / "bad.png")]))
    dom, _ = _render(page, tmp_path)
    assert 'data-images-ok="2"' in dom and 'data-images-broken="1"' in dom
    assert "this plot did not decode: bad.png" in dom


def test_plots_are_checked_against_each_entrys_folder(tmp_path):
    """A merge's per-layer entries: each against the plots folder of the file it came from
    (run["layer_plots_dirs"]); the other entries against run["plots_dir"]; `plots_dirs` overrides both."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pa, pb = _png(a / "x.png"), _png(b / "y.png", "tab:red")
    entry = {"status": "ok", "wall_time_s": 0.1, "results": {}}
    res = {"run": {"model": "m", "layers": [0, 1], "plots_dir": str(b), "layer_plots_dirs": {"0": str(a), "1": None}},
           "architecture": {"display_name": "Mamba"},
           "layers": {0: {"delta": {**entry, "plots": [pa, pb]}}, 1: {"delta": {**entry, "plots": [pb]}}},
           "depth_profiles": {**entry, "plots": [pa, pb],
                              "results": {"left_out": [{"layer": 0, "metric": "m", "reason": "undefined (null)"}]}}}
    page, left_out = build_report(res)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    # a merge's report puts the depth profiles first
    assert page.index('id="stage-depth_profiles"') < page.index('id="stage-delta-layer0"')
    assert embedded == [base64.b64encode(open(p, "rb").read()).decode() for p in (pb, pa)]
    assert [p for p, _ in left_out] == [pa, pb, pb]
    assert "no plots folder recorded" in left_out[2][1] and "values left out of the profiles" in page
    page, left_out = build_report(res, plots_dirs={"delta, layer 1": str(b)})
    assert [p for p, _ in left_out] == [pa, pb]
    assert render_report(res) == build_report(res)[0]


def test_rows_that_are_not_dicts_do_not_break_a_table(tmp_path):
    res = _results(tmp_path, [])
    res["delta"]["results"]["top_neurons"] = [3, "x", None, {"channel": 1}]
    page = render_report(res)
    assert "<th>value</th>" in page and "<th>channel</th>" in page


@needs_chromium
def test_findings_lead_and_tables_sort_in_the_browser(tmp_path):
    """In a 1400-px-wide window the findings panel is on the first screen; a click on a table header reorders
    its rows (numbers as numbers); the contents bar stays in view; figures are kept whole in print."""
    res = _results(tmp_path, [])
    res["delta"]["results"]["top_neurons"] = [{"channel": c, "variance": v} for c, v in ((7, 2.0), (3, 10.0), (5, 1.0))]
    page = write_report(tmp_path / "report.html", res)
    html_text = page.read_text()
    assert "break-inside: avoid" in html_text and "position: sticky" in html_text
    # a test-only script, added to a copy of the page: after the page's own script, click the variance header
    probe = """<script>window.addEventListener("load", function () { setTimeout(function () {
      var f = document.getElementById("findings").getBoundingClientRect();
      document.body.dataset.findingsTop = Math.round(f.top);
      var table = document.querySelector("#stage-delta ~ table.sortable");
      var th = Array.prototype.filter.call(table.querySelectorAll("th"), function (h) {
        return h.textContent === "variance"; })[0];
      th.click();
      document.body.dataset.sorted = Array.prototype.map.call(table.tBodies[0].rows,
        function (r) { return r.cells[0].textContent; }).join(",");
      th.click();
      document.body.dataset.reversed = Array.prototype.map.call(table.tBodies[0].rows,
        function (r) { return r.cells[0].textContent; }).join(",");
    }, 0); });</script></body>"""
    probed = tmp_path / "probed.html"
    probed.write_text(html_text.replace("</body>", probe))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                          "--virtual-time-budget=2000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    top = int(re.search(r'data-findings-top="(-?\d+)"', dom).group(1))
    assert 0 <= top < 900, top
    assert 'data-sorted="5,7,3"' in dom and 'data-reversed="3,7,5"' in dom, re.findall(r"data-\w+=\"[^\"]*\"", dom)


@needs_chromium
def test_printed_report_splits_no_figure(tmp_path):
    """Printed to PDF by Chromium, every embedded plot lies on one page, a tall one included (each image is
    drawn from one page's resources only; a figure split across pages is drawn on both)."""
    pypdf = pytest.importorskip("pypdf")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    for k, (w, h) in enumerate(((6, 4), (6, 10), (6, 4), (6, 9.7), (8, 3))):  # two taller than a page at full width
        fig, ax = plt.subplots(figsize=(w, h))
        ax.plot([0, 1], [0, k])
        fig.savefig(tmp_path / f"p{k}.png", format="png", dpi=100)
        plt.close(fig)
        plots.append(str(tmp_path / f"p{k}.png"))
    page = write_report(tmp_path / "report.html", _results(tmp_path, plots))
    pdf = tmp_path / "report.pdf"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--print-to-pdf={pdf}", page.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    pages_of = {}
    for i, p in enumerate(pypdf.PdfReader(pdf).pages):
        resources = p.get("/Resources")
        xobjects = resources.get_object().get("/XObject") if resources is not None else None
        for ref in (xobjects.get_object().values() if xobjects is not None else ()):
            if ref.get_object().get("/Subtype") == "/Image":
                pages_of.setdefault(ref.idnum, set()).add(i)
    assert len(pages_of) == len(plots) and all(len(v) == 1 for v in pages_of.values()), pages_of


def test_the_faithfulness_verdict_needs_an_interval_above_random():
    from report import findings

    def entry(low):
        row = {"ranking": "delta.eta_squared", "space": "channels", "spearman": {"value": 0.3, "low": 0.1, "high": 0.5},
               "normalised_area": {"value": 0.4, "low": low, "high": 0.9}}
        return [("faithfulness", "faithfulness", {"status": "ok", "results": {"layer": 0, "table": [row]}})]

    assert "best finds the units that matter is delta.eta_squared" in findings(entry(0.2))[0]
    assert "no ranking is told apart from random" in findings(entry(-0.1))[0]

    def two(a, b):
        rows = [{"ranking": name, "space": "channels", "spearman": {"value": 0.3, "low": 0.1, "high": 0.5},
                 "normalised_area": {"value": v, "low": lo, "high": hi}} for name, (v, lo, hi) in (("a", a), ("b", b))]
        return findings([("faithfulness", "faithfulness", {"status": "ok", "results": {"layer": 0, "table": rows}})])[0]

    # the largest point area reaches random, a smaller one lies above it: that one is named, not "none"
    line = two((0.50, -0.10, 0.90), (0.45, 0.20, 0.70))
    assert "1 of 2 rankings are told apart from random by their intervals (b)" in line and "area of those is b" in line
    # both above random but overlapping: no "best"
    line = two((0.50, 0.30, 0.90), (0.45, 0.20, 0.70))
    assert "best" not in line and "2 of 2 rankings" in line and "none from all the others" in line
    # one above random and above the other's interval: the best
    assert "best finds the units that matter is a" in two((0.80, 0.60, 0.90), (0.20, -0.10, 0.50))


def test_the_delta_and_causal_headlines_say_what_is_undefined_and_carry_intervals():
    from report import findings

    top = {"channel": 3, "score": 0.4, "low": 0.2, "high": 0.6}
    delta = {"top_neurons": [top], "n_above_noise_floor": None, "n_channels": 8, "expected_above_by_chance": 0.4}
    causal = {"site": "mixer_out", "layer": 0, "n_prompts": 4,
              "top_neurons": [{"dim": 5, "score": 0.1, "low": 0.05, "high": 0.2, "delta_logp_top1": -0.3,
                               "delta_logp_top1_low": -0.5, "delta_logp_top1_high": -0.1}]}
    lines = findings([("delta", "delta", {"status": "ok", "results": delta}),
                      ("causal", "causal", {"status": "ok", "results": causal})])
    assert len(lines) == 2 and "noise floor undefined" in lines[0]
    assert "Δ log p(clean top-1) -0.3 [-0.5, -0.1] nats" in lines[1]
