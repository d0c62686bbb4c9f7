"""Hostile inputs to `main.py --report` and to the HTML report: every file is checked for the layout the
merge reads and refused in one line (exit 2, nothing written), and a report embeds only the PNG plots of
the runs it reports, from their plots folders, naming every other path as left out."""
import base64
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from report import NO_PLOTS_DIR, PNG_SIGNATURE, build_report, check_plot

MAIN = str(Path(__file__).resolve().parent.parent / "main.py")
N_LAYERS = 4


def run_main(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, MAIN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _png(path, color="tab:blue") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5, 1))
    ax.plot([0, 1, 2], [0, 2, 1], color=color)
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path).read_bytes()


def _entry(results, plots=()):
    return {"status": "ok", "results": results, "plots": list(plots), "wall_time_s": 0.5}


def results_file(layer=0, plots_dir=None, plots=(), model="tiny/model"):
    """A --layer run's results, in the layout main.py --save_results writes (only what is read)."""
    def iv(v):
        return {"value": v, "low": v - 0.05, "high": v + 0.05}

    single = {"layer": layer, "traditional": {"threshold": 0.01, "sparsity": 0.25},
              "percentile": {"percentiles": [5, 50, 95], "thresholds": [0.1, 0.2, 0.3], "sparsity": [0.0, 0.5, 1.0]},
              "population": {"normalised_entropy": iv(0.6), "entropy_sparsity": iv(0.4), "gini": iv(0.7),
                             "hoyer": iv(0.5)},
              "usage": {"gini": iv(0.3), "hoyer": iv(0.1)},
              "entropy": {"sparsity": 0.4, "mean_entropy": 0.6}, "gini": 0.3, "hoyer": 0.1,  # the legacy keys
              "dead_neurons": {"count": 0, "fraction": 0.0}}
    run = {"model": model, "model_source": "hub", "model_class": "MambaForCausalLM", "layer": layer, "layers": None,
           "seed": 0, "notes": []}
    if plots_dir is not None:
        run["plots_dir"] = str(plots_dir)
    return {"run": run, "texts": {"n_texts": 4, "n_tokens": 40},
            "architecture": {"family": "mamba", "display_name": "Mamba", "n_layers": N_LAYERS},
            "delta": _entry({"ranked_by": "eta_squared",
                             "per_channel": {"eta_squared": [0.5, 0.9, 0.1], "text_variance": [0.1, 0.4, 0.2]},
                             "top_neurons": [{"channel": 1, "score": 0.9, "variance": 0.4}]}, plots),
            "causal": _entry({"scores": [0.5, 0.25, 1.0], "top_neurons": [{"dim": 2, "score": 1.0}]}),
            "sparsity": _entry({"single": single}),
            "efficiency": {"status": "ok", "results": {}, "plots": [], "wall_time_s": 0.1}}


def layers_file(layers=(1, 2)):
    """A --layers run's results: the per-layer entries under "layers"."""
    one = results_file()
    per = {k: one.pop(k) for k in ("delta", "causal", "sparsity")}
    one["run"]["layers"] = list(layers)
    one["layers"] = {str(la): {**copy.deepcopy(per), "delta": {**per["delta"], "layer": la}} for la in layers}
    return one


def _set(path, value):
    """A function that sets `value` at the dotted `path` of a results dict (a "-" deletes the key)."""
    def change(res):
        *head, last = path.split(".")
        d = res
        for k in head:
            d = d[k]
        if value == "-":
            del d[last]
        else:
            d[last] = value
        return res
    return change


def _layer_key(key):
    def change(res):
        res["layers"][key] = res["layers"].pop("1")
        return res
    return change


