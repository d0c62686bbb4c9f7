"""The figures of issue 29: token labels and the undefined triangle of attention maps, whole-number ticks on
count axes, units (nats) on every KL, readable and non-negative KL axes, shared colour scales, natural
ranges, relative depth, bars for one layer, the scaling curve's skipped lengths, the multi-layer plot once
per run, and attention maps whose structure shows beyond the sink column. Each figure is caught as it is
saved (`figures`) and its axes are read."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model

import matplotlib

matplotlib.use("Agg")


@pytest.fixture
def figures(monkeypatch):
    """{file name: Figure} of every figure saved while the test runs (still written, then inspected)."""
    import comparison_plots
    import utils

    saved, original = {}, utils.save_figure

    def catch(fig, plots_dir, name):
        saved[name] = fig
        return original(fig, plots_dir, name)

    monkeypatch.setattr(utils, "save_figure", catch)
    monkeypatch.setattr(comparison_plots, "save_figure", catch)
    return saved


def _drawn(fig):
    fig.canvas.draw()  # tick positions and labels are decided at draw time
    return fig


def _texts(fig) -> str:
    """Every text of a figure (titles, labels, tick labels, legends, colour bars, notes), joined."""
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def _whole_ticks(axis) -> bool:
    lo, hi = axis.get_view_interval()
    ticks = [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def _colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


# --------------------------------------------------------------------------------------------------
# 1, 11: attention maps
# --------------------------------------------------------------------------------------------------
SINK = np.tril(np.full((6, 6), 0.02)) + np.eye(6) * 0.03
SINK[:, 0] = 0.9  # an attention sink on the first token
SINK[4, 2] = 0.2  # and structure beyond it


@pytest.mark.parametrize("family, stem", [("mamba", "hidden_attention"), ("transformer", "attention_map")])
def test_attention_map_has_token_labels_and_a_grey_undefined_triangle(family, stem, tmp_path, figures):
    from attention_neurons import UNDEFINED_COLOUR, plot_attention_vector

    tokens = ["The", " cat", " sat", "\n", " on", " it"]
    plot_attention_vector(SINK, 3, tmp_path, "m", family, tokens)
    fig = _drawn(figures[f"m_{stem}_layer3_text0"])
    ax = fig.axes[0]
    shown = [repr(t)[1:-1] for t in tokens]  # escapes written out: "\\n"
    assert [t.get_text() for t in ax.get_xticklabels()] == shown and shown[3] == "\\n"
    assert [t.get_text() for t in ax.get_yticklabels()] == shown
    assert ax.get_xlabel() == "key token j" and ax.get_ylabel() == "query token i"
    image = ax.get_images()[0]
    data = image.get_array()
    upper = np.triu_indices(6, 1)
    assert data.mask[upper].all() and not data.mask[np.tril_indices(6)].any()  # not defined, not 0
    assert matplotlib.colors.same_color(image.get_cmap().get_bad(), UNDEFINED_COLOUR)
    assert "not defined" in ax.get_legend().get_texts()[0].get_text()
    (label,) = _colorbar_labels(fig)
    assert "row-normalised" in label and "log colour scale" in label


def test_a_long_text_labels_every_kth_token_with_its_position(tmp_path, figures):
    from attention_neurons import MAX_TOKEN_LABELS, plot_attention_vector

    L = 200
    plot_attention_vector(np.tril(np.ones((L, L))), 0, tmp_path, "m", "mamba", [f"t{i}" for i in range(L)])
    ax = figures["m_hidden_attention_layer0_text0"].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert 1 < len(labels) <= MAX_TOKEN_LABELS and labels[0] == "0: t0"
    assert labels[1] == f"{ax.get_xticks()[1]:.0f}: t{ax.get_xticks()[1]:.0f}"


def test_comparison_maps_show_structure_beyond_the_sink_column(tmp_path, figures):
    """Under min-max scaling every entry but the sink column sits near the bottom of the colour scale;
    row-normalised on a log scale the rest spreads over the scale, and the colour bar says so."""
    import comparison_plots as cp

    side = {"by_layer": {1: {"attention_vector_first_text": SINK, "first_text_tokens": list("abcdef")}}}
    comparison = {"attention": {"models": {"mamba": {**side, "family": "mamba"}, "gpt": {**side, "family": "gpt2"}},
                                "matched_layers": {"mamba": 1, "gpt": 1}}}
    cp.plot_attention_maps(comparison, tmp_path, "c")
    fig = _drawn(figures["c"])
    for ax in [a for a in fig.axes if a.get_images()]:
        image = ax.get_images()[0]
        assert isinstance(image.norm, matplotlib.colors.LogNorm)
        colours = image.norm(image.get_array())
        beyond = colours[np.tril_indices(6, -1)][np.tril_indices(6, -1)[1] > 0]  # off-diagonal, off the sink
        minmax = SINK[np.tril_indices(6, -1)][np.tril_indices(6, -1)[1] > 0] / SINK.max()
        assert np.ptp(beyond) > 0.3 > np.ptp(minmax)
        assert [t.get_text() for t in ax.get_xticklabels()] == list("abcdef")
    assert all("row-normalised" in lab and "log" in lab for lab in _colorbar_labels(fig))


def test_the_attention_stage_keeps_the_first_texts_tokens_and_labels_its_maps(tokenizer, tmp_path, figures):
    from pipeline import Options, run_pipeline
    from utils import OFFLINE_TEXTS_PATH, read_texts_file, tokenize_texts

    texts = read_texts_file(OFFLINE_TEXTS_PATH)[:2]
    opts = Options(layer=1, max_length=10, plots_dir=str(tmp_path), prefix="m", progress=False, bootstrap_resamples=100)
    res = run_pipeline(make_model("mamba_a"), tokenizer, texts, opts, ["attention"])
    r = res["attention"]["results"]
    ids = tokenize_texts(tokenizer, texts, 10).input_ids[0][0].tolist()
    assert r["first_text_tokens"] == [tokenizer.decode([t]) for t in ids]
    labels = [repr(t)[1:-1] for t in r["first_text_tokens"]]
    ax = figures["m_hidden_attention_layer1_text0"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    for m in r["methods"]:  # the 6-panel figure's token map
        token_map = next(a for a in figures[f"m_attention_neurons_{m}_layer1"].axes
                         if a.get_title().startswith("token map"))
        assert [t.get_text() for t in token_map.get_xticklabels()] == labels
        assert token_map.get_images()[0].get_array().mask[0, 1]  # key after the query: not defined


# --------------------------------------------------------------------------------------------------
# 2, 4, 5, 6: counts, KL units, the inter-layer and cross-layer figures
# --------------------------------------------------------------------------------------------------
def test_count_axes_have_whole_number_ticks_and_kl_axes_say_nats(tmp_path, figures):
    import causal_analysis as ca
    import efficiency as ef

    ca.plot_causal_impacts(np.array([0.01, 0.02, 0.5]), np.arange(3), 2, 0, "ssm", tmp_path, "m")
    top, dist = (_drawn(figures[f"m_causal_{k}_ssm_layer0"]).axes[0] for k in ("top", "distribution"))
    assert _whole_ticks(dist.yaxis) and "(count)" in dist.get_ylabel() and "nat" in dist.get_xlabel()
    assert "(nats)" in top.get_ylabel()
    e = {"parameters": {"total": 2e6}, "neurons": {"per_layer": 3, "total": 6, "active": 2, "efficiency_ratio": 2 / 3},
         "flops_per_token_at_256": {"total": 1e6}}
    ef.plot_efficiency([("a", e), ("b", {**e, "neurons": {**e["neurons"], "active": 1}})], tmp_path, "eff")
    counts = [ax for ax in _drawn(figures["eff"]).axes if ax.get_title().startswith(("neurons", "active"))]
    assert len(counts) == 3 and all(_whole_ticks(ax.yaxis) for ax in counts)


def test_inter_layer_kl_axis_starts_at_zero_with_plain_ticks_and_delta_logp_in_nats(tmp_path, figures):
    import causal_analysis as ca

    curves = {"7": [(0, 1.6e-2, -7.3e-4, 4e-2, -0.2, -0.4, 0.0), (1, 3e-4, 1e-4, 6e-4, 0.01, -0.02, 0.03)]}
    ca.plot_inter_layer(curves, "ssm", tmp_path, "m")
    kl, dlp = _drawn(figures["m_inter_layer_ssm"]).axes
    assert kl.get_ylim()[0] == 0.0  # a KL is >= 0
    ticks = [t.get_text() for t in kl.get_yticklabels() if t.get_text()]
    assert ticks and not any("$" in t or "×" in t or "10^" in t for t in ticks)
    assert all(float(t) >= 0 for t in ticks)
    assert "(nats)" in kl.get_ylabel() and "Δ log p" in dlp.get_ylabel() and "(nats)" in dlp.get_ylabel()
    assert _whole_ticks(kl.xaxis) and _whole_ticks(dlp.xaxis)


@pytest.mark.parametrize("n_layers, numbered", [(4, True), (13, False)])
def test_cross_layer_panels_share_one_labelled_symmetric_scale(n_layers, numbered, tmp_path, figures):
    import causal_analysis as ca

    rng = np.random.default_rng(0)
    change = np.triu(rng.standard_normal((2, n_layers, n_layers)))
    change[1] *= 10  # the second dimension's changes are ten times larger
    ca.plot_cross_layer({"dims": [3, 5], "change": change, "sources": np.arange(n_layers),
                         "targets": np.arange(n_layers)}, "residual", tmp_path, "m")
    fig = figures["m_cross_layer_residual"]
    panels = [ax for ax in fig.axes if ax.get_images()]
    (label,) = _colorbar_labels(fig)
    assert "ablated − clean" in label and "activation units" in label
    lim = np.abs(change).max()
    assert all(ax.get_images()[0].get_clim() == (-lim, lim) for ax in panels)
    written = [len(ax.texts) for ax in panels]
    assert written == ([n_layers * (n_layers + 1) // 2] * 2 if numbered else [0, 0])


def test_depth_profile_axes_say_their_units(tmp_path, figures):
    from depth_profiles import plot_depth_profiles

    plot_depth_profiles({"layers": [0, 1], "relative_depth": [0.0, 1.0],
                         "metrics": {"causal: max impact": [0.02, 0.01], "sparsity: population Gini": [0.47, 0.5]}},
                        tmp_path, "d")
    kl, gini = figures["d"].axes[:2]
    assert "(nats)" in kl.get_ylabel() and kl.get_ylim()[0] == 0.0
    assert gini.get_ylim() == pytest.approx((-0.03, 1.03))


# --------------------------------------------------------------------------------------------------
# 3: the delta plot
# --------------------------------------------------------------------------------------------------
def test_delta_plot_draws_points_and_the_tables_quantities(tmp_path, figures):
    from delta_extraction import plot_delta_variance, stats_from_deltas

    rng = np.random.default_rng(1)
    st = stats_from_deltas([np.abs(rng.standard_normal((7, 12))) * (1 + i) for i in range(4)])
    plot_delta_variance(st, 3, tmp_path, "m")
    fig = figures["m_delta_variance_layer0"]
    ranked, scatter = fig.axes[:2]
    for ax in (ranked, scatter):  # no line through the channels (the dashed noise floor is a 2-point line)
        assert all(line.get_linestyle() == "None" or len(line.get_xdata()) <= 2 for line in ax.get_lines())
    assert ranked.get_ylabel().startswith("η²") and "variance" in scatter.get_ylabel()
    assert "std" not in _texts(fig)


# --------------------------------------------------------------------------------------------------
# 7, 10: the multi-layer sparsity figure
# --------------------------------------------------------------------------------------------------
def _layer(rng, layer: int, n_layers: int) -> dict:
    import sparsity as sp

    a = rng.standard_normal((20, 6)) * (1 + 0.01 * layer)
    return {**sp.comprehensive_sparsity(a, 0.01, lengths=[10, 10]), "layer": layer,
            "relative_depth": layer / (n_layers - 1)}


def test_multilayer_panels_show_their_natural_range_and_relative_depth(tmp_path, figures):
    import sparsity as sp

    rng = np.random.default_rng(2)
    deep = {la: _layer(rng, la, 7) for la in range(7)}
    shallow = {la: _layer(rng, la, 4) for la in range(4)}
    sp.plot_multilayer([("deep", deep)], tmp_path, "one")
    sp.plot_multilayer([("deep", deep), ("shallow", shallow)], tmp_path, "two")
    one, two = (_drawn(figures[n]).axes for n in ("one", "two"))
    gini = [m for m, _ in sp.MULTILAYER_METRICS].index("population Gini")
    assert one[gini].get_ylim() == pytest.approx((-0.03, 1.03))  # never zoomed onto 0.47-0.50
    assert one[gini].get_xlabel() == "layer" and _whole_ticks(one[gini].xaxis)
    assert two[gini].get_xlabel().startswith("relative depth")
    xs = [line.get_xdata() for line in two[gini].get_lines()]
    assert [list(x) for x in xs] == [[la / 6 for la in range(7)], [la / 3 for la in range(4)]]


def test_a_layers_run_writes_the_multilayer_plot_once(tokenizer, tmp_path, figures):
    from pipeline import Options, run_pipeline
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    opts = Options(layers=(0, 1), max_length=8, plots_dir=str(tmp_path), prefix="m", progress=False,
                   bootstrap_resamples=100)
    res = run_pipeline(make_model("mamba_a"), tokenizer, read_texts_file(OFFLINE_TEXTS_PATH)[:2], opts, ["sparsity"])
    listed = {la: [p for p in res["layers"][la]["sparsity"]["plots"] if "multilayer" in p] for la in (0, 1)}
    assert len(listed[0]) == 1 and listed[1] == []
    assert [n for n in figures if "multilayer" in n] == ["m_sparsity_multilayer"]


# --------------------------------------------------------------------------------------------------
# 8: attention over depth with one layer per model
# --------------------------------------------------------------------------------------------------
def _entry(layer: int, activation, diversity) -> dict:
    low, high = (None, None) if activation is None else (activation * 0.9, activation * 1.1)
    methods = {m: {"mean_activation": activation, "mean_activation_low": low, "mean_activation_high": high,
                   "neuron_diversity": diversity} for m in ("attention_weighted", "rollout")}
    return {"layer": layer, "methods": methods}


def test_attention_depth_with_one_layer_draws_bars_not_lines(tmp_path, figures):
    from attention_neurons import plot_attention_depth

    plot_attention_depth([("a", 7, {0: _entry(0, 0.4, 0.97)}), ("b", 4, {0: _entry(0, None, None)})], tmp_path, "one")
    plot_attention_depth([("a", 7, {0: _entry(0, 0.4, 0.97), 6: _entry(6, 0.3, 0.9)})], tmp_path, "many")
    one, many = figures["one"].axes, figures["many"].axes
    def bars(ax):
        return [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]

    assert len(one) == 4 and all(len(bars(ax)) == 1 and len(bars(ax)[0]) == 2 for ax in one)  # 2 methods x 2 rows
    assert "undefined" in _texts(figures["one"]) and "(share of relevance, no unit)" in _texts(figures["one"])
    assert all(ax.get_lines() and not bars(ax) for ax in many)


# --------------------------------------------------------------------------------------------------
# 9: the scaling curve says which lengths did not run, and why
# --------------------------------------------------------------------------------------------------
def test_scaling_plot_names_the_lengths_not_run(tmp_path, figures):
    import efficiency as ef

    points = [{"seq_len": L, "time_s": 0.01 * L / 64, "peak_memory_bytes": 2 ** 20 * L / 64, "flops_per_token": 1e6,
               "achieved_gflops_per_s": 10.0} for L in (64, 128, 256)]
    skipped = [{"seq_len": 512, "reason": "predicted 9.9 s, after 4.9 s spent, would overrun this curve's 1.5 s of "
                                          "the budget"},
               {"seq_len": 1024, "reason": "the budget stopped this curve at a shorter length"},
               {"seq_len": 2048, "reason": "the budget stopped this curve at a shorter length"}]
    e = {"scaling": {"implementation": {"name": "slow path"}, "points": points, "skipped": skipped},
         "architecture_curve": {"curve": "scaling", "exact": True}}
    ef.plot_scaling([("m", e)], tmp_path, "s")
    text = _texts(figures["s"])
    assert "L = 512, 1024, 2048 not run: the time budget ran out (predicted 9.9 s" in text
    assert "sequence length L (tokens)" in text and "time (s)" in text
    assert ef.skipped_note("m", {"skipped": []}) is None
