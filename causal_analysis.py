"""Causal neurons by ablation: exact KL impacts for every dimension of a site.

Impact of dimension k at a site of layer ℓ: the mean over prompts of KL(p_clean ‖ p_ablated) of the
next-token distribution at the last position, where the ablation multiplies dimension k at every
position by `intervention_scale` (0: zero ablation) or, with `ablation="mean"`, replaces it by its mean
over all positions of all prompts in the clean runs.

Speed by construction: one clean run per prompt caches the residual stream entering layer ℓ; every
ablated run starts there (`run_from_layer`), K ablations go through the model as one batch (row i
ablates dims[i]; the batch enters as one row and is expanded to K rows at the site, so layer ℓ up to
the site runs once), only the last position's logits are computed, and Mamba mixers run a
cache-blocked copy of transformers' own forward (`ssm.mixer_forward_blocked`, same operations in the
same order). Prompts are processed one at a time, so prompts of different lengths need no padding.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from models import ArchitectureAdapter, Site, get_adapter
from ssm import ReconstructionError, blocked_inference
from utils import free_memory_bytes, text_list, trace

logger = logging.getLogger(__name__)

# The five factual prompts used when the user gives none.
DEFAULT_PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "Water freezes at a temperature of",
    "The largest planet in the solar system is",
    "The play Romeo and Juliet was written by",
]
ABLATIONS = ("zero", "mean")


# --------------------------------------------------------------------------------------------------
# Running the model from a layer, and editing one dimension per batch row
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_from_layer(model, adapter: ArchitectureAdapter, layer: int):
    """Inside the block, `model(inputs_embeds=h)` runs layers `layer`.. only, with `h` (b, L, d) the
    residual stream entering `layer` (absolute position embeddings are switched off, so h is used as
    is). Layer paths inside the block are relative: the first block is `LAYERS.0`. Mamba mixers run
    `ssm.mixer_forward_blocked` (transformers' operations, cache-blocked for many-row batches); callers
    check that the unablated pass reproduces the model's own clean run. Restored on exit."""
    parent_path, attr = adapter.layers_path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    full = getattr(parent, attr)
    with contextlib.ExitStack() as stack:
        setattr(parent, attr, torch.nn.ModuleList(list(full)[adapter.check_layer(layer):]))
        stack.callback(setattr, parent, attr, full)
        if adapter.is_mamba:
            stack.enter_context(blocked_inference(model))
        if adapter.position_embedding_path is not None:
            stack.enter_context(trace(model, [adapter.position_embedding_path], retain_output=False,
                                      edit_output=lambda name, out: torch.zeros_like(out)))
        yield


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _with_first(value, new):
    return (new, *value[1:]) if isinstance(value, tuple) else new


def _ablator(dims: torch.Tensor, scale: float, values: torch.Tensor | None):
    """Edit function for `trace`: in row i of the batch, dimension dims[i] (every position) is multiplied
    by `scale`, or set to values[i] when `values` is given. A one-row activation (1, L, W) is first
    expanded to K = len(dims) rows, so the part of the model before the site runs once, not K times."""
    def edit(name, value):
        act = _first(value).expand(len(dims), -1, -1).clone()  # (K, L, W)
        rows = torch.arange(act.shape[0], device=act.device)
        cols = dims.to(act.device)
        if values is None:
            act[rows, :, cols] = act[rows, :, cols] * scale  # (K, L)
        else:
            act[rows, :, cols] = values[:, None].to(act.device, act.dtype)
        return _with_first(value, act)

    return edit


def _ablation_dims(dims, width: int, where: str, intervention_scale: float) -> torch.Tensor:
    """`dims` as a LongTensor (K,), checked: a non-empty list of whole numbers in 0..width−1 (a bare
    string is refused, not read character by character), with a finite intervention scale."""
    if not math.isfinite(intervention_scale):
        raise ValueError(f"intervention_scale {intervention_scale}: must be a finite number")
    if isinstance(dims, (str, bytes)):
        raise ValueError(f"dims must be a list of whole numbers, not a string: {dims!r}")
    out = torch.as_tensor(list(dims), dtype=torch.long)  # (K,)
    if len(out) == 0:
        raise ValueError("dims is empty; give at least one dimension (None: every dimension)")
    if out.min() < 0 or out.max() >= width:
        raise ValueError(f"dims must lie in 0..{width - 1} for {where} of width {width}; got {out.tolist()[:8]}")
    return out


def _edit_kwargs(site: Site, edit) -> dict:
    return {"edit_input": edit} if site.capture == "input" else {"edit_output": edit}


def _auto_batch_size(adapter: ArchitectureAdapter, L: int, n_dims: int, device) -> int:
    """How many ablations fit in a quarter of the free memory, by a generous per-row estimate
    (L positions × the widest per-layer activations: Mamba's (e, n) scan tensors, MLP width)."""
    free = free_memory_bytes(device)
    state = int(getattr(adapter.config, "state_size", 1))
    per_row = L * adapter.inner_size * (state + 8) * 4 * 4 + adapter.config.vocab_size * 16
    cap = 256 if device.type == "cuda" else 32  # on a CPU, larger batches fall out of cache (measured)
    return int(max(1, min(n_dims, cap, free // 4 // max(1, per_row))))


# --------------------------------------------------------------------------------------------------
# Clean runs
# --------------------------------------------------------------------------------------------------
@dataclass
class CleanRun:
    input_ids: torch.Tensor  # (1, L)
    resid_in: torch.Tensor  # (1, L, d): residual stream entering the ablated layer
    site_act: torch.Tensor  # (1, L, W): the site's clean activations
    logp: torch.Tensor  # (V,) float64 log p_clean at the last position


def clean_run(model, adapter: ArchitectureAdapter, input_ids: torch.Tensor, layer: int, site: Site) -> CleanRun:
    block = adapter.layer_path(layer)
    paths = list(dict.fromkeys([block, site.path]))
    with torch.no_grad(), trace(model, paths, retain_input=True) as tr:
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[0, -1]  # (V,)
    act = tr[site.path].input if site.capture == "input" else tr[site.path].output
    return CleanRun(input_ids, tr[block].input, act, torch.log_softmax(logits.double(), -1))


def _tokenize(tokenizer, prompts, device) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, L)
        if ids.shape[1] == 0:
            raise ValueError(f"prompt {p!r} tokenizes to no tokens")
        out.append(ids.to(device))
    return out


def _check_start_from_layer(model, c: CleanRun, tolerance: float = 1e-4) -> None:
    """Inside run_from_layer: the unablated pass from the cached layer input must give the model's own
    clean last-position distribution (it differs only by batched rounding, ~1e-6 in log p)."""
    logits = model(inputs_embeds=c.resid_in, use_cache=False, logits_to_keep=1).logits[0, -1]  # (V,)
    err = (torch.log_softmax(logits.double(), -1) - c.logp).abs().max().item()
    if err > tolerance:
        raise ReconstructionError(f"the ablation path does not reproduce the clean run: max |Δ log p| {err:.3g} "
                                  f"> {tolerance:g}")


def kl_last(logp_clean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ q) per row: logp_clean (V,) float64, logits (K, V) -> (K,) float64
    (what F.kl_div(log q, p) sums)."""
    logq = torch.log_softmax(logits.double(), -1)  # (K, V)
    return (logp_clean.exp() * (logp_clean - logq)).sum(-1)


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------
def causal_impact_scores(model, tokenizer, prompts, layer_idx: int, site: str | None = None,
                         intervention_scale: float = 0.0, ablation: str = "zero", dims=None,
                         batch_size: int | None = None, progress: bool = True) -> np.ndarray:
    """Mean over prompts of KL(p_clean ‖ p_ablated) at the last position, for every dimension of the
    site (or the given `dims`), as a float64 array in the order of `dims` (default: 0..width-1).
    `site`: one of the adapter's sites (default Mamba `mixer_out`, Transformers `mlp_out`)."""
    from tqdm.auto import tqdm

    prompts = text_list(prompts, "prompts")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation {ablation!r} is unknown; choose one of {', '.join(ABLATIONS)}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size {batch_size!r}: must be a whole number of at least 1 (or None: automatic)")
    adapter = get_adapter(model)
    site_name = site or adapter.default_causal_site
    s = adapter.site(site_name, layer_idx)
    local = adapter.site(site_name, 0)  # the same site inside run_from_layer
    asked = _ablation_dims(range(s.size) if dims is None else dims, s.size, f"site {site_name}", intervention_scale)
    dims, back = torch.unique(asked, return_inverse=True)  # a repeated dim is scanned once; back: (K,) into it
    device = next(model.parameters()).device
    cleans = [clean_run(model, adapter, ids, layer_idx, s) for ids in _tokenize(tokenizer, prompts, device)]
    means = None
    if ablation == "mean":
        means = torch.cat([c.site_act[0] for c in cleans]).double().mean(0)  # (W,) over every position
    scores = torch.zeros(len(dims), dtype=torch.float64)
    bar = tqdm(total=len(dims) * len(cleans), desc=f"ablate {site_name} L{layer_idx}", disable=not progress)
    # each prompt's unablated pass from the cached layer input must reproduce the clean logits first
    with torch.no_grad(), run_from_layer(model, adapter, layer_idx):
        for c in cleans:
            _check_start_from_layer(model, c)
            L = c.input_ids.shape[1]
            bs = batch_size or _auto_batch_size(adapter, L, len(dims), device)
            for start in range(0, len(dims), bs):
                chunk = dims[start:start + bs].to(device)  # (K,)
                values = None if means is None else means.to(device)[chunk]
                edit = _ablator(chunk, intervention_scale, values)
                # one row in: the ablated layer runs once up to the site, where the edit makes K rows
                with trace(model, [local.path], retain_output=False, **_edit_kwargs(local, edit)):
                    out = model(inputs_embeds=c.resid_in, use_cache=False, logits_to_keep=1)  # c.resid_in (1, L, d)
                    logits = out.logits[:, -1]  # (K, V)
                scores[start:start + len(chunk)] += kl_last(c.logp, logits).cpu()
                bar.update(len(chunk))
    bar.close()
    bad = dims[~torch.isfinite(scores)]
    if len(bad):
        raise FloatingPointError(f"the ablated forward gave non-finite logits for dims {bad[:5].tolist()} (scale "
                                 f"{intervention_scale:g} overflows {next(model.parameters()).dtype}); use a smaller "
                                 "intervention scale")
    return (scores / len(cleans))[back].numpy()  # in the order asked, repeats included


def find_causal_neurons(model, tokenizer, prompts, layer_idx: int = 0, top_k: int = 5, **kwargs
                        ) -> list[tuple[int, float]]:
    """[(dim, score)] of the `top_k` highest impacts, highest first (scores of every dimension computed)."""
    dims = kwargs.pop("dims", None)
    scores = causal_impact_scores(model, tokenizer, prompts, layer_idx, dims=dims, **kwargs)
    dim_ids = np.arange(len(scores)) if dims is None else np.asarray(list(dims))
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [(int(dim_ids[i]), float(scores[i])) for i in order]


def inter_layer_causal_impact_all_layers(model, tokenizer, prompt: str, dim: int, site: str | None = None,
                                         **kwargs) -> list[tuple[int, float]]:
    """[(layer, impact)] of ablating `dim` of the site at each layer in turn (one prompt)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be one string; got {type(prompt).__name__}")
    adapter = get_adapter(model)
    kwargs.setdefault("progress", False)
    return [(layer, float(causal_impact_scores(model, tokenizer, [prompt], layer, site, dims=[dim], **kwargs)[0]))
            for layer in range(adapter.n_layers)]


def cross_layer_matrix(model, tokenizer, prompt: str, dims, site: str = "residual", intervention_scale: float = 0.0,
                       sources=None) -> dict:
    """Ablate dimension k of `site` at each source layer s and read dimension k of the residual stream
    after each target layer t, at the last position. Full forward passes (not started at s), so the
    entries with t < s are measured, and are exactly 0 by causality. Returns float64 arrays:
    clean (n_dims, n_layers), ablated and change = ablated − clean (n_dims, n_sources, n_layers)."""
    adapter = get_adapter(model)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be one string; got {type(prompt).__name__} (call once per prompt)")
    dims = _ablation_dims(dims, adapter.hidden_size, "the residual stream", intervention_scale)  # (K,)
    if adapter.site(site, 0).size != adapter.hidden_size:
        raise ValueError(f"cross-layer influence reads the residual stream (width {adapter.hidden_size}); "
                         f"site {site!r} has a different width")
    sources = list(range(adapter.n_layers)) if sources is None else list(sources)
    device = next(model.parameters()).device
    ids = _tokenize(tokenizer, [prompt], device)[0]
    readouts = [adapter.site("residual", t).path for t in range(adapter.n_layers)]
    rows, cols = torch.arange(len(dims), device=device), dims.to(device)

    def read(tr):  # (K, n_layers) on the CPU: dimension dims[i] of row i, last position, after each layer
        return torch.stack([tr[p].output[rows, -1, cols].double() for p in readouts], dim=-1).cpu()

    batch = ids.expand(len(dims), -1)  # (K, L): the clean pass has the ablated passes' batch shape, so the
    with torch.no_grad(), trace(model, readouts) as tr:  # unaffected entries match bit for bit
        model(input_ids=batch, use_cache=False, logits_to_keep=1)
    clean = read(tr)  # (K, n_layers)
    ablated = torch.zeros(len(dims), len(sources), adapter.n_layers, dtype=torch.float64)
    for j, s in enumerate(sources):
        src = adapter.site(site, s)
        edit = _ablator(dims, intervention_scale, None)
        # the edit is registered first, so a readout on the same module (residual source) sees the edited value
        with torch.no_grad(), trace(model, [src.path], retain_output=False, **_edit_kwargs(src, edit)), \
                trace(model, readouts) as tr:
            model(input_ids=batch, use_cache=False, logits_to_keep=1)
        ablated[:, j] = read(tr)
    change = ablated - clean[:, None, :]
    if not (torch.isfinite(clean).all() and torch.isfinite(ablated).all()):
        raise FloatingPointError(f"non-finite residual readouts (intervention scale {intervention_scale:g} "
                                 "overflows the model's dtype); use a smaller intervention scale")
    return {"dims": dims.numpy(), "sources": np.asarray(sources), "targets": np.arange(adapter.n_layers),
            "clean": clean.numpy(), "ablated": ablated.numpy(), "change": change.numpy()}


def cross_layer_causal_influence(model, tokenizer, prompt: str, dim: int, source_layer: int, target_layer: int,
                                 site: str = "residual", intervention_scale: float = 0.0) -> dict:
    """{"clean", "ablated", "change"} of residual dimension `dim` after `target_layer` when `dim` of `site`
    is ablated at `source_layer` (last position)."""
    m = cross_layer_matrix(model, tokenizer, prompt, [dim], site, intervention_scale, sources=[source_layer])
    return {"clean": float(m["clean"][0, target_layer]), "ablated": float(m["ablated"][0, 0, target_layer]),
            "change": float(m["change"][0, 0, target_layer])}


# --------------------------------------------------------------------------------------------------
# Plots (consume the numbers above only)
# --------------------------------------------------------------------------------------------------
def plot_causal_impacts(scores: np.ndarray, dims: np.ndarray, top_k: int, layer: int, site: str, plots_dir,
                        prefix: str) -> list[str]:
    import matplotlib.pyplot as plt

    from utils import save_figure

    order = np.argsort(-scores, kind="stable")[:top_k]
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    ax.bar(range(len(order)), scores[order], color="tab:red")
    ax.set_xticks(range(len(order)), [str(int(dims[i])) for i in order], rotation=45)
    ax.set(title=f"Top {len(order)} causal dimensions, {site} layer {layer}", xlabel="dimension",
           ylabel="mean KL(p_clean ‖ p_ablated)")
    top = save_figure(fig, plots_dir, f"{prefix}_causal_top_{site}_layer{layer}")
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    positive = scores[scores > 0]
    if positive.size:
        ax.hist(np.log10(positive), bins=50, color="tab:blue")
    ax.set(title=f"Impact distribution over {scores.size} dimensions ({scores.size - positive.size} exactly 0)",
           xlabel="log10 mean KL", ylabel="dimensions")
    dist = save_figure(fig, plots_dir, f"{prefix}_causal_distribution_{site}_layer{layer}")
    return [top, dist]


def plot_inter_layer(curves: dict, site: str, plots_dir, prefix: str) -> str:
    import matplotlib.pyplot as plt

    from utils import save_figure

    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    for dim, pairs in curves.items():
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", label=f"dim {dim}")
    ax.set(title=f"Impact of ablating one {site} dimension at each layer", xlabel="layer",
           ylabel="mean KL(p_clean ‖ p_ablated)", yscale="symlog")
    ax.legend()
    return save_figure(fig, plots_dir, f"{prefix}_inter_layer_{site}")


def plot_cross_layer(matrix: dict, site: str, plots_dir, prefix: str) -> str:
    import matplotlib.pyplot as plt

    from utils import save_figure

    n = len(matrix["dims"])
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n + 1, 4), constrained_layout=True, squeeze=False)
    for ax, k, change in zip(axes[0], matrix["dims"], matrix["change"]):
        lim = float(np.abs(change).max()) or 1.0
        im = ax.imshow(change, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set(title=f"dim {int(k)}: ablated − clean", xlabel="target layer t", ylabel="source layer s")
        fig.colorbar(im, ax=ax)
    return save_figure(fig, plots_dir, f"{prefix}_cross_layer_{site}")
