"""Efficiency: parameters, neurons, active neurons, measured forward time and peak memory against
sequence length, with the analytic FLOPs per token beside the measurement and the achieved GFLOP/s
(analytic FLOPs / measured time).

**What is timed.** A measured time belongs to an implementation, not to an architecture. Each curve names
its implementation (`timed_implementation`): a Mamba model's own forward is transformers' PyTorch slow
path (a Python loop over positions) unless its CUDA kernels (mamba-ssm, causal-conv1d) are in use, which
this module finds out as transformers decides it; a Transformer's own forward is named by its attention
implementation (`config._attn_implementation`: eager, sdpa, ...). A Mamba-1 / FalconMamba model is timed a
second time through the project's fast scan (`ssm.fast_scan`), its logits checked against the model's own
forward at every length both curves measured (a difference beyond `fast_scan_tolerance` makes that curve
an error, never a timing); `architecture_curve` says which curve reflects the architecture, and why.

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
- A hybrid (Jamba, Bamba, Granite 4.0, Zamba2, Nemotron-H, Falcon-H1), layer by layer from its weights: 2 per
  weight of every matrix the layer applies to each token (every projection, router and shared block, its
  conv 2·k per channel; a mixture of experts' expert weights × k / E, k of its E experts per token; biases,
  norms and A_log left out), plus at a state-space mixer the scan and gate terms above (Mamba-1 7·e·n + 3·e,
  Mamba-2 6·I·N + 2·H + 3·I) and at attention 2·H·d_h·(L + 1) (scores and weighted sum). On a pure
  family's layer this rule gives the formulas above exactly (tested).
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
    active neurons (mean |a| above the traditional threshold) and the efficiency ratio active / total.

    The ratio says something only where the threshold splits the neurons: at exactly 1 (every neuron's
    mean |a| above the threshold) or 0 (none) it reflects where the absolute threshold sits against the
    activation scale, not the model, and "efficiency_ratio_informative" is False with the reason in
    "efficiency_ratio_note" (None when informative)."""
    from sparsity import neuron_site, site_layers

    if adapter.hybrid:  # each layer's own neurons, of its own width; per_layer: the analysed layer's
        have, _ = site_layers(adapter, range(adapter.n_layers))
        per_layer = None if site_stats is None else int(len(site_stats["neuron_mean_abs"]))
        out = {"site": neuron_site(adapter), "per_layer": per_layer,
               "total": sum(adapter.site(neuron_site(adapter), la).size for la in have),
               "layers_with_neurons": have}
    else:
        per_layer = adapter.site(neuron_site(adapter), 0).size
        out = {"site": neuron_site(adapter), "per_layer": per_layer, "total": per_layer * adapter.n_layers}
    if site_stats is not None:
        means = np.asarray(site_stats["neuron_mean_abs"])
        thr = site_stats["traditional"]["threshold"]
        active = int((means > thr).sum())
        informative = 0 < active < per_layer
        note = None if informative else (
            f"uninformative at threshold {thr:g}: {'every' if active else 'no'} neuron's mean |a| is above it")
        out.update(layer=site_stats.get("layer"), threshold=thr, active=active, efficiency_ratio=active / per_layer,
                   efficiency_ratio_informative=informative, efficiency_ratio_note=note,
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
    if adapter.hybrid:  # the larger of a state-space layer's and an attention layer's
        mlp = max((adapter.mlp_width(la) for la in range(adapter.n_layers) if adapter.mlp_down_path(la)), default=0)
        return logits + max(L * adapter.inner_size * (adapter.state_size + 8) * 16,
                            L * (mlp + 4 * adapter.hidden_size) * 16 + 3 * adapter.attention_heads * L * L * 4)
    if adapter.is_ssm:  # Mamba-2's chunked scan holds tensors of the same order, (L, I, N) at most
        return logits + L * adapter.inner_size * (int(c.state_size) + 8) * 16
    heads = int(getattr(c, "n_head", None) or c.num_attention_heads)
    return logits + L * (adapter.inner_size + 4 * adapter.hidden_size) * 16 + 3 * heads * L * L * 4


def flops_per_token(adapter, seq_len: int) -> dict:
    """Analytic forward FLOPs per token at context `seq_len` (formulas in the module doc)."""
    c = adapter.config
    d, V = adapter.hidden_size, int(c.vocab_size)
    if adapter.hybrid:
        layers = [layer_flops_from_weights(adapter, la, seq_len) for la in range(adapter.n_layers)]
        return {"per_layer": layers, "attention_per_layer": [x["attention"] for x in layers],
                "head": int(2 * d * V), "total": int(sum(x["total"] for x in layers) + 2 * d * V)}
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


def layer_flops_from_weights(adapter, layer: int, seq_len: int) -> dict:
    """One layer's forward FLOPs per token from its weights (module doc, "A hybrid"): {"weights": 2 per
    weight applied to each token (a mixture of experts' expert weights × k / E), "scan": the state-space
    mixer's scan and gate terms, "attention": scores and weighted sum at context `seq_len`, "total"}."""
    model, c = adapter.model, adapter.config
    block = model.get_submodule(adapter.layer_path(layer))
    k = int(getattr(c, "num_experts_per_tok", 1) or 1)
    weights = 0.0
    for mod in block.modules():  # a shared block (Zamba2's) counted at every layer it runs in
        experts = "Experts" in type(mod).__name__
        for name, p in mod.named_parameters(recurse=False):
            if name == "A_log" or p.dim() < 2:  # biases, norms, D, dt_bias: left out; A_log: not a matrix applied
                continue
            if experts and p.dim() == 3:  # (E, out, in): k of the E experts per token
                weights += 2 * p.numel() * k / p.shape[0]
            else:  # a projection, a router, the conv (C, 1, k): 2 per weight
                weights += 2 * p.numel()
    scan = attention = 0
    if adapter.has_ssm(layer):
        mixer = adapter.mixer(layer)
        I, N = int(mixer.intermediate_size), int(mixer.ssm_state_size)
        scan = 7 * I * N + 3 * I if adapter.ssm_kind == "mamba1" else 6 * I * N + 2 * int(mixer.num_heads) + 3 * I
    if adapter.has_attention(layer):
        attention = 2 * adapter.attention_width * (int(seq_len) + 1)
    return {"weights": int(weights), "scan": int(scan), "attention": int(attention),
            "total": int(weights + scan + attention)}


# --------------------------------------------------------------------------------------------------
# What is timed
# --------------------------------------------------------------------------------------------------
# The implementation-resolving functions transformers' modeling files (5.x with per-function fallbacks)
# call for a full-sequence forward: the scan and the causal convolution.
_KERNEL_FUNCTIONS = {"mamba1": ("mamba_selective_scan", "causal_conv1d_fn"),
                     "mamba2": ("mamba2_chunk_scan", "causal_conv1d_fn")}


def _resolved(fn) -> dict | None:
    """What one of transformers' `use_kernel_func_from_hub_with_fallback` functions runs: {"fallback":
    True when it is its own PyTorch body (the package was not importable), "runs": the function's module and
    name}; None when `fn` is not such a function (another transformers version)."""
    import inspect

    if fn is None or not callable(fn):
        return None
    try:
        nonlocals = inspect.getclosurevars(fn).nonlocals
    except TypeError:  # a builtin or a class
        return None
    impl, own = nonlocals.get("implementation"), nonlocals.get("torch_function", getattr(fn, "__wrapped__", None))
    if impl is None or own is None:
        return None
    return {"fallback": impl is own, "runs": f"{getattr(impl, '__module__', '?')}.{getattr(impl, '__qualname__', '?')}"}


def _probe_mixer_method(model, mixer) -> str | None:
    """transformers before the per-function fallbacks: a mixer's forward calls `cuda_kernels_forward`
    (when mamba-ssm and causal-conv1d are importable, the weights are on CUDA and nothing is being
    compiled) or `slow_forward` / `torch_forward`. Which one it calls is recorded in one 2-token forward
    (instance attributes shadow the methods for it, removed afterwards): the decision as transformers makes
    it, whatever the version's exact condition."""
    import torch

    calls, names = [], [n for n in ("cuda_kernels_forward", "slow_forward", "torch_forward") if hasattr(type(mixer), n)]
    for n in names:
        def record(*args, _n=n, _f=getattr(mixer, n), **kwargs):
            calls.append(_n)
            return _f(*args, **kwargs)
        setattr(mixer, n, record)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=mixer.in_proj.weight.device), use_cache=False)
    finally:
        for n in names:
            mixer.__dict__.pop(n, None)
    return calls[0] if calls else None


