"""Δ (the selective time step) of a Mamba layer, and the delta-sensitive channels.

Δ is recomputed from the captured mixer input (ssm.py) and every forward is verified against the
mixer's real output before any Δ is used.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

import stats
from causal_analysis import check_layer, check_layers, check_token_ids, check_top_k, whole_number
from models import get_adapter, require_mamba
from ssm import MixerInternals, ReconstructionCheck, blocked_inference, check_reconstruction, recompute_mixer
from utils import trace

logger = logging.getLogger(__name__)


def capture_mixer_ios(model, layers, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (input, real output)} (b, L, d) each of the mixers of `layers`, all from one forward that
    stops after the last of them. The mixers of `layers` run the model's own forward, so each output is
    the model's own mixer on its input; on Mamba-1 / FalconMamba the mixers below that are not captured run
    `ssm.blocked_inference` (transformers' slow-path operations with the scan in chunks of positions, about
    half the time on a CPU; the mixer inputs it gives are those of the model's own forward to float
    rounding, checked on the first text by the text pass)."""
    adapter = get_adapter(model)
    require_mamba(adapter)
    paths = {layer: adapter.mixer_path(layer) for layer in check_layers(adapter, layers)}
    below = [la for la in range(max(paths, default=0)) if la not in paths]  # the uncaptured mixers before the last
    swap = blocked_inference(model, layers=below) if below and adapter.blocked_forward else nullcontext()
    with torch.no_grad(), swap, trace(model, list(paths.values()), retain_input=True, stop=True) as traces:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return {layer: (traces[p].input, traces[p].output) for layer, p in paths.items()}


