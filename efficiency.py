"""Efficiency: parameters, neurons, active neurons, measured forward time and peak memory
against sequence length, with the analytic FLOPs per token beside the measurement.

Analytic forward FLOPs per token (a multiply-add counts 2; elementwise operations 1 each; norms, biases
and activation functions left out), d = hidden size, V = vocabulary, per layer:
- Mamba-1: in_proj 2·d·2e + conv 2·k·e + x_proj 2·e·(r + 2n) + dt_proj 2·r·e + scan 7·e·n
  (Δ·A, exp, Δ·B, ·x, Ā·h, +, h·C as multiply-adds 2) + D skip and gate 3·e + out_proj 2·e·d (FalconMamba
  the same: its RMS norms of Δ's input, B and C are left out with the other norms);
- Mamba-2, I = H·P inner width, G groups: in_proj 2·d·(2I + 2GN + H) + conv 2·k·(I + 2GN) + the scan as its
  recurrence 6·I·N (Δ·x·B, Ā·h + that, h·C) + 2·H (Δ·A, exp) + D skip and gate 3·I + out_proj 2·I·d (the
  chunked form transformers runs does the same work up to a factor near 1);
- Transformer at context L (causal, averaged over positions): QKV 6·d² + scores and weighted sum
  2·d·(L + 1) + output 2·d² + MLP 4·d·f;
plus the LM head 2·d·V.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

logger = logging.getLogger(__name__)

SEQ_LENGTHS = (64, 128, 256, 512, 1024, 2048)


# --------------------------------------------------------------------------------------------------
# Parameters and neurons
# --------------------------------------------------------------------------------------------------
def parameter_counts(model, adapter) -> dict:
    """Total parameters (tied weights counted once) and by component: embeddings, layers (and the
    components of one layer), final norm, LM head (0 when tied to the embeddings)."""
    seen, groups, layer0 = set(), {"embeddings": 0, "layers": 0, "final_norm": 0, "lm_head": 0, "other": 0}, {}
    prefix = adapter.layers_path + "."
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n = p.numel()
        if name.startswith(prefix):
            groups["layers"] += n
            layer, rest = name[len(prefix):].split(".", 1)
            if layer == "0":
                comp = rest.rsplit(".", 1)[0]  # e.g. mixer.in_proj, attn.c_attn, mlp.c_fc, norm
                layer0[comp] = layer0.get(comp, 0) + n
        elif out is not None and p is out.weight and not tied:
            groups["lm_head"] += n
        elif p is emb or "wpe" in name or "embed" in name:
            groups["embeddings"] += n
        elif "norm" in name or "ln_f" in name:
            groups["final_norm"] += n
        else:
            groups["other"] += n
    return {"total": int(sum(groups.values())), **{k: int(v) for k, v in groups.items()},
            "per_layer": int(groups["layers"] // adapter.n_layers), "layer0_components": layer0,
            "tied_embeddings": bool(tied)}


def neuron_counts(adapter, site_stats: dict | None = None) -> dict:
    """Neurons per layer (the inner site), in all layers, and — from a sparsity dict of one layer —
    active neurons (mean |a| above the traditional threshold) and the efficiency ratio active / total."""
    from sparsity import neuron_site

    per_layer = adapter.site(neuron_site(adapter), 0).size
    out = {"site": neuron_site(adapter), "per_layer": per_layer, "total": per_layer * adapter.n_layers}
    if site_stats is not None:
        means = np.asarray(site_stats["neuron_mean_abs"])
        thr = site_stats["traditional"]["threshold"]
        active = int((means > thr).sum())
        out.update(layer=site_stats.get("layer"), threshold=thr, active=active, efficiency_ratio=active / per_layer,
                   activation_variance_mean=site_stats["activation_variance"]["mean"],
                   gini=site_stats["gini"], hoyer=site_stats["hoyer"], entropy_sparsity=site_stats["entropy"]["sparsity"])
    return out


# --------------------------------------------------------------------------------------------------
# Analytic FLOPs
# --------------------------------------------------------------------------------------------------
def forward_bytes_estimate(adapter, seq_len: int) -> int:
    """A generous estimate of the activation memory of one batch-1 forward at `seq_len`, made before
    running it, so that a length that cannot fit is skipped instead of exhausting the machine: the
    float32 logits L·V·4, plus per layer Mamba's (L, e, n) scan tensors L·e·(n + 8)·16 or a Transformer's
    L·(f + 4d)·16 and its attention scores 3·h·L²·4 (a few tensors of each kind live at once)."""
    c, L = adapter.config, int(seq_len)
    logits = L * int(c.vocab_size) * 4
    if adapter.is_ssm:  # Mamba-2's chunked scan holds tensors of the same order, (L, I, N) at most
        return logits + L * adapter.inner_size * (int(c.state_size) + 8) * 16
    heads = int(getattr(c, "n_head", None) or c.num_attention_heads)
    return logits + L * (adapter.inner_size + 4 * adapter.hidden_size) * 16 + 3 * heads * L * L * 4


def flops_per_token(adapter, seq_len: int) -> dict:
    """Analytic forward FLOPs per token at context `seq_len` (formulas in the module doc)."""
    c = adapter.config
    d, V = adapter.hidden_size, int(c.vocab_size)
    if adapter.ssm_kind == "mamba2":
        I, n, k, G, H = adapter.inner_size, int(c.state_size), int(c.conv_kernel), int(c.n_groups), adapter.n_heads
        layer = 2 * d * (2 * I + 2 * G * n + H) + 2 * k * (I + 2 * G * n) + 6 * I * n + 2 * H + 3 * I + 2 * I * d
        attention = 0
    elif adapter.is_ssm:
        e, n, r, k = int(c.intermediate_size), int(c.state_size), int(c.time_step_rank), int(c.conv_kernel)
        layer = 2 * d * 2 * e + 2 * k * e + 2 * e * (r + 2 * n) + 2 * r * e + 7 * e * n + 3 * e + 2 * e * d
        attention = 0
    else:
        f = adapter.inner_size
        attention = 2 * d * (seq_len + 1)
        layer = 6 * d * d + attention + 2 * d * d + 4 * d * f
    head = 2 * d * V
    return {"per_layer": int(layer), "attention_per_layer": int(attention), "head": int(head),
            "total": int(adapter.n_layers * layer + head)}


# --------------------------------------------------------------------------------------------------
# Measured time and memory
# --------------------------------------------------------------------------------------------------
def peak_forward_memory(model, input_ids) -> int:
    """Peak bytes allocated by PyTorch during one forward beyond what was allocated before it
    (activations and workspaces; the weights are not counted). CUDA: the allocator's peak; CPU: the
    running sum of the profiler's allocation events."""
    import torch

    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ side prints "USDT: ... profiler_start/stop" on stderr at each use unless its log
    # level is above 5; it reads the variable when it first starts. A user's own setting is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=input_ids, use_cache=False)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = np.cumsum([b for _, b in events]) if events else np.zeros(1)
    return int(max(0, running.max()))