def timed_implementation(model, adapter) -> dict:
    """What the model's own forward runs, as transformers decides it: {"name" (short, for legends),
    "description", "per_position_loop" (True: a Python loop over positions; None: not determined),
    "device", "detected_by"}; a Transformer's also "attn_implementation" (config._attn_implementation).

    Mamba-1 / FalconMamba / Mamba-2, transformers 5.x: each kernel function of the modeling file (the scan,
    the causal convolution) was resolved when transformers imported it: mamba-ssm's / causal-conv1d's own
    when importable, else its PyTorch body (read here from the function). There is no device check: a
    CPU model with the packages importable would call the CUDA kernels. Mamba-1's PyTorch scan is a loop
    over positions (mambapy's parallel scan instead where `config.use_mambapy` and mambapy is importable;
    the associative scan only under torch.compile); Mamba-2's is the chunked form, no loop over positions.
    Older transformers: the mixer method its forward calls (`_probe_mixer_method`)."""
    import sys

    import transformers

    device = str(next(model.parameters()).device)
    version = f"transformers {transformers.__version__}"
    if not adapter.is_ssm:
        attn = getattr(model.config, "_attn_implementation", None)
        return {"name": f"{attn} attention", "description": f"{type(model).__name__}'s own forward with attention "
                f"implementation '{attn}' (config._attn_implementation)", "per_position_loop": False,
                "attn_implementation": attn, "device": device, "detected_by": f"config._attn_implementation ({version})"}
    mixer = adapter.mixer(0)
    module = sys.modules[type(mixer).__module__]
    mamba2 = adapter.ssm_kind == "mamba2"
    torch_scan = ("transformers' PyTorch chunked scan (no loop over positions)" if mamba2 else
                  "transformers' PyTorch slow path (a Python loop over positions)")
    if hasattr(type(mixer), "cuda_kernels_forward"):  # transformers 4.x / early 5.x
        method = _probe_mixer_method(model, mixer)
        how = f"the mixer method its forward called ({version})"
        if method == "cuda_kernels_forward":
            return {"name": "CUDA kernels", "description": f"{type(mixer).__name__}.cuda_kernels_forward: mamba-ssm's "
                    "and causal-conv1d's fused CUDA kernels", "per_position_loop": False, "device": device,
                    "detected_by": how}
        if method in ("slow_forward", "torch_forward"):
            return {"name": "transformers slow path" if not mamba2 else "transformers chunked scan",
                    "description": f"{type(mixer).__name__}.{method}: {torch_scan}; the CUDA kernels need mamba-ssm "
                    "and causal-conv1d importable and the model on CUDA", "per_position_loop": not mamba2,
                    "device": device, "detected_by": how}
        return {"name": "undetermined", "description": f"{type(mixer).__name__}'s forward called none of "
                "cuda_kernels_forward / slow_forward / torch_forward", "per_position_loop": None, "device": device,
                "detected_by": how}
    fns = {name: _resolved(getattr(module, name, None)) for name in _KERNEL_FUNCTIONS[adapter.ssm_kind]}
    how = f"the implementations {type(mixer).__name__}'s kernel functions resolved to ({version}): " + ", ".join(
        f"{n} -> {'?' if r is None else r['runs']}" for n, r in fns.items())
    if any(r is None for r in fns.values()):
        return {"name": "undetermined", "description": "this transformers version's Mamba kernel functions are not "
                "the per-function fallbacks this module reads", "per_position_loop": None, "device": device,
                "detected_by": how}
    scan, conv = (fns[n] for n in _KERNEL_FUNCTIONS[adapter.ssm_kind])
    if not scan["fallback"]:
        return {"name": "CUDA kernels", "description": f"mamba-ssm's scan kernel ({scan['runs']}) and "
                f"{'causal-conv1d' if not conv['fallback'] else 'the PyTorch'} causal convolution",
                "per_position_loop": False, "device": device, "detected_by": how}
    mambapy = (not mamba2 and bool(getattr(mixer, "use_mambapy", False))
               and bool(getattr(module, "is_mambapy_available", lambda: False)()))
    if mambapy:
        return {"name": "mambapy parallel scan", "description": "transformers' PyTorch fallback with mambapy's "
                "parallel scan (config.use_mambapy)", "per_position_loop": False, "device": device, "detected_by": how}
    return {"name": "transformers slow path" if not mamba2 else "transformers chunked scan",
            "description": f"{torch_scan}: mamba-ssm is not importable, so transformers runs the PyTorch body of its "
            "scan", "per_position_loop": not mamba2, "device": device, "detected_by": how}


