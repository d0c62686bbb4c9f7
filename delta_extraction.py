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
    `ssm.blocked_inference` (transformers' slow-path operations in the same order, about half the time on a
    CPU; the mixer inputs it gives are those of the model's own forward to float rounding, bitwise on this
    project's 2-core CPU VMs)."""
    adapter = get_adapter(model)
    require_mamba(adapter)
    paths = {layer: adapter.mixer_path(layer) for layer in check_layers(adapter, layers)}
    below = [la for la in range(max(paths, default=0)) if la not in paths]  # the uncaptured mixers before the last
    swap = blocked_inference(model, layers=below) if below and adapter.ssm_kind == "mamba1" else nullcontext()
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


@dataclass
class DeltaStats:
    """Per-channel Δ statistics of one layer over a text set (at least 2 texts). Arrays have shape (e,).

    `token_variance` is averaged over the texts of at least 2 tokens (`n_token_variance_texts` of them): a
    one-token text has no within-text variation to measure, and is left out rather than counted as 0. When
    no text has 2 tokens it is None and `token_variance_undefined` says why."""

    layer: int
    n_texts: int
    n_tokens: int
    mean_delta: np.ndarray  # mean Δ over every token of every text
    text_variance: np.ndarray  # variance across texts of each text's mean Δ (ddof=0): the ranking key
    token_variance: np.ndarray | None  # within-text variance over tokens (ddof=0), averaged over texts of >= 2 tokens
    max_reconstruction_error: float  # worst max|ours - real| / max|real| over the texts
    reconstruction_tolerance: float
    example_delta: np.ndarray  # (L, e) Δ of the first text, for the heatmap
    example_tokens: list[str] = field(default_factory=list)
    unit: str = "channel"  # what the index counts: a channel (Mamba-1, FalconMamba) or a head (Mamba-2)
    n_token_variance_texts: int | None = None  # texts averaged in token_variance (None: every text)
    token_variance_undefined: str | None = None  # why token_variance is None

    def top(self, k: int) -> list[tuple[int, float]]:
        """The k channels with the highest across-text variance, highest first: [(channel, variance)]
        (ties in channel order). `k`: a whole number >= 1 (fewer are listed when there are fewer channels)."""
        order = np.argsort(-self.text_variance, kind="stable")[:check_top_k(k)]
        return [(int(c), float(self.text_variance[c])) for c in order]

    def to_dict(self, top_k: int) -> dict:
        """The results dict. `top_neurons[i]["token_variance"]` and `per_channel["token_variance"]` are
        None when the within-text variance is undefined (every text of one token); `undefined` then maps
        "token_variance" to the reason (an empty dict when everything is defined)."""
        tv = self.token_variance
        return {
            "layer": self.layer, "n_texts": self.n_texts, "n_tokens": self.n_tokens,
            "n_channels": int(self.mean_delta.shape[0]), "unit": self.unit,
            "top_neurons": [{"channel": c, "variance": v, "mean_delta": float(self.mean_delta[c]),
                             "token_variance": None if tv is None else float(tv[c])} for c, v in self.top(top_k)],
            "per_channel": {"mean_delta": self.mean_delta, "text_variance": self.text_variance,
                            "token_variance": tv},
            "n_token_variance_texts": self.n_texts if self.n_token_variance_texts is None
            else self.n_token_variance_texts,
            "undefined": {} if tv is not None else {"token_variance": self.token_variance_undefined},
            "reconstruction": {"max_relative_error": self.max_reconstruction_error,
                               "tolerance": self.reconstruction_tolerance},
            "definitions": {
                "text_variance": "variance across texts (ddof=0) of the per-text mean of Δ over tokens",
                "token_variance": "variance over the tokens of one text (ddof=0), averaged over the texts of at "
                                  "least 2 tokens",
                "mean_delta": "mean of Δ over all tokens of all texts",
            },
        }


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
        self.acc = {la: {"means": [], "token_vars": [], "total": None, "worst": 0.0, "tol": None, "example": None}
                    for la in self.layers}
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
            if delta.shape[0] >= 2:  # a one-token text has no within-text variance
                a["token_vars"].append(delta.var(0, unbiased=False).cpu().numpy())  # (e,)
            a["total"] = delta.sum(0) if a["total"] is None else a["total"] + delta.sum(0)  # (e,)
            a["worst"], a["tol"] = max(a["worst"], check.relative_error), check.tolerance
            if self.n_texts == 0:
                a["example"] = internals.delta[0].cpu().numpy()  # (L, e)
        if self.n_texts == 0:
            self.first_ids = ids
        self.n_texts += 1
        self.n_tokens += int(ids.shape[-1])

    def finish(self) -> dict:
        return self.result()

    def result(self) -> dict[int, DeltaStats]:
        if self.n_texts < 2:
            raise ValueError(f"delta sensitivity needs at least 2 texts (got {self.n_texts}): the ranking is a "
                             "variance across texts")
        tokens = [self.tokenizer.decode([t]) for t in self.first_ids[0].tolist()]
        return {la: DeltaStats(
            layer=la, n_texts=self.n_texts, n_tokens=self.n_tokens,
            mean_delta=(a["total"] / self.n_tokens).cpu().numpy(), text_variance=np.stack(a["means"]).var(0),
            token_variance=np.stack(a["token_vars"]).mean(0) if a["token_vars"] else None,
            max_reconstruction_error=a["worst"], reconstruction_tolerance=a["tol"], example_delta=a["example"],
            example_tokens=tokens, unit="head" if self.adapter.ssm_kind == "mamba2" else "channel",
            n_token_variance_texts=len(a["token_vars"]),
            token_variance_undefined=None if a["token_vars"] else TOKEN_VARIANCE_UNDEFINED)
            for la, a in self.acc.items()}


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
                                 max_length: int = 256) -> list[tuple[int, float]]:
    """The original tool's interface: texts as strings -> [(channel, variance)], highest variance first.
    Refused before any forward (ValueError): `texts` not a list of at least 2 strings (`utils.text_list`),
    a `top_k` or `max_length` that is not a whole number >= 1, a layer out of range."""
    from utils import text_list, tokenize_texts

    texts = text_list(texts, "texts")
    top_k, max_length = check_top_k(top_k), whole_number("max_length", max_length, low=1)
    ids = tokenize_texts(tokenizer, texts, max_length).input_ids
    return delta_channel_statistics(model, tokenizer, ids, layer_idx).top(top_k)


