"""Depth profiles (--layers, and --report's merge of saved runs): each per-layer stage's headline numbers
over relative depth, their plot, and their summary text. Light: numpy, matplotlib and the stage modules
are imported inside the functions.
"""
from __future__ import annotations

from utils import nested  # light: utils imports torch only inside its functions


def _profile_metrics(stage: str, r) -> tuple[dict, dict]:
    """({metric: value}, {metric: why it is left out}): the headline numbers of one per-layer stage's
    results `r` at one layer. A value the profile reads that is missing, undefined (None) or not a finite
    number (a list of them, for Δ's η² and text variances and the causal scores) is left out with the reason;
    a channel whose η² is undefined (NaN, or null once saved) is left out of η²'s max and median only."""
    import math

    import numpy as np

    missing = object()

    def at(d, *keys):
        return nested(d, *keys, default=missing)

    def number(v) -> bool:  # a finite int or float (numpy's too), not a bool
        return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                and math.isfinite(v))

    def why_not_number(v, what: str) -> str:
        if v is missing:
            return f"{what} is missing"
        return f"{what} is undefined (null)" if v is None else f"{what} is not a finite number"

    def numbers(v, what: str):
        if v is missing or v is None:
            return None, why_not_number(v, what)
        if isinstance(v, np.ndarray):  # a run's own results, before they are saved as JSON
            if v.ndim != 1 or not v.size or v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.number):
                return None, f"{what} is not a non-empty list of numbers"
            v = v.astype(np.float64)
            return (v, None) if np.isfinite(v).all() else (None, f"{what} holds a value that is not a finite number")
        if not isinstance(v, (list, tuple)) or not v:
            return None, f"{what} is not a non-empty list of numbers"
        if not all(number(x) for x in v):
            return None, f"{what} holds a value that is not a finite number"
        return np.asarray(v, dtype=np.float64), None

    def defined_channels(v):
        """A per-channel list without its undefined channels (NaN in a run's own results, null once saved);
        anything else unchanged (checked by `numbers`)."""
        if isinstance(v, np.ndarray) and v.ndim == 1 and np.issubdtype(v.dtype, np.floating):
            return v[~np.isnan(v)]
        if isinstance(v, (list, tuple)):
            return [x for x in v if x is not None and not (isinstance(x, (float, np.floating)) and math.isnan(x))]
        return v

    if stage == "delta":
        # the default ranking, η² (the between-text share of Δ's variance, scale-free), over the channels where it
        # is defined (NaN in a run's own results, null in a saved one: a channel whose Δ is constant); the raw
        # between-text variance (the ranking of versions before η², which follows Δ's scale) beside it
        out, left = {}, {}
        names = ("delta: max η²", "delta: median η²")
        eta = at(r, "per_channel", "eta_squared")
        if eta is None and isinstance(at(r, "undefined", "eta_squared"), str):  # every text of one token
            v, why = None, f"per_channel.eta_squared is {r['undefined']['eta_squared']}"
        else:
            v, why = numbers(defined_channels(eta), "per_channel.eta_squared (its defined channels)")
            if eta is missing or eta is None:
                why = why_not_number(eta, "per_channel.eta_squared")
        if why is not None:
            left.update(dict.fromkeys(names, why))
        else:
            out.update({names[0]: float(v.max()), names[1]: float(np.median(v))})
        names = ("delta: max text variance", "delta: median text variance")
        v, why = numbers(at(r, "per_channel", "text_variance"), "per_channel.text_variance")
        if why is not None:
            left.update(dict.fromkeys(names, why))
        else:
            out.update({names[0]: float(v.max()), names[1]: float(np.median(v))})
        return out, left
    if stage == "causal":
        names = ("causal: max impact", "causal: median impact")
        v, why = numbers(at(r, "scores"), "scores")
        out, left = ({}, dict.fromkeys(names, why)) if why is not None else (
            {names[0]: float(v.max()), names[1]: float(np.median(v))}, {})
        paths = at(r, "path_effects")
        for path, e in (paths.items() if isinstance(paths, dict) else ()):  # Falcon-H1's parallel paths, each whole
            kl = nested(e, "kl", "value", default=missing)
            name = f"causal: {path} ablated whole"
            if number(kl):
                out[name] = float(kl)
            else:
                left[name] = why_not_number(kl, f"path_effects.{path}.kl.value")
        return out, left
    if stage == "attention":
        methods = at(r, "methods")
        if not isinstance(methods, dict) or not methods:
            return {}, {"attention: diversity": "methods is missing or not a non-empty object"}
        out, left = {}, {}
        for m, a in methods.items():
            d = at(a, "neuron_diversity")
            if number(d):
                out[f"attention: diversity, {m}"] = float(d)
            else:
                left[f"attention: diversity, {m}"] = why_not_number(d, f"methods.{m}.neuron_diversity")
        if isinstance(at(r, "attention_path"), dict):  # Falcon-H1: the same layer's softmax heads
            got, why = _profile_metrics("attention", r["attention_path"])
            out.update({k.replace("attention: ", "attention path: "): v for k, v in got.items()})
            left.update({k.replace("attention: ", "attention path: "): v for k, v in why.items()})
        return out, left
    if stage == "faithfulness":  # each ranking's normalised deletion area (1 = the ground truth's own, 0 = random)
        table = at(r, "table")
        if not isinstance(table, list) or not table:
            return {}, {"faithfulness: normalised area": "table is missing or not a non-empty list"}
        out, left = {}, {}
        for row in table:
            name = f"faithfulness: normalised area, {nested(row, 'ranking', default='?')}"
            v = nested(row, "normalised_area", "value", default=missing)
            if number(v):
                out[name] = float(v)
            else:
                left[name] = why_not_number(v, "normalised_area.value")
        return out, left
    if stage != "sparsity":
        return {}, {}
    import sparsity as sp

    single = at(r, "single")
    out, left = {}, {}
    for name, f in sp.MULTILAYER_METRICS:
        metric = f"sparsity: {name}"
        if not isinstance(single, dict):
            left[metric] = "single is missing or not an object"
            continue
        try:
            v = f(single)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            left[metric] = f"single: the fields of {name} are missing or of the wrong type"
            continue
        if number(v):
            out[metric] = float(v)
        else:
            left[metric] = why_not_number(v, f"single: {name}")
    return out, left