def fast_scan_implementation(adapter) -> dict | None:
    """The project's fast scan (`ssm.fast_scan`), for Mamba-1 / FalconMamba; None for other families (the
    project has no whole-model fast forward for them)."""
    import ssm

    if not adapter.blocked_forward:  # a hybrid's Jamba mixers are Mamba-1 too, but not the project's fast path
        return None
    return {"name": "project fast scan", "description": "the project's fast scan (ssm.fast_scan: ssm.mixer_forward "
            "with ssm.selective_scan_fast in every mixer, float32 inside): the recurrence in chunks of "
            f"{ssm.SCAN_CHUNK} positions (ssm.linear_scan_), its Python loops over the positions of one chunk and "
            "the levels of chunks, so the tensor operations per layer grow with the logarithm of the length, not "
            "with each position", "per_position_loop": False, "detected_by": "ssm.fast_scan swaps every mixer's forward"}


def fast_scan_tolerance(dtype) -> float:
    """Largest allowed max|fast-scan logits − model's logits| / max|model's logits|: 1e-3 in float32 and
    float64 (the fast scan's float32 rounding grows through the layers, as the text pass's SITE_TOLERANCE
    says), the model's own rounding (ssm.RECONSTRUCTION_TOLERANCE) where that is larger (half precision)."""
    from passes import SITE_TOLERANCE
    from ssm import RECONSTRUCTION_TOLERANCE

    return max(SITE_TOLERANCE, RECONSTRUCTION_TOLERANCE.get(dtype, SITE_TOLERANCE))


# --------------------------------------------------------------------------------------------------
# Measured time and memory
# --------------------------------------------------------------------------------------------------
def _profiled_forward(model, input_ids) -> tuple[int, int | None]:
    """(peak bytes, aten operator calls) of one forward; see `peak_forward_memory`. The operator calls
    (every `aten::` event the CPU profiler recorded, nested calls included) only on a CPU, else None."""
    import torch

    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base), None
    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ side prints "USDT: ... profiler_start/stop" on stderr at each use unless its log
    # level is above 5; it reads the variable when it first starts. A user's own setting is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=input_ids, use_cache=False)
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    running = np.cumsum([b for _, b in memory]) if memory else np.zeros(1)
    return int(max(0, running.max())), sum(1 for e in events if e.name().startswith("aten::"))


def peak_forward_memory(model, input_ids) -> int:
    """Peak bytes allocated by PyTorch during one forward beyond what was allocated before it
    (activations and workspaces; the weights are not counted). CUDA: the allocator's peak; CPU: the
    running sum of the profiler's allocation events."""
    return _profiled_forward(model, input_ids)[0]


def _forward(model, input_ids, keep: bool = False):
    """(seconds, logits (1, L, V) when `keep`, else None) of one forward, synchronised on CUDA."""
    import torch

    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda *a: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False)
    sync()
    return time.perf_counter() - t0, (out.logits if keep else None)


