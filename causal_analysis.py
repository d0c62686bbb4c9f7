"""Causal neurons by ablation: exact KL impacts for every dimension of a site.

Impact of dimension k at a site of layer ℓ: the mean over prompts of KL(p_clean ‖ p_ablated) of the
next-token distribution at the last position, where the ablation multiplies dimension k at every
position by `intervention_scale` (0: zero ablation) or, with `ablation="mean"`, replaces it by its mean
over all positions of all prompts in the clean runs. Per prompt (`causal_effects_by_layer`) the same ablated
forward also gives Δ log p(clean top-1) = log p_ablated(t) − log p_clean(t), t the prompt's clean top-1
token: whether the ablation moves the model's own prediction, not only its distribution. The stages keep
the per-prompt values and give each mean over prompts a 95% bootstrap interval (`stats`), and the top list
each dimension's rank stability.

Speed by construction: one clean run per prompt caches the residual stream entering layer ℓ; every
ablated run starts there (`run_from_layer`), K ablations go through the model as one batch (row i
ablates dims[i]; the batch enters as one row and is expanded to K rows at the site, so layer ℓ up to
the site runs once), only the last position's logits are computed, and Mamba mixers run a
cache-blocked copy of transformers' own forward with the scan in chunks of positions
(`ssm.mixer_forward_blocked`), which must be as exact as the model's own forward against the model's
float64 forward (`_check_start_from_layer`). Prompts are processed one at a time, so prompts of different
lengths need no padding.
Ablations at several layers (`causal_impact_by_layer`) share one clean run per prompt and share passes:
a layer's rows join the batch at that layer, so each still runs from its own layer on.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

import stats
from models import ArchitectureAdapter, get_adapter
from ssm import ReconstructionError, blocked_inference
from utils import REPO_DIR, in_float64, read_texts_file
from utils import finite_number, free_memory_bytes, text_list, trace, whole_number  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

# The prompts used when the user gives none: data/default_prompts.txt, one per line (read like
# --prompts_file), 24 prompts in four groups of six: facts, syntax and collocations, copying and induction
# (a repeated name or sequence), numbers. Written in WikiText's style (spaced punctuation, "@,@"), the
# text the reference models were trained on, so that the next token is well determined for them too.
DEFAULT_PROMPTS_PATH = REPO_DIR / "data" / "default_prompts.txt"
DEFAULT_PROMPTS = read_texts_file(DEFAULT_PROMPTS_PATH, flag="the default prompts file")
ABLATIONS = ("zero", "mean")


# --------------------------------------------------------------------------------------------------
# Running the model from a layer, and editing one dimension per batch row
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_from_layer(model, adapter: ArchitectureAdapter, layer: int):
    """Inside the block, `forward_from(model, adapter, c, layer)` runs the model from `layer` on, with the
    residual stream entering `layer` that clean run `c` kept. A pure family's model runs layers `layer`..
    only (`model(inputs_embeds=h)`, absolute position embeddings switched off, so h is used as is; Mamba-1
    mixers in `ssm.mixer_forward_blocked`), and layer paths inside the block are relative: the first block
    is `LAYERS.0`. A hybrid's layers read more than the residual stream (the masks of their kind, Zamba2's
    embeddings, Granite's embedding multiplier), so its model runs whole from the prompt's tokens, each row
    of the batch from the embeddings, and paths stay absolute (`layer_offset`). Callers check that the
    unablated pass reproduces the model's own clean run (`_check_start_from_layer`; a hybrid's: the
    unablated row kept in each ablated batch, `_ablated_pass`) and measure the ablations' effects against
    that pass. Restored on exit."""
    if adapter.hybrid:
        adapter.check_layer(layer)
        yield
        return
    parent_path, attr = adapter.layers_path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    full = getattr(parent, attr)
    with contextlib.ExitStack() as stack:
        setattr(parent, attr, torch.nn.ModuleList(list(full)[adapter.check_layer(layer):]))
        stack.callback(setattr, parent, attr, full)
        if adapter.blocked_forward:
            stack.enter_context(blocked_inference(model))
        if adapter.position_embedding_path is not None:
            stack.enter_context(trace(model, [adapter.position_embedding_path], retain_output=False,
                                      edit_output=lambda name, out: torch.zeros_like(out)))
        yield


def layer_offset(adapter: ArchitectureAdapter, start: int) -> int:
    """What to subtract from a layer index to name its module inside `run_from_layer(start)`."""
    return 0 if adapter.hybrid else start


def forward_from(model, adapter: ArchitectureAdapter, c: "CleanRun", start: int, rows: int = 1) -> torch.Tensor:
    """Inside `run_from_layer(start)`: the last position's logits (rows, V) of the pass from layer `start` of
    clean run `c` (one row from the cached layer input, which edits may expand; a hybrid's `rows` rows from
    the prompt's tokens)."""
    if adapter.hybrid:
        ids = c.input_ids.expand(rows, -1)  # (rows, L)
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    return model(inputs_embeds=c.resid_in[start], use_cache=False, logits_to_keep=1).logits[:, -1]


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _with_first(value, new):
    return (new, *value[1:]) if isinstance(value, tuple) else new


def _ablator(dims: torch.Tensor, scale: float, values: torch.Tensor | None, first_row: int = 0):
    """Edit function for `trace`: in row first_row + i of the batch, dimension dims[i] (every position) is
    multiplied by `scale`, or set to values[i] when `values` is given. `dims` may instead be a (K, W)
    boolean mask: row i's dimensions set in mask i are ablated together (values: (W,), one per dimension).
    A one-row activation (1, L, W) is first expanded to first_row + K rows (K = len(dims)), so the part of
    the model before the site runs once, not once per ablation."""
    def edit(name, value):
        act = _first(value)  # (B, L, W)
        if act.shape[0] == 1:
            act = act.expand(first_row + len(dims), -1, -1)
        act = act.clone()  # (B, L, W)
        if dims.dim() == 2:  # sets of dimensions, one per row
            part = act[first_row:first_row + len(dims)]  # (K, L, W)
            new = part * scale if values is None else values.to(act.device, act.dtype).expand_as(part)
            act[first_row:first_row + len(dims)] = torch.where(dims.to(act.device)[:, None, :], new, part)
            return _with_first(value, act)
        rows = torch.arange(first_row, first_row + len(dims), device=act.device)
        cols = dims.to(act.device)
        if values is None:
            act[rows, :, cols] = act[rows, :, cols] * scale  # (K, L)
        else:
            act[rows, :, cols] = values[:, None].to(act.device, act.dtype)
        return _with_first(value, act)

    return edit


def _chain(first, second):
    """Two edit functions on one module, applied in turn."""
    return lambda path, value: second(path, first(path, value))


def _grower(rows_by_path: dict):
    """Edit function for `trace` on layer inputs: the batch entering the layer at `path` gets copies of
    row 0 appended up to rows_by_path[path] rows (the rows that are ablated from that layer on)."""
    def edit(path, value):
        h = _first(value)  # (B, L, d)
        extra = rows_by_path[path] - h.shape[0]
        return _with_first(value, torch.cat([h, h[:1].expand(extra, -1, -1)]) if extra > 0 else h)

    return edit


# --------------------------------------------------------------------------------------------------
# Argument checks shared by the analysis modules (delta_extraction, attention_neurons, sparsity,
# efficiency import them): each refuses, before any forward pass, with a ValueError naming the argument,
# the value and the fix.
# --------------------------------------------------------------------------------------------------
def check_top_k(top_k) -> int:
    """top_k: a whole number of at least 1 (how many units a ranking lists; fewer when there are fewer)."""
    return whole_number("top_k", top_k, low=1)


def check_layer(adapter: ArchitectureAdapter, layer, name: str = "layer") -> int:
    """A layer index: a whole number in 0..n_layers−1 of the model (no negative indexing)."""
    return whole_number(name, layer, 0, adapter.n_layers - 1,
                        f"this {adapter.family} model has {adapter.n_layers} layers")


def check_layers(adapter: ArchitectureAdapter, layers, name: str = "layers", distinct: bool = False) -> list[int]:
    """A non-empty list of layer indices (`check_layer` each), in the order given. `distinct`: a layer given
    twice is refused; otherwise the caller deduplicates (and says so in its docstring)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"{name} {layers!r}: must be a list of layer indices (wrap one layer: [{layers!r}])")
    out = [check_layer(adapter, la, name) for la in layers]
    if not out:
        raise ValueError(f"{name} is empty; give at least one layer")
    if distinct and len(set(out)) != len(out):
        raise ValueError(f"{name} {out}: a layer is given more than once; give each layer once")
    return out


def check_dims(dims, width: int, where: str, name: str = "dims") -> list[int]:
    """`dims` as a list of ints, in the order given: a non-empty list (not a string, not one number) of
    whole numbers (`whole_number`: no bool, no float) in 0..width−1. Repeats are kept here: every caller
    measures each distinct dimension once and returns its result at each position it was asked."""
    if isinstance(dims, (str, bytes)):
        raise ValueError(f"{name} must be a list of whole numbers, not a string: {dims!r}")
    if not isinstance(dims, Iterable) or isinstance(dims, torch.Tensor) and dims.dim() == 0:
        raise ValueError(f"{name} {dims!r}: must be a list of whole numbers (wrap one dimension: [{dims!r}])")
    items = dims.tolist() if isinstance(dims, (torch.Tensor, np.ndarray)) else list(dims)
    if not items:
        raise ValueError(f"{name} is empty; give at least one dimension (None: every dimension)")
    out = [whole_number(f"{name} item", d) for d in items]
    bad = [d for d in out if not 0 <= d < width]
    if bad:
        raise ValueError(f"{name} must lie in 0..{width - 1} for {where} of width {width}; got {bad[:8]}")
    return out


def check_token_ids(texts_ids, name: str = "texts_ids") -> list:
    """A non-empty list of token-id tensors, one (1, L_i) integer tensor per text with L_i >= 1 (what
    `utils.tokenize_texts(...).input_ids` gives). A bare tensor is refused: iterating over it would read
    its rows (or tokens) as texts."""
    if isinstance(texts_ids, (torch.Tensor, np.ndarray, str, bytes)) or not isinstance(texts_ids, Iterable):
        shape = f" of shape {tuple(texts_ids.shape)}" if hasattr(texts_ids, "shape") else ""
        raise ValueError(f"{name} must be a list of (1, L) token-id tensors, one per text; got a "
                         f"{type(texts_ids).__name__}{shape} (split a batch: list(ids.split(1)))")
    items = list(texts_ids)
    if not items:
        raise ValueError(f"{name} is empty; give at least one text")
    for i, ids in enumerate(items):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.is_floating_point():
            what = f"shape {tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name}[{i}]: each text must be a (1, L) integer tensor of token ids; got {what}")
        if ids.shape[1] == 0:
            raise ValueError(f"{name}[{i}] has no tokens; give texts of at least one token")
    return items


def _check_batch_size(batch_size) -> int | None:
    return None if batch_size is None else whole_number("batch_size", batch_size, low=1, context="or None: automatic")


def _ablation_dims(dims, width: int, where: str, intervention_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct dims (K',) ascending, back (K,)) as LongTensors for `check_dims`' list: dims = distinct[back];
    with a finite intervention scale (`finite_number`)."""
    finite_number("intervention_scale", intervention_scale)
    distinct, back = torch.unique(torch.tensor(check_dims(dims, width, where), dtype=torch.long),
                                  return_inverse=True)  # (K',), (K,)
    return distinct, back


def _ablation_setup(model, prompts, ablation: str, batch_size, site: str | None):
    """The checks every ablation scan makes before any forward: (prompts as a list, batch size, the model's
    adapter, the site's name: `site` or the family's default). ValueError on bad input."""
    prompts = text_list(prompts, "prompts")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation {ablation!r} is unknown; choose one of {', '.join(ABLATIONS)}")
    adapter = get_adapter(model)
    return prompts, _check_batch_size(batch_size), adapter, site or adapter.default_causal_site


def _edit_kwargs(capture: str, edit) -> dict:
    return {"edit_input": edit} if capture == "input" else {"edit_output": edit}


def _auto_batch_size(adapter: ArchitectureAdapter, L: int, n_dims: int, device) -> int:
    """How many ablations fit in a quarter of the free memory, by a generous per-row estimate
    (L positions × the widest per-layer activations: Mamba's (e, n) scan tensors, MLP width)."""
    free = free_memory_bytes(device)
    state = int(getattr(adapter, "state_size", None) or getattr(adapter.config, "state_size", 1))
    per_row = L * adapter.inner_size * (state + 8) * 4 * 4 + adapter.config.vocab_size * 16
    cap = 256 if device.type == "cuda" else 32  # on a CPU, larger batches fall out of cache (measured)
    return int(max(1, min(n_dims, cap, free // 4 // max(1, per_row))))


# --------------------------------------------------------------------------------------------------
# Clean runs
# --------------------------------------------------------------------------------------------------
@dataclass
class CleanRun:
    input_ids: torch.Tensor  # (1, L)
    resid_in: dict  # layer -> (1, L, d): the residual stream entering the layer
    site_act: dict  # layer -> (1, L, W): the site's clean activations
    logp: torch.Tensor  # (V,) float64 log p_clean at the last position
    logp_float64: torch.Tensor | None = None  # (V,) the same from the model's forward in float64 (`clean_runs`)
    allowance: float | None = None  # what the reproduction check allows (`check_allowance` of the whole prompt pass)

    @property
    def own_error(self) -> float:
        """max |log p_clean − its float64 value|: how far the model's own forward in its dtype is from float64."""
        return (self.logp - self.logp_float64).abs().max().item()


def clean_run(model, adapter: ArchitectureAdapter, input_ids: torch.Tensor, layers, site_name: str) -> CleanRun:
    """One forward of the model itself, keeping each of `layers`' input and site activations (no float64
    reference: `clean_runs` adds it)."""
    layers = list(layers)
    blocks = {la: adapter.layer_path(la) for la in layers}
    sites = {la: adapter.site(site_name, la) for la in layers}
    paths = list(dict.fromkeys([*blocks.values(), *(s.path for s in sites.values())]))
    with torch.no_grad(), trace(model, paths, retain_input=True) as tr:
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[0, -1]  # (V,)
    act = {la: tr[s.path].input if s.capture == "input" else tr[s.path].output for la, s in sites.items()}
    return CleanRun(input_ids, {la: tr[p].input for la, p in blocks.items()}, act,
                    torch.log_softmax(logits.double(), -1))


def clean_runs(model, tokenizer, prompts, layers, site_name: str) -> list[CleanRun]:
    """One `clean_run` per prompt (the prompt pass: every causal stage of a run reads these), each with its
    last-position log p from the model run in float64 (`utils.in_float64`), the yardstick of the
    reproduction check (`_check_start_from_layer`)."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    cleans = [clean_run(model, adapter, ids, layers, site_name) for ids in _tokenize(tokenizer, prompts, device)]
    with torch.no_grad(), in_float64(model):
        for c in cleans:
            logits = model(input_ids=c.input_ids, use_cache=False, logits_to_keep=1).logits[0, -1]  # (V,)
            c.logp_float64 = torch.log_softmax(logits.double(), -1)
    allowance = check_allowance(cleans)
    for c in cleans:  # one allowance for the whole pass, also where a stage reads some of its prompts
        c.allowance = allowance
    return cleans


def _check_cleans(cleans, prompts, layers) -> None:
    """ValueError unless `cleans` (given by a caller) are one `clean_runs` result per prompt keeping `layers`."""
    if len(cleans) != len(prompts) or any(la not in c.resid_in for c in cleans for la in layers):
        raise ValueError("cleans: give one clean run per prompt, each keeping every layer asked for")
    if any(c.logp_float64 is None or c.allowance is None for c in cleans):
        raise ValueError("cleans: make them with clean_runs, which adds the float64 yardstick of the reproduction "
                         "check (clean_run alone does not)")


def _tokenize(tokenizer, prompts, device) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, L)
        if ids.shape[1] == 0:
            raise ValueError(f"prompt {p!r} tokenizes to no tokens")
        out.append(ids.to(device))
    return out


def kl_last(logp_clean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ q) per row: logp_clean (V,) float64, logits (K, V) -> (K,) float64
    (what F.kl_div(log q, p) sums)."""
    return _effects(logp_clean, logits)[0]


def _effects(logp_clean: torch.Tensor, logits: torch.Tensor, top: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p_clean ‖ q), log q(top) − log p_clean(top)) per row, float64 (K,) each, from one log-softmax of
    the ablated logits (K, V); top = the given token, else the clean distribution's most probable token (the
    first on a tie)."""
    logq = torch.log_softmax(logits.double(), -1)  # (K, V)
    top = int(logp_clean.argmax()) if top is None else top
    return (logp_clean.exp() * (logp_clean - logq)).sum(-1), logq[:, top] - logp_clean[top]


def clean_top_tokens(cleans, tokenizer, k: int = 5) -> list[list[dict]]:
    """Per clean run, its k most probable next tokens at the last position, most probable first:
    [{"token_id", "token" (the tokenizer's decoding of that one id), "p" (p_clean, float64)}]."""
    out = []
    for c in cleans:
        p, ids = c.logp.exp().topk(min(check_top_k(k), c.logp.numel()))  # (k,), (k,)
        out.append([{"token_id": int(i), "token": tokenizer.decode([int(i)]), "p": float(q)}
                    for q, i in zip(p.tolist(), ids.tolist())])
    return out


# --------------------------------------------------------------------------------------------------
# Ablated passes
# --------------------------------------------------------------------------------------------------
# The reproduction check's yardstick: the ablation path (from a layer's cached input, Mamba mixers in
# `ssm.mixer_forward_blocked`, whose scan rounds in another order than the model's) may be at most
# CHECK_MARGIN times as far from the model's float64 forward as the model's own forward in its dtype is on
# the run's prompts (the largest of its distances: on one prompt alone the two roundings' sizes scatter by
# more than 2x), plus CHECK_FLOOR nats (a few float32 roundings of log p, where the two agree to the last bits).
CHECK_MARGIN = 2.0
CHECK_FLOOR = 1e-6


def check_allowance(cleans) -> float:
    """max |log p − log p_float64| the ablation path may show on any prompt of `cleans` (CleanRun list)."""
    return CHECK_MARGIN * max(c.own_error for c in cleans) + CHECK_FLOOR


def _check_start_from_layer(model, adapter: ArchitectureAdapter, c: CleanRun, start: int) -> tuple[torch.Tensor, float]:
    """Inside run_from_layer(start): the unablated one-row pass from the cached layer input must be as
    exact as the model's own forward, measured against the float64 forward: max |log p − log p_float64| at
    most `c.allowance` (ReconstructionError otherwise). Returns its last-position log p (V,) float64, the
    baseline of the effects of the ablations from this layer (the same path, so its rounding cancels), and
    that distance."""
    logits = forward_from(model, adapter, c, start)[0]  # (V,)
    logp = torch.log_softmax(logits.double(), -1)
    return logp, _checked_distance(logp, c)


def _checked_distance(logp: torch.Tensor, c: CleanRun) -> float:
    """max |logp − c's float64 log p| (logp (V,) float64: an unablated pass along the ablation path), at most
    `c.allowance` (ReconstructionError otherwise)."""
    err, allowed = (logp - c.logp_float64).abs().max().item(), c.allowance
    if err > allowed:
        raise ReconstructionError(
            f"the ablation path does not reproduce the clean run: it is {err:.3g} (max |Δ log p|) from the "
            f"model's float64 forward, more than the {allowed:.3g} allowed ({CHECK_MARGIN:g} x the model's own "
            f"largest distance on these prompts + {CHECK_FLOOR:g})")
    return err


def _ablated_pass(model, adapter: ArchitectureAdapter, c: CleanRun, site_name: str, plan, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (R, V) at the last position of R = Σ K_ℓ ablated rows, for `plan` = [(layer ℓ, dims (K_ℓ,),
    values (K_ℓ,) or None)] with ascending layers. Call inside `run_from_layer(model, adapter, start)`
    with start = the first plan layer: the pass starts from c.resid_in[start] as one row. Rows are laid
    out [an unablated row 0 when the plan has several layers] + each layer's K_ℓ rows, and a layer's
    rows join the batch only at that layer (copies of row 0 appended at the layer's input; the first
    layer's at its site), so each ablated row runs from its own layer on and no further back. A hybrid's batch
    runs whole from the tokens with the unablated row 0 always in it: returned beside the ablated rows
    (None for a pure family), the baseline of their effects, checked against the float64 yardstick."""
    start = plan[0][0]
    shift = layer_offset(adapter, start)  # paths are relative inside run_from_layer (a pure family's)
    # later layers copy row 0, which must then stay unablated; a hybrid's batch keeps it always: its baseline
    base = 1 if len(plan) > 1 or adapter.hybrid else 0
    site_edits, grow, offset = {}, {}, base
    for layer, dims, values in plan:
        local = adapter.site(site_name, layer - shift)
        site_edits[local.path] = _ablator(dims, scale, values, offset)
        if layer != start:
            grow[adapter.layer_path(layer - shift)] = offset + len(dims)
        offset += len(dims)
    capture = adapter.site(site_name, start - shift).capture
    with contextlib.ExitStack() as stack:
        stack.enter_context(trace(model, list(site_edits), retain_output=False,
                                  **_edit_kwargs(capture, lambda path, v: site_edits[path](path, v))))
        if grow:
            stack.enter_context(trace(model, list(grow), retain_output=False, edit_input=_grower(grow)))
        logits = forward_from(model, adapter, c, start, rows=offset)  # (offset, V)
    return logits[base:], (logits[0] if adapter.hybrid else None)  # (R, V), the unablated row (V,) or None


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------
@dataclass
class CausalEffects:
    """Per-prompt effects of ablating each dimension at each layer (float64, in the order of the prompts,
    `layers` and `dims` asked): `kl` (n_prompts, n_layers, n_dims) = KL(p_clean ‖ p_ablated) in nats, and
    `delta_logp` (same shape) = log p_ablated(t) − log p_clean(t), t = the prompt's clean top-1 token
    `clean_top[prompt]`; both at the last position, from the same ablated forward. p_clean is the unablated
    pass along the same path from the same layer (checked to reproduce the model's own clean run within the
    float64 yardstick), so that an ablation that changes nothing scores 0 rather than the paths' rounding."""

    kl: np.ndarray
    delta_logp: np.ndarray
    clean_top: np.ndarray  # (n_prompts,) token ids
    path_distance: float | None = None  # the reproduction check's largest max |log p_path − log p_float64|


def reproduction_check(effects: CausalEffects, cleans) -> dict:
    """The reproduction check of a scan, for its results (REPRODUCTION_CHECK_DEFINITION): the ablation path's
    and the model's own largest distance from the float64 forward over the prompts, and the allowance."""
    return {"path_largest_distance": effects.path_distance,
            "model_own_largest_distance": max(c.own_error for c in cleans), "allowance": cleans[0].allowance}


REPRODUCTION_CHECK_DEFINITION = (
    "in nats: the largest over prompts of max_v |log p(v) - log p_float64(v)| at the last position, of the unablated "
    "pass along the ablation path from the ablated layer (path_largest_distance) and of the model's own forward in "
    f"its dtype (model_own_largest_distance), log p_float64 from the model run in float64; the path must stay "
    f"within allowance = {CHECK_MARGIN:g} x model_own_largest_distance + {CHECK_FLOOR:g} on every prompt, else the "
    "stage fails. On a hybrid the ablated batch runs whole from the tokens and keeps an unablated row, the baseline "
    "of its effects: that row is what is checked, in every batch")


def causal_effects_by_layer(model, tokenizer, prompts, layers, site: str | None = None,
                            intervention_scale: float = 0.0, ablation: str = "zero", dims=None,
                            batch_size: int | None = None, progress: bool = True, cleans=None) -> CausalEffects:
    """Per prompt, the effect of ablating every dimension of the site (or the given `dims`, default
    0..width-1) at each of `layers` in turn: `CausalEffects` (KL and Δ log p(clean top-1) per prompt).
    `causal_impact_by_layer` is its KL averaged over the prompts.

    One clean run per prompt keeps every layer's input (`cleans`: those runs, `clean_runs` of these
    prompts at these layers or more and this site, when the caller has them: the prompt pass); each
    ablated row starts at its own layer. Up to `batch_size` (layer, dim) pairs share a forward pass (default: chosen from free memory). Before the
    first pass from each start layer, an unablated one-row pass from there must reproduce the clean run.

    Refused before any forward (ValueError): `prompts` not a non-empty list of strings (`utils.text_list`:
    a bare string is not read character by character), `layers` not a non-empty list of distinct layer
    indices (`check_layers`), `dims` not a non-empty list of whole numbers in 0..width−1 (`check_dims`), a
    non-finite `intervention_scale`, an unknown ablation, a `batch_size` that is not a whole number >= 1.
    A dimension given more than once is ablated once; its score appears at each position it was asked."""
    from tqdm.auto import tqdm

    prompts, batch_size, adapter, site_name = _ablation_setup(model, prompts, ablation, batch_size, site)
    layers = check_layers(adapter, layers, distinct=True)
    width = adapter.site(site_name, layers[0]).size
    dims, back = _ablation_dims(range(width) if dims is None else dims, width, f"site {site_name}",
                                intervention_scale)  # a repeated dim is scanned once; back: (K,) into dims
    device = next(model.parameters()).device
    order = sorted(range(len(layers)), key=lambda i: layers[i])  # passes run in ascending layer order
    if cleans is None:
        cleans = clean_runs(model, tokenizer, prompts, layers, site_name)
    else:
        _check_cleans(cleans, prompts, layers)
    means = None
    if ablation == "mean":  # (W,) per layer, over every position of every prompt
        means = {la: torch.cat([c.site_act[la][0] for c in cleans]).double().mean(0).to(device) for la in layers}
    kls = torch.zeros(len(cleans), len(layers), len(dims), dtype=torch.float64)
    dlogp = torch.zeros_like(kls)
    pairs = [(i, j) for i in order for j in range(len(dims))]  # (layer index, dim index), by ascending layer
    where = f"L{layers[0]}" if len(layers) == 1 else f"{len(layers)} layers"
    worst = 0.0  # the reproduction check's largest distance
    bar = tqdm(total=len(pairs) * len(cleans), desc=f"ablate {site_name} {where}", disable=not progress)
    with torch.no_grad():
        for n, c in enumerate(cleans):
            L = c.input_ids.shape[1]
            bs = batch_size or _auto_batch_size(adapter, L, len(pairs), device)
            baseline = {}  # start layer -> the unablated pass's log p from there (V,)
            for p0 in range(0, len(pairs), bs):
                chunk = pairs[p0:p0 + bs]
                plan = []
                for i in dict.fromkeys(i for i, _ in chunk):
                    js = torch.tensor([j for i2, j in chunk if i2 == i])  # (K_ℓ,)
                    d = dims[js].to(device)
                    plan.append((layers[i], d, None if means is None else means[layers[i]][d]))
                start = plan[0][0]
                with run_from_layer(model, adapter, start):
                    if start not in baseline and not adapter.hybrid:
                        baseline[start], err = _check_start_from_layer(model, adapter, c, start)
                        worst = max(worst, err)
                    logits, row0 = _ablated_pass(model, adapter, c, site_name, plan, intervention_scale)  # (R, V)
                if row0 is not None:  # a hybrid: the unablated row of the same batch is the baseline, checked
                    baseline[start] = torch.log_softmax(row0.double(), -1)
                    worst = max(worst, _checked_distance(baseline[start], c))
                kl, dl = (e.cpu() for e in _effects(baseline[start], logits, int(c.logp.argmax())))  # (R,) each
                rows_i = torch.tensor([i for i, _ in chunk])
                rows_j = torch.tensor([j for _, j in chunk])
                kls[n, rows_i, rows_j] = kl
                dlogp[n, rows_i, rows_j] = dl
                bar.update(len(chunk))
    bar.close()
    bad = ~(torch.isfinite(kls) & torch.isfinite(dlogp)).all(0).all(0)  # (K',)
    if bad.any():
        raise FloatingPointError(f"the ablated forward gave non-finite logits for dims {dims[bad][:5].tolist()} "
                                 f"(scale {intervention_scale:g} overflows {next(model.parameters()).dtype}); use a "
                                 "smaller intervention scale")
    return CausalEffects(kls[:, :, back].numpy(), dlogp[:, :, back].numpy(),  # in the order asked, repeats included
                         np.array([int(c.logp.argmax()) for c in cleans]), worst)


def set_ablation_effects(model, tokenizer, prompts, layer: int, masks, site: str | None = None,
                         intervention_scale: float = 0.0, ablation: str = "zero", batch_size: int | None = None,
                         progress: bool = True, cleans=None) -> CausalEffects:
    """Per prompt, the effect of ablating each *set* of the site's dimensions together at `layer`: masks
    (K, W) booleans, row k the set (W the site's width); `CausalEffects` with kl and delta_logp
    (n_prompts, 1, K). The same machinery as `causal_effects_by_layer` (clean runs kept, ablated rows from
    the layer on, the unablated pass checked against each clean run first), so a one-dimension set gives
    exactly its single-dimension effect. Refused before any forward (ValueError): `masks` not a non-empty
    (K, W) boolean array, and what `causal_effects_by_layer` refuses."""
    from tqdm.auto import tqdm

    prompts, batch_size, adapter, site_name = _ablation_setup(model, prompts, ablation, batch_size, site)
    finite_number("intervention_scale", intervention_scale)
    layer = check_layer(adapter, layer)
    width = adapter.site(site_name, layer).size
    m = np.asarray(masks)
    if m.dtype != bool or m.ndim != 2 or m.shape[0] == 0 or m.shape[1] != width:
        raise ValueError(f"masks must be a non-empty (sets, {width}) boolean array for site {site_name}; got "
                         f"{m.dtype} {m.shape}")
    masks = torch.from_numpy(m.copy())  # (K, W)
    device = next(model.parameters()).device
    if cleans is None:
        cleans = clean_runs(model, tokenizer, prompts, [layer], site_name)
    else:
        _check_cleans(cleans, prompts, [layer])
    means = None
    if ablation == "mean":  # (W,) over every position of every prompt
        means = torch.cat([c.site_act[layer][0] for c in cleans]).double().mean(0).to(device)
    K = masks.shape[0]
    kls = torch.zeros(len(cleans), 1, K, dtype=torch.float64)
    dlogp = torch.zeros_like(kls)
    worst = 0.0  # the reproduction check's largest distance
    bar = tqdm(total=K * len(cleans), desc=f"ablate sets of {site_name} L{layer}", disable=not progress)
    with torch.no_grad():
        for n, c in enumerate(cleans):
            bs = batch_size or _auto_batch_size(adapter, c.input_ids.shape[1], K, device)
            with run_from_layer(model, adapter, layer):
                if not adapter.hybrid:
                    baseline, err = _check_start_from_layer(model, adapter, c, layer)  # (V,)
                    worst = max(worst, err)
                for k0 in range(0, K, bs):
                    chunk = masks[k0:k0 + bs].to(device)  # (k, W)
                    logits, row0 = _ablated_pass(model, adapter, c, site_name, [(layer, chunk, means)],
                                                 intervention_scale)  # (k, V)
                    if row0 is not None:  # a hybrid: the unablated row of the same batch, checked
                        baseline = torch.log_softmax(row0.double(), -1)
                        worst = max(worst, _checked_distance(baseline, c))
                    kl, dl = (e.cpu() for e in _effects(baseline, logits, int(c.logp.argmax())))
                    kls[n, 0, k0:k0 + len(chunk)], dlogp[n, 0, k0:k0 + len(chunk)] = kl, dl
                    bar.update(len(chunk))
    bar.close()
    if not (torch.isfinite(kls).all() and torch.isfinite(dlogp).all()):
        raise FloatingPointError(f"the ablated forward gave non-finite logits (scale {intervention_scale:g}); use a "
                                 "smaller intervention scale")
    return CausalEffects(kls.numpy(), dlogp.numpy(), np.array([int(c.logp.argmax()) for c in cleans]), worst)


def causal_impact_by_layer(model, tokenizer, prompts, layers, site: str | None = None,
                           intervention_scale: float = 0.0, ablation: str = "zero", dims=None,
                           batch_size: int | None = None, progress: bool = True, cleans=None) -> np.ndarray:
    """Mean over prompts of KL(p_clean ‖ p_ablated) at the last position, for every dimension of the
    site (or the given `dims`) ablated at each of `layers` in turn: float64 (n_layers, n_dims), in the
    order of `layers` and `dims` (default: 0..width-1): `causal_effects_by_layer(...).kl.mean(0)`, the
    same arguments, checked the same way."""
    return causal_effects_by_layer(model, tokenizer, prompts, layers, site, intervention_scale, ablation, dims,
                                   batch_size, progress, cleans).kl.mean(0)


def causal_impact_scores(model, tokenizer, prompts, layer_idx: int, site: str | None = None,
                         intervention_scale: float = 0.0, ablation: str = "zero", dims=None,
                         batch_size: int | None = None, progress: bool = True, cleans=None) -> np.ndarray:
    """Mean over prompts of KL(p_clean ‖ p_ablated) at the last position, for every dimension of the
    site (or the given `dims`), as a float64 array in the order of `dims` (default: 0..width-1).
    `site`: one of the adapter's sites (default Mamba `mixer_out`, Transformers `mlp_out`). Arguments are
    checked as in `causal_impact_by_layer` (a repeated dim is ablated once, its score at each position)."""
    check_layer(get_adapter(model), layer_idx, "layer_idx")
    return causal_impact_by_layer(model, tokenizer, prompts, [layer_idx], site, intervention_scale, ablation, dims,
                                  batch_size, progress, cleans)[0]


def find_causal_neurons(model, tokenizer, prompts, layer_idx: int = 0, top_k: int = 5, **kwargs
                        ) -> list[tuple[int, float]]:
    """[(dim, score)] of the `top_k` highest impacts, highest first (scores of every dimension, or of the
    given `dims`, computed). Each distinct dimension is ranked once (a repeated dim is not listed twice);
    ties keep the order of `dims`. `top_k`: a whole number >= 1; it and the other arguments
    (`causal_impact_by_layer`) are checked before any forward."""
    top_k = check_top_k(top_k)
    dims = kwargs.pop("dims", None)
    if dims is not None:
        adapter = get_adapter(model)
        site = kwargs.get("site") or adapter.default_causal_site
        width = adapter.site(site, check_layer(adapter, layer_idx, "layer_idx")).size
        dims = list(dict.fromkeys(check_dims(dims, width, f"site {site}")))  # distinct, in the order asked
    scores = causal_impact_scores(model, tokenizer, prompts, layer_idx, dims=dims, **kwargs)
    dim_ids = np.arange(len(scores)) if dims is None else np.asarray(dims)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [(int(dim_ids[i]), float(scores[i])) for i in order]


def inter_layer_causal_impact_all_layers(model, tokenizer, prompt: str, dim: int, site: str | None = None,
                                         **kwargs) -> list[tuple[int, float]]:
    """[(layer, impact)] of ablating `dim` of the site at each layer in turn (one prompt: a string; `dim`:
    a whole number in 0..width−1; the rest checked as in `causal_impact_by_layer`)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be one string; got {type(prompt).__name__}")
    adapter = get_adapter(model)
    kwargs.setdefault("progress", False)
    scores = causal_impact_by_layer(model, tokenizer, [prompt], range(adapter.n_layers), site,
                                    dims=[whole_number("dim", dim)], **kwargs)
    return [(layer, float(scores[layer, 0])) for layer in range(adapter.n_layers)]


def cross_layer_matrix(model, tokenizer, prompt: str, dims, site: str = "residual", intervention_scale: float = 0.0,
                       sources=None, batch_size: int | None = None) -> dict:
    """Ablate dimension k of `site` at each source layer s and read dimension k of the residual stream
    after each target layer t, at the last position. Full forward passes (not started at s), so the
    entries with t < s are measured, and are exactly 0 by causality. The (source, dim) rows share
    forward passes (up to `batch_size` rows, default from free memory), and each pass has a clean twin
    of the same batch shape, so rows that no ablation has reached match it bit for bit. Returns float64
    arrays: clean (n_dims, n_layers), ablated and change (n_dims, n_sources, n_layers), where change is
    ablated − the twin's same row (= ablated − clean up to batch-shape rounding, ~1e-7 relative).

    Refused before any forward (ValueError): `prompt` not one string, `dims` not a non-empty list of whole
    numbers in 0..d−1 (`check_dims`), `sources` not a non-empty list of layer indices, a non-finite
    `intervention_scale`, a `batch_size` that is not a whole number >= 1. A dimension given more than once
    is ablated once and its rows appear at each position it was asked ("dims" is returned as asked); a
    source given more than once is measured at each position it was asked."""
    adapter = get_adapter(model)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be one string; got {type(prompt).__name__} (call once per prompt)")
    dims, back = _ablation_dims(dims, adapter.hidden_size, "the residual stream", intervention_scale)  # (K,), (K0,)
    batch_size = _check_batch_size(batch_size)
    sources = list(range(adapter.n_layers)) if sources is None else check_layers(adapter, sources, "sources")
    if adapter.site(site, sources[0]).size != adapter.hidden_size:
        raise ValueError(f"cross-layer influence reads the residual stream (width {adapter.hidden_size}); "
                         f"site {site!r} has a different width")
    device = next(model.parameters()).device
    ids = _tokenize(tokenizer, [prompt], device)[0]  # (1, L)
    K = len(dims)
    readouts = [adapter.site("residual", t).path for t in range(adapter.n_layers)]
    capture = adapter.site(site, sources[0]).capture
    per_pass = max(1, (batch_size or _auto_batch_size(adapter, ids.shape[1], K * len(sources), device)) // K)
    per_pass = math.ceil(len(sources) / math.ceil(len(sources) / per_pass))  # even passes: fewer clean twins

    def run(n_sources, edits=None):  # (n_sources·K, n_layers) readouts: row j·K + i reads dims[i]
        rows = torch.arange(n_sources * K, device=device)
        cols = dims.to(device).repeat(n_sources)
        swap = blocked_inference(model) if adapter.blocked_forward else contextlib.nullcontext()
        with torch.no_grad(), swap, contextlib.ExitStack() as stack:
            if edits:  # registered first, so a readout on the same module (residual source) sees the edit
                stack.enter_context(trace(model, list(edits), retain_output=False,
                                          **_edit_kwargs(capture, lambda path, v: edits[path](path, v))))
            tr = stack.enter_context(trace(model, readouts))
            model(input_ids=ids.expand(n_sources * K, -1), use_cache=False, logits_to_keep=1)
        return torch.stack([tr[p].output[rows, -1, cols].double() for p in readouts], dim=-1).cpu()

    clean_by_size = {}  # pass rows -> its clean twin's readouts
    ablated = torch.zeros(K, len(sources), adapter.n_layers, dtype=torch.float64)
    change = torch.zeros_like(ablated)
    for j0 in range(0, len(sources), per_pass):
        group = sources[j0:j0 + per_pass]
        edits = {}
        for g, s in enumerate(group):  # source group[g] ablates rows g·K .. g·K + K − 1
            path = adapter.site(site, s).path
            edit = _ablator(dims, intervention_scale, None, g * K)
            edits[path] = edit if path not in edits else _chain(edits[path], edit)  # a source given twice
        if len(group) not in clean_by_size:
            clean_by_size[len(group)] = run(len(group))
        out = run(len(group), edits).reshape(len(group), K, -1).transpose(0, 1)  # (K, len(group), n_layers)
        twin = clean_by_size[len(group)].reshape(len(group), K, -1).transpose(0, 1)  # same rows, unablated
        ablated[:, j0:j0 + len(group)] = out
        change[:, j0:j0 + len(group)] = out - twin
    clean = clean_by_size[min(len(sources), per_pass)][:K]  # (K, n_layers): the first pass's first block
    if not (torch.isfinite(clean).all() and torch.isfinite(ablated).all()):
        raise FloatingPointError(f"non-finite residual readouts (intervention scale {intervention_scale:g} "
                                 "overflows the model's dtype); use a smaller intervention scale")
    return {"dims": dims[back].numpy(), "sources": np.asarray(sources), "targets": np.arange(adapter.n_layers),
            "clean": clean[back].numpy(), "ablated": ablated[back].numpy(), "change": change[back].numpy()}


def cross_layer_causal_influence(model, tokenizer, prompt: str, dim: int, source_layer: int, target_layer: int,
                                 site: str = "residual", intervention_scale: float = 0.0) -> dict:
    """{"clean", "ablated", "change"} of residual dimension `dim` after `target_layer` when `dim` of `site`
    is ablated at `source_layer` (last position). Layers: whole numbers in 0..n_layers−1."""
    target_layer = check_layer(get_adapter(model), target_layer, "target_layer")
    m = cross_layer_matrix(model, tokenizer, prompt, [dim], site, intervention_scale, sources=[source_layer])
    return {"clean": float(m["clean"][0, target_layer]), "ablated": float(m["ablated"][0, 0, target_layer]),
            "change": float(m["change"][0, 0, target_layer])}


# --------------------------------------------------------------------------------------------------
# Plots (consume the numbers above only)
# --------------------------------------------------------------------------------------------------
def plot_causal_impacts(scores: np.ndarray, dims: np.ndarray, top_k: int, layer: int, site: str, plots_dir,
                        prefix: str, low: np.ndarray | None = None, high: np.ndarray | None = None) -> list[str]:
    """The top `top_k` mean KLs as bars (with their 95% intervals `low`..`high` (n_dims,) when given), and
    the distribution of every dimension's mean KL."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from utils import save_figure

    order = np.argsort(-scores, kind="stable")[:check_top_k(top_k)]
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    err = None if low is None else np.clip(np.stack([scores[order] - low[order], high[order] - scores[order]]),
                                           0.0, None)  # (2, k); a percentile can sit a rounding error past the mean
    ax.bar(range(len(order)), scores[order], color="tab:red", yerr=err, capsize=3)
    ax.set_xticks(range(len(order)), [str(int(dims[i])) for i in order], rotation=45)
    ax.set(title=f"Top {len(order)} causal dimensions, {site} layer {layer}"
                 + ("" if low is None else " (95% bootstrap interval over prompts)"), xlabel="dimension",
           ylabel="mean KL(p_clean ‖ p_ablated) (nats)")
    top = save_figure(fig, plots_dir, f"{prefix}_causal_top_{site}_layer{layer}")
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    positive = scores[scores > 0]
    if positive.size:
        ax.hist(np.log10(positive), bins=50, color="tab:blue")
    ax.set(title=f"Impact distribution over {scores.size} dimensions ({scores.size - positive.size} exactly 0)",
           xlabel="log10(mean KL(p_clean ‖ p_ablated) / 1 nat)", ylabel="dimensions (count)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    dist = save_figure(fig, plots_dir, f"{prefix}_causal_distribution_{site}_layer{layer}")
    return [top, dist]


def _plain(value, _pos=None) -> str:
    """A tick label as a plain number (0.001, 0.02, 1e-05), never as a power-of-ten product."""
    return "0" if value == 0 else f"{value:.3g}"


def plot_inter_layer(curves: dict, site: str, plots_dir, prefix: str) -> str:
    """curves: dim -> [(layer, mean KL, low, high)] (low/high None: no band), optionally followed by
    (Δ log p(clean top-1), its low, its high): then a second panel shows it. The KL axis (≥ 0) starts at 0
    and is linear up to the smallest positive value drawn and logarithmic above it, with plain tick labels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from utils import save_figure

    with_dlp = all(len(p) >= 7 for points in curves.values() for p in points) and bool(curves)
    fig, axes = plt.subplots(1, 2 if with_dlp else 1, figsize=(15 if with_dlp else 9, 4.5), squeeze=False,
                             constrained_layout=True)
    ax = axes[0, 0]
    drawn = []
    for dim, points in curves.items():
        layers = [p[0] for p in points]
        (line,) = ax.plot(layers, [p[1] for p in points], marker="o", label=f"dim {dim}")
        drawn += [p[1] for p in points]
        if all(p[2] is not None for p in points):
            ax.fill_between(layers, [max(0.0, p[2]) for p in points], [p[3] for p in points], color=line.get_color(),
                            alpha=0.2)
            drawn += [p[3] for p in points]
        if with_dlp:
            dax = axes[0, 1]
            dax.plot(layers, [p[4] for p in points], marker="o", color=line.get_color(), label=f"dim {dim}")
            if all(p[5] is not None for p in points):
                dax.fill_between(layers, [p[5] for p in points], [p[6] for p in points], color=line.get_color(),
                                 alpha=0.2)
    positive = [v for v in drawn if v is not None and v > 0]
    top = max(positive, default=1.0)
    linthresh = 10.0 ** np.floor(np.log10(max(min(positive, default=1e-6), top * 1e-4)))
    ax.set_yscale("symlog", linthresh=linthresh, linscale=0.5)
    ax.set_ylim(0, top * 1.5)  # a KL is >= 0: the axis starts at 0 (a band's lower end is clipped there)
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, pos: ""))
    ax.set(title=f"Impact of ablating one {site} dimension at each layer (95% interval over prompts)",
           xlabel="layer (ablated)", ylabel=f"mean KL(p_clean ‖ p_ablated) (nats)\nlinear below {_plain(linthresh)}, "
                                            "log above")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    if with_dlp:
        dax = axes[0, 1]
        dax.axhline(0, color="grey", lw=0.8)
        dax.set(title="Change of log p of the clean top-1 token (95% interval over prompts)", xlabel="layer (ablated)",
                ylabel="mean Δ log p(clean top-1) (nats)")
        dax.xaxis.set_major_locator(MaxNLocator(integer=True))
        dax.yaxis.set_major_formatter(FuncFormatter(_plain))
        dax.legend()
    return save_figure(fig, plots_dir, f"{prefix}_inter_layer_{site}")


CELL_NUMBERS_UP_TO = 12  # a cross-layer grid of at most this many layers a side has its values written in


def plot_cross_layer(matrix: dict, site: str, plots_dir, prefix: str) -> str:
    """Per chosen dimension k, the mean over prompts of (residual dim k after target layer t with k of the
    site ablated at source layer s) − (the same, clean): one panel each, on one shared symmetric colour
    scale with one labelled colour bar, the values written in the cells when the grid is at most
    CELL_NUMBERS_UP_TO layers a side; targets before the source (exactly 0 by causality) in grey."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    n = len(matrix["dims"])
    changes = [np.asarray(c, dtype=np.float64) for c in matrix["change"]]
    sources = np.asarray(matrix.get("sources", np.arange(changes[0].shape[0])))
    targets = np.asarray(matrix.get("targets", np.arange(changes[0].shape[1])))
    before = sources[:, None] > targets[None, :]  # target before the source: no effect by causality
    lim = max((float(np.abs(c).max()) for c in changes), default=0.0) or 1.0
    S, T = changes[0].shape
    cell = max(0.45, min(0.9, 6.0 / max(S, T)))
    fig, axes = plt.subplots(1, n, figsize=(cell * T * n + 1.8, cell * S + 1.4), constrained_layout=True,
                             squeeze=False)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")
    im = None
    for ax, k, change in zip(axes[0], matrix["dims"], changes):
        im = ax.imshow(np.ma.masked_where(before, change), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        ax.set(title=f"dim {int(k)}: ablated − clean", xlabel="target layer t", ylabel="source layer s (ablated)")
        ax.set_xticks(range(T), [str(int(t)) for t in targets])
        ax.set_yticks(range(S), [str(int(s)) for s in sources])
        if max(S, T) <= CELL_NUMBERS_UP_TO:
            for s in range(S):
                for t in range(T):
                    if not before[s, t]:
                        v = change[s, t]
                        ax.text(t, s, f"{v:.2g}", ha="center", va="center", fontsize=7,
                                color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=list(axes[0]), label=f"change of residual dim k after layer t (ablated − clean;\nthe "
                                             "residual stream's activation units), one scale for every panel",
                 shrink=0.9)
    fig.suptitle(f"Cross-layer effect of ablating {site} dims, mean over prompts (grey: target before source, "
                 "0 by causality)", fontsize=10)
    return save_figure(fig, plots_dir, f"{prefix}_cross_layer_{site}")


# --------------------------------------------------------------------------------------------------
# The causal stages (causal, inter_layer, cross_layer): they share the prompt pass's clean runs
# --------------------------------------------------------------------------------------------------
KL_DEFINITION = ("KL(p_clean || p_ablated) = sum_v p_clean(v) (log p_clean(v) - log p_ablated(v)) of the next-token "
                 "distribution at the prompt's last position, natural log (nats); p_clean is the unablated pass along "
                 "the ablated rows' own path from the same layer (it reproduces the model's own clean run within "
                 "reproduction_check's allowance), so that an ablation that changes nothing scores 0")
DELTA_LOGP_DEFINITION = ("log p_ablated(t) - log p_clean(t), natural log, t = the prompt's clean top-1 next token "
                         "(clean_predictions[i][0]); negative: the ablation lowers the probability of the clean "
                         "prediction; from the same ablated forward as the KL")
ABLATION_DEFINITION = ("zero ablation: dimension k of the site multiplied by intervention_scale at every position "
                       "(0: set to 0); mean ablation: set to its mean over every position of every prompt's clean "
                       "run (those means are computed once, on all prompts, and held fixed across bootstrap draws)")
INTERVAL_DEFINITION = ("low, high: the 95% percentile-bootstrap interval of the mean over prompts (prompts drawn with "
                       "replacement, see interval_method); None with one prompt")


def _site(ctx) -> str:
    return ctx.opts.causal_site or ctx.adapter.default_causal_site


def scale_of(opts) -> float:
    """The zero ablation's factor of a run's options: --intervention_scale, default 0."""
    return 0.0 if opts.intervention_scale is None else opts.intervention_scale


def _prompt_resamples(ctx, n: int) -> stats.Resamples:
    return stats.Resamples.draw(n, ctx.opts.bootstrap_resamples, ctx.opts.seed, "prompts")


def _bounds(per_prompt: np.ndarray, res: stats.Resamples) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(low, high) of the mean over axis 0 of per-prompt values (n_prompts, ...), or (None, None)."""
    return stats.intervals(per_prompt.mean(0), res.means(per_prompt), res)


def _run_causal(ctx):
    """KL impact and Δ log p(clean top-1) of ablating every dimension (or --causal_dims) of the site at
    --layer, per prompt; their means over the prompts with bootstrap intervals; the top list by mean KL
    with each dimension's rank stability."""
    from functools import partial

    o, site = ctx.opts, _site(ctx)
    cleans = ctx.clean_runs(site)
    eff = causal_effects_by_layer(ctx.model, ctx.tokenizer, o.prompt_list, [ctx.layer], site=site,
                                  intervention_scale=scale_of(ctx.opts), ablation=o.ablation, dims=o.causal_dims,
                                  batch_size=o.causal_batch_size, progress=ctx.progress, cleans=cleans)
    kl, dlp = eff.kl[:, 0], eff.delta_logp[:, 0]  # (n_prompts, n_dims) each
    scores, dl = kl.mean(0), dlp.mean(0)  # (n_dims,)
    dims = np.arange(kl.shape[1]) if o.causal_dims is None else np.asarray(o.causal_dims)
    res = _prompt_resamples(ctx, kl.shape[0])
    resampled = res.means(kl)  # (R, n_dims)
    low, high = stats.intervals(scores, resampled, res)
    dl_low, dl_high = _bounds(dlp, res)
    top = stats.ranked(scores, ctx.top_k, resampled, res, ids=dims, key="dim")
    where = {int(d): i for i, d in enumerate(dims)}
    for e in top:  # Δ log p(clean top-1) beside the KL
        i = where[e["dim"]]
        e.update(delta_logp_top1=float(dl[i]), delta_logp_top1_low=None if dl_low is None else float(dl_low[i]),
                 delta_logp_top1_high=None if dl_high is None else float(dl_high[i]))
    predictions = clean_top_tokens(cleans, ctx.tokenizer, 5)
    results = {"layer": ctx.layer, "site": site, "ablation": o.ablation,
               "intervention_scale": scale_of(ctx.opts) if o.ablation == "zero" else None,  # mean: not used
               "prompts": o.prompt_list, "n_prompts": int(kl.shape[0]), "n_dims": int(kl.shape[1]),
               "clean_predictions": [{"prompt": p, "top": t} for p, t in zip(o.prompt_list, predictions)],
               "ranked_by": "scores (the mean KL over prompts); delta_logp_top1 is shown beside, not used to rank",
               "top_neurons": top, "ties": stats.ties_note(top, "dim"),
               "dims": dims, "scores": scores, "scores_low": low, "scores_high": high, "scores_per_prompt": kl,
               "delta_logp_top1": dl, "delta_logp_top1_low": dl_low, "delta_logp_top1_high": dl_high,
               "delta_logp_top1_per_prompt": dlp, "n_zero": int((scores == 0).sum()),
               "interval_method": res.method(), "reproduction_check": reproduction_check(eff, cleans),
               "definitions": {
                   "scores": f"per dimension: the mean over prompts of {KL_DEFINITION}; scores_per_prompt "
                             "(n_prompts, n_dims) holds each prompt's KL, and its mean over prompts is scores",
                   "delta_logp_top1": f"per dimension: the mean over prompts of {DELTA_LOGP_DEFINITION}; "
                                      "delta_logp_top1_per_prompt (n_prompts, n_dims) holds each prompt's value",
                   "ablation": ABLATION_DEFINITION, "reproduction_check": REPRODUCTION_CHECK_DEFINITION,
                   "low/high": INTERVAL_DEFINITION + " (scores_low/high, delta_logp_top1_low/high: every dimension)",
                   "stability": f"by the resampled mean KL: {stats.STABILITY_DEFINITION}",
                   "rank": "competition rank by mean KL (1 = highest); scores within a relative 1e-6 share a rank "
                           "and are marked tied",
                   "clean_predictions": "each prompt's 5 most probable next tokens under the unablated model, "
                                        "with p_clean (the tokenizer's decoding of each token id)"}}
    if ctx.adapter.hybrid and ctx.adapter.path_sites:
        results["path_effects"] = path_effects(ctx)
        results["definitions"]["path_effects"] = PATH_EFFECTS_DEFINITION
    return results, [partial(plot_causal_impacts, scores, dims, ctx.top_k, ctx.layer, site, ctx.plots_dir,
                             ctx.prefix, low, high)]


PATH_EFFECTS_DEFINITION = (
    "a layer with parallel paths (Falcon-H1: the state-space mixer and attention read the same input): each path's "
    "whole output ablated at once (every dimension of its site, ssm_path or attn_path, with the stage's ablation), "
    "per prompt KL(p_clean ‖ p_ablated) and Δ log p(clean top-1) as for one dimension; mean over prompts [95% "
    "interval]. Per unit: run the causal stage with --causal_site ssm_path or attn_path")


def path_effects(ctx) -> dict:
    """{path site: its whole output's effect at ctx.layer}: KL and Δ log p(clean top-1) per prompt, their means
    with intervals over prompts, and the reproduction check (`PATH_EFFECTS_DEFINITION`)."""
    o = ctx.opts
    out = {}
    for site in ctx.adapter.path_sites:
        cleans = ctx.clean_runs(site)
        mask = np.ones((1, ctx.adapter.site(site, ctx.layer).size), dtype=bool)  # (1, d): the whole path
        eff = set_ablation_effects(ctx.model, ctx.tokenizer, o.prompt_list, ctx.layer, mask, site=site,
                                   intervention_scale=scale_of(o), ablation=o.ablation, batch_size=o.causal_batch_size,
                                   progress=False, cleans=cleans)
        kl, dlp = eff.kl[:, 0, 0], eff.delta_logp[:, 0, 0]  # (n_prompts,) each
        res = _prompt_resamples(ctx, kl.shape[0])
        out[site] = {"kl": _mean_interval(kl, res), "delta_logp_top1": _mean_interval(dlp, res), "kl_per_prompt": kl, "delta_logp_top1_per_prompt": dlp,
                     "reproduction_check": reproduction_check(eff, cleans),
                     "description": ctx.adapter.sites[site].description}
    return out


def _mean_interval(per_prompt: np.ndarray, res: stats.Resamples) -> dict:
    """{"value": the mean of per-prompt values (n,), "low", "high": its interval (None where undefined)}."""
    low, high = _bounds(per_prompt[:, None], res)  # (1,) each, or None
    return {"value": float(per_prompt.mean()), "low": None if low is None else float(low[0]),
            "high": None if high is None else float(high[0])}


def _chosen_dims(ctx, n: int = 3) -> list[int]:
    """Every --causal_dims dimension, else the causal stage's top `n`."""
    if ctx.opts.causal_dims:
        return list(ctx.opts.causal_dims)
    causal = ctx.upstream("causal")
    if causal is None:
        raise ValueError("needs --causal_dims or a successful causal stage to choose its dimensions")
    return [t["dim"] for t in causal["top_neurons"][:n]]


def _selection_note(ctx) -> str | None:
    if ctx.opts.causal_dims:
        return None
    return (f"the dimensions are the causal stage's top ones at layer {ctx.layer}, chosen there by their impact on "
            "these prompts: their curves peak at that layer partly by selection")


def _run_inter_layer(ctx):
    """Impact of ablating each chosen dimension at every layer in turn: per prompt, and the mean over the
    prompts with its bootstrap interval at every layer (Δ log p(clean top-1) beside it)."""
    from functools import partial

    from models import NotApplicable
    from sparsity import site_layers

    o, site = ctx.opts, _site(ctx)
    dims = _chosen_dims(ctx)
    n_layers = ctx.adapter.n_layers
    layers, skipped = site_layers(ctx.adapter, range(n_layers), site)  # a hybrid's layers may lack the site
    kinds = {(ctx.adapter.has_ssm(la), ctx.adapter.site(site, la).size) for la in layers}
    if ctx.adapter.hybrid and site == "neurons" and len(kinds) > 1:
        raise NotApplicable("the neurons site is each layer's own, here of different kinds (a state-space mixer's "
                            "channels at some layers, a dense MLP's units at others): one dimension is not one unit "
                            "across this hybrid's layers; choose --causal_site block_out, residual or ssm")
    # the prompt pass's clean runs for every layer with the site; (layer, dim) ablations share passes
    eff = causal_effects_by_layer(ctx.model, ctx.tokenizer, o.prompt_list, layers, site=site,
                                  intervention_scale=scale_of(ctx.opts), ablation=o.ablation, dims=dims,
                                  batch_size=o.causal_batch_size, progress=ctx.progress,
                                  cleans=ctx.clean_runs(site))  # kl, delta_logp: (n_prompts, n_layers, n_dims)
    res = _prompt_resamples(ctx, eff.kl.shape[0])
    mean, dl = eff.kl.mean(0), eff.delta_logp.mean(0)  # (n_layers, n_dims)
    low, high = _bounds(eff.kl, res)
    dl_low, dl_high = _bounds(eff.delta_logp, res)

    def at(a, la, i):
        return None if a is None else float(a[la, i])

    curves = {str(d): [{"layer": la, "relative_depth": la / max(1, n_layers - 1), "score": float(mean[j, i]),
                        "low": at(low, j, i), "high": at(high, j, i),
                        "delta_logp_top1": float(dl[j, i]), "delta_logp_top1_low": at(dl_low, j, i),
                        "delta_logp_top1_high": at(dl_high, j, i)} for j, la in enumerate(layers)]
              for i, d in enumerate(dims)}
    results = {"site": site, "dims": dims, "n_prompts": int(eff.kl.shape[0]), "curves": curves,
               **({"layers_without_site": skipped} if skipped else {}),
               "scores_per_prompt": {str(d): eff.kl[:, :, i] for i, d in enumerate(dims)},
               "delta_logp_top1_per_prompt": {str(d): eff.delta_logp[:, :, i] for i, d in enumerate(dims)},
               "note": _selection_note(ctx), "interval_method": res.method(),
               "definitions": {
                   "score": f"the mean over prompts of {KL_DEFINITION}, dimension ablated at that layer only",
                   "delta_logp_top1": f"the mean over prompts of {DELTA_LOGP_DEFINITION}",
                   "scores_per_prompt": "per dimension, (n_prompts, n_layers): each prompt's KL",
                   "ablation": ABLATION_DEFINITION, "low/high": INTERVAL_DEFINITION}}
    plotted = {d: [(c["layer"], c["score"], c["low"], c["high"], c["delta_logp_top1"], c["delta_logp_top1_low"],
                    c["delta_logp_top1_high"]) for c in curve] for d, curve in curves.items()}
    return results, [partial(plot_inter_layer, plotted, site, ctx.plots_dir, ctx.prefix)]


def _run_cross_layer(ctx):
    """Ablate each chosen dimension at every source layer, read it in the residual stream after every
    target layer (last position), per prompt; the means over the prompts with a bootstrap interval for
    every entry of the change. Its passes are full forwards with clean twins of the same batch shape
    (`cross_layer_matrix`), not the prompt pass's clean runs."""
    from functools import partial

    from sparsity import site_layers

    o, a = ctx.opts, ctx.adapter
    site = _site(ctx)
    sources, _ = site_layers(a, range(a.n_layers), site)  # a hybrid's layers may lack the site
    if not sources or any(a.site(site, la).size != a.hidden_size for la in sources):
        site, sources = "residual", list(range(a.n_layers))
    chosen = _chosen_dims(ctx)
    dims = [d for d in chosen if d < a.hidden_size]
    if not dims:
        raise ValueError(f"no chosen dimension lies in the residual stream (width {a.hidden_size})")
    per = [cross_layer_matrix(ctx.model, ctx.tokenizer, p, dims, site=site, intervention_scale=scale_of(ctx.opts),
                              sources=sources, batch_size=o.causal_batch_size) for p in o.prompt_list]
    stacked = {k: np.stack([x[k] for x in per]) for k in ("clean", "ablated", "change")}  # (n_prompts, ...)
    m = {k: v.mean(0) for k, v in stacked.items()}  # clean (K, T); ablated, change (K, S, T)
    m.update(dims=per[0]["dims"], sources=per[0]["sources"], targets=per[0]["targets"])
    res = _prompt_resamples(ctx, len(per))
    low, high = _bounds(stacked["change"], res)  # (K, S, T) each, or None
    strongest = []
    for i, d in enumerate(m["dims"]):  # per dim: the (source, target ≥ source) entry of largest |mean change|
        after = np.where(m["sources"][:, None] <= m["targets"][None, :], np.abs(m["change"][i]), -1.0)  # (S, T)
        s, t = np.unravel_index(int(np.argmax(after)), after.shape)
        strongest.append({"dim": int(d), "source": int(m["sources"][s]), "target": int(m["targets"][t]),
                          "value": float(m["change"][i, s, t]),
                          "low": None if low is None else float(low[i, s, t]),
                          "high": None if high is None else float(high[i, s, t])})
    before = max(float(np.abs(stacked["change"][:, :, j, :s]).max(initial=0.0))
                 for j, s in enumerate(m["sources"]))
    results = {"site": site, "readout": "residual stream after each target layer, last position, "
                                        "mean over prompts", **m, "n_prompts": len(per),
               "change_low": low, "change_high": high, "change_per_prompt": stacked["change"],
               "largest_change": strongest,
               "left_out_dims": [d for d in chosen if d not in dims],
               "max_abs_change_before_source": before, "interval_method": res.method(),
               "definitions": {
                   "change": "per dimension k, source s, target t: the mean over prompts of (residual dimension k "
                             "after layer t with k of the site ablated at layer s) − (the same, unablated), at the "
                             "last position; clean, ablated: the two terms' means; change_per_prompt (n_prompts, "
                             "n_dims, n_sources, n_targets): each prompt's change",
                   "change_low/change_high": INTERVAL_DEFINITION + ", for every entry of change",
                   "largest_change": "per dimension: the entry with target >= source of largest |mean change|, "
                                     "with its signed mean and interval (the entry is chosen by its size, so the "
                                     "interval is conditional on that choice)",
                   "max_abs_change_before_source": "the largest |change| of any prompt at a target before its "
                                                   "source layer: exactly 0 by causality"}}
    return results, [partial(plot_cross_layer, m, site, ctx.plots_dir, ctx.prefix)]


def _stability(e: dict) -> str:
    return "n/a" if e.get("stability") is None else f"{100 * e['stability']:.0f}%"


def _interval(e: dict, key: str) -> dict:
    return {"value": e[key], "low": e.get(f"{key}_low" if key != "score" else "low"),
            "high": e.get(f"{key}_high" if key != "score" else "high")}


def causal_summary(r: dict) -> str:
    lines = [f"    {r['n_dims']} dims of {r['site']} at layer {r['layer']}, {r['n_prompts']} prompts, "
             f"{r['ablation']} ablation; {r['n_zero']} dims with impact exactly 0\n"]
    tops = [c["top"][0] for c in r["clean_predictions"]]
    ps = np.array([t["p"] for t in tops])
    lines.append(f"    clean top-5 next tokens per prompt with p_clean (top-1 p: median {np.median(ps):.2f}, "
                 f"{int((ps >= 0.5).sum())} of {len(ps)} at p >= 0.5):\n")
    for c in r["clean_predictions"]:
        prompt = c["prompt"] if len(c["prompt"]) <= 44 else "…" + c["prompt"][-43:]
        lines.append(f"      {prompt!r:>48} -> " + ", ".join(f"{t['token']!r} {t['p']:.2f}" for t in c["top"]) + "\n")
    k = len(r["top_neurons"])
    lines.append(f"    top causal dims by mean KL (nats) [95% interval over prompts], top-{k} stability; "
                 "mean Δ log p(clean top-1):\n")
    for e in r["top_neurons"]:
        lines.append(f"      dim {e['dim']:>5}: {stats.shown(_interval(e, 'score'))}, stability {_stability(e)}; "
                     f"Δ log p {stats.shown(_interval(e, 'delta_logp_top1'))}\n")
    if r.get("ties"):
        lines.append(f"    ties: {r['ties']}\n")
    for path, e in (r.get("path_effects") or {}).items():
        lines.append(f"    {path} ablated whole: KL {stats.shown(e['kl'])} nats, Δ log p {stats.shown(e['delta_logp_top1'])}\n")
    check = r.get("reproduction_check")
    if check:
        lines.append(f"    reproduction check: the ablation path within {check['path_largest_distance']:.2g} nats of the "
                     f"model's float64 log p (the model's own forward: {check['model_own_largest_distance']:.2g}; allowed "
                     f"{check['allowance']:.2g})\n")
    return "".join(lines)


def inter_layer_summary(r: dict) -> str:
    lines = []
    for d, curve in r["curves"].items():
        best = max(curve, key=lambda c: c["score"])
        lines.append(f"    dim {d}: largest mean KL at layer {best['layer']} ({stats.shown(_interval(best, 'score'))}"
                     f" nats over {r['n_prompts']} prompts)\n")
    if r.get("note"):
        lines.append(f"    note: {r['note']}\n")
    return "".join(lines)


def cross_layer_summary(r: dict) -> str:
    text = (f"    dims {list(map(int, r['dims']))} of {r['site']}, {r['n_prompts']} prompts; largest |change| before "
            f"the source layer: {r['max_abs_change_before_source']:.1e} (causality: must be 0)\n")
    for e in r["largest_change"]:
        text += (f"    dim {e['dim']}: largest |mean change| at source {e['source']} -> target {e['target']}: "
                 f"{stats.shown(e)}\n")
    if r["left_out_dims"]:
        text += f"    dims {r['left_out_dims']} left out: beyond the residual stream's width\n"
    return text


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("causal", _run_causal, causal_summary, per_layer=True))
    register(Stage("inter_layer", _run_inter_layer, inter_layer_summary, needs=("causal",)))
    register(Stage("cross_layer", _run_cross_layer, cross_layer_summary, needs=("causal",)))


_register()