PROFILE_DEFINITIONS = {
    "delta": "max and median over channels of η², the default ranking score (the share of the channel's Δ "
             "variance that lies between texts: var_between / (var_between + var_within), scale-free; over the "
             "channels where it is defined), and of the raw across-text variance of the per-text mean of Δ "
             "(var_between, which follows Δ's scale)",
    "causal": "max and median over the site's dimensions of the causal impact (mean KL over the prompts)",
    "attention": "neuron diversity of each method (normalised entropy of the channel activations, 1 = uniform)",
    "faithfulness": "each ranking's normalised deletion area at the layer (1 = as good as the ground truth's own "
                    "ranking, 0 = random; undefined where the ground truth's curve does not rise above random)",
    "sparsity": "each sparsity measure of the layer's neuron site, named as in the sparsity stage's multi-layer "
                "table (population: per token across the neurons, mean over tokens; usage: per neuron, its mean "
                "|a| over the corpus); point values, without their intervals. On a hybrid each layer's neurons are "
                "its own (a state-space layer's mixer channels, elsewhere the dense MLP's units): its series by "
                "layer kind are series by neuron kind",
}


def depth_profiles(layer_results: dict, n_layers: int, layer_kinds: list | None = None) -> dict:
    """{"layers", "relative_depth", "metrics": {metric: [value per layer, None where its stage did not
    succeed or the value is left out]}, "left_out": [{"layer", "metric", "reason"}] (values that are
    missing, undefined or not finite numbers: `_profile_metrics`), "definitions"} from {layer: {stage:
    entry}} (the per-layer stages of a --layers run). A hybrid's profiles also carry each layer's kind
    ("layer_kinds", from `layer_kinds`: every layer's kind by index) and, per metric, its values split by
    kind ("by_kind": {metric: {kind: {"layers", "values"}}}), so that its state-space and attention layers
    are read apart."""
    layers = sorted(layer_results)
    per = {la: {} for la in layers}
    left_out = []
    for la in layers:
        for stage, entry in layer_results[la].items():
            if isinstance(entry, dict) and entry.get("status") == "ok":
                got, why = _profile_metrics(stage, entry.get("results"))
                per[la].update(got)
                left_out += [{"layer": la, "metric": m, "reason": w} for m, w in why.items()]
    names = list(dict.fromkeys([*(m for la in layers for m in per[la]), *(x["metric"] for x in left_out)]))
    out = {"layers": layers, "relative_depth": [la / max(1, n_layers - 1) for la in layers],
           "metrics": {m: [per[la].get(m) for la in layers] for m in names}, "left_out": left_out,
           "definitions": PROFILE_DEFINITIONS}
    if layer_kinds is not None:
        kinds = [layer_kinds[la] for la in layers]
        out["layer_kinds"] = kinds
        out["by_kind"] = {m: {k: {"layers": [la for la, kk in zip(layers, kinds) if kk == k and per[la].get(m) is not None],
                                  "values": [per[la][m] for la, kk in zip(layers, kinds)
                                             if kk == k and per[la].get(m) is not None]}
                              for k in dict.fromkeys(kinds)} for m in names}
    return out


