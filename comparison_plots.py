"""Plots of a Mamba-vs-Transformer comparison (consume `comparison_wrapper.compare_models`' dict):
every sparsity method side by side at the matched layers, multi-layer and over relative depth, activation
variance, efficiency metrics and scaling curves, causal-impact distributions, attention neurons over
relative depth and both models' attention maps of the first text, and a summary table."""
from __future__ import annotations

import numpy as np

import efficiency as ef
import sparsity as sp
from utils import save_figure

# every sparsity measure that reads "higher = sparser" under its own short name (sparsity.MULTILAYER_METRICS:
# population vs usage; entropy as 1 − H; H itself, lower = sparser, would invert on this axis), and the
# optimal-threshold neuron sparsity
METHODS = (*((name.split(" (")[0], f) for name, f in sp.MULTILAYER_METRICS if "lower = sparser" not in name),
           ("optimal τ(50%)\nneuron sparsity", lambda s: s["optimal_threshold"]["neuron_sparsity"][0]))


def methods_table(comparison: dict) -> dict:
    """{model label: {method: value}} at the matched layers: the numbers of `plot_methods` (None where a
    method is undefined for that model's layer: its sparsity dict's "undefined" says why)."""
    return {s["label"]: {m.replace("\n", " "): None if (v := f(s["sparsity_by_layer"][s["layer"]])) is None
                         else float(v) for m, f in METHODS}
            for s in comparison["models"]}