# --------------------------------------------------------------------------------------------------
# Plots (consume DeltaStats only)
# --------------------------------------------------------------------------------------------------
def plot_delta_variance(stats: DeltaStats, top_k: int, plots_dir, prefix: str) -> str:
    import matplotlib.pyplot as plt

    from utils import save_figure

    e = stats.text_variance.shape[0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), constrained_layout=True)
    ax1.plot(np.arange(e), stats.text_variance, lw=0.8, color="tab:blue")
    top = stats.top(top_k)
    ax1.scatter([c for c, _ in top], [v for _, v in top], color="tab:red", s=18, zorder=3,
                label=f"top {len(top)} delta-sensitive {stats.unit}s")
    ax1.set(xlabel=stats.unit, ylabel="variance across texts of mean Δ",
            title=f"Δ sensitivity, layer {stats.layer} ({stats.n_texts} texts, {stats.n_tokens} tokens)")
    ax1.legend(loc="upper right")
    ax2.plot(np.arange(e), stats.mean_delta, lw=0.8, color="tab:green", label="mean Δ")
    if stats.token_variance is not None:  # undefined when every text has one token
        ax2.plot(np.arange(e), np.sqrt(stats.token_variance), lw=0.8, color="tab:orange",
                 label="within-text std of Δ (mean over texts of >= 2 tokens)")
    ax2.set(xlabel=stats.unit, ylabel="Δ", yscale="log")
    ax2.legend(loc="upper right")
    return save_figure(fig, plots_dir, f"{prefix}_delta_variance_layer{stats.layer}")


def plot_delta_heatmap(stats: DeltaStats, plots_dir, prefix: str) -> str:
    import matplotlib.pyplot as plt

    from utils import save_figure

    delta = stats.example_delta.T  # (e, L)
    fig, ax = plt.subplots(figsize=(11, 6), constrained_layout=True)
    im = ax.imshow(delta, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label="Δ")
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
    return DeltaProfile(ctx.model, ctx.tokenizer, ctx.layers)


def _stage_run(ctx, stats_by_layer: dict):
    from functools import partial

    stats = stats_by_layer[ctx.layer]
    return stats.to_dict(ctx.top_k), [partial(plot_delta_variance, stats, ctx.top_k, ctx.plots_dir, ctx.prefix),
                                      partial(plot_delta_heatmap, stats, ctx.plots_dir, ctx.prefix)]


def delta_summary(r: dict) -> str:
    from utils import shown

    rec = r["reconstruction"]
    unit = r.get("unit", "channel")
    lines = [f"    {r['n_channels']} {unit}s, {r['n_texts']} texts, {r['n_tokens']} tokens; mixer reconstruction "
             f"max rel. error {rec['max_relative_error']:.2e} (tolerance {rec['tolerance']:.0e})",
             f"    top delta-sensitive {unit}s (variance across texts of mean Δ | mean Δ | within-text var):"]
    lines += [f"      {unit} {n['channel']:>5}: {n['variance']:.4e} | {n['mean_delta']:.4e} | "
              f"{shown(n['token_variance'], '.4e')}" for n in r["top_neurons"]]
    lines += [f"    {field}: {why}" for field, why in (r.get("undefined") or {}).items()]
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from models import SSM_FAMILIES
    from pipeline import Stage, register

    # the delta ranking is a variance across texts: one text cannot rank anything
    register(Stage("delta", _stage_run, delta_summary, reader=_stage_reader, families=SSM_FAMILIES, min_texts=2,
                   per_layer=True))


_register()