def _timed_forward(model, input_ids) -> float:
    import torch

    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda *a: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    sync()
    return time.perf_counter() - t0


def scaling_curve(model, adapter, token_ids, seq_lengths=SEQ_LENGTHS, efficiency_budget: float = 15.0,
                  repeats: int = 3,
                  progress: bool = False) -> dict:
    """Forward time (best of `repeats`, after one warm-up) and peak memory at batch 1 for each length,
    with analytic FLOPs per token. `token_ids` (1-D) are cycled to each length. Lengths beyond the
    model's positions are skipped, and so is every length whose predicted cost (the last measured time
    × the last growth factor, × (repeats + 2)) would overrun `efficiency_budget`; each skip is recorded.

    Refused before any forward (ValueError): `seq_lengths` not a non-empty list of whole numbers >= 1 (a
    length given twice is measured once), an `efficiency_budget` that is not a finite number > 0, `repeats` not a
    whole number >= 1, no tokens, or token ids that are not whole numbers."""
    import torch
    from tqdm.auto import tqdm

    from causal_analysis import finite_number, whole_number
    from utils import free_memory_bytes

    if isinstance(seq_lengths, (str, bytes)) or not hasattr(seq_lengths, "__iter__"):
        raise ValueError(f"seq_lengths {seq_lengths!r}: must be a list of whole numbers >= 1")
    lengths = [whole_number("seq_lengths item", L, low=1) for L in seq_lengths]
    if not lengths:
        raise ValueError("seq_lengths is empty; give at least one length")
    if finite_number("efficiency_budget", efficiency_budget) <= 0:
        raise ValueError(f"efficiency_budget {efficiency_budget}: must be more than 0 seconds")
    repeats = whole_number("repeats", repeats, low=1)
    device = next(model.parameters()).device
    ids = np.asarray(token_ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be whole numbers; got dtype {ids.dtype}")
    pool = torch.as_tensor(ids, dtype=torch.long).ravel()
    if len(pool) == 0:
        raise ValueError("no tokens to build the sequences from")
    seq_lengths = sorted(set(lengths))  # the curve runs from short to long (the budget's prediction
    # extrapolates from the last two lengths)
    limit = adapter.max_positions
    points, skipped, spent = [], [], 0.0
    t_start = time.perf_counter()
    for L in tqdm(seq_lengths, desc="efficiency", disable=not progress, leave=False):
        if limit is not None and L > limit:
            skipped.append({"seq_len": L, "reason": f"beyond the model's {limit} positions"})
            continue
        need, free = forward_bytes_estimate(adapter, L), free_memory_bytes(device)
        if need > free / 2:
            skipped.append({"seq_len": L, "reason": f"would need about {need / 2 ** 30:.3g} GiB (estimated), more "
                                                    f"than half the {free / 2 ** 30:.3g} GiB free"})
            continue
        if len(points) >= 1:
            growth = points[-1]["time_s"] / points[-2]["time_s"] if len(points) >= 2 else 2.0
            predicted = points[-1]["time_s"] * max(growth, 1.0) * (repeats + 2)
            spent = time.perf_counter() - t_start
            if spent + predicted > efficiency_budget:
                skipped.append({"seq_len": L, "reason": f"predicted {predicted:.1f} s would overrun the "
                                                        f"{efficiency_budget:g} s budget"})
                continue
        ids = pool.repeat(L // len(pool) + 1)[:L][None].to(device)  # (1, L)
        _timed_forward(model, ids)  # warm-up
        t = min(_timed_forward(model, ids) for _ in range(repeats))
        mem = peak_forward_memory(model, ids)
        fl = flops_per_token(adapter, L)
        points.append({"seq_len": L, "time_s": t, "tokens_per_s": L / t, "peak_memory_bytes": mem,
                       "flops_per_token": fl["total"], "measured_gflops_per_s": fl["total"] * L / t / 1e9})
    return {"points": points, "skipped": skipped, "budget_s": efficiency_budget,  # seconds
            "repeats": repeats, "batch_size": 1,
            "device": str(device), "memory_note": "peak bytes PyTorch allocated during the forward beyond what "
                                                  "was allocated before it (weights not counted)"}


def efficiency_metrics(model, adapter, token_ids, site_stats: dict | None, seq_lengths=SEQ_LENGTHS,
                       efficiency_budget: float = 15.0, progress: bool = False) -> dict:
    return {"parameters": parameter_counts(model, adapter), "neurons": neuron_counts(adapter, site_stats),
            "flops_per_token_at_256": flops_per_token(adapter, 256),
            "scaling": scaling_curve(model, adapter, token_ids, seq_lengths, efficiency_budget=efficiency_budget,
                                     progress=progress),
            "flops_formulas": __doc__.split("\n\n", 1)[1].strip()}


# --------------------------------------------------------------------------------------------------
# Plots (consume the dicts above; one entry per model)
# --------------------------------------------------------------------------------------------------
def plot_efficiency(entries: list[tuple[str, dict]], plots_dir, name: str) -> str:
    """Bars of parameters, neurons per layer, total and active neurons, efficiency ratio, per model."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    labels = [lab for lab, _ in entries]
    panels = [("parameters (M)", [e["parameters"]["total"] / 1e6 for _, e in entries]),
              ("neurons per layer", [e["neurons"]["per_layer"] for _, e in entries]),
              ("neurons, all layers", [e["neurons"]["total"] for _, e in entries]),
              ("active neurons (analysed layer)", [e["neurons"].get("active", np.nan) for _, e in entries]),
              ("efficiency ratio (active / neurons)", [e["neurons"].get("efficiency_ratio", np.nan) for _, e in entries]),
              ("FLOPs per token at L=256 (M)", [e["flops_per_token_at_256"]["total"] / 1e6 for _, e in entries])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, vals) in zip(axes.ravel(), panels):
        bars = ax.bar(labels, vals, color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Efficiency metrics (active: mean |a| above each model's traditional threshold)")
    fig.tight_layout()
    return save_figure(fig, plots_dir, name)


def plot_scaling(entries: list[tuple[str, dict]], plots_dir, name: str) -> str:
    """Measured forward time and peak memory against sequence length (log-log), analytic FLOPs/token."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (lab, e) in enumerate(entries):
        pts = e["scaling"]["points"]
        if not pts:
            continue
        L = [p["seq_len"] for p in pts]
        axes[0].plot(L, [p["time_s"] for p in pts], "o-", color=f"C{i}", label=lab)
        axes[1].plot(L, [p["peak_memory_bytes"] / 2 ** 20 for p in pts], "o-", color=f"C{i}", label=lab)
        axes[2].plot(L, [p["flops_per_token"] / 1e6 for p in pts], "o-", color=f"C{i}", label=lab)
    for ax, title in zip(axes, ["forward time (s), batch 1", "peak activation memory (MiB)",
                                "analytic FLOPs per token (M)"]):
        ax.set_xscale("log", base=2)
        if ax is not axes[2]:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, plots_dir, name)


# --------------------------------------------------------------------------------------------------
# The efficiency stage
# --------------------------------------------------------------------------------------------------
def _stage_reader(ctx):
    """Without the sparsity stage in the run, the neuron site at --layer from the text pass (its active
    neurons); with it, nothing: its numbers are read (`needs`)."""
    import sparsity as sp

    if "sparsity" in ctx.stages:
        return None
    return sp.SparsityRead(ctx.model, ctx.adapter, [ctx.layer], ctx.tokens.input_ids, ctx.opts.sparsity_threshold,
                           ctx.opts.dead_eps)


def _stage_run(ctx, read: dict | None):
    """Parameters, neurons, active neurons at --layer (from the sparsity stage's numbers when it ran, else
    from the text pass), measured time / memory against sequence length."""
    from functools import partial

    import torch

    import sparsity as sp

    o = ctx.opts
    done = ctx.upstream("sparsity")
    if done is not None:
        stats = done["single"]
    elif read is not None:
        stats = read["stats"][ctx.layer]
    else:  # the sparsity stage is in the run but failed: measured here, with forwards of its own
        stats = sp.layer_sparsity(ctx.model, ctx.adapter, ctx.tokens.input_ids, [ctx.layer],
                                  sparsity_threshold=o.sparsity_threshold, dead_eps=o.dead_eps,
                                  progress=ctx.progress)[ctx.layer]
    pool = torch.cat([ids[0] for ids in ctx.tokens.input_ids]).cpu().numpy()
    res = efficiency_metrics(ctx.model, ctx.adapter, pool, stats, seq_lengths=o.seq_lengths or SEQ_LENGTHS,
                             efficiency_budget=o.efficiency_budget, progress=ctx.progress)
    return res, [partial(plot_efficiency, [(ctx.prefix, res)], ctx.plots_dir, f"{ctx.prefix}_efficiency_layer{ctx.layer}"),
                 partial(plot_scaling, [(ctx.prefix, res)], ctx.plots_dir, f"{ctx.prefix}_scaling")]


def efficiency_summary(r: dict) -> str:
    p, n = r["parameters"], r["neurons"]
    lines = [f"    parameters {p['total']:,} (embeddings {p['embeddings']:,}, layers {p['layers']:,}, head "
             f"{p['lm_head']:,}{', tied' if p['tied_embeddings'] else ''}); {n['per_layer']} neurons per layer "
             f"({n['site']}), {n['total']} in all"]
    if "active" in n:
        lines.append(f"    layer {n['layer']}: {n['active']} active (mean |a| > {n['threshold']:g}), efficiency ratio "
                     f"{n['efficiency_ratio']:.3f}")
    lines += [f"    L={pt['seq_len']:>5}: {pt['time_s'] * 1e3:9.1f} ms, peak {pt['peak_memory_bytes'] / 2 ** 20:8.1f} "
              f"MiB, {pt['flops_per_token'] / 1e6:.2f} MFLOP/token" for pt in r["scaling"]["points"]]
    lines += [f"    L={sk['seq_len']:>5}: skipped ({sk['reason']})" for sk in r["scaling"]["skipped"]]
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("efficiency", _stage_run, efficiency_summary, reader=_stage_reader, needs=("sparsity",)))


_register()
