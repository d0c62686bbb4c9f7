"""Attention neurons of Mamba: the e channels seen through their hidden attention.

Every α is computed block-wise by `ssm.hidden_attention_groups` (equal to the direct `ssm.hidden_attention`
to float rounding, tested) from the recomputed Δ, A, B, C and verified: `(α x + D x) · SiLU(z)` through
`out_proj` must equal the mixer's real output, or ReconstructionError is raised.

The method functions (`attention_weighted`, `gradient_guided`, `rollout_layer`) are pure functions of one
example's arrays: the reference path. Each is built from channel-local parts (per-channel rows and a sum
over channels), so `MambaAttentionNeurons.text_scores` (what the attention stage runs) can score α one
channel group at a time, as the groups are computed, and never hold α whole; it equals the reference path
(`extract_attention_vectors` + `create_mamba_neurons`) to float rounding (tested). Shapes: α (e, L, L)
indexed [c, i, j] (query i, key j), x and g (L, e).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from models import get_adapter, require_mamba
from ssm import (ReconstructionCheck, apply_hidden_attention, check_reconstruction, fast_scan_training,
                 hidden_attention_chunked, hidden_attention_groups, mixer_projections, project_out)

logger = logging.getLogger(__name__)

METHODS = ("attention_weighted", "gradient_guided", "rollout")
DEFINITIONS = {
    "attention_weighted": "contrib^c[i,j] = |alpha^c[i,j] x^c_j|; activation = mean of contrib^c over causal "
                          "entries (j <= i); importance = std over query positions i of row sums sum_j contrib^c[i,j]; "
                          "token map = mean over channels of contrib^c",
    "gradient_guided": "contrib^c[i,j] = ReLU(g^c_i alpha^c[i,j] x^c_j), g^c_i = d logit[target] / d y^c_i by autograd, "
                       "target = predicted next token at the last position; activation, importance and token map "
                       "as for attention_weighted",
    "rollout": "R_l = rownorm(mean_c normalise(|alpha^c_l|) + I) R_{l-1}, R_{-1} = I; channel map "
               "C^c = rownorm(normalise(|alpha^c_l|) + I) R_{l-1}; activation = mean over i of 1 - C^c[i,i] (share "
               "of token i's end-to-end relevance from other tokens); importance = its std over i; token map = R_l",
}


@dataclass
class NeuronScores:
    """One method's scores for one layer."""

    method: str
    neuron_activations: np.ndarray  # (e,)
    neuron_importance: np.ndarray  # (e,)
    token_map: np.ndarray  # (L, L) [query i, key j]


@dataclass
class TextScores:
    """`MambaAttentionNeurons.text_scores` for one batch of texts at one layer."""

    scores: dict  # {method: NeuronScores}: activations and importance averaged over the batch, first example's map
    attention_vectors: torch.Tensor  # (b, L, L): mean over channels of α
    reconstruction: ReconstructionCheck  # (α x + D x) through the gate and out_proj against the mixer's output
    rollout_R: list | None = None  # per example, the rolled-out map R_ℓ (L, L) when rollout was scored


class MixerProjections(NamedTuple):
    """`ssm.mixer_projections`' result by name: all that α needs (no scan output)."""

    x: torch.Tensor  # (b, L, e)
    z: torch.Tensor  # (b, L, e)
    delta: torch.Tensor  # (b, L, e)
    B: torch.Tensor  # (b, L, n)
    C: torch.Tensor  # (b, L, n)
    A: torch.Tensor  # (e, n)
    D: torch.Tensor  # (e,)


def _batch_mean(method: str, per: list[NeuronScores]) -> NeuronScores:
    """Activations and importance averaged over the examples of a batch; the first example's token map."""
    return NeuronScores(method, np.mean([p.neuron_activations for p in per], axis=0),
                        np.mean([p.neuron_importance for p in per], axis=0), per[0].token_map)