def plot_methods(comparison: dict, plots_dir, name: str) -> str:
    import matplotlib.pyplot as plt

    sides = comparison["models"]
    fig, ax = plt.subplots(figsize=(17, 5))
    w = 0.8 / len(sides)
    for i, s in enumerate(sides):
        st = s["sparsity_by_layer"][s["layer"]]
        vals = [f(st) for _, f in METHODS]
        heights = [np.nan if v is None else v for v in vals]  # an undefined measure: no bar, labelled so
        bars = ax.bar(np.arange(len(METHODS)) + (i - (len(sides) - 1) / 2) * w, heights, width=w, color=f"C{i}",
                      label=f"{s['label']} (layer {s['layer']}, depth {s['relative_depth']:.2f})")
        ax.bar_label(bars, labels=["undefined" if v is None else f"{v:.3f}" for v in vals], fontsize=7)
    ax.set_xticks(range(len(METHODS)), [m for m, _ in METHODS], fontsize=7)
    ax.set(ylabel="sparsity (0 dense … 1 sparse)", title="Every sparsity method at the matched layers "
                                                         "(traditional is scale-dependent)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, plots_dir, name)


def plot_causal(comparison: dict, plots_dir, name: str) -> str:
    """Distribution (complementary CDF) of the per-dimension causal impacts of both models."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    c = comparison["causal"]
    for i, s in enumerate(comparison["models"]):
        e = c[s["label"]]
        v = np.sort(np.asarray(e["scores"], dtype=float))[::-1]
        n_zero = len(v) - int((v > 0).sum())
        v = v[v > 0]
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(e["scores"]), color=f"C{i}",
                    label=f"{s['label']}: {e['site']} ({e.get('site_kind', '?')}), layer {e['layer']}, "
                          f"{len(e['scores'])} dims" + (f", {n_zero} with impact 0 not drawn" if n_zero else ""))
        m = e.get("max_impact")
        if m is not None and m.get("low") is not None:  # the max's interval over prompts, at the top of the curve
            ax.errorbar([m["value"]], [1 / len(e["scores"])], xerr=[[m["value"] - m["low"]], [m["high"] - m["value"]]],
                        fmt="o", color=f"C{i}", ms=4, capsize=3)
    sites = " vs ".join(f"{c[s['label']]['site']}" for s in comparison["models"])
    kinds = "same kind" if c.get("note") is None else "different kinds: see the note"
    ax.set(xscale="log", xlabel="impact: mean KL(p_clean ‖ p_ablated) over prompts (nats)",
           ylabel="fraction of dims with impact ≥ x",
           title=f"Causal-impact distributions at the matched layers\n{sites} ({kinds}); "
                 "bar: the largest impact's 95% interval over prompts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, plots_dir, name)


def plot_attention_maps(comparison: dict, plots_dir, name: str) -> str:
    """The first text's attention vector of each model at the matched layers side by side: Mamba's hidden
    attention (channel mean of α) and a Transformer's head-mean attention weights, each over its own tokens
    (its axes labelled with them where the results hold them), each query row normalised to its share on
    each key and drawn on a log colour scale (`attention_neurons.draw_attention_map`), so that the structure
    beyond a first-token (sink) column shows."""
    import matplotlib.pyplot as plt

    from attention_neurons import draw_attention_map
    from models import SSM_FAMILIES

    att = comparison["attention"]
    sizes = [np.asarray(side["by_layer"][att["matched_layers"][label]]["attention_vector_first_text"]).shape[0]
             for label, side in att["models"].items()]
    side_in = min(14.0, max(7.0, 0.22 * min(max(sizes), 64) + 3))
    fig, axes = plt.subplots(1, len(att["models"]), figsize=((side_in + 1.5) * len(att["models"]), side_in),
                             squeeze=False, constrained_layout=True)
    for ax, (label, side) in zip(axes[0], att["models"].items()):
        layer = att["matched_layers"][label]
        entry = side["by_layer"][layer]
        vector = np.asarray(entry["attention_vector_first_text"])
        draw_attention_map(ax, fig, vector, "mamba" if side["family"] in SSM_FAMILIES else "transformer",
                           entry.get("first_text_tokens"))
        ax.set_title(f"{label}: {ax.get_title().lower()}, layer {layer}, {vector.shape[0]} tokens", fontsize=10)
    fig.suptitle("The same first text through both models at the matched layers (each on its own tokens; "
                 "each query row normalised, log colour scale)")
    return save_figure(fig, plots_dir, name)


def plot_summary_table(comparison: dict, plots_dir, name: str) -> str:
    import matplotlib.pyplot as plt

    rows = comparison["summary"]
    labels = [s["label"] for s in comparison["models"]]
    fig, ax = plt.subplots(figsize=(11, 0.38 * len(rows) + 1))
    ax.axis("off")
    table = ax.table(cellText=[[r["metric"], *[str(r[lab]) for lab in labels]] for r in rows],
                     colLabels=["metric", *labels], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    ax.set_title("Mamba vs Transformer: summary")
    return save_figure(fig, plots_dir, name)


def comparison_plots(comparison: dict, plots_dir, prefix: str) -> list[str]:
    """Every comparison plot; returns the paths written."""
    sides = comparison["models"]
    at_layer = [(s["label"], s["sparsity_by_layer"][s["layer"]]) for s in sides]
    chosen = [(s["label"], {la: s["sparsity_by_layer"][la] for la in comparison["sparsity_layers"][s["label"]]})
              for s in sides]
    every = [(s["label"], s["sparsity_by_layer"]) for s in sides]
    paths = [plot_methods(comparison, plots_dir, f"{prefix}_sparsity_methods"),
             *sp.sparsity_plots(at_layer, chosen, plots_dir, prefix),
             sp.plot_multilayer(every, plots_dir, f"{prefix}_layer_dynamics", relative=True),
             plot_summary_table(comparison, plots_dir, f"{prefix}_summary_table")]
    if all(s["efficiency"] for s in sides):
        paths += [ef.plot_efficiency([(s["label"], s["efficiency"]) for s in sides], plots_dir, f"{prefix}_efficiency"),
                  ef.plot_scaling([(s["label"], s["efficiency"]) for s in sides], plots_dir, f"{prefix}_scaling")]
    if "causal" in comparison:
        paths.append(plot_causal(comparison, plots_dir, f"{prefix}_causal_distributions"))
    cz = comparison.get("census")
    if cz is not None and "skipped" not in cz:
        from census import plot_by_depth

        paths.append(plot_by_depth([(label, m["by_depth"]) for label, m in cz["models"].items()], plots_dir,
                                   f"{prefix}_census_by_depth", cz["level"]))
    att = comparison.get("attention")
    if att is not None and "skipped" not in att:
        from attention_neurons import plot_attention_depth

        paths += [plot_attention_depth([(label, side["n_layers"], side["by_layer"]) for label, side
                                        in att["models"].items()], plots_dir, f"{prefix}_attention_by_depth"),
                  plot_attention_maps(comparison, plots_dir, f"{prefix}_attention_maps")]
    return paths