def axis_of(metric: str) -> tuple[str, tuple | None]:
    """(y label with its unit, fixed y range or None) of a depth-profile metric, by its stage's prefix: a
    measure in [0, 1] (η², diversity, every sparsity measure) always shows all of [0, 1], a KL starts at 0
    (upper end None: the data's)."""
    if metric.startswith("delta: ") and "η²" in metric:
        return "η² (between-text share, 0 … 1)", (0.0, 1.0)
    if metric.startswith("delta: "):
        return "variance of mean Δ (no unit)", None
    if metric.startswith("causal: "):
        return "mean KL(p_clean ‖ p_ablated) (nats)", (0.0, None)  # a KL is >= 0
    if metric.startswith(("attention: ", "attention path: ")):
        return "diversity (1 = uniform, 0 … 1)", (0.0, 1.0)
    if metric.startswith("faithfulness: "):
        return "normalised area (1 = ground truth, 0 = random)", None
    if metric.startswith("sparsity: "):
        return "0 … 1 (no unit)", (0.0, 1.0)
    return "", None


def plot_depth_profiles(profiles: dict, plots_dir, name: str) -> str:
    """One panel per metric against relative depth, its y axis labelled with its unit (`axis_of`); a layer
    where the metric's stage did not succeed is left out of its panel."""
    import math

    import matplotlib.pyplot as plt

    from utils import save_figure

    metrics = profiles["metrics"]
    cols = min(4, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, constrained_layout=True)
    x = profiles["relative_depth"]
    kinds = profiles.get("layer_kinds") or [None] * len(x)  # a hybrid's: one series per layer kind
    for ax, (metric, values) in zip(axes.ravel(), metrics.items()):
        for i, kind in enumerate(dict.fromkeys(kinds)):
            pts = [(xi, v) for xi, v, k in zip(x, values, kinds) if v is not None and k == kind]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if kind is None else "o--", color=f"C{i}",
                    label=None if kind is None else f"{kind} layers")
        if kinds[0] is not None:
            ax.legend(fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("relative depth (layer / (layers - 1))", fontsize=8)
        ax.set_xlim(-0.05, 1.05)
        ylabel, yrange = axis_of(metric)
        ax.set_ylabel(ylabel, fontsize=8)
        if yrange is not None and yrange[1] is not None:
            ax.set_ylim(yrange[0] - 0.03, yrange[1] + 0.03)
        else:
            if yrange is not None:
                ax.set_ylim(bottom=yrange[0])
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes.ravel()[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"Depth profiles, layers {', '.join(map(str, profiles['layers']))}")
    return save_figure(fig, plots_dir, name)


def depth_profiles_text(results: dict) -> str:
    """The summary of the depth profiles `results` (as main prints it under the entry's head line): the
    layers line, then one line per metric, each line ending in a newline."""
    lines = [f"    over layers {', '.join(map(str, results['layers']))}:\n"]
    if results.get("layer_kinds"):
        lines.append("      layer kinds: " + ", ".join(f"{la} {k}" for la, k in zip(results["layers"],
                                                                              results["layer_kinds"])) + "\n")
    for metric, values in results["metrics"].items():
        shown = ", ".join("-" if v is None else f"{v:.3g}" for v in values)
        lines.append(f"      {metric}: {shown}\n")
    return "".join(lines)