def logits_difference(reference, other) -> dict:
    """{"max_abs_diff": max|other − reference|, "relative_diff": that / max|reference|} of two logits
    tensors (in float32 or wider)."""
    import torch

    wide = torch.promote_types(reference.dtype, torch.float32)
    diff = float((other.to(wide) - reference.to(wide)).abs().max())
    scale = float(reference.to(wide).abs().max())
    return {"max_abs_diff": diff, "relative_diff": diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))}


class _Curve:
    """One scaling curve while it is measured: what it times, its budget share and what it measured."""

    def __init__(self, key: str, implementation: dict, context, share: float, checked: bool, tolerance=None):
        self.key, self.implementation, self.context, self.share = key, implementation, context, share
        self.checked, self.tolerance = checked, tolerance  # checked: its logits against the model's own
        self.points, self.skipped, self.spent, self.stopped, self.error = [], [], 0.0, False, None
        self.failed_check = None  # {"seq_len", "max_abs_diff", "relative_diff", "ok": False} of a failed check

    def result(self, repeats: int, device) -> dict:
        out = {"implementation": self.implementation, "points": [] if self.error else self.points,
               "skipped": self.skipped, "budget_share_s": self.share, "spent_s": self.spent, "repeats": repeats,
               "batch_size": 1, "device": str(device),
               "memory_note": "peak bytes PyTorch allocated during the forward beyond what was allocated before it "
                              "(weights not counted)"}
        if self.checked:
            checks = [p for p in self.points if p.get("logits_check") is not None]
            out["logits_check"] = {
                "tolerance": self.tolerance, "relative_to": "the largest |logit| of the model's own forward",
                "lengths_checked": [p["seq_len"] for p in checks],
                "lengths_unchecked": [p["seq_len"] for p in self.points if p.get("logits_check") is None],
                "max_abs_diff": max((p["logits_check"]["max_abs_diff"] for p in checks), default=None),
                "max_relative_diff": max((p["logits_check"]["relative_diff"] for p in checks), default=None),
                "ok": self.error is None and bool(checks), "failed_at": self.failed_check}
        if self.error:
            out["error"] = self.error
        return out