def capture_mixer_io(model, layer_idx: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and the real output (b, L, d) of layer `layer_idx`'s mixer; the forward stops there."""
    layer_idx = whole_number("layer_idx", layer_idx)  # its range is checked with the model's layers
    return capture_mixer_ios(model, [layer_idx], input_ids, attention_mask)[layer_idx]


def mixer_internals(model, layer_idx: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> tuple[MixerInternals, ReconstructionCheck]:
    """Run the model up to layer `layer_idx`'s mixer, recompute the mixer's internals from its input and
    verify them against its real output (ReconstructionError on mismatch)."""
    io = capture_mixer_io(model, layer_idx, input_ids, attention_mask)  # (b, L, d) each
    return verified_internals(get_adapter(model).mixer(layer_idx), io, attention_mask)


def verified_internals(mixer, io: tuple, attention_mask: torch.Tensor | None = None
                       ) -> tuple[MixerInternals, ReconstructionCheck]:
    """The internals recomputed from a captured (mixer input, real output), checked against that output."""
    h_in, real_out = io
    internals = recompute_mixer(mixer, h_in, attention_mask)
    return internals, check_reconstruction(internals.out, real_out, mixer=mixer)


def extract_deltas(model, layer_idx: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Δ of layer `layer_idx` for `input_ids` (b, L): a float32 tensor (b, L, e), verified."""
    return mixer_internals(model, layer_idx, input_ids, attention_mask)[0].delta


TOKEN_VARIANCE_UNDEFINED = ("undefined: every text has one token (a variance over the tokens of a text needs at "
                            "least 2)")
ETA_SQUARED_UNDEFINED = ("undefined: no text has 2 tokens, so there is no within-text variance to divide by; the "
                         "channels are ranked by the raw between-text variance instead (which follows Δ's scale)")
RANKINGS = ("eta_squared", "text_variance")
DEFINITIONS = {
    "per-text statistics": "for text i (n_i tokens) and channel c: m_ic = mean of Δ over the text's tokens, v_ic = "
                           "variance of Δ over the text's tokens (ddof=0; only for texts of at least 2 tokens)",
    "text_variance": "var_between = variance across texts (ddof=0, each text weighted once) of the per-text mean "
                     "m_ic: the raw between-text variance, in Δ's units squared (follows Δ's scale)",
    "token_variance": "var_within = mean over the texts of at least 2 tokens (each weighted once) of v_ic",
    "eta_squared": "the default ranking score: η² = var_between / (var_between + var_within), the share of the "
                   "channel's Δ variation that lies between texts (η² of text identity with texts weighted "
                   "equally); unchanged when Δ of a channel is multiplied by a constant or shifted, so it does "
                   "not rank by Δ's size; 0 = Δ's level does not depend on the text, 1 = Δ is constant within "
                   "each text. With short texts the sampling noise of m_ic adds about 1/n_i to it for every "
                   "channel alike",
    "mean_delta": "mean of Δ over all tokens of all texts (texts weighted by their tokens: Σ_i n_i m_ic / Σ_i n_i)",
    "eta_squared_noise_floor": "η² expected with no text effect at all, from the sampling noise of each text's "
                               "mean if its tokens were independent: var_null = (n−1)/n · mean over texts of at "
                               "least 2 tokens of v_ic/(n_i − 1), η²_null = var_null / (var_null + var_within). "
                               "Δ is autocorrelated along a text, so the real noise is larger: a lower bound",
    "n_above_noise_floor": "channels whose η² 95% interval lies wholly above their η²_null: a one-sided test at "
                           "2.5% per channel, uncorrected for testing every channel (expected_above_by_chance = "
                           "2.5% of them would pass with no text effect at all), against a floor that ignores Δ's "
                           "autocorrelation (a lower bound): a count near expected_above_by_chance is no evidence "
                           "of channels that tell texts apart",
    "score": "a top list entry's ranking score (`ranked_by`), with its 95% interval (low, high) and rank "
             f"stability ({stats.STABILITY_DEFINITION})",
    "spearman_with_mean_delta": "Spearman's rank correlation over channels of each ranking score with mean Δ: "
                                "how much a ranking follows Δ's scale",
    "intervals": "texts are resampled; on each resample var_between = mean(m²) − mean(m)², var_within = mean(v) "
                 "over the drawn texts of at least 2 tokens, mean Δ = the token-weighted mean of m, and η² from "
                 "those",
}


@dataclass
class DeltaStats:
    """Per-channel Δ statistics of one layer over a text set (at least 2 texts). Arrays have shape (e,) unless
    said; the per-text arrays (n_texts, e) are what the scores and their bootstrap intervals are made of.

    `token_variance` is averaged over the texts of at least 2 tokens (`n_token_variance_texts` of them): a
    one-token text has no within-text variation to measure, and is left out rather than counted as 0. When
    no text has 2 tokens it is None and `token_variance_undefined` says why; η² (the default ranking) is
    then undefined too and `ranking` falls back to the raw between-text variance, saying so."""

    layer: int
    n_texts: int
    n_tokens: int
    mean_delta: np.ndarray  # mean Δ over every token of every text (token-weighted)
    text_variance: np.ndarray  # var_between: variance across texts of each text's mean Δ (ddof=0)
    token_variance: np.ndarray | None  # var_within: within-text variance (ddof=0), mean over texts of >= 2 tokens
    max_reconstruction_error: float  # worst max|ours - real| / max|real| over the texts
    reconstruction_tolerance: float
    example_delta: np.ndarray  # (L, e) Δ of the first text, for the heatmap
    example_tokens: list[str] = field(default_factory=list)
    unit: str = "channel"  # what the index counts: a channel (Mamba-1, FalconMamba) or a head (Mamba-2)
    n_token_variance_texts: int | None = None  # texts averaged in token_variance (None: every text)
    token_variance_undefined: str | None = None  # why token_variance is None
    text_means: np.ndarray | None = None  # (n_texts, e) m_ic
    text_within: np.ndarray | None = None  # (n_texts, e) v_ic (0 where the text has one token: see has_within)
    has_within: np.ndarray | None = None  # (n_texts,) bool: the text has at least 2 tokens
    text_tokens: np.ndarray | None = None  # (n_texts,) n_i

    @property
    def eta_squared(self) -> np.ndarray | None:
        """η² = var_between / (var_between + var_within) per channel (None when var_within is undefined)."""
        if self.token_variance is None:
            return None
        return _eta_squared(self.text_variance, self.token_variance)

    @property
    def ranked_by(self) -> str:
        """The ranking key: "eta_squared" (scale-free), or "text_variance" when η² is undefined."""
        return "eta_squared" if self.token_variance is not None else "text_variance"

    def score(self, key: str | None = None) -> np.ndarray:
        key = key or self.ranked_by
        if key not in RANKINGS:
            raise ValueError(f"key {key!r}: choose one of {', '.join(RANKINGS)}")
        if key == "eta_squared" and self.token_variance is None:
            raise ValueError(f"eta_squared is {ETA_SQUARED_UNDEFINED}")
        return self.eta_squared if key == "eta_squared" else self.text_variance

    def top(self, k: int, key: str | None = None) -> list[tuple[int, float]]:
        """The k channels with the highest ranking score (`key`: "eta_squared", the default, or "text_variance"),
        highest first: [(channel, score)] (ties in channel order). `k`: a whole number >= 1 (fewer are listed
        when there are fewer channels)."""
        s = self.score(key)
        order = np.argsort(-s, kind="stable")[:check_top_k(k)]
        return [(int(c), float(s[c])) for c in order]

    @property
    def eta_squared_noise_floor(self) -> np.ndarray | None:
        """η²_null per channel (DEFINITIONS["eta_squared_noise_floor"]); None when var_within is undefined."""
        if self.token_variance is None:
            return None
        has = self.has_within
        null = (self.n_texts - 1) / self.n_texts * (self.text_within[has] / (self.text_tokens[has, None] - 1)).mean(0)
        return _eta_squared(null, self.token_variance)

    def resampled(self, res: stats.Resamples) -> dict:
        """{"mean_delta", "text_variance", "token_variance", "eta_squared"}: each (R, e), the statistic on each
        resample of the texts (from resampled means of m, m² and v; see DEFINITIONS["intervals"])."""
        m = self.text_means
        mean_m, mean_m2 = res.means(m), res.means(m * m)  # (R, e) each
        between = np.maximum(mean_m2 - mean_m ** 2, 0.0)  # a variance; clipped at 0 against rounding
        out = {"mean_delta": res.means(m, weights=self.text_tokens), "text_variance": between,
               "token_variance": None, "eta_squared": None}
        if self.token_variance is not None:
            # a draw of only one-token texts has no within-text variance: its statistics are NaN
            with np.errstate(invalid="ignore", divide="ignore"):
                within = res.means(self.text_within, weights=self.has_within.astype(np.float64))
                out["token_variance"], out["eta_squared"] = within, _eta_squared(between, within)
        return out

    def to_dict(self, top_k: int, n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
        """The results dict: the top list by `ranked_by` (stats.ranked: score, its interval and rank
        stability) with each channel's raw between-text variance, within-text variance and mean Δ (with its
        interval); every channel's statistics under "per_channel"; each ranking's Spearman with mean Δ.
        `top_neurons[i]["token_variance"]` and `per_channel["token_variance"]` (and "eta_squared") are None
        when the within-text variance is undefined (every text of one token); `undefined` then says why."""
        top_k = check_top_k(top_k)
        res = stats.Resamples.draw(self.n_texts, n_resamples, seed, "texts")
        draws = self.resampled(res)
        key = self.ranked_by
        score = self.score(key)
        top = stats.ranked(score, top_k, draws[key], res, key="channel")
        tv, eta, floor = self.token_variance, self.eta_squared, self.eta_squared_noise_floor
        md_low, md_high = stats.intervals(self.mean_delta, draws["mean_delta"], res)
        for e in top:
            c = e["channel"]
            e.update(variance=float(self.text_variance[c]),
                     mean_delta={"value": float(self.mean_delta[c]),
                                 "low": None if md_low is None else float(md_low[c]),
                                 "high": None if md_high is None else float(md_high[c])},
                     token_variance=None if tv is None else float(tv[c]),
                     eta_squared=None if eta is None else float(eta[c]),
                     eta_squared_noise_floor=None if eta is None else float(floor[c]))
        undefined = {} if tv is not None else {"token_variance": self.token_variance_undefined,
                                                "eta_squared": ETA_SQUARED_UNDEFINED}
        above = None
        if eta is not None and res.defined:
            eta_low, _ = stats.intervals(eta, draws["eta_squared"], res)
            above = int((eta_low > floor).sum())
        spearman = {"text_variance": stats.spearman(self.text_variance, self.mean_delta),
                    "eta_squared": None if eta is None else stats.spearman(eta, self.mean_delta)}
        return {
            "layer": self.layer, "n_texts": self.n_texts, "n_tokens": self.n_tokens,
            "n_channels": int(self.mean_delta.shape[0]), "unit": self.unit,
            "ranked_by": key,
            "top_neurons": top,
            "ties": stats.ties_note(top, "channel"),
            "spearman_with_mean_delta": spearman,
            "median_eta_squared": None if eta is None else float(np.median(eta)),
            "median_eta_squared_noise_floor": None if floor is None else float(np.median(floor)),
            "n_above_noise_floor": above,
            "expected_above_by_chance": None if above is None else 0.025 * int(self.mean_delta.shape[0]),
            "per_channel": {"eta_squared": eta, "eta_squared_noise_floor": floor, "mean_delta": self.mean_delta, "text_variance": self.text_variance,
                            "token_variance": tv},
            "n_token_variance_texts": self.n_texts if self.n_token_variance_texts is None
            else self.n_token_variance_texts,
            "weighting": "η², var_between and var_within weight each text once (a text is one observation of "
                         "'which text'); mean Δ weights texts by their tokens (the mean over all tokens)",
            "interval_method": res.method(),
            "undefined": undefined,
            "reconstruction": {"max_relative_error": self.max_reconstruction_error,
                               "tolerance": self.reconstruction_tolerance},
            "definitions": dict(DEFINITIONS),
        }


def _eta_squared(between: np.ndarray, within: np.ndarray) -> np.ndarray:
    """between / (between + within), elementwise; NaN where both are 0 (Δ constant: no variation to share)."""
    total = between + within
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, between / np.where(total > 0, total, 1.0), np.nan)


def delta_channel_statistics(model, tokenizer, texts_ids: list[torch.Tensor], layer_idx: int = 0,
                             progress: bool = True) -> DeltaStats:
    """Δ statistics over texts, each given as input ids (1, L_i); at least two texts are needed for an
    across-text variance (checked as in `delta_statistics_by_layer`)."""
    adapter = get_adapter(model)
    require_mamba(adapter)
    layer_idx = check_layer(adapter, layer_idx, "layer_idx")
    return delta_statistics_by_layer(model, tokenizer, texts_ids, [layer_idx], progress)[layer_idx]


class DeltaProfile:
    """The running statistics of `delta_statistics_by_layer`: `add(ios, n_tokens, first)` with one text's
    {layer: (mixer input, real output)}, `result(tokens)` {layer: DeltaStats}. Also the delta stage's
    reader of the text pass (`request`, `read`, `finish`): it reads each text's mixer captures there."""

    def __init__(self, model, tokenizer, layers):
        self.adapter = get_adapter(model)
        require_mamba(self.adapter)
        self.tokenizer = tokenizer
        self.layers = list(dict.fromkeys(check_layers(self.adapter, layers)))
        self.acc = {la: {"means": [], "within": [], "total": None, "worst": 0.0, "tol": None, "example": None}
                    for la in self.layers}
        self.lengths: list[int] = []  # n_i per text
        self.n_texts = self.n_tokens = 0
        self.first_ids = None

    @property
    def request(self):
        from passes import TextRequest

        return TextRequest(mixer_io=frozenset(self.layers))

    def read(self, text) -> None:
        self.add(text.ids, text.mixer_io)

    def add(self, ids: torch.Tensor, ios: dict) -> None:
        """One text (1, L) and its captured {layer: (input, real output)}: each layer's internals recomputed
        and verified against the real output (`verified_internals`)."""
        for la in self.layers:
            internals, check = verified_internals(self.adapter.mixer(la), ios[la])
            a = self.acc[la]
            delta = internals.delta[0].double()  # (L, e)
            a["means"].append(delta.mean(0).cpu().numpy())  # (e,)
            # a one-token text has no within-text variance: 0 here, left out of every mean by `has_within`
            a["within"].append(delta.var(0, unbiased=False).cpu().numpy() if delta.shape[0] >= 2
                               else np.zeros(delta.shape[1]))  # (e,)
            a["total"] = delta.sum(0) if a["total"] is None else a["total"] + delta.sum(0)  # (e,)
            a["worst"], a["tol"] = max(a["worst"], check.relative_error), check.tolerance
            if self.n_texts == 0:
                a["example"] = internals.delta[0].cpu().numpy()  # (L, e)
        if self.n_texts == 0:
            self.first_ids = ids
        self.n_texts += 1
        self.n_tokens += int(ids.shape[-1])
        self.lengths.append(int(ids.shape[-1]))

    def finish(self) -> dict:
        return self.result()

    def result(self) -> dict[int, DeltaStats]:
        if self.n_texts < 2:
            raise ValueError(f"delta sensitivity needs at least 2 texts (got {self.n_texts}): the ranking is a "
                             "variance across texts")
        tokens = [self.tokenizer.decode([t]) for t in self.first_ids[0].tolist()]
        unit = "head" if self.adapter.ssm_kind == "mamba2" else "channel"
        return {la: _delta_stats(la, np.stack(a["means"]), np.stack(a["within"]), np.asarray(self.lengths),
                                 (a["total"] / self.n_tokens).cpu().numpy(), a["worst"], a["tol"], a["example"],
                                 tokens, unit)
                for la, a in self.acc.items()}


def _delta_stats(layer: int, means: np.ndarray, within: np.ndarray, lengths: np.ndarray, mean_delta: np.ndarray,
                 worst: float, tolerance: float, example: np.ndarray, tokens: list[str], unit: str) -> DeltaStats:
    """DeltaStats from the per-text means m (n, e), within-text variances v (n, e; 0 for one-token texts) and
    lengths (n,)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    has = lengths >= 2
    return DeltaStats(
        layer=layer, n_texts=len(lengths), n_tokens=int(lengths.sum()), mean_delta=mean_delta,
        text_variance=means.var(0), token_variance=within[has].mean(0) if has.any() else None,
        max_reconstruction_error=worst, reconstruction_tolerance=tolerance, example_delta=example,
        example_tokens=tokens, unit=unit, n_token_variance_texts=int(has.sum()),
        token_variance_undefined=None if has.any() else TOKEN_VARIANCE_UNDEFINED,
        text_means=means, text_within=within, has_within=has, text_tokens=lengths)


def stats_from_deltas(deltas, layer: int = 0, unit: str = "channel") -> DeltaStats:
    """DeltaStats of given Δ arrays, one (L_i, e) per text (at least 2 texts), as the delta stage computes them
    from the model's Δ (no reconstruction: its error is 0 by construction)."""
    deltas = [np.asarray(d, dtype=np.float64) for d in deltas]
    if len(deltas) < 2 or any(d.ndim != 2 or d.shape[0] < 1 for d in deltas):
        raise ValueError("deltas: give at least 2 arrays (L_i, e) with L_i >= 1")
    lengths = np.array([d.shape[0] for d in deltas])
    means = np.stack([d.mean(0) for d in deltas])
    within = np.stack([d.var(0) if d.shape[0] >= 2 else np.zeros(d.shape[1]) for d in deltas])
    return _delta_stats(layer, means, within, lengths, np.concatenate(deltas).mean(0), 0.0, 0.0, deltas[0], [], unit)


def delta_statistics_by_layer(model, tokenizer, texts_ids: list[torch.Tensor], layers, progress: bool = True
                              ) -> dict[int, DeltaStats]:
    """{layer: DeltaStats} for several layers, every layer's mixer input captured in one forward per text
    (stopped after the last of them); each layer's internals recomputed and verified as in
    `mixer_internals`.

    Refused before any forward (ValueError): `texts_ids` not a list of (1, L_i) token-id tensors
    (`causal_analysis.check_token_ids`), fewer than 2 texts (the ranking is a variance across texts),
    `layers` not a non-empty list of layer indices (a layer given twice is analysed once)."""
    from tqdm.auto import tqdm

    require_mamba(get_adapter(model))
    texts_ids = check_token_ids(texts_ids)
    if len(texts_ids) < 2:
        raise ValueError(f"texts_ids: delta sensitivity needs at least 2 texts (got {len(texts_ids)}): the ranking "
                         "is a variance across texts; give more texts")
    profile = DeltaProfile(model, tokenizer, layers)
    device = next(model.parameters()).device
    layers = profile.layers
    desc = f"Δ layer {layers[0]}" if len(layers) == 1 else f"Δ layers {layers[0]}..{layers[-1]}"
    for ids in tqdm(texts_ids, desc=desc, disable=not progress):
        ids = ids.to(device)
        profile.add(ids, capture_mixer_ios(model, layers, ids))
    return profile.result()


def find_delta_sensitive_neurons(model, tokenizer, texts, layer_idx: int = 0, top_k: int = 10,
                                 max_length: int = 256, key: str | None = None) -> list[tuple[int, float]]:
    """The original tool's interface: texts as strings -> [(channel, score)], highest score first. `key`:
    "eta_squared" (the default: the between-text share of Δ's variance, scale-free) or "text_variance" (the
    original tool's raw variance across texts of the per-text mean Δ, which follows Δ's scale).
    Refused before any forward (ValueError): `texts` not a list of at least 2 strings (`utils.text_list`),
    a `top_k` or `max_length` that is not a whole number >= 1, a layer out of range, an unknown `key`."""
    from utils import text_list, tokenize_texts

    texts = text_list(texts, "texts")
    top_k, max_length = check_top_k(top_k), whole_number("max_length", max_length, low=1)
    if key is not None and key not in RANKINGS:
        raise ValueError(f"key {key!r}: choose one of {', '.join(RANKINGS)}")
    ids = tokenize_texts(tokenizer, texts, max_length).input_ids
    return delta_channel_statistics(model, tokenizer, ids, layer_idx).top(top_k, key)


# --------------------------------------------------------------------------------------------------
# Plots (consume DeltaStats only)
# --------------------------------------------------------------------------------------------------
def plot_delta_variance(st: DeltaStats, top_k: int, plots_dir, prefix: str, top: list[dict] | None = None) -> str:
    """Top: every channel's ranking score (η², or the raw variance when η² is undefined: the summary table's
    score column) in rank order, as points, the top k marked with their channel and (with `top`, the
    results' top list) their 95% intervals. Bottom: raw between-text variance (the table's "raw between-text
    var") against mean Δ per channel (a scatter: channel numbers have no order), coloured by η²: the raw
    variance follows Δ's scale, η² does not. Δ is a step size without unit, so its variance has none."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    key = st.ranked_by
    score = st.score(key)
    raw = "raw between-text variance of mean Δ (no unit)"
    label = "η² = between-text share of Δ's variance (0 … 1)" if key == "eta_squared" else raw
    order = np.argsort(-score, kind="stable")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), constrained_layout=True)
    ranks = np.arange(1, len(order) + 1)
    ax1.plot(ranks, score[order], ".", ms=3, color="tab:blue", label=f"every {st.unit}, by rank")
    entries = top if top is not None else [{"channel": c, "score": s} for c, s in st.top(top_k, key)]
    k = len(entries)
    y = np.array([t["score"] for t in entries])
    if entries and entries[0].get("low") is not None:
        err = np.array([[t["score"] - t["low"] for t in entries], [t["high"] - t["score"] for t in entries]])
        ax1.errorbar(ranks[:k], y, yerr=np.maximum(err, 0), fmt="o", color="tab:red", ms=4, capsize=2, zorder=3,
                     label=f"top {k} (95% interval over texts)")
    else:
        ax1.scatter(ranks[:k], y, color="tab:red", s=18, zorder=3, label=f"top {k}")
    floor = st.eta_squared_noise_floor
    if key == "eta_squared" and floor is not None:
        ax1.axhline(float(np.median(floor)), color="gray", ls="--", lw=0.8,
                    label="median η² from token sampling noise alone (independent tokens)")
    for r, t in zip(ranks[:k], entries):
        ax1.annotate(str(t["channel"]), (r, t["score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax1.set(xlabel=f"rank (1 = most delta-sensitive {st.unit})", ylabel=label, xscale="log",
            title=f"Δ sensitivity ranked by {key}, layer {st.layer} ({st.n_texts} texts, {st.n_tokens} tokens)")
    ax1.legend(loc="upper right", fontsize=8)
    eta = st.eta_squared
    positive = (st.mean_delta > 0) & (st.text_variance > 0)
    if eta is not None:
        sc = ax2.scatter(st.mean_delta[positive], st.text_variance[positive], s=6, c=eta[positive], cmap="viridis")
        fig.colorbar(sc, ax=ax2, label="η² (between-text share, 0 … 1)")
    else:
        ax2.scatter(st.mean_delta[positive], st.text_variance[positive], s=6, color="tab:blue")
    chosen = [t["channel"] for t in entries]
    ax2.scatter(st.mean_delta[chosen], st.text_variance[chosen], s=40, facecolors="none", edgecolors="tab:red",
                label=f"top {k} by {key}")
    rho = stats.spearman(st.text_variance, st.mean_delta)
    rho_eta = None if eta is None else stats.spearman(eta, st.mean_delta)
    ax2.set(xscale="log", yscale="log", xlabel="mean Δ (no unit: a step size)", ylabel=raw,
            title=f"raw variance follows Δ's scale (Spearman with mean Δ: raw {_fmt(rho)}, η² {_fmt(rho_eta)})")
    ax2.legend(loc="upper left", fontsize=8)
    return save_figure(fig, plots_dir, f"{prefix}_delta_variance_layer{st.layer}")


def _fmt(value) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def plot_delta_heatmap(stats: DeltaStats, plots_dir, prefix: str) -> str:
    import matplotlib.pyplot as plt

    from utils import save_figure

    delta = stats.example_delta.T  # (e, L)
    fig, ax = plt.subplots(figsize=(11, 6), constrained_layout=True)
    im = ax.imshow(delta, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label="Δ (step size, no unit)")
    L = delta.shape[1]
    if L <= 48:
        ax.set_xticks(range(L), [repr(t)[1:-1] for t in stats.example_tokens], rotation=90, fontsize=7)
    ax.set(xlabel="token position", ylabel=stats.unit,
           title=f"Δ per {stats.unit} and token, layer {stats.layer}, first text ({L} tokens)")
    return save_figure(fig, plots_dir, f"{prefix}_delta_heatmap_layer{stats.layer}_text0")


# --------------------------------------------------------------------------------------------------
# The delta stage (a text stage: it reads the mixers' captures of the text pass)
# --------------------------------------------------------------------------------------------------
def _stage_reader(ctx):
    from models import require_ssm_layer, ssm_layers

    layers = ssm_layers(ctx.adapter, ctx.layers)
    if not layers:
        require_ssm_layer(ctx.adapter, ctx.layers[0])
    return DeltaProfile(ctx.model, ctx.tokenizer, layers)


def _stage_run(ctx, stats_by_layer: dict):
    from functools import partial

    from models import require_ssm_layer

    require_ssm_layer(ctx.adapter, ctx.layer)  # a hybrid's attention layer has no Δ
    st = stats_by_layer[ctx.layer]
    out = st.to_dict(ctx.top_k, ctx.opts.bootstrap_resamples, ctx.opts.seed)
    return out, [partial(plot_delta_variance, st, ctx.top_k, ctx.plots_dir, ctx.prefix, out["top_neurons"]),
                 partial(plot_delta_heatmap, st, ctx.plots_dir, ctx.prefix)]


def delta_summary(r: dict) -> str:
    from stats import shown

    rec = r["reconstruction"]
    unit = r.get("unit", "channel")
    rho = r.get("spearman_with_mean_delta") or {}
    lines = [f"    {r['n_channels']} {unit}s, {r['n_texts']} texts, {r['n_tokens']} tokens; mixer reconstruction "
             f"max rel. error {rec['max_relative_error']:.2e} (tolerance {rec['tolerance']:.0e})"]
    if r["ranked_by"] == "eta_squared":
        lines.append(f"    ranked by η² = between-text share of Δ's variance (scale-free; median over {unit}s "
                     f"{r['median_eta_squared']:.3g}); Spearman with mean Δ: η² {_fmt(rho.get('eta_squared'))}, "
                     f"raw between-text variance {_fmt(rho.get('text_variance'))}")
        floor = r.get("median_eta_squared_noise_floor")
        above = r.get("n_above_noise_floor")
        chance = r.get("expected_above_by_chance")
        lines.append(f"    η² from token sampling noise alone (independent tokens, a lower bound): median {floor:.3g}; "
                     + (f"{above} of {r['n_channels']} {unit}s have their η² interval above it (about {chance:.0f} "
                        "would by chance alone, uncorrected, and more since the floor ignores autocorrelation: a "
                        "count near that is no evidence that any channel tells the texts apart)"
                        if above is not None else "no interval with one text"))
    else:
        lines.append(f"    ranked by the raw between-text variance (η² undefined; Spearman with mean Δ "
                     f"{_fmt(rho.get('text_variance'))})")
    lines.append(f"    top delta-sensitive {unit}s: {r['ranked_by']} [95% interval over texts] (in top "
                 f"{len(r['top_neurons'])}) | raw between-text var | mean Δ [95%] | within-text var:")
    for n in r["top_neurons"]:
        stab = "" if n.get("stability") is None else f" ({n['stability']:.0%})"
        lines.append(f"      {unit} {n['channel']:>5}: {_score(n)}{stab} | "
                     f"{n['variance']:.3e} | {shown(n['mean_delta'], '.4g')} | "
                     f"{'undefined' if n['token_variance'] is None else format(n['token_variance'], '.3e')}")
    if r.get("ties"):
        lines.append(f"    ties: {r['ties']}")
    lines += [f"    {field}: {why}" for field, why in (r.get("undefined") or {}).items()]
    return "".join(line + "\n" for line in lines)


def _score(n: dict) -> str:
    """A top entry's score with its interval ('score [low, high]')."""
    from stats import shown

    return shown({"value": n["score"], "low": n.get("low"), "high": n.get("high")}, ".4g")


def _register() -> None:
    from models import SSM_FAMILIES
    from pipeline import Stage, register

    # the delta ranking is a variance across texts: one text cannot rank anything
    register(Stage("delta", _stage_run, delta_summary, reader=_stage_reader, families=SSM_FAMILIES, min_texts=2,
                   per_layer=True))


_register()