def _contribution_parts(contrib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums Σ_j contrib^c[i, j] (c, L) and the channel sum Σ_c contrib^c (L, L) of contributions
    (c, L, L). Channel-local, so channel groups can be done apart and joined."""
    return contrib.sum(-1), contrib.sum(0)


def _contribution_scores(method: str, rows: torch.Tensor, map_sum: torch.Tensor, e: int) -> NeuronScores:
    """From the joined parts of all e channels: activation_c = mean of contrib^c over the L(L+1)/2 causal
    entries; importance_c = std (ddof=0) over query positions i of the row sums Σ_j contrib^c[i, j];
    token map = mean over channels of contrib^c."""
    L = rows.shape[-1]
    activations = rows.sum(-1) / (L * (L + 1) / 2)  # (e,)
    importance = rows.std(-1, unbiased=False)  # (e,)
    return NeuronScores(method, activations.cpu().numpy(), importance.cpu().numpy(), (map_sum / e).cpu().numpy())


def _weighted_contrib(alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.mul(alpha, x.T[:, None, :]).abs_()  # (c, L, L): |α^c[i, j] x^c_j|, one new tensor


def _gradient_contrib(alpha: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.mul(alpha, g.T[:, :, None]).mul_(x.T[:, None, :]).relu_()  # (c, L, L): ReLU(g_i α_ij x_j)


def attention_weighted(alpha: torch.Tensor, x: torch.Tensor) -> NeuronScores:
    """contrib^c[i, j] = |α^c[i, j] · x^c_j|: what token j sends to token i through channel c.
    Scores as in `_contribution_scores`. α (e, L, L), x (L, e)."""
    return _contribution_scores("attention_weighted", *_contribution_parts(_weighted_contrib(alpha, x)),
                                alpha.shape[0])


def gradient_guided(alpha: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> NeuronScores:
    """contrib^c[i, j] = ReLU(g^c_i · α^c[i, j] · x^c_j) with g^c_i = ∂ logit[target] / ∂ y^c_i (autograd;
    target = the model's predicted next token at the last position). Scores as in
    `_contribution_scores`. α (e, L, L), x and g (L, e)."""
    return _contribution_scores("gradient_guided", *_contribution_parts(_gradient_contrib(alpha, x, g)),
                                alpha.shape[0])


def _normalise(m: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of non-negative (..., L, L) maps over their last two dims; the masked upper
    triangle makes the minimum 0, so this is m / max(m) (an all-zero map stays zero)."""
    lo = m.amin((-1, -2), keepdim=True)
    span = m.amax((-1, -2), keepdim=True) - lo
    return torch.where(span > 0, (m - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(m))


def _normalised_abs(alpha: torch.Tensor) -> torch.Tensor:
    """`_normalise(alpha.abs())` with one new tensor and fewer passes over it: when every map's minimum
    is 0 (any causal map with L >= 2) the normalisation is a per-map scale, applied in place."""
    m = alpha.abs()
    lo, hi = m.amin((-1, -2), keepdim=True), m.amax((-1, -2), keepdim=True)
    if bool((lo == 0).all()):
        return m.mul_(torch.where(hi > 0, 1.0 / torch.where(hi > 0, hi, 1.0), 0.0))
    return _normalise(m)


def _rownorm(m: torch.Tensor) -> torch.Tensor:
    return m / m.sum(-1, keepdim=True)


def rollout_step(alpha: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """R_ℓ = Â_ℓ · R_{ℓ-1} with Â_ℓ = rownorm(mean_c normalise(|α^c_ℓ|) + I) and R_{-1} = I. α (e, L, L)."""
    L = alpha.shape[-1]
    eye = torch.eye(L, dtype=alpha.dtype, device=alpha.device)
    previous = eye if previous is None else previous
    return _rownorm(_normalised_abs(alpha).mean(0) + eye) @ previous  # (L, L)


def _rollout_parts(alpha: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For channels α (c, L, L) and R_{ℓ-1} (L, L): carried (c, L) = 1 − Ĉ^c[i, i] (see `rollout_layer`) and
    Σ_c N^c (L, L), N^c = normalise(|α^c|). Channel-local, so channel groups can be done apart and joined."""
    # only the diagonal of Ĉ^c is used: Ĉ^c[i, i] = Σ_k (N^c[i, k] + δ_ik) R[k, i] / Σ_k (N^c[i, k] + δ_ik):
    # c·L² work instead of the c·L³ of forming every Ĉ^c
    N = _normalised_abs(alpha)  # (c, L, L)
    own = (N * previous.T).sum(-1) + torch.diagonal(previous)  # (c, L)
    carried = 1.0 - own / (N.sum(-1) + 1.0)  # (c, L)
    return carried, N.sum(0)


def _rollout_scores(carried: torch.Tensor, n_sum: torch.Tensor, e: int, previous: torch.Tensor
                    ) -> tuple[NeuronScores, torch.Tensor]:
    """`rollout_layer`'s result from the joined parts of all e channels: carried (e, L), Σ_c N^c (L, L)."""
    eye = torch.eye(n_sum.shape[-1], dtype=n_sum.dtype, device=n_sum.device)
    R = _rownorm(n_sum / e + eye) @ previous  # (L, L), = rollout_step(alpha, previous)
    scores = NeuronScores("rollout", carried.mean(-1).cpu().numpy(), carried.std(-1, unbiased=False).cpu().numpy(),
                          R.cpu().numpy())
    return scores, R


def rollout_layer(alpha: torch.Tensor, previous: torch.Tensor | None = None) -> tuple[NeuronScores, torch.Tensor]:
    """One step of attention rollout (Abnar & Zuidema 2020, as in Mamba-Rollout).

    Â_ℓ = rownorm(mean_c normalise(|α^c_ℓ|) + I);  R_ℓ = Â_ℓ · R_{ℓ-1}  (R_{-1} = I).
    Channel c's end-to-end map: Ĉ^c = rownorm(normalise(|α^c_ℓ|) + I) · R_{ℓ-1}, rows summing to 1.
    activation_c = mean over query positions i of 1 − Ĉ^c[i, i], the share of token i's end-to-end
    relevance that comes from *other* tokens; importance_c = its std (ddof=0) over i.
    Token map = R_ℓ. Returns (scores, R_ℓ). α (e, L, L), previous (L, L).
    """
    L = alpha.shape[-1]
    previous = torch.eye(L, dtype=alpha.dtype, device=alpha.device) if previous is None else previous
    return _rollout_scores(*_rollout_parts(alpha, previous), alpha.shape[0], previous)


def neuron_diversity(activations: np.ndarray) -> float:
    """Entropy of p_c = a_c / Σ a, divided by log(e): 1 = all channels equal, 0 = one channel carries all."""
    a = np.asarray(activations, dtype=np.float64)
    total = a.sum()
    if a.size < 2 or total <= 0:
        return float("nan")
    p = a[a > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(a.size))


class MambaAttentionNeurons:
    """Hidden attention and attention neurons of a Hugging Face Mamba-1 model."""

    def __init__(self, model):
        self.model = model
        self.adapter = get_adapter(model)
        require_mamba(self.adapter, "hidden attention exists only in Mamba layers")

    @staticmethod
    def _ids(inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(inputs, torch.Tensor):
            return inputs, None
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("padded batches are not supported (the maps and the last-position target would "
                             "include padding): pass texts one at a time or of equal length")
        return inputs["input_ids"], mask

    def extract_attention_vectors(self, inputs, layer_indices) -> dict:
        """{layer: {"attention_matrix": α (b, e, L, L), "attention_vectors": mean_c α (b, L, L),
        "x", "y" (= α x + D x), "z": (b, L, e), "D": (e,), "reconstruction": ReconstructionCheck,
        "input_ids", "attention_mask"}}.
        `inputs`: input ids (b, L) or a tokenizer output dict. α is verified against the mixer output."""
        from delta_extraction import capture_mixer_io

        ids, mask = self._ids(inputs)
        ids = ids.to(next(self.model.parameters()).device)
        data = {}
        for layer in layer_indices:
            h_in, real_out = capture_mixer_io(self.model, layer, ids, mask)  # (b, L, d) each
            mixer = self.adapter.mixer(layer)
            with torch.no_grad():
                x, z, delta, B, C, A, D = mixer_projections(mixer, h_in, mask)  # no sequential scan needed:
                alpha = hidden_attention_chunked(delta, A, B, C)  # (b, e, L, L); == hidden_attention (tested)
                y = apply_hidden_attention(alpha, x, D)  # (b, L, e), the scan output via α
                check = check_reconstruction(project_out(mixer, y * F.silu(z)), real_out)
            data[layer] = {"attention_matrix": alpha, "attention_vectors": alpha.mean(1), "x": x, "y": y,
                           "z": z, "D": D, "reconstruction": check, "input_ids": ids, "attention_mask": mask}
        return data

    def output_gradient(self, input_ids: torch.Tensor, layer: int, attention_mask=None, y=None, z=None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """g = ∂ logit[target] / ∂ y (b, L, e) at layer `layer`, target (b,) = the predicted next token at
        the last position. The mixer's output is replaced by out_proj(y · SiLU(z)) computed from a leaf
        y (numerically the mixer's own output, verified), so autograd reaches y exactly. Every mixer runs
        the fast scan in this pass (`ssm.fast_scan_training`: the same recurrence, tested against the
        reference scan, so the logits equal the model's to float rounding) for its cheap backward. `y`, `z`
        (b, L, e): already verified internals of this layer for these inputs, to skip recomputing them."""
        from delta_extraction import mixer_internals
        from utils import trace

        mixer = self.adapter.mixer(layer)
        if y is None or z is None:
            it, _ = mixer_internals(self.model, layer, input_ids, attention_mask)  # verified
            y, z = it.y, it.z
        y = y.clone().requires_grad_(True)  # (b, L, e)
        # only ∂/∂y is needed: the weights leave the graph for this pass (no weight-gradient work, e.g. the
        # scan's ∂/∂A), and get their requires_grad back afterwards, also on error
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        # the layers above run the same recurrence through the fast scan, whose hand-written backward is
        # O(b L e n); autograd through transformers' step-by-step slow path costs O(L²) memory traffic
        try:
            with torch.enable_grad(), fast_scan_training(self.model):
                out = project_out(mixer, y * F.silu(z))  # (b, L, d)
                path = self.adapter.mixer_path(layer)
                with trace(self.model, [path], retain_output=False,
                           edit_output=lambda name, o: out.to(o.dtype)):
                    logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                        logits_to_keep=1).logits  # (b, 1, V): the head at the last position only
                last = logits[:, -1].float()  # (b, V)
                target = last.argmax(-1)  # (b,)
                g, = torch.autograd.grad(last.gather(1, target[:, None]).sum(), y)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return g.detach(), target

    def text_scores(self, inputs, layer: int, methods=METHODS, rolled: tuple | None = None) -> TextScores:
        """Every method's scores at `layer` for `inputs`, equal to `create_mamba_neurons` on
        `extract_attention_vectors` (the reference path; tested) but with α consumed one channel group at a
        time as `ssm.hidden_attention_groups` yields it: α is never held whole (peak memory about one
        group's α instead of (b, e, L, L)), and each group is read by every method while in cache.

        Per group: y = α x + D x (then checked against the mixer's real output, as in
        `extract_attention_vectors`; ReconstructionError on mismatch), the channel sum of α, and each
        method's channel-local parts. gradient_guided's g comes from one backward (`output_gradient`) from
        the scan's y, itself checked against the mixer output first. Rollout at layer ℓ > 0 first streams
        the layers below it (each checked the same way) for R_{ℓ-1}; `rolled` = (layer k < ℓ, per-example
        R_k), the `rollout_R` of an earlier call on the same inputs, starts from R_k instead (layers k+1 ..
        ℓ-1 streamed). The result's `rollout_R` is R_ℓ per example (None without rollout)."""
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; choose one of {', '.join(METHODS)}")
        from delta_extraction import capture_mixer_ios

        ids, mask = self._ids(inputs)
        ids = ids.to(next(self.model.parameters()).device)
        start, previous = (-1, None) if rolled is None else rolled
        if not start < layer:
            raise ValueError(f"rolled starts at layer {start}, not below layer {layer}")
        below = range(start + 1, layer) if "rollout" in methods else range(0)
        ios = capture_mixer_ios(self.model, [*below, layer], ids, mask)  # one forward for every layer needed
        for lo in below:  # R_{ℓ-1}, one lower layer at a time
            previous = self._stream_layer(ids, mask, lo, ios[lo], ("rollout",), previous)[1]
        scores, R = self._stream_layer(ids, mask, layer, ios[layer], tuple(methods), previous)
        scores.rollout_R = R
        return scores

    def _stream_layer(self, ids, mask, layer: int, io: tuple, methods: tuple, previous: list | None
                      ) -> tuple[TextScores, list | None]:
        """(TextScores, per-example R_ℓ (L, L) if rollout is among `methods`, else None). `io`: the mixer's
        captured input and real output (b, L, d); `previous`: per-example R_{ℓ-1}, None for the identity."""
        from delta_extraction import verified_internals

        h_in, real_out = io
        mixer = self.adapter.mixer(layer)
        g = None
        if "gradient_guided" in methods:  # the gradient's leaf is the scan's y, checked against the mixer first
            it, _ = verified_internals(mixer, io, mask)  # x, z, Δ, B, C, A, D and y, (b, L, ·)
            g, _ = self.output_gradient(ids, layer, mask, it.y, it.z)  # (b, L, e)
        else:  # α needs no sequential scan (e.g. rollout's lower layers)
            with torch.no_grad():
                it = MixerProjections(*mixer_projections(mixer, h_in, mask))
        b, L, e = it.x.shape
        eye = torch.eye(L, dtype=it.x.dtype, device=it.x.device)
        prev = [eye] * b if previous is None else previous
        y = torch.empty_like(it.x)  # (b, L, e): α x + D x, filled group by group
        channel_sum = it.x.new_zeros(b, L, L)  # (b, L, L): Σ_c α^c
        rows = {m: [[] for _ in range(b)] for m in methods}  # per example, the groups' (g, L) parts in order
        maps = {m: [0.0] * b for m in methods}  # per example, Σ_c of the method's (L, L) part
        with torch.no_grad():
            for cs, alpha in hidden_attention_groups(it.delta, it.A, it.B, it.C):  # (b, g, L, L)
                y[:, :, cs] = apply_hidden_attention(alpha, it.x[:, :, cs], it.D[cs])
                channel_sum += alpha.sum(1)
                for k in range(b):
                    x = it.x[k, :, cs]  # (L, g)
                    for m in methods:
                        if m == "attention_weighted":
                            part = _contribution_parts(_weighted_contrib(alpha[k], x))
                        elif m == "gradient_guided":
                            part = _contribution_parts(_gradient_contrib(alpha[k], x, g[k, :, cs]))
                        else:
                            part = _rollout_parts(alpha[k], prev[k])
                        rows[m][k].append(part[0])
                        maps[m][k] = maps[m][k] + part[1]
            check = check_reconstruction(project_out(mixer, y * F.silu(it.z)), real_out)
        per, R = {}, None
        for m in methods:
            if m == "rollout":
                done = [_rollout_scores(torch.cat(rows[m][k]), maps[m][k], e, prev[k]) for k in range(b)]
                per[m], R = [s for s, _ in done], [r for _, r in done]
            else:
                per[m] = [_contribution_scores(m, torch.cat(rows[m][k]), maps[m][k], e) for k in range(b)]
        scores = {m: _batch_mean(m, per[m]) for m in methods}
        return TextScores(scores, channel_sum / e, check), R

    def create_mamba_neurons(self, attention_data: dict, method: str, layers=None) -> dict:
        """{layer: NeuronScores} for `method` (METHODS) at `layers` (default: every layer in the data);
        activations and importance are averaged over the batch, the token map is the first example's.
        Rollout computes any lower layer missing from the data on the fly (one at a time)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        out = {}
        for layer in (attention_data if layers is None else layers):
            d = attention_data[layer]
            alpha, x = d["attention_matrix"], d["x"]  # (b, e, L, L), (b, L, e)
            if method == "gradient_guided":
                g, _ = self.output_gradient(d["input_ids"], layer, d["attention_mask"], d["y"], d["z"])
                per = [gradient_guided(alpha[k], x[k], g[k]) for k in range(alpha.shape[0])]
            elif method == "attention_weighted":
                per = [attention_weighted(alpha[k], x[k]) for k in range(alpha.shape[0])]
            else:
                per = self._rollout(attention_data, layer)
            out[layer] = _batch_mean(method, per)
        return out

    def _rollout(self, attention_data: dict, layer: int) -> list[NeuronScores]:
        d = attention_data[layer]
        inputs = {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"]}
        b = d["attention_matrix"].shape[0]
        R = [None] * b
        for lo in range(layer):  # lower layers: only the rolled-out product is kept
            a = (attention_data[lo] if lo in attention_data else
                 self.extract_attention_vectors(inputs, [lo])[lo])["attention_matrix"]  # (b, e, L, L)
            R = [rollout_step(a[k], R[k]) for k in range(b)]
        return [rollout_layer(d["attention_matrix"][k], R[k])[0] for k in range(b)]

    @staticmethod
    def analyze_neuron_behavior(neurons: dict, layer_idx: int, top_k: int = 10) -> dict:
        s: NeuronScores = neurons[layer_idx]
        a = np.asarray(s.neuron_activations, dtype=np.float64)
        order = np.argsort(-a, kind="stable")[:top_k]
        return {"method": s.method, "layer": layer_idx, "num_neurons": int(a.size),
                "mean_activation": float(a.mean()), "activation_std": float(a.std()),
                "top_neurons": [{"channel": int(c), "activation": float(a[c]),
                                 "importance": float(s.neuron_importance[c])} for c in order],
                "neuron_diversity": neuron_diversity(a)}

    @staticmethod
    def visualize_neurons(neurons: dict, layer_idx: int, plots_dir, prefix: str = "model", top_k: int = 10) -> str:
        """The 6-panel figure: activation histogram, top neurons, activation vs importance, token map,
        diversity (cumulative share of activation), statistics table. Returns the PNG path."""
        import matplotlib.pyplot as plt

        from utils import save_figure

        s: NeuronScores = neurons[layer_idx]
        stats = MambaAttentionNeurons.analyze_neuron_behavior(neurons, layer_idx, top_k)
        a, imp = np.asarray(s.neuron_activations), np.asarray(s.neuron_importance)
        fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
        fig.suptitle(f"Attention neurons, layer {layer_idx}, method {s.method}")
        ax = axes[0, 0]
        ax.hist(a, bins=min(50, max(5, a.size // 4)), color="tab:blue")
        ax.set(title="activation distribution", xlabel="activation", ylabel="channels")
        ax = axes[0, 1]
        top = stats["top_neurons"]
        ax.bar(range(len(top)), [t["activation"] for t in top], color="tab:red")
        ax.set_xticks(range(len(top)), [str(t["channel"]) for t in top], rotation=45)
        ax.set(title=f"top {len(top)} channels", xlabel="channel", ylabel="activation")
        ax = axes[0, 2]
        ax.scatter(a, imp, s=6, alpha=0.6)
        ax.set(title="activation vs importance", xlabel="activation", ylabel="importance")
        for ax_ in (axes[0, 0], axes[0, 2]):
            ax_.ticklabel_format(axis="both", style="sci", scilimits=(-3, 3))
        ax = axes[1, 0]
        im = ax.imshow(s.token_map, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax)
        ax.set(title="token map (first text)", xlabel="key token j", ylabel="query token i")
        ax = axes[1, 1]
        share = np.cumsum(np.sort(a)[::-1]) / max(a.sum(), 1e-300)
        ax.plot(np.arange(1, a.size + 1) / a.size, share, color="tab:purple")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set(title=f"diversity {stats['neuron_diversity']:.3f} (1 = uniform)",
               xlabel="fraction of channels (most active first)", ylabel="share of total activation")
        ax = axes[1, 2]
        ax.axis("off")
        rows = [["neurons", f"{stats['num_neurons']}"], ["mean activation", f"{stats['mean_activation']:.4g}"],
                ["activation std", f"{stats['activation_std']:.4g}"],
                ["diversity", f"{stats['neuron_diversity']:.4f}"],
                ["top channel", f"{top[0]['channel']} ({top[0]['activation']:.4g})"]]
        ax.table(cellText=rows, colLabels=["statistic", "value"], loc="center").scale(1, 1.6)
        ax.set(title="statistics")
        return save_figure(fig, plots_dir, f"{prefix}_attention_neurons_{s.method}_layer{layer_idx}")


def plot_attention_vector(vector: np.ndarray, layer: int, plots_dir, prefix: str) -> str:
    """The layer's attention vector (channel mean of α, one text), |·| min-max normalised for display."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    shown = np.abs(vector)
    span = shown.max() - shown.min()
    shown = (shown - shown.min()) / span if span > 0 else np.zeros_like(shown)
    fig, ax = plt.subplots(figsize=(7, 6), constrained_layout=True)
    im = ax.imshow(shown, cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="|mean_c α| (min-max normalised)")
    ax.set(title=f"Hidden attention, layer {layer}, first text", xlabel="key token j", ylabel="query token i")
    return save_figure(fig, plots_dir, f"{prefix}_hidden_attention_layer{layer}_text0")


def integrate_mamba_attention_neurons(model, inputs, layer_indices=(0,), methods=METHODS, top_k: int = 10) -> dict:
    """Hidden attention for `layer_indices`, every method's neurons, and their analysis:
    {"attention_data", "mamba_neurons": {method: {layer: NeuronScores}}, "analysis_results":
    {method: {layer: dict}}, "analyzer"}."""
    analyzer = MambaAttentionNeurons(model)
    data = analyzer.extract_attention_vectors(inputs, list(layer_indices))
    neurons = {m: analyzer.create_mamba_neurons(data, m) for m in methods}
    analysis = {m: {lay: analyzer.analyze_neuron_behavior(neurons[m], lay, top_k) for lay in layer_indices}
                for m in methods}
    return {"attention_data": data, "mamba_neurons": neurons, "analysis_results": analysis, "analyzer": analyzer}