def _checked_inputs(seq_lengths, efficiency_budget, repeats, token_ids):
    """(sorted distinct lengths, budget, repeats, token pool (1-D long tensor)); ValueError as
    `scaling_curve` documents."""
    import torch

    from utils import finite_number, whole_number

    if isinstance(seq_lengths, (str, bytes)) or not hasattr(seq_lengths, "__iter__"):
        raise ValueError(f"seq_lengths {seq_lengths!r}: must be a list of whole numbers >= 1")
    lengths = [whole_number("seq_lengths item", L, low=1) for L in seq_lengths]
    if not lengths:
        raise ValueError("seq_lengths is empty; give at least one length")
    if finite_number("efficiency_budget", efficiency_budget) <= 0:
        raise ValueError(f"efficiency_budget {efficiency_budget}: must be more than 0 seconds")
    repeats = whole_number("repeats", repeats, low=1)
    ids = np.asarray(token_ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be whole numbers; got dtype {ids.dtype}")
    pool = torch.as_tensor(ids, dtype=torch.long).ravel()
    if len(pool) == 0:
        raise ValueError("no tokens to build the sequences from")
    # the curves run from short to long (the budget's prediction extrapolates from the last two lengths)
    return sorted(set(lengths)), float(efficiency_budget), repeats, pool


def _measure(model, adapter, pool, lengths, curves: list[_Curve], repeats: int, progress: bool) -> None:
    """Every curve at every length, short to long, one length on every curve before the next (the model's
    own curve first: its logits are the reference the next curves are checked against at that length).

    Budget: each curve may spend its `share`, plus the unspent share of every curve that has stopped; its
    time counts the warm-up, the timed forwards, the memory profile and the logits check. Before a length,
    its cost is predicted as the last length's cost × the last growth of the forward time (2 after one
    length); a curve whose prediction would overrun stops, and its longer lengths are recorded as skipped."""
    from tqdm.auto import tqdm

    from utils import free_memory_bytes

    device = next(model.parameters()).device
    limit = adapter.max_positions
    for L in tqdm(lengths, desc="efficiency", disable=not progress, leave=False):
        if limit is not None and L > limit:
            for c in curves:
                c.skipped.append({"seq_len": L, "reason": f"beyond the model's {limit} positions"})
            continue
        need, free = forward_bytes_estimate(adapter, L), free_memory_bytes(device)
        if need > free / 2:
            for c in curves:
                c.skipped.append({"seq_len": L, "reason": f"would need about {need / 2 ** 30:.3g} GiB (estimated), "
                                                          f"more than half the {free / 2 ** 30:.3g} GiB free"})
            continue
        ids = pool.repeat(L // len(pool) + 1)[:L][None].to(device)  # (1, L)
        reference = None  # the model's own logits at L
        for c in curves:
            if c.error is not None:
                continue
            if c.stopped:
                c.skipped.append({"seq_len": L, "reason": "the budget stopped this curve at a shorter length"})
                continue
            allowed = c.share + sum(max(0.0, o.share - o.spent) for o in curves
                                    if o is not c and (o.stopped or o.error is not None))
            if c.points:
                pts = c.points
                growth = pts[-1]["time_s"] / pts[-2]["time_s"] if len(pts) >= 2 else 2.0
                predicted = pts[-1]["measurement_s"] * max(growth, 1.0)
                if c.spent + predicted > allowed:
                    c.skipped.append({"seq_len": L, "reason": f"predicted {predicted:.1f} s, after {c.spent:.1f} s "
                                                              f"spent, would overrun this curve's {allowed:.3g} s "
                                                              "of the budget"})
                    c.stopped = True
                    continue
            t0 = time.perf_counter()
            with c.context():
                keep = c.checked or (c is curves[0] and any(o.checked for o in curves))
                _, logits = _forward(model, ids, keep=keep)  # the warm-up
                check = None
                if c.checked and reference is not None:
                    check = logits_difference(reference, logits)
                    check["ok"] = check["relative_diff"] <= c.tolerance
                if c is curves[0]:
                    reference = logits
                del logits
                if check is not None and not check["ok"]:
                    c.error = (f"the logits differ from the model's own forward at L={L} by {check['relative_diff']:.3g} "
                               f"(max |difference| {check['max_abs_diff']:.3g}, relative to the largest |logit|) > "
                               f"{c.tolerance:g}: not timed")
                    c.failed_check = {"seq_len": L, **check}
                    c.spent += time.perf_counter() - t0
                    continue
                t = min(_forward(model, ids)[0] for _ in range(repeats))
                mem, ops = _profiled_forward(model, ids)
            cost = time.perf_counter() - t0
            c.spent += cost
            fl = flops_per_token(adapter, L)
            point = {"seq_len": L, "time_s": t, "tokens_per_s": L / t, "peak_memory_bytes": mem,
                     "flops_per_token": fl["total"], "achieved_gflops_per_s": achieved_gflops(fl["total"] * L, t),
                     "aten_ops": ops, "measurement_s": cost}
            if c.checked:
                point["logits_check"] = check
            c.points.append(point)
        del reference


def achieved_gflops(flops: float, seconds: float) -> float:
    """Analytic FLOPs of a forward / its measured seconds, in GFLOP/s."""
    return flops / seconds / 1e9


def scaling_curve(model, adapter, token_ids, seq_lengths=SEQ_LENGTHS, efficiency_budget: float = 15.0,
                  repeats: int = 3, progress: bool = False) -> dict:
    """The model's own forward: time (best of `repeats`, after one warm-up), peak memory and aten operator
    calls at batch 1 for each length, with analytic FLOPs per token and the achieved GFLOP/s, and what was
    timed ("implementation", `timed_implementation`). `token_ids` (1-D) are cycled to each length.
    Lengths beyond the model's positions are skipped, so is a length whose memory estimate exceeds half
    the free memory, and so is every length whose predicted cost would overrun `efficiency_budget` (see
    `_measure`); each skip is recorded.

    Refused before any forward (ValueError): `seq_lengths` not a non-empty list of whole numbers >= 1 (a
    length given twice is measured once), an `efficiency_budget` that is not a finite number > 0, `repeats`
    not a whole number >= 1, no tokens, or token ids that are not whole numbers."""
    import contextlib

    lengths, budget, repeats, pool = _checked_inputs(seq_lengths, efficiency_budget, repeats, token_ids)
    own = _Curve("scaling", timed_implementation(model, adapter), contextlib.nullcontext, budget, checked=False)
    _measure(model, adapter, pool, lengths, [own], repeats, progress)
    return own.result(repeats, next(model.parameters()).device)


def architecture_curve(own: dict, fast: dict | None, n_layers: int) -> dict:
    """{"curve": the key of the curve that reflects the architecture ("scaling", "scaling_fast_scan") or
    None, "exact": whether it really does (no Python loop over positions) or is only the closest of the two,
    "reason"} from the two curves' results: the model's own where it runs no Python loop over positions
    (CUDA kernels, a chunked scan, a Transformer: exact), else the fast scan where it passed its check
    (exact too: it runs the recurrence in chunks of positions)."""
    impl = own["implementation"]
    if impl["per_position_loop"] is False:
        return {"curve": "scaling", "exact": True, "reason": f"the model's own forward ({impl['name']}) has no Python loop over "
                                                             "positions"}
    if impl["per_position_loop"] is None:
        return {"curve": None, "exact": False, "reason": f"what the model's own forward runs could not be determined "
                                         f"({impl['description']})"}
    if fast is None:
        return {"curve": None, "exact": False, "reason": f"the model's own forward ({impl['name']}) is a Python loop over positions "
                                         "and the project has no fast scan for this family"}
    if "error" in fast:
        return {"curve": None, "exact": False, "reason": "the model's own forward is a Python loop over positions and the fast scan "
                                         "curve failed its logits check"}
    per = _ops_per_position(own["points"], fast["points"], n_layers)
    ops = "" if per is None else (f" (about {per[0]:.0f} against {per[1]:.1f} aten operator calls per position and layer, "
                                  f"from the profiled calls at L={per[2]} and {per[3]})")
    exact = fast["implementation"]["per_position_loop"] is False
    how = ("computes the same forward (its logits checked against the model's) with the recurrence in chunks of "
           "positions, no Python loop over them: its time follows the architecture's cost" if exact else
           "loops over positions too, with fewer operations per position: its time is only the closer to the scan's "
           "arithmetic")
    return {"curve": "scaling_fast_scan", "exact": exact,
            "reason": f"transformers' slow path dispatches many tensor operations per position and layer in its Python "
                      f"loop; the project's fast scan{ops} {how}"}


def _exact(results: dict) -> bool:
    """Whether the results' architecture curve really reflects the architecture (older results: when named)."""
    a = results.get("architecture_curve") or {}
    return bool(a.get("exact", a.get("curve") == "scaling"))


def _arch_mark(results: dict) -> str:
    return " (architecture)" if _exact(results) else " (closest to the architecture; still a Python loop)"


def _ops_per_position(own: list, fast: list, n_layers: int):
    """(own, fast aten calls per position and layer, L1, L2) from the two longest lengths both curves
    profiled: (calls(L2) − calls(L1)) / ((L2 − L1) · layers); None with fewer than two such lengths."""
    a = {p["seq_len"]: p["aten_ops"] for p in own if p["aten_ops"] is not None}
    b = {p["seq_len"]: p["aten_ops"] for p in fast if p["aten_ops"] is not None}
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    L1, L2 = common[-2:]
    return (a[L2] - a[L1]) / ((L2 - L1) * n_layers), (b[L2] - b[L1]) / ((L2 - L1) * n_layers), L1, L2


def scaling_curves(model, adapter, token_ids, seq_lengths=SEQ_LENGTHS, efficiency_budget: float = 15.0,
                   repeats: int = 3, progress: bool = False) -> dict:
    """The model's own forward ("scaling", as `scaling_curve`) and, for Mamba-1 / FalconMamba, the same
    model through the project's fast scan ("scaling_fast_scan", `ssm.fast_scan`; None for other families),
    whose logits at each length are checked against the model's own forward at that length (the warm-up
    forwards' logits; a length the model's own curve skipped is recorded unchecked): beyond
    `fast_scan_tolerance` the curve is an error, its points dropped. "architecture_curve" says which curve
    reflects the architecture. `efficiency_budget` is split evenly between the curves (`_measure`).
    Refusals as `scaling_curve`."""
    import contextlib

    import ssm

    lengths, budget, repeats, pool = _checked_inputs(seq_lengths, efficiency_budget, repeats, token_ids)
    device = next(model.parameters()).device
    fast_impl = fast_scan_implementation(adapter)
    n = 1 if fast_impl is None else 2
    curves = [_Curve("scaling", timed_implementation(model, adapter), contextlib.nullcontext, budget / n, checked=False)]
    if fast_impl is not None:
        fast_impl["device"] = str(device)
        curves.append(_Curve("scaling_fast_scan", fast_impl, lambda: ssm.fast_scan(model), budget / n, checked=True,
                             tolerance=fast_scan_tolerance(next(model.parameters()).dtype)))
    _measure(model, adapter, pool, lengths, curves, repeats, progress)
    out = {c.key: c.result(repeats, device) for c in curves}
    out.setdefault("scaling_fast_scan", None)
    out["architecture_curve"] = architecture_curve(out["scaling"], out["scaling_fast_scan"], adapter.n_layers)
    out["timing_budget"] = {
        "total_s": budget, "spent_s": sum(c.spent for c in curves),
        "rule": f"--efficiency_budget split evenly between the {n} curve{'s' if n > 1 else ''}; a curve's warm-up, "
                "timed forwards, memory profile and logits check count against its share; a curve the budget "
                "stops leaves the rest of its share to the curves still running"}
    return out


DEFINITIONS = {
    "time_s": "the fastest of `repeats` batch-1 forwards (after one warm-up forward), synchronised on CUDA",
    "achieved_gflops_per_s": "analytic forward FLOPs (flops_per_token × seq_len) / time_s / 1e9",
    "aten_ops": "aten operator calls the CPU profiler recorded in one forward, nested calls included (None on CUDA)",
    "measurement_s": "wall seconds this length took to measure: warm-up, timed forwards, memory profile, check",
    "logits_check": "max|fast-scan logits − the model's own logits| and that divided by the largest |logit| of the "
                    "model's own forward, at the same length and tokens; above the tolerance the curve is an error",
    "implementation": "what the curve timed: the model's own forward as transformers runs it (Mamba: CUDA kernels "
                      "or the PyTorch fallback; a Transformer: its attention implementation), or the project's "
                      "fast scan",
    "architecture_curve": "the curve whose time reflects the architecture rather than an implementation's Python "
                          "overhead (no Python loop over positions: the model's own where it has none, else the "
                          "project's fast scan, which runs the recurrence in chunks of positions), with the reason; "
                          "exact false: neither curve does on this device, and this one is only the closer",
    "efficiency_ratio": "active / neurons of the analysed layer, active = neurons whose mean |a| over the texts' "
                        "tokens exceeds the sparsity threshold; at exactly 0 or 1 it says where the absolute threshold sits "
                        "against the activation scale, not what the model does: efficiency_ratio_informative False",
}


def efficiency_metrics(model, adapter, token_ids, site_stats: dict | None, seq_lengths=SEQ_LENGTHS,
                       efficiency_budget: float = 15.0, progress: bool = False) -> dict:
    return {"parameters": parameter_counts(model, adapter), "neurons": neuron_counts(adapter, site_stats),
            "flops_per_token_at_256": flops_per_token(adapter, 256),
            **scaling_curves(model, adapter, token_ids, seq_lengths, efficiency_budget=efficiency_budget,
                             progress=progress),
            "flops_formulas": __doc__[__doc__.index("Analytic forward FLOPs"):].strip(),
            "definitions": DEFINITIONS}


# --------------------------------------------------------------------------------------------------
# Plots (consume the dicts above; one entry per model)
# --------------------------------------------------------------------------------------------------
def plot_efficiency(entries: list[tuple[str, dict]], plots_dir, name: str) -> str:
    """Bars of parameters, neurons per layer, total and active neurons, efficiency ratio, per model (a
    ratio uninformative at its threshold is marked so on its bar)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from utils import save_figure

    labels = [lab for lab, _ in entries]
    panels = [("parameters (M)", [e["parameters"]["total"] / 1e6 for _, e in entries]),
              ("neurons per layer (a hybrid: the analysed layer's)",
               [np.nan if e["neurons"]["per_layer"] is None else e["neurons"]["per_layer"] for _, e in entries]),
              ("neurons, all layers", [e["neurons"]["total"] for _, e in entries]),
              ("active neurons (analysed layer)", [e["neurons"].get("active", np.nan) for _, e in entries]),
              ("efficiency ratio (active / neurons)", [e["neurons"].get("efficiency_ratio", np.nan) for _, e in entries]),
              ("FLOPs per token at L=256 (M)", [e["flops_per_token_at_256"]["total"] / 1e6 for _, e in entries])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, vals) in zip(axes.ravel(), panels):
        bars = ax.bar(labels, vals, color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, fmt="%.3g")
        if title.startswith("efficiency ratio"):
            for bar, (_, e) in zip(bars, entries):
                if e["neurons"].get("efficiency_ratio_informative") is False:
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() / 2,
                            f"uninformative at\nthreshold {e['neurons']['threshold']:g}", ha="center", va="center",
                            fontsize=7, color="white")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        if title.startswith(("neurons", "active neurons")):  # counts: whole-number ticks
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("neurons (count)")
    fig.suptitle("Efficiency metrics (active: mean |a| above each model's traditional threshold)")
    fig.tight_layout()
    return save_figure(fig, plots_dir, name)


CURVE_KEYS = ("scaling", "scaling_fast_scan")


def skipped_note(label: str, curve: dict) -> str | None:
    """One line naming the lengths a curve did not run and why ("L = 512, 1024 not run: <reason>"), the
    lengths that the budget stopped after a longer one's prediction given with that reason; None when it ran
    every length."""
    groups = []  # [(lengths, reason)] in order
    for sk in curve.get("skipped") or []:
        reason = sk["reason"]
        if groups and (reason == groups[-1][1] or (reason.startswith("the budget stopped")
                                                   and groups[-1][1].startswith("predicted"))):
            groups[-1][0].append(sk["seq_len"])
        else:
            groups.append(([sk["seq_len"]], reason))
    if not groups:
        return None
    parts = [f"L = {', '.join(map(str, lengths))} not run: " + (f"the time budget ran out ({reason})"
                                                               if reason.startswith("predicted") else reason)
             for lengths, reason in groups]
    return f"{label}: " + "; ".join(parts)


def plot_scaling(entries: list[tuple[str, dict]], plots_dir, name: str) -> str:
    """Measured forward time, peak memory and achieved GFLOP/s against sequence length (log-log), and the
    analytic FLOPs per token: per model its own forward (solid) and, where measured, the project's fast
    scan (dashed), each named by what was timed; "(architecture)" marks the curve that reflects the
    architecture, and the caption below says it per model, and names the lengths each curve did not run,
    with the reason (`skipped_note`)."""
    import textwrap

    import matplotlib.pyplot as plt

    from utils import save_figure

    caption, drawn = [], []  # drawn: (model index, curve key, style, label, points)
    for i, (lab, e) in enumerate(entries):
        arch = (e.get("architecture_curve") or {}).get("curve")
        names, skipped = [], []
        for key, style in zip(CURVE_KEYS, ("o-", "s--")):
            curve = e.get(key)
            if not curve:
                continue
            impl = (curve.get("implementation") or {}).get("name", "model's own forward")
            names.append(impl)
            note = skipped_note(f"{lab}, {impl}", curve)
            if note:
                skipped.append(note)
            if curve["points"]:
                drawn.append((i, key, style, f"{lab}: {impl}{_arch_mark(e) if key == arch else ''}", lab,
                              curve["points"]))
        arch_name = (e.get(arch) or {}).get("implementation", {}).get("name") if arch else None
        caption.append(f"{lab}: timed {' and '.join(names)}; "
                       + (f"reflects the architecture: {arch_name}" if _exact(e) else
                          f"neither reflects the architecture on this device; closest: {arch_name or 'neither'}"))
        caption += skipped
    lines = [part for c in caption for part in textwrap.wrap(c, 210, subsequent_indent="    ")]
    legend_rows = -(-max(1, len(drawn)) // 3)
    fig = plt.figure(figsize=(19, 4.8 + 0.22 * legend_rows + 0.16 * len(lines) + 0.3), constrained_layout=True)
    grid = fig.add_gridspec(3, 4, height_ratios=[4.8, 0.22 * legend_rows + 0.1, 0.16 * len(lines) + 0.1])
    axes = [fig.add_subplot(grid[0, c]) for c in range(4)]
    for i, key, style, legend, lab, pts in drawn:
        L = [p["seq_len"] for p in pts]
        axes[0].plot(L, [p["time_s"] for p in pts], style, color=f"C{i}", label=legend)
        axes[1].plot(L, [p["peak_memory_bytes"] / 2 ** 20 for p in pts], style, color=f"C{i}", label=legend)
        axes[2].plot(L, [p.get("achieved_gflops_per_s", np.nan) for p in pts], style, color=f"C{i}", label=legend)
        if key == "scaling":
            axes[3].plot(L, [p["flops_per_token"] / 1e6 for p in pts], style, color=f"C{i}", label=lab)
    for ax, (title, ylabel) in zip(axes, [("forward time, batch 1", "time (s), log scale"),
                                          ("peak activation memory", "memory (MiB), log scale"),
                                          ("achieved GFLOP/s (analytic FLOPs / time)", "GFLOP/s, log scale"),
                                          ("analytic FLOPs per token", "MFLOP per token")]):
        ax.set_xscale("log", base=2)
        if ax is not axes[3]:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    if axes[3].get_legend_handles_labels()[0]:
        axes[3].legend(fontsize=7)
    legend_ax, note_ax = fig.add_subplot(grid[1, :]), fig.add_subplot(grid[2, :])
    for ax in (legend_ax, note_ax):
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend for the three measured panels, below them
        legend_ax.legend(handles, labels, loc="upper left", fontsize=8, ncols=min(3, len(handles)), frameon=False)
    note_ax.text(0.0, 1.0, "\n".join(lines), fontsize=8, va="top", ha="left", transform=note_ax.transAxes)
    return save_figure(fig, plots_dir, name)


# --------------------------------------------------------------------------------------------------
# The efficiency stage
# --------------------------------------------------------------------------------------------------
def _stage_reader(ctx):
    """Without the sparsity stage in the run, the neuron site at --layer from the text pass (its active
    neurons); with it, nothing: its numbers are read (`needs`)."""
    import sparsity as sp

    if "sparsity" in ctx.stages or not sp.site_layers(ctx.adapter, [ctx.layer])[0]:  # (a hybrid's layer may have none)
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
    if not sp.site_layers(ctx.adapter, [ctx.layer])[0]:  # a hybrid's layer without neurons: no active count
        stats = None
    elif done is not None:
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


def _curve_lines(title: str, c: dict) -> list[str]:
    impl = c.get("implementation") or {}
    lines = [f"    {title}: {impl.get('description', '?')} [{impl.get('device', '?')}]"]
    chk = c.get("logits_check")
    if chk is not None and chk["lengths_checked"]:
        lines.append(f"      logits within {chk['max_relative_diff']:.2g} of the model's own forward (relative to its "
                     f"largest |logit|; max |difference| {chk['max_abs_diff']:.2g}; tolerance {chk['tolerance']:g}) at "
                     f"L = {', '.join(map(str, chk['lengths_checked']))}"
                     + (f"; unchecked at L = {', '.join(map(str, chk['lengths_unchecked']))} (the model's own curve "
                        "did not run there)" if chk["lengths_unchecked"] else ""))
    if "error" in c:
        lines.append(f"      error: {c['error']}")
    for pt in c["points"]:
        ops = "" if pt.get("aten_ops") is None else f", {pt['aten_ops']:,} aten ops"
        lines.append(f"      L={pt['seq_len']:>5}: {pt['time_s'] * 1e3:9.1f} ms, {pt['achieved_gflops_per_s']:7.3g} GFLOP/s, "
                     f"peak {pt['peak_memory_bytes'] / 2 ** 20:8.1f} MiB, {pt['flops_per_token'] / 1e6:.2f} MFLOP/token{ops}")
    lines += [f"      L={sk['seq_len']:>5}: skipped ({sk['reason']})" for sk in c["skipped"]]
    return lines


def efficiency_summary(r: dict) -> str:
    p, n = r["parameters"], r["neurons"]
    lines = [f"    parameters {p['total']:,} (embeddings {p['embeddings']:,}, layers {p['layers']:,}, head "
             f"{p['lm_head']:,}{', tied' if p['tied_embeddings'] else ''}); "
             + (f"{n['per_layer']} neurons per layer ({n['site']}), {n['total']} in all" if "layers_with_neurons" not in n
                else f"{n['per_layer'] or '?'} neurons at layer {n.get('layer', '?')} ({n['site']}: each layer's own, of "
                     f"its own width), {n['total']} in all over layers {', '.join(map(str, n['layers_with_neurons']))}")]
    if "active" in n:
        lines.append(f"    layer {n['layer']}: {n['active']} active (mean |a| > {n['threshold']:g}), efficiency ratio "
                     f"{n['efficiency_ratio']:.3f}" + ("" if n.get("efficiency_ratio_informative", True) else
                                                       f" ({n['efficiency_ratio_note']})"))
    lines += _curve_lines("timed (the model's own forward)", r["scaling"])
    if r.get("scaling_fast_scan"):
        lines += _curve_lines("timed (the same model, project fast scan)", r["scaling_fast_scan"])
    a = r["architecture_curve"]
    name = r[a["curve"]]["implementation"]["name"] if a["curve"] else "neither curve"
    lines.append(f"    {'reflects the architecture' if _exact(r) else 'closest to the architecture (neither curve reflects it here)'}"
                 f": {name} ({a['reason']})")
    b = r["timing_budget"]
    n_curves = 1 + bool(r.get("scaling_fast_scan"))
    lines.append(f"    budget {b['total_s']:g} s{' split evenly between the 2 curves' if n_curves > 1 else ''}, spent "
                 f"{b['spent_s']:.1f} s")
    return "".join(line + "\n" for line in lines)


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("efficiency", _stage_run, efficiency_summary, reader=_stage_reader, needs=("sparsity",)))


_register()