# (case id, what the file holds: a results dict to change, or raw bytes / a special file, what the error says)
HOSTILE = [
    ("a list", b"[1, 2, 3]", "not an object"),
    ("a number", b"3", "not an object"),
    ("a string", b'"x"', "not an object"),
    ("not json", b"{not json", "not a results JSON"),
    ("empty", b"", "not a results JSON"),
    ("not utf-8", b'{"run": "\xff\xfe"}', "not UTF-8"),
    ("deep nesting", b"[" * 200000, "not a results JSON"),
    ("huge int", b'{"run": ' + b"9" * 5000 + b"}", "not a results JSON"),
    ("nested 900 deep", _set("delta.results.deep", json.loads("[" * 900 + "]" * 900)), "nested deeper than"),
    ("a NUL in a name", _set("run.plots_dir", "/tmp/a\0b"), "run.plots_dir holds a NUL"),
    ("run missing", _set("run", "-"), "no run metadata"),
    ("run a string", _set("run", "x"), '"run" is a string'),
    ("run a list", _set("run", [1]), '"run" is a list'),
    ("architecture a number", _set("architecture", 7), '"architecture" is a number'),
    ("model missing", _set("run.model", "-"), "run.model is missing"),
    ("model a number", _set("run.model", 3), "run.model is 3"),
    ("plots_dir a list", _set("run.plots_dir", ["a"]), "run.plots_dir is a list"),
    ("notes a string", _set("run.notes", "note"), "run.notes"),
    ("texts a list", _set("texts", [1]), '"texts" is a list'),
    ("n_layers missing", _set("architecture.n_layers", "-"), "architecture.n_layers is missing"),
    ("n_layers 0", _set("architecture.n_layers", 0), "architecture.n_layers is 0"),
    ("n_layers a string", _set("architecture.n_layers", "4"), "architecture.n_layers is '4'"),
    ("n_layers true", _set("architecture.n_layers", True), "architecture.n_layers is True"),
    ("layer -1", _set("run.layer", -1), "run.layer is -1"),
    ("layer 10**9", _set("run.layer", 10 ** 9), "run.layer is 1000000000"),
    ("layer = n_layers", _set("run.layer", N_LAYERS), f"run.layer is {N_LAYERS}"),
    ("layer 1.5", _set("run.layer", 1.5), "run.layer is 1.5"),
    ("layer true", _set("run.layer", True), "run.layer is True"),
    ("layer a string", _set("run.layer", "1"), "run.layer is '1'"),
    ("layer missing", _set("run.layer", "-"), "run.layer is missing"),
    ("stage entry a string", _set("delta", "ok"), "delta is a string, not a stage entry"),
    ("stage entry a list", _set("causal", [1]), "causal is a list, not a stage entry"),
    ("status missing", _set("delta.status", "-"), "delta.status is missing"),
    ("status unknown", _set("delta.status", "fine"), "delta.status is 'fine'"),
    ("results missing", _set("delta.results", "-"), "delta.results is missing"),
    ("results a list", _set("sparsity.results", [1]), "sparsity.results is a list"),
    ("error entry without error", lambda r: {**r, "delta": {"status": "error", "wall_time_s": 0}}, "delta.error"),
    ("plots a string", _set("delta.plots", "/etc/passwd"), "delta.plots is not a list"),
    ("plots of numbers", _set("delta.plots", [1]), "delta.plots is not a list"),
    ("wall time a string", _set("delta.wall_time_s", "1 s"), "delta.wall_time_s"),
    ("no per-layer results", lambda r: {k: v for k, v in r.items() if k not in ("delta", "causal", "sparsity")},
     "holds no per-layer stage results"),
    ("layers a list", lambda r: {**layers_file(), "layers": [1, 2]}, '"layers" is a list'),
    ("layers empty", lambda r: {**layers_file(), "layers": {}}, "holds no per-layer stage results"),
    ("layers of empty layers", lambda r: {**layers_file(), "layers": {"1": {}}}, "holds no per-layer stage results"),
    ("layer key -1", lambda r: _layer_key("-1")(layers_file()), "'-1'"),
    ("layer key 10**9", lambda r: _layer_key("1000000000")(layers_file()), "'1000000000'"),
    ("layer key 1.5", lambda r: _layer_key("1.5")(layers_file()), "'1.5'"),
    ("layer key true", lambda r: _layer_key("true")(layers_file()), "'true'"),
    ("layer key 01", lambda r: _layer_key("01")(layers_file()), "'01'"),
    ("a layer a list", lambda r: _set("layers.1", [1])(layers_file()), "layers['1'] is a list"),
    ("a layer's entry a number", lambda r: _set("layers.1.delta", 5)(layers_file()), "layers['1'].delta is a number"),
    ("a layer's unknown stage", lambda r: _set("layers.1.efficiency", {})(layers_file()), "not a per-layer stage"),
    ("a layer's entry layer differs", lambda r: _set("layers.1.delta.layer", 2)(layers_file()), "filed under layer 1"),
    ("a layer's ok entry without results", lambda r: _set("layers.2.causal.results", "-")(layers_file()),
     "layers['2'].causal.results is missing"),
    ("folder", "folder", "is a folder"),
    ("fifo", "fifo", "is a FIFO"),
    ("missing", "missing", "no such file"),
    ("too large", "sparse", "over the"),
]


def _make(case, tmp_path):
    """The hostile file for `case`; returns its name relative to tmp_path."""
    name = "bad.json"
    path = tmp_path / name
    if isinstance(case, bytes):
        path.write_bytes(case)
    elif case == "folder":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)  # nothing ever writes: a reader that opens it blocks
    elif case == "sparse":
        with open(path, "wb") as f:  # sparse: no disk used
            f.truncate(513 * 2 ** 20)
    elif case == "missing":
        pass
    else:
        path.write_text(json.dumps(case(results_file(layer=1))))
    return name


def _assert_refused(p, names, tmp_path, says=None):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert any(n in lines[0] for n in names), lines[0]
    if says is not None:
        assert says in lines[0], lines[0]
    for folder in ("out", "plots"):
        assert not (tmp_path / folder).exists() or not any((tmp_path / folder).iterdir()), folder


@pytest.mark.parametrize("case_id, case, says", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_hostile_results_file_is_refused_in_one_line(case_id, case, says, tmp_path):
    """Beside a good file of another layer: the bad one is named, nothing is written."""
    (tmp_path / "good.json").write_text(json.dumps(results_file(layer=3)))
    name = _make(case, tmp_path)
    p = run_main(["--report", "good.json", name, "--output_dir", "out", "--plots_dir", "plots"], tmp_path)
    _assert_refused(p, [name], tmp_path, says)


def test_the_same_file_twice_and_files_of_two_models_are_refused(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(results_file(layer=0)))
    (tmp_path / "b.json").write_text(json.dumps(results_file(layer=1, model="other\nmodel")))
    os.symlink("a.json", tmp_path / "link.json")
    for files, says in ((["a.json", "a.json"], "given twice"), (["a.json", "./a.json"], "given twice"),
                        (["a.json", "link.json"], "given twice"), (["a.json", "b.json"], "merge the results of one model")):
        p = run_main(["--report", *files, "--output_dir", "out", "--plots_dir", "plots"], tmp_path)
        _assert_refused(p, [files[1]], tmp_path, says)
    (tmp_path / "long.json").write_text(json.dumps(results_file(layer=1, model="a" * 300)))
    p = run_main(["--report", "long.json", "--output_dir", "out", "--plots_dir", "plots"], tmp_path)
    _assert_refused(p, ["long.json"], tmp_path, "does not make a file name")


def test_values_of_the_wrong_type_are_left_out_of_the_profiles_not_a_traceback(tmp_path):
    """Per-layer results whose values are not finite numbers (or None, an undefined measure): the metric is
    missing at that layer, with the reason in the JSON and the report; the merge goes on. An undefined
    channel of η² (null) is left out of its max and median, not of the profile."""
    a, b = results_file(layer=0), results_file(layer=2)
    a["delta"]["results"]["per_channel"]["text_variance"] = "abc"
    a["delta"]["results"]["per_channel"]["eta_squared"] = [0.5, None, 0.1]
    a["causal"]["results"]["scores"] = [1.0, "x"]
    a["sparsity"]["results"]["single"]["usage"]["gini"] = a["sparsity"]["results"]["single"]["gini"] = None
    a["sparsity"]["results"]["single"]["population"]["entropy_sparsity"]["value"] = True
    b["delta"]["results"]["per_channel"]["eta_squared"] = None  # every text of one token: η² undefined, said why
    b["delta"]["results"]["undefined"] = {"eta_squared": "undefined: no text has 2 tokens"}
    b["causal"]["results"]["scores"] = []
    b["sparsity"]["results"]["single"] = {"percentile": {"percentiles": "50"}}
    b["attention"] = _entry({"methods": {"rollout": {"neuron_diversity": None},
                                         "gradient_guided": {"neuron_diversity": 0.5},
                                         "attention_weighted": {"neuron_diversity": float("nan")}}})
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))  # NaN: Python's json reads and writes it
    p = run_main(["--report", "a.json", "b.json", "--output_dir", "out", "--plots_dir", "plots"], tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    merged = json.loads(next((tmp_path / "out").glob("*_merged_results.json")).read_text())
    prof = merged["depth_profiles"]["results"]
    assert prof["layers"] == [0, 2]
    m = prof["metrics"]
    assert m["delta: max text variance"] == [None, 0.4] and m["causal: max impact"] == [None, None]
    assert m["delta: max η²"] == [0.5, None] and m["delta: median η²"] == [pytest.approx(0.3), None]
    assert m["sparsity: usage Gini"] == [None, None] and m["sparsity: usage Hoyer"] == [0.1, None]
    assert m["sparsity: population Gini"] == [0.7, None]
    assert m["sparsity: population 1-H (entropy sparsity, higher = sparser)"] == [None, None]
    assert m["sparsity: population H (normalised entropy, lower = sparser)"] == [0.6, None]
    assert m["attention: diversity, gradient_guided"] == [None, 0.5]
    assert m["attention: diversity, rollout"] == [None, None]
    reasons = {(x["layer"], x["metric"]): x["reason"] for x in prof["left_out"]}
    assert "not a non-empty list" in reasons[(0, "delta: max text variance")]
    assert reasons[(2, "delta: max η²")] == "per_channel.eta_squared is undefined: no text has 2 tokens"
    assert "not a finite number" in reasons[(0, "causal: max impact")]
    assert "not a non-empty list" in reasons[(2, "causal: max impact")]
    assert "undefined" in reasons[(0, "sparsity: usage Gini")]
    assert "undefined" in reasons[(2, "attention: diversity, rollout")]
    assert "not a finite number" in reasons[(0, "sparsity: population 1-H (entropy sparsity, higher = sparser)")]
    assert "not a finite number" in reasons[(2, "attention: diversity, attention_weighted")]
    assert "wrong type" in reasons[(2, "sparsity: percentile p50")]
    page = next((tmp_path / "out").glob("*_merged_report.html")).read_text()
    assert "values left out of the profiles" in page


def test_profiles_of_a_runs_own_results_and_of_results_before_eta_squared_and_the_population_measures():
    """In a run (numpy arrays, NaN for a channel whose η² is undefined) the η² profile is over the defined
    channels; results written before η² and the population measures give the raw variance and the usage
    measures and 1 − H from their legacy keys (the same numbers), and say what they lack."""
    import numpy as np

    from depth_profiles import PROFILE_DEFINITIONS, depth_profiles

    new = results_file(layer=1)
    new["delta"]["results"]["per_channel"] = {"eta_squared": np.array([0.2, np.nan, 0.8, 0.4]),
                                              "text_variance": np.array([1.0, 0.0, 3.0, 2.0])}
    old = results_file(layer=3)
    old["delta"]["results"]["per_channel"] = {"text_variance": [0.1, 0.4, 0.2]}
    s = old["sparsity"]["results"]["single"]
    del s["population"], s["usage"]
    prof = depth_profiles({1: {k: new[k] for k in ("delta", "sparsity")},
                           3: {k: old[k] for k in ("delta", "sparsity")}}, N_LAYERS)
    m = prof["metrics"]
    assert prof["relative_depth"] == [1 / 3, 1.0]
    assert m["delta: max η²"] == [0.8, None] and m["delta: median η²"] == [pytest.approx(0.4), None]
    assert m["delta: max text variance"] == [3.0, 0.4] and m["delta: median text variance"] == [1.5, 0.2]
    assert m["sparsity: usage Gini"] == [0.3, 0.3] and m["sparsity: usage Hoyer"] == [0.1, 0.1]
    assert m["sparsity: population 1-H (entropy sparsity, higher = sparser)"] == [0.4, 0.4]
    assert m["sparsity: population H (normalised entropy, lower = sparser)"] == [0.6, 0.6]
    assert m["sparsity: population Gini"] == [0.7, None]
    reasons = {(x["layer"], x["metric"]): x["reason"] for x in prof["left_out"]}
    assert reasons[(3, "delta: max η²")] == "per_channel.eta_squared is missing"
    assert "missing" in reasons[(3, "sparsity: population Gini")]
    assert {x["layer"] for x in prof["left_out"]} == {3}
    assert "η²" in PROFILE_DEFINITIONS["delta"] and "raw" in PROFILE_DEFINITIONS["delta"]
    assert "usage" in PROFILE_DEFINITIONS["sparsity"] and "population" in PROFILE_DEFINITIONS["sparsity"]


# --------------------------------------------------------------------------------------------------
# What a report embeds
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def plot_files(tmp_path):
    """A run's plots folder with two good PNGs and every kind of path that must not be embedded."""
    plots, other = tmp_path / "plots", tmp_path / "other"
    plots.mkdir()
    other.mkdir()
    good = {str(plots / "a.png"): _png(plots / "a.png"), str(plots / "b.png"): _png(plots / "b.png", "tab:red")}
    _png(other / "outside.png")
    (plots / "text.png").write_text("just text, named .png\n")
    (plots / "plot.txt").write_bytes(PNG_SIGNATURE + b"a PNG by its bytes, not by its name")
    os.symlink(other / "outside.png", plots / "link.png")
    os.symlink("/etc/passwd", plots / "passwd.png")
    os.mkfifo(plots / "fifo.png")
    (plots / "folder.png").mkdir()
    bad = {"/etc/passwd": "not in the run's plots folder",
           str(plots / "text.png"): "not a PNG image",
           str(plots / "plot.txt"): "not a .png file",
           str(other / "outside.png"): "not in the run's plots folder",
           str(plots / ".." / "other" / "outside.png"): "not in the run's plots folder",
           str(plots / "link.png"): "a link to",
           str(plots / "passwd.png"): "a link to /etc/passwd",
           str(plots / "fifo.png"): "a FIFO, not a regular file",
           str(plots / "folder.png"): "a folder, not a regular file",
           str(plots / "missing.png"): "missing"}
    return plots, good, bad


def test_a_report_embeds_only_the_runs_own_pngs(plot_files):
    plots, good, bad = plot_files
    res = results_file(plots_dir=plots, plots=[*good, *bad])
    page, left_out = build_report(res)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert embedded == [base64.b64encode(data).decode() for data in good.values()]
    reasons = dict(left_out)
    assert set(reasons) == set(bad)
    for path, why in bad.items():
        assert why in reasons[path], (path, reasons[path])
        assert f"plot left out: {path}: " in page
    assert "root:" not in page and base64.b64encode(Path("/etc/passwd").read_bytes()[:30]).decode()[:20] not in page
    # with no plots folder recorded (a results file of an older version): nothing is embedded
    res["run"].pop("plots_dir")
    page, left_out = build_report(res)
    assert "data:image/png" not in page
    assert [why for _, why in left_out] == [NO_PLOTS_DIR] * (len(good) + len(bad))


def test_check_plot_never_opens_a_fifo(tmp_path):
    """A FIFO named like a plot, in the plots folder: refused by its type without opening (which would block)."""
    os.mkfifo(tmp_path / "p.png")
    assert check_plot(str(tmp_path / "p.png"), str(tmp_path)) == (None, "a FIFO, not a regular file")
    assert check_plot(str(tmp_path / "p.png"), "relative/plots")[1].endswith("is not an absolute path")
    assert check_plot("a\0b.png", str(tmp_path))[0] is None


def test_report_merge_embeds_each_files_plots_from_its_own_folder(plot_files, tmp_path):
    """--report: each layer's plots are checked against the plots folder of the file it came from, the
    merge's own plot against --plots_dir; every path left out is one "note: left out" line on stdout."""
    plots, good, bad = plot_files
    plots_b = tmp_path / "plots_b"
    plots_b.mkdir()
    own_b = _png(plots_b / "c.png", "tab:green")
    (tmp_path / "a.json").write_text(json.dumps(results_file(layer=0, plots_dir=plots, plots=[*good, *bad])))
    # b's entries list a's good plots, outside b's plots folder: left out
    (tmp_path / "b.json").write_text(json.dumps(results_file(layer=1, plots_dir=plots_b,
                                                             plots=[str(plots_b / "c.png"), *good])))
    (tmp_path / "old.json").write_text(json.dumps(results_file(layer=2, plots=[str(plots_b / "c.png")])))
    p = run_main(["--report", "a.json", "b.json", "old.json", "--output_dir", "out", "--plots_dir", "merged_plots"],
                 tmp_path)
    assert p.returncode == 0, p.stderr
    notes = [line for line in p.stdout.splitlines() if line.startswith("note: left out ")]
    for path in (*bad, *good, str(plots_b / "c.png")):
        assert any(line.startswith(f"note: left out {path}: ") for line in notes), path
    assert f"note: left out {plots_b / 'c.png'}: {NO_PLOTS_DIR}" in notes  # old.json records no plots folder
    assert len(notes) == len(bad) + len(good) + 1
    page = next((tmp_path / "out").glob("*_merged_report.html")).read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    merged_plot = next((tmp_path / "merged_plots").glob("*_merged.png")).read_bytes()
    # the merge's depth profiles first, then each layer's plots
    assert embedded == [base64.b64encode(x).decode() for x in (merged_plot, *good.values(), own_b)]
    merged = json.loads(next((tmp_path / "out").glob("*_merged_results.json")).read_text())
    assert merged["run"]["layer_plots_dirs"] == {"0": str(plots), "1": str(plots_b), "2": None}
    assert merged["run"]["plots_dir"] == str(tmp_path / "merged_plots")
