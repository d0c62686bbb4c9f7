"""Attention neurons: Mamba's hidden attention and a Transformer's attention, one set of definitions.

Shapes: b batch, L tokens, e units of the layer, g the units of one group, H heads; α (e, L, L) indexed
[c, i, j] (query i, key j); x and g (L, e).

**The unit ("attention neuron") on each side.** Every layer is written as e independent token mixers
y^c_i = Σ_j α^c[i, j] x^c_j (+ D_c x^c_i in Mamba), one per unit c:
- Mamba-1: the e channels of the inner width (d_inner). α^c is channel c's hidden attention
  α^c[i, j] = Σ_n C_i[n] exp(A[c, n] (S^c_i − S^c_j)) Δ^c_j B_j[n] (j ≤ i, S^c the cumulative Δ), x^c the
  channel's scan input; the identity y = α x + D x is the selective scan. α is computed block-wise by
  `ssm.hidden_attention_groups` from the recomputed Δ, A, B, C and verified: `(α x + D x) · SiLU(z)`
  through `out_proj` must equal the mixer's real output, or ReconstructionError is raised.
- Transformer (GPT-2, GPT-NeoX): the d dimensions of the attention output before the output projection
  (H heads × d/H dims, c = head · d/H + k). α^c = A_h, the softmax attention weights of c's head h
  (shared by its d/H dims), x^c the value dimension c; the identity y = α x (no D) is the attention
  itself. A and the values are the model's own (eager attention weights, the q/k/v projection's output) and
  are verified: the output projection of α x must equal the projection's real output.
The same method functions then score both, so the numbers are of the same kind (their scale is not
comparable across models: α x is Δ-weighted on one side and a convex mix on the other; the diversity is
scale-free).

**The methods are one registry**, `METHOD_SPECS` ({name: `MethodSpec`}; METHODS and DEFINITIONS are derived
from it): each spec says what the method computes, whether it needs the gradient g or reads the layers
below (rollout), its reference function and the forms the streamed path uses; the code asks the spec,
never the name, so another method is one more entry.

The method functions (`attention_weighted`, `gradient_guided`, `rollout_layer`) are pure functions of one
example's arrays: the reference path. Each is built from unit-local parts (per-unit rows and a sum over
units), so `AttentionNeurons.text_scores` (what the attention stage runs) scores α one unit group at a
time, as the groups are computed, and never holds α whole; it equals the reference path
(`extract_attention_vectors` + `create_neurons`) to float rounding (tested). It forms each unit's row sums
from matrix products of α⁺ = max(α, 0) and α⁻ = max(−α, 0) with x⁺ and x⁻ (`_fast_parts`: every term
non-negative, nothing cancels) and rollout's from |α| and its row sums, instead of a (units, L, L)
product per method; once per head where a head's units share α; and the (L, L) token maps only for the
texts whose maps are kept.

**Scores per query token, texts weighted by tokens.** A unit's activation in one text is the mean over
query positions i of what it moves into token i (a contribution method's row sum Σ_j contrib^c[i, j];
rollout's share of token i's relevance from other tokens), so it does not shrink or grow with the text's
length; over the texts it is the token-weighted mean (every query token counts once), with a 95%
percentile-bootstrap interval over the texts (`stats`) and, for each unit of a top-k list, its rank
stability. gradient_guided's gradient is of `--attention_target` (`TARGETS`): by default the text's own
log-likelihood of its next tokens summed over every position, so that every query token has a target
(the argmax at the last position is the other choice: one token, far from most query positions). Each
text's target is recorded.

**Undefined scores are said, never shown as numbers.** Rollout's activation (the share of a token's
relevance from other tokens) is undefined for a one-token text, and so is gradient_guided's under the
likelihood target (a one-token text has no next token of its own): such a text gives None (`NeuronScores`)
and is left out of that method's mean (`n_texts_averaged`). With no text left, or when every unit's
averaged activation is 0 (no ranking, no distribution over the units), the method's entry has None / [] in
the fields concerned and `undefined` maps each such field to its reason (`UNDEFINED`); `undefined` is an
empty dict when everything is defined.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from causal_analysis import check_layer, check_layers, check_token_ids, check_top_k
from models import NotApplicable, get_adapter, require_mamba
from passes import DEFAULT_TARGET, TARGETS, check_target
from ssm import (ReconstructionCheck, apply_hidden_attention, channel_D, check_reconstruction,
                 gate_output, hidden_attention_by_channel, project_out, ssm_projections)

logger = logging.getLogger(__name__)

UNITS = {
    "mamba": "channel c of the inner width (e units): alpha^c = the channel's hidden attention "
             "sum_n C_i[n] exp(A[c,n] (S_i - S_j)) Delta_j B_j[n] (j <= i), x^c = its scan input, y = alpha x + D x "
             "(the selective scan)",
    "mamba2": "channel c of the inner width (I units = H heads x P): alpha^c = alpha_h of c's head h, "
              "(C_i . B_j) exp(A_h sum_{k=j+1..i} Delta_k) Delta_j (j <= i, B and C of h's group, one Delta and A per "
              "head), x^c = its scan input, y = alpha x + D_h x (the scan, before the gated RMS norm)",
    "transformer": "dimension c of the attention output before the output projection (d units = H heads x d/H): "
                   "alpha^c = A_h, the softmax attention of c's head h, x^c = value dimension c, y = alpha x",
}


UNDEFINED = {
    "rollout_one_token": "undefined: rollout needs a text of at least 2 tokens (in a one-token text no other token "
                         "carries relevance to it)",
    "all_zero": "undefined: every unit's activation is 0 (no ranking of the units and no distribution over them)",
    "one_unit": "undefined: one unit (diversity is normalised by log(number of units) = 0)",
}


# Rollout's weight of the identity (the residual path): Abnar & Zuidema's 0.5.
IDENTITY_WEIGHT = 0.5


@dataclass
class NeuronScores:
    """One method's scores for one layer: `neuron_activations` (e,) per query token (module doc), None
    where undefined, with the reason in `undefined`."""

    method: str
    neuron_activations: np.ndarray | None  # (e,)
    token_map: np.ndarray | None  # (L, L) [query i, key j]; None where not formed (`score_groups`)
    undefined: str | None = None  # why neuron_activations is None


@dataclass
class TextScores:
    """`AttentionNeurons.text_scores` for one batch of texts at one layer."""

    scores: dict  # {method: NeuronScores}: activations averaged over the batch, first example's map
    attention_vectors: torch.Tensor | None  # (b, L, L): mean over channels of α (None without maps)
    reconstruction: ReconstructionCheck  # (α x + D x) through the gate and out_proj against the mixer's output
    rollout_R: list | None = None  # per example, the rolled-out map R_ℓ (L, L) when rollout was scored
    targets: list | None = None  # per example, the gradient's target record (`passes.target_value`); None: no g
    n_tokens: int = 0  # L, each example's tokens


class MixerProjections(NamedTuple):
    """`ssm.ssm_projections`' result by name: all that α needs (no scan
    output). Mamba-1 shapes below; Mamba-2: Δ (b, L, H), B and C (b, L, G, N), A and D (H,)."""

    x: torch.Tensor  # (b, L, e)
    z: torch.Tensor  # (b, L, e)
    delta: torch.Tensor  # (b, L, e)
    B: torch.Tensor  # (b, L, n)
    C: torch.Tensor  # (b, L, n)
    A: torch.Tensor  # (e, n)
    D: torch.Tensor  # (e,)


def _batch_mean(method: str, per: list[NeuronScores]) -> NeuronScores:
    """Activations averaged over the examples of a batch (those where defined; the examples of a batch
    have one length, so all or none are); the first example's token map."""
    acts = [p.neuron_activations for p in per if p.neuron_activations is not None]
    return NeuronScores(method, np.mean(acts, axis=0) if acts else None, per[0].token_map,
                        None if acts else per[0].undefined)


def _contribution_parts(contrib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums Σ_j contrib^c[i, j] (c, L) and the channel sum Σ_c contrib^c (L, L) of contributions
    (c, L, L). Channel-local, so channel groups can be done apart and joined."""
    return contrib.sum(-1), contrib.sum(0)


def _contribution_scores(method: str, rows: torch.Tensor, map_sum: torch.Tensor | None, e: int) -> NeuronScores:
    """From the joined parts of all e channels: activation_c = (1/L) Σ_i Σ_j contrib^c[i, j], the mean over
    query positions of what unit c moves into token i; token map = mean over channels of contrib^c."""
    activations = rows.mean(-1)  # (e,)
    token_map = None if map_sum is None else (map_sum / e).cpu().numpy()
    return NeuronScores(method, activations.cpu().numpy(), token_map)


def _row_inverse(rows: torch.Tensor) -> torch.Tensor:
    """1 / r for row sums r = Σ_j |α_ij| (..., L); 0 where r = 0 (a row that carries nothing)."""
    zero = rows == 0
    return torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, rows))


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
    """contrib^c[i, j] = ReLU(g^c_i · α^c[i, j] · x^c_j) with g^c_i = ∂ T / ∂ y^c_i (autograd; the target T:
    `passes.TARGETS`, chosen by the caller of the gradient forward). Scores as in `_contribution_scores`.
    α (e, L, L), x and g (L, e)."""
    return _contribution_scores("gradient_guided", *_contribution_parts(_gradient_contrib(alpha, x, g)),
                                alpha.shape[0])


def _rownorm(m: torch.Tensor) -> torch.Tensor:
    return m / m.sum(-1, keepdim=True)


def _unit_rows(alpha: torch.Tensor) -> torch.Tensor:
    """P = rownorm(|α|) (..., L, L): each query row of |α| as a distribution over its keys; an all-zero row
    (the unit carries nothing into token i) becomes the identity's row (token i keeps its own relevance)."""
    m = alpha.abs()
    rows = m.sum(-1, keepdim=True)  # (..., L, 1)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return torch.where(rows > 0, m / torch.where(rows > 0, rows, 1.0), eye)


def rollout_step(alpha: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """R_ℓ = Â_ℓ · R_{ℓ-1} with Â_ℓ = w I + (1 − w) mean_c rownorm(|α^c_ℓ|), w = IDENTITY_WEIGHT, and
    R_{-1} = I. α (e, L, L)."""
    L = alpha.shape[-1]
    eye = torch.eye(L, dtype=alpha.dtype, device=alpha.device)
    previous = eye if previous is None else previous
    w = IDENTITY_WEIGHT
    return (w * eye + (1 - w) * _unit_rows(alpha).mean(0)) @ previous  # (L, L)


def _rollout_parts(alpha: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For channels α (c, L, L) and R_{ℓ-1} (L, L): carried (c, L) = (1 − w)(1 − (P^c R)[i, i]) (see
    `rollout_layer`) and
    Σ_c P^c (L, L), P^c = rownorm(|α^c|). Channel-local, so channel groups can be done apart and joined."""
    # only the diagonal of P^c R is used: (P^c R)[i, i] = Σ_k P^c[i, k] R[k, i]: c·L² work instead of the
    # c·L³ of forming every P^c R
    P = _unit_rows(alpha)  # (c, L, L)
    own = (P * previous.T).sum(-1)  # (c, L): (P^c R)[i, i]
    return (1 - IDENTITY_WEIGHT) * (1.0 - own), P.sum(0)


def _rollout_scores(carried: torch.Tensor, p_sum: torch.Tensor, e: int, previous: torch.Tensor
                    ) -> tuple[NeuronScores, torch.Tensor]:
    """`rollout_layer`'s result from the joined parts of all e channels: carried (e, L), Σ_c P^c (L, L).
    For L = 1 the scores are undefined (None, UNDEFINED["rollout_one_token"]); R is still formed."""
    L = p_sum.shape[-1]
    eye = torch.eye(L, dtype=p_sum.dtype, device=p_sum.device)
    w = IDENTITY_WEIGHT
    R = (w * eye + (1 - w) * p_sum / e) @ previous  # (L, L), = rollout_step(alpha, previous)
    if L < 2:
        return NeuronScores("rollout", None, R.cpu().numpy(), UNDEFINED["rollout_one_token"]), R
    return NeuronScores("rollout", carried.mean(-1).cpu().numpy(), R.cpu().numpy()), R


def rollout_layer(alpha: torch.Tensor, previous: torch.Tensor | None = None) -> tuple[NeuronScores, torch.Tensor]:
    """One step of attention rollout (Abnar & Zuidema 2020), on the same footing for every family.

    P^c = rownorm(|α^c_ℓ|) (each query row a distribution over the keys; for softmax attention P = A
    exactly); Â^c = w I + (1 − w) P^c with w = IDENTITY_WEIGHT (the residual path); Â_ℓ = mean_c Â^c;
    R_ℓ = Â_ℓ · R_{ℓ-1} (R_{-1} = I). Unit c's end-to-end map: Ĉ^c = Â^c · R_{ℓ-1}, rows summing to 1, of
    which its own part (1 − w) P^c R_{ℓ-1} carries (1 − w) of each row. activation_c = mean over query
    positions i of (1 − w)(1 − (P^c R_{ℓ-1})[i, i]), the share of token i's end-to-end relevance that the
    unit's own part carries from *other* tokens (the identity part, the same for every unit, is left out;
    None for L = 1: no other token). Bounds: 0 ≤ activation ≤ 1 − w at every layer, for every family.
    Token map = R_ℓ. Returns (scores, R_ℓ). α (e, L, L), previous (L, L).
    """
    L = alpha.shape[-1]
    previous = torch.eye(L, dtype=alpha.dtype, device=alpha.device) if previous is None else previous
    return _rollout_scores(*_rollout_parts(alpha, previous), alpha.shape[0], previous)


# --------------------------------------------------------------------------------------------------
# The methods: one registry. What differs between methods is in its MethodSpec; the reference path, the
# streamed path and the attention stage ask the spec, never the name.
# --------------------------------------------------------------------------------------------------
def _pos_neg(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t⁺, t⁻) = (max(t, 0), max(−t, 0)): t = t⁺ − t⁻ and |t| = t⁺ + t⁻, exactly."""
    return t.clamp(min=0), (-t).clamp(min=0)


def _weighted_rows(Pp: torch.Tensor, Pn: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """Σ_j |α_ij x_j| = Σ_j (α⁺_ij + α⁻_ij)(x⁺_j + x⁻_j) (c, L), from `_signed_parts`' P⁺, P⁻."""
    return (Pp[0] + Pp[1]) + (Pn[0] + Pn[1])


def _weighted_shared_map(ap: torch.Tensor, an: torch.Tensor, x: torch.Tensor, g: torch.Tensor | None
                         ) -> torch.Tensor:
    """Σ_c |α_ij x^c_j| (L, L) for units sharing one α = α⁺ − α⁻ (L, L)."""
    return (ap + an) * x.abs().sum(1)[None, :]


def _gradient_rows(Pp: torch.Tensor, Pn: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_j ReLU(g_i α_ij x_j) = g⁺_i Σ_j (α⁺_ij x⁺_j + α⁻_ij x⁻_j) + g⁻_i Σ_j (α⁺_ij x⁻_j + α⁻_ij x⁺_j) (c, L)."""
    gp, gn = _pos_neg(g.T)  # (c, L): g⁺, g⁻
    return gp * (Pp[0] + Pn[1]) + gn * (Pp[1] + Pn[0])


def _gradient_shared_map(ap: torch.Tensor, an: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_c ReLU(g^c_i α_ij x^c_j) = α⁺ ⊙ (g⁺ x⁺ᵀ + g⁻ x⁻ᵀ) + α⁻ ⊙ (g⁺ x⁻ᵀ + g⁻ x⁺ᵀ) (L, L) for units sharing α."""
    (gp, gn), (xp, xn) = _pos_neg(g.T), _pos_neg(x)  # (c, L), (L, c)
    return ap * (gp.T @ xp.T + gn.T @ xn.T) + an * (gp.T @ xn.T + gn.T @ xp.T)


@dataclass(frozen=True)
class MethodSpec:
    """One attention-neuron method: all that the code asks of it, so that a method is one entry of
    METHOD_SPECS.

    `definition`: what it computes, in words (DEFINITIONS; the attention stage's JSON). `needs_gradient`:
    it reads g = ∂ T / ∂ y (one gradient forward per text; T the target). `reference` (α (e, L, L), x (L, e),
    g (L, e) or None, R_{ℓ-1} (L, L) or None for the identity) -> NeuronScores: its whole-α scoring of one
    example (the reference path, `create_neurons`). `kind` says how the streamed path (`_fast_parts`,
    `score_groups`) scores it:
    - "contribution": a non-negative contribution contrib^c[i, j] per unit, scored by
      `_contribution_scores`. `contribution` (α (c, L, L), x, g (L, c)) -> contrib (c, L, L) is its
      whole-α form (and the streamed token map of units with their own α); `signed_rows` (P⁺, P⁻ of
      `_signed_parts`, g) -> the row sums Σ_j contrib^c[i, j] (c, L), and `shared_map` (α⁺, α⁻ (L, L), x, g)
      -> Σ_c contrib^c (L, L) for units that share one α, its forms without a (c, L, L) product.
    - "rollout": attention rollout (`_rollout_parts` / `_fast_rollout`, `_rollout_scores`), continuing
      R_{ℓ-1} from the layers below: it reads them (`reads_lower_layers`) and gives R_ℓ."""

    name: str
    definition: str
    kind: str  # "contribution" | "rollout"
    needs_gradient: bool
    reference: Callable
    contribution: Callable | None = None
    signed_rows: Callable | None = None
    shared_map: Callable | None = None

    def __post_init__(self):
        forms = (self.contribution, self.signed_rows, self.shared_map)
        if not (self.kind == "contribution" and all(f is not None for f in forms)
                or self.kind == "rollout" and all(f is None for f in forms)):
            raise ValueError(f"method {self.name!r} of kind {self.kind!r}: a 'contribution' method gives "
                             f"contribution, signed_rows and shared_map, a 'rollout' method none of them")

    @property
    def reads_lower_layers(self) -> bool:
        """Rollout at layer ℓ continues R_{ℓ-1}, so every layer below ℓ is read as well."""
        return self.kind == "rollout"


OVER_TEXTS = ("over the texts: the token-weighted mean of the per-text activations (each query token counts once), "
              "with a 95% percentile-bootstrap interval over the texts")
METHOD_SPECS = {spec.name: spec for spec in (
    MethodSpec("attention_weighted",
               "contrib^c[i,j] = |alpha^c[i,j] x^c_j| for unit c (what token j sends to token i through unit c); "
               "activation (one text of L tokens) = (1/L) sum_i sum_j contrib^c[i,j], the mean over query tokens i "
               "of what unit c moves into token i (in units of its output y), not the mean over the L(L+1)/2 causal "
               "entries, which falls as 2/(L+1); a unit with a long memory (Mamba) still adds up more tokens at later "
               "positions, so its score grows with the text's length until its memory is full; token map = mean "
               f"over units of contrib^c (first text); {OVER_TEXTS}",
               "contribution", needs_gradient=False,
               reference=lambda alpha, x, g, previous: attention_weighted(alpha, x),
               contribution=lambda alpha, x, g: _weighted_contrib(alpha, x),
               signed_rows=_weighted_rows, shared_map=_weighted_shared_map),
    MethodSpec("gradient_guided",
               "contrib^c[i,j] = ReLU(g^c_i alpha^c[i,j] x^c_j) (Chefer et al.'s (A . grad A)+ per unit), "
               "g^c_i = d T / d y^c_i by autograd, T the target "
               "(target_definition: --attention_target; each text's target is recorded); activation = (1/L) "
               f"sum_i sum_j contrib^c[i,j] as for attention_weighted (under the likelihood target g at the last "
               "position is exactly 0, no target depends on it, and it counts as a query token with 0); token map "
               f"likewise; {OVER_TEXTS} (those where the target is defined)",
               "contribution", needs_gradient=True,
               reference=lambda alpha, x, g, previous: gradient_guided(alpha, x, g),
               contribution=_gradient_contrib, signed_rows=_gradient_rows, shared_map=_gradient_shared_map),
    MethodSpec("rollout",
               f"P^c = rownorm(|alpha^c_l|) (each query row a distribution over keys; = A_h exactly for softmax "
               f"attention; an all-zero row: the identity's); A_l = w I + (1 - w) mean_c P^c, w = {IDENTITY_WEIGHT} "
               "the identity (residual) weight; R_l = A_l R_{l-1}, R_{-1} = I (Abnar & Zuidema's (A/2 + I/2) for "
               "softmax attention, the same for both families); activation = (1/L) sum_i (1 - w)(1 - (P^c R_{l-1})"
               "[i,i]), the share of token i's end-to-end relevance that the unit's own part (1 - w) P^c R_{l-1} "
               f"carries from other tokens, in [0, 1 - w] = [0, {1 - IDENTITY_WEIGHT}] at every layer for every "
               "family (row 0 always 0: the first token has no other); units sharing one map (a "
               "head's) have equal scores and are listed as ties; token map = R_l; undefined for a one-token text "
               f"(no other token); {OVER_TEXTS} of >= 2 tokens",
               "rollout", needs_gradient=False,
               reference=lambda alpha, x, g, previous: rollout_layer(alpha, previous)[0]),
)}
METHODS = tuple(METHOD_SPECS)
DEFINITIONS = {name: spec.definition for name, spec in METHOD_SPECS.items()}


def method_spec(method: str) -> MethodSpec:
    """The spec of one method (METHOD_SPECS); ValueError for an unknown one."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_SPECS[method]


def needs_gradient(methods) -> bool:
    """Whether any of `methods` reads the gradient g."""
    return any(METHOD_SPECS[m].needs_gradient for m in methods)


def lower_layer_methods(methods) -> tuple:
    """Those of `methods` that read the layers below the scored one (rollout), each once: what
    `scores_by_layer` scores at those layers."""
    return tuple(dict.fromkeys(m for m in methods if METHOD_SPECS[m].reads_lower_layers))


def diversity_undefined(activations) -> str | None:
    """Why `neuron_diversity` is None for these activations (UNDEFINED), or None when it is defined."""
    a = np.asarray(activations, dtype=np.float64)
    if a.size < 2:
        return UNDEFINED["one_unit"]
    return UNDEFINED["all_zero"] if not (a > 0).any() else None


def neuron_diversity(activations: np.ndarray) -> float | None:
    """Entropy of p_c = a_c / Σ a (activations are non-negative), divided by log(e): 1 = all channels equal,
    0 = one channel carries all; computed on a / max(a), so it is scale-free at any finite scale. None when
    undefined (`diversity_undefined`: fewer than 2 units, or every activation 0)."""
    a = np.asarray(activations, dtype=np.float64)
    if diversity_undefined(a) is not None:
        return None
    a = a / a.max()
    p = a[a > 0] / a.sum()
    return float(-(p * np.log(p)).sum() / np.log(a.size))


def diversity_rows(activations) -> np.ndarray:
    """`neuron_diversity` of each row of (R, e) non-negative activations (R,): NaN for an all-zero row."""
    a = np.asarray(activations, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = a / a.sum(1, keepdims=True)  # (R, e)
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)
        return np.where(a.sum(1) > 0, h / np.log(a.shape[1]), np.nan)


def check_methods(methods) -> tuple:
    """`methods` as a tuple of METHODS names: a non-empty list (not one bare string, which would be read
    letter by letter) of known methods. ValueError otherwise."""
    from utils import text_list

    methods = tuple(text_list(methods, "methods"))
    for m in methods:
        method_spec(m)
    return methods


class LayerView(NamedTuple):
    """One layer of one batch, as the scoring loop reads it: the units' inputs x (b, L, e), the gradient g
    (b, L, e) or None, `groups` yielding (unit slice, α of those units (b, g, L, L)), and `check()`, the
    reconstruction check of the layer's output from the α seen (call it after the groups are consumed).
    `shared`: every group's units share one α (a head's: a Transformer's or Mamba-2's), so that the groups
    yield expanded views and the scores are computed once per group with matrix products."""

    x: torch.Tensor
    g: torch.Tensor | None
    groups: Iterator
    check: Callable[[], ReconstructionCheck]
    shared: bool = False
    g_undefined: str | None = None  # why g is None where a method needs it (the target is undefined)


def _signed_parts(alpha: torch.Tensor, x: torch.Tensor, shared: bool, rows: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(α⁺, α⁻, P⁺, P⁻, r) for the unit rows without a (c, L, L) product per method: α⁺ = max(α, 0) and
    α⁻ = max(−α, 0) (so |α| = α⁺ + α⁻ and α = α⁺ − α⁻, exactly), P^± [k, c, i] = Σ_j α^±[c, i, j] X_k[c, j]
    with X_0 = x⁺ = max(x, 0) and X_1 = x⁻ = max(−x, 0) (2, c, L), and with `rows` (rollout needs them)
    r = Σ_j |α_ij| the row sums ((c, L), or (L,) for a shared α), else None. One matrix product per sign:
    batched per unit (α (c, L, L), r from a column of ones beside x⁺ and x⁻), or one product for all units of
    a group that shares α ((L, L))."""
    xt = x.T  # (c, L)
    X = torch.stack(_pos_neg(xt))  # (2, c, L): x⁺, x⁻
    ap = torch.relu(alpha)  # (c, L, L) or (L, L): α⁺
    an = ap - alpha  # α⁻: exactly −α where α < 0, exactly 0 elsewhere
    c, L = xt.shape
    if shared:  # (L, L) @ (L, 2c): every unit's two columns in one product
        cols = X.reshape(2 * c, L).T  # (L, 2c)
        P = [(a @ cols).T.reshape(2, c, L) for a in (ap, an)]  # (2, c, L) each
        return ap, an, P[0], P[1], (ap.sum(-1) + an.sum(-1)) if rows else None
    cols = (torch.cat([X, torch.ones_like(X[:1])]) if rows else X).permute(1, 2, 0)  # (c, L, 2 or 3): x⁺, x⁻(, 1)
    P = [torch.bmm(a, cols).permute(2, 0, 1) for a in (ap, an)]  # (2 or 3, c, L) each
    return ap, an, P[0][:2], P[1][:2], (P[0][2] + P[1][2]) if rows else None


def _fast_rollout(pieces: list, c: int, shared: bool, previous: torch.Tensor | None, rows=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`_rollout_parts` (carried (c, L), Σ_c P^c (L, L)) from non-negative `pieces` that sum to |α| ([|α|],
    or [α⁺, α⁻]; (c, L, L) each, or (L, L) shared by the c units): P^c = |α^c| / r^c with r^c its row
    sums (an all-zero row: the identity's), so its diagonal term is that of |α^c| scaled by 1 / r^c and
    Σ_c P^c is the units' |α^c| scaled row by row and summed, without forming P^c apart. `rows`: the row
    sums r when the caller has them."""
    rows = sum(p.sum(-1) for p in pieces) if rows is None else rows  # (c, L) or (L,): r = Σ_k |α_ik|
    zero = rows == 0  # rows carrying nothing: P's row is the identity's
    inv = _row_inverse(rows)  # (c, L) or (L,)
    if previous is None:
        own, diag = sum(torch.diagonal(p, dim1=-2, dim2=-1) for p in pieces), 1.0  # |α_ii|
    else:
        own, diag = sum((p * previous.T).sum(-1) for p in pieces), torch.diagonal(previous)  # Σ_k |α_ik| R[k, i]
    own_p = inv * own + zero * diag  # (c, L) or (L,): Σ_k P[i, k] R[k, i]
    carried = (1 - IDENTITY_WEIGHT) * (1.0 - own_p)  # (c, L) or (L,)
    if shared:  # the group's units share one map
        P = sum(pieces) * inv[:, None] + torch.diag(zero.to(inv.dtype))  # (L, L)
        return carried.expand(c, -1), P * c
    p_sum = sum((p * inv[..., None]).sum(0) for p in pieces) + torch.diag(zero.sum(0).to(inv.dtype))  # (L, L)
    return carried, p_sum


def _fast_parts(alpha: torch.Tensor, x: torch.Tensor, g: torch.Tensor | None, methods: tuple, shared: bool,
                previous: torch.Tensor | None, maps: bool) -> dict:
    """{method: (rows (c, L), (L, L) map part or None)}: the same parts as `_contribution_parts` and
    `_rollout_parts` for units c of one example, from α (c, L, L) (or one shared (L, L)), x and g (L, c),
    but each unit's rows from the matrix products of `_signed_parts`, by these identities (every term
    non-negative, so nothing cancels):
      Σ_j |α_ij x_j| = Σ_j (α⁺_ij + α⁻_ij)(x⁺_j + x⁻_j) (`_weighted_rows`);
      Σ_j ReLU(g_i α_ij x_j) = g⁺_i Σ_j (α⁺_ij x⁺_j + α⁻_ij x⁻_j) + g⁻_i Σ_j (α⁺_ij x⁻_j + α⁻_ij x⁺_j)
      (`_gradient_rows`): a contribution method's `MethodSpec.signed_rows`;
      rollout (`_fast_rollout`): rownorm(|α|) from |α| = α⁺ + α⁻ and its row sums r.
    The (L, L) maps of the contribution methods are formed only with `maps` (the first text's); rollout's
    Σ_c P^c is always formed (it is R_ℓ). `previous`: R_{ℓ-1} (L, L), None for the identity."""
    c = x.shape[1]
    specs = [METHOD_SPECS[m] for m in methods]
    if len(specs) == 1 and specs[0].kind == "rollout":  # rollout alone (the layers below): |α| is all it needs
        return {specs[0].name: _fast_rollout([alpha.abs()], c, shared, previous)}
    ap, an, Pp, Pn, r = _signed_parts(alpha, x, shared, rows=any(sp.kind == "rollout" for sp in specs))
    out = {}
    for sp in specs:
        if sp.kind == "rollout":
            out[sp.name] = _fast_rollout([ap, an], c, shared, previous, r)
            continue
        part = None
        if maps:  # (L, L): Σ_c contrib^c
            part = sp.shared_map(ap, an, x, g) if shared else sp.contribution(alpha, x, g).sum(0)
        out[sp.name] = (sp.signed_rows(Pp, Pn, g), part)  # rows (c, L)
    return out


def score_groups(view: LayerView, methods: tuple, previous: list | None, maps: bool = True
                 ) -> tuple[dict, torch.Tensor | None, list | None]:
    """Every method's scores from α consumed group by group: ({method: NeuronScores} averaged over the batch
    (first example's map), the unit mean of α (b, L, L), per-example R_ℓ (L, L) if rollout is among
    `methods`, else None). `previous`: per-example R_{ℓ-1}, None for the identity. Without `maps` the
    contribution methods' token maps and the unit mean of α are not formed (None): the attention stage
    keeps only the first text's. Unit rows by `_fast_parts`. A method that needs g where the view has none
    (its target undefined: `view.g_undefined`) gets None with that reason."""
    b, L, e = view.x.shape
    lacking = tuple(m for m in methods if METHOD_SPECS[m].needs_gradient and view.g is None)
    if lacking and view.g_undefined is None:
        raise ValueError(f"method {lacking[0]} needs the gradient g, and the layer view has none")
    undefined = {m: NeuronScores(m, None, None, view.g_undefined) for m in lacking}
    methods = tuple(m for m in methods if m not in lacking)
    eye = torch.eye(L, dtype=view.x.dtype, device=view.x.device)
    prev = [None] * b if previous is None else previous
    unit_sum = view.x.new_zeros(b, L, L) if maps else None  # (b, L, L): Σ_c α^c
    rows = {m: [[] for _ in range(b)] for m in methods}  # per example, the groups' (g, L) parts in order
    parts = {m: [0.0] * b for m in methods}  # per example, Σ_c of the method's (L, L) part
    with torch.no_grad():
        for cs, alpha in view.groups:  # (b, g, L, L)
            width = cs.stop - cs.start
            if maps:
                unit_sum += alpha[:, 0] * width if view.shared else alpha.sum(1)
            for k in range(b):
                a = alpha[k, 0] if view.shared else alpha[k]  # (L, L) or (g, L, L)
                g = None if view.g is None else view.g[k, :, cs]  # (L, g)
                for m, (r, part) in _fast_parts(a, view.x[k, :, cs], g, methods, view.shared, prev[k],
                                                maps).items():
                    rows[m][k].append(r)
                    if part is not None:
                        parts[m][k] = parts[m][k] + part
    per, R = {}, None
    for m in methods:
        if METHOD_SPECS[m].kind == "rollout":
            done = [_rollout_scores(torch.cat(rows[m][k]), parts[m][k], e, eye if prev[k] is None else prev[k])
                    for k in range(b)]
            per[m], R = [s for s, _ in done], [r for _, r in done]
        else:
            per[m] = [_contribution_scores(m, torch.cat(rows[m][k]), parts[m][k] if maps else None, e)
                      for k in range(b)]
    return {**{m: _batch_mean(m, per[m]) for m in methods}, **undefined}, (unit_sum / e if maps else None), R


class AttentionNeurons:
    """Attention neurons of one model, family-agnostic: the scoring, rollout through the layers below, the
    analysis and the figure. A subclass says how to capture a layer (`capture`), how to see it as unit
    groups of α (`layer_view`), the whole-α reference (`extract_attention_vectors`) and the gradient."""

    unit = "unit"  # what the units are called in summaries and plots

    def __init__(self, model, target: str = DEFAULT_TARGET):
        """`target`: what gradient_guided's gradient is of (`passes.TARGETS`)."""
        self.model = model
        self.adapter = get_adapter(model)
        self.target = check_target(target)

    @staticmethod
    def _ids(inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input ids (b, L), mask or None) of input ids or a tokenizer output: ValueError unless the ids are
        a 2-D integer tensor with at least one token, unpadded."""
        if not isinstance(inputs, torch.Tensor):
            if not hasattr(inputs, "get") or not isinstance(inputs.get("input_ids"), torch.Tensor):
                raise ValueError(f"inputs must be input ids (b, L) or a tokenizer output with input_ids; got "
                                 f"{type(inputs).__name__} (tokenize texts first: utils.tokenize_texts)")
        ids = inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0 or ids.is_floating_point():
            raise ValueError(f"input ids must be a (b, L) integer tensor with b, L >= 1; got shape {tuple(ids.shape)} "
                             f"{ids.dtype}")
        if isinstance(inputs, torch.Tensor):
            return inputs, None
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("padded batches are not supported (the maps and the last-position target would "
                             "include padding): pass texts one at a time or of equal length")
        return inputs["input_ids"], mask

    def _device_ids(self, inputs):
        ids, mask = self._ids(inputs)
        return ids.to(next(self.model.parameters()).device), mask

    def describe_units(self) -> dict:
        raise NotImplementedError

    def capture(self, ids, mask, layers) -> dict:
        """{layer: what `layer_view` needs}, from one forward for all `layers`."""
        raise NotImplementedError

    def layer_view(self, mask, layer: int, io, g: torch.Tensor | None) -> LayerView:
        """The layer as unit groups of α, from `io` (what `capture` gave for it); `g`: ∂ logit / ∂ y at the
        layer's unit outputs (`passes.gradient_pass`), or None."""
        raise NotImplementedError

    def text_scores(self, inputs, layer: int, methods=METHODS, rolled: tuple | None = None) -> "TextScores":
        """`scores_by_layer` at one layer (`layer`: a whole number in 0..n_layers−1)."""
        return next(iter(self.scores_by_layer(inputs, [check_layer(self.adapter, layer)], methods, rolled)))[1]

    def scores_by_layer(self, inputs, layers, methods=METHODS, rolled: tuple | None = None, maps: bool = True,
                        captured=None) -> Iterator[tuple[int, "TextScores"]]:
        """(layer, TextScores) for each of `layers` in ascending order: every method's scores, equal to
        `create_neurons` on `extract_attention_vectors` (the reference path; tested) but with α consumed one
        unit group at a time: α is never held whole (peak memory about one group's α instead of
        (b, e, L, L)), and each group is read by every method while in cache. One forward captures every
        layer needed, and (with gradient_guided) one gradient forward gives every layer's g
        (`passes.gradient_pass`); `captured`: a `passes.TextCapture` of these inputs that holds them
        already (the text pass's), so that no forward runs here.

        Per layer, the output rebuilt from the α seen is checked against the model's real output
        (ReconstructionError on mismatch). Rollout at layer ℓ > 0 streams the layers below it for R_{ℓ-1},
        continuing from each chosen layer to the next; `rolled` = (layer k below the first of `layers`,
        per-example R_k), the `rollout_R` of an earlier call on the same inputs, starts from R_k instead.
        Each result's `rollout_R` is R_ℓ per example (None without rollout). Without `maps` the
        contribution methods' token maps and `attention_vectors` are left out (None; see `score_groups`).
        `methods` (`check_methods`) and `layers` (a non-empty list of layer indices; a layer given twice is
        scored once) are checked before any forward (ValueError)."""
        methods, layers = check_methods(methods), sorted(set(check_layers(self.adapter, layers)))
        ids, mask = self._device_ids(inputs)
        start, previous = (-1, None) if rolled is None else rolled
        if not start < layers[0]:
            raise ValueError(f"rolled starts at layer {start}, not below layer {layers[0]}")
        needed = self.layers_read(layers, methods, start)
        gradient_layers = layers if needs_gradient(methods) else []
        if captured is None:
            ios = self.capture(ids, mask, needed)
            grads, targets = self.site_gradients(ids, mask, gradient_layers)
        else:
            ios, grads, targets = self.captured_io(captured), captured.gradients, [captured.target]
        why = None if not gradient_layers else targets[0].get("undefined")
        for la in needed:
            chosen = la in layers
            view = self.layer_view(mask, la, ios[la], grads[la] if chosen and la in gradient_layers else None)
            view = view._replace(g_undefined=why)
            scores, vectors, R = score_groups(view, methods if chosen else lower_layer_methods(methods), previous,
                                              maps and chosen)
            check = view.check()
            previous = R
            if chosen:
                yield la, TextScores(scores, vectors, check, R, targets if gradient_layers else None, ids.shape[1])

    @staticmethod
    def layers_read(layers, methods, start: int = -1) -> list[int]:
        """The layers whose captures `scores_by_layer` reads: `layers`, and with rollout every layer from
        `start` + 1 up to the last of them."""
        layers = sorted(set(layers))
        return list(range(start + 1, layers[-1] + 1)) if lower_layer_methods(methods) else layers

    def captured_io(self, captured) -> dict:
        """{layer: what `layer_view` reads} from a `passes.TextCapture`."""
        raise NotImplementedError

    def site_gradients(self, ids, mask, layers) -> tuple[dict, list | None]:
        """({layer: the gradient of `self.target` at the gradient path's input, None where the target is
        undefined}, per-example target records) from one gradient forward (({}, None) for no layers)."""
        from passes import gradient_pass

        if not layers:
            return {}, None
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("padded batches are not supported")
        grads, targets, _ = gradient_pass(self.model, self.adapter, ids, layers, target=self.target)
        return grads, targets

    def create_neurons(self, attention_data: dict, method: str, layers=None) -> dict:
        """{layer: NeuronScores} for `method` (METHODS) at `layers` (default: every layer in the data), from
        whole α (the reference path); activations are averaged over the batch, the token map is the first
        example's. Rollout computes any lower layer missing from the data on the fly. Scores undefined for
        the data (one-token texts) are None with the reason (`NeuronScores`)."""
        spec = method_spec(method)
        layers = list(attention_data) if layers is None else check_layers(self.adapter, layers)
        missing = [la for la in layers if la not in attention_data]
        if missing:
            raise ValueError(f"layer {missing[0]} is not in the attention data (it holds layers "
                             f"{sorted(attention_data)}); extract it first")
        out = {}
        for layer in layers:
            d = attention_data[layer]
            alpha, x = d["attention_matrix"], d["x"]  # (b, e, L, L), (b, L, e)
            b = alpha.shape[0]
            g, targets = (self.output_gradient(d["input_ids"], layer, d["attention_mask"]) if spec.needs_gradient
                          else ([None] * b, None))  # (b, L, e)
            if g is None:  # the target is undefined for these texts
                out[layer] = NeuronScores(method, None, None, targets[0]["undefined"])
                continue
            R = self._rolled_below(attention_data, layer) if spec.reads_lower_layers else [None] * b
            out[layer] = _batch_mean(method, [spec.reference(alpha[k], x[k], g[k], R[k]) for k in range(b)])
        return out

    create_mamba_neurons = create_neurons  # the design documents' name (every family)

    def _rolled_below(self, attention_data: dict, layer: int) -> list:
        """Per example, R_{ℓ-1} (L, L) of `layer` ℓ from whole α (None for ℓ = 0: the identity); a lower
        layer missing from the data is extracted on the fly."""
        d = attention_data[layer]
        inputs = {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"]}
        R = [None] * d["attention_matrix"].shape[0]
        for lo in range(layer):  # lower layers: only the rolled-out product is kept
            a = (attention_data[lo] if lo in attention_data else
                 self.extract_attention_vectors(inputs, [lo])[lo])["attention_matrix"]  # (b, e, L, L)
            R = [rollout_step(a[k], R[k]) for k in range(len(R))]
        return R

    def extract_attention_vectors(self, inputs, layer_indices) -> dict:
        raise NotImplementedError

    def analyze_neuron_behavior(self, neurons: dict, layer_idx: int, top_k: int = 10, resampled=None,
                                res=None) -> dict:
        """{"method", "layer", "num_neurons", "mean_activation", "activation_std" (over the units),
        "top_neurons" (the `top_k` most active units, highest first: [{"channel", ("head"), "activation",
        "rank" (competition rank; units within stats.TIE_RTOL share it), "tied"}]), "ties" (a line naming tied
        units, or None), "neuron_diversity", "undefined"}. With `resampled` (R, e), the activations on R
        bootstrap draws of the texts, and `res` (their `stats.Resamples`): each top unit's "low", "high" (95%
        interval) and "stability" (stats.STABILITY_DEFINITION), and "mean_activation" and
        "neuron_diversity" each with "_low" / "_high". Where a field is undefined it is None (or [] for
        top_neurons) and "undefined" maps it to its reason (UNDEFINED): activations undefined (rollout on
        one-token texts; gradient_guided without a target) -> mean_activation, activation_std,
        top_neurons, neuron_diversity; every activation 0 -> top_neurons and neuron_diversity (the mean and
        std, 0, are measured). `top_k`: a whole number >= 1."""
        import stats

        top_k = check_top_k(top_k)
        s: NeuronScores = neurons[layer_idx]
        out = {"method": s.method, "layer": layer_idx, "num_neurons": int(self.describe_units()["n_units"])}
        undefined = {}
        if s.neuron_activations is None:
            undefined.update(dict.fromkeys(("mean_activation", "activation_std", "top_neurons", "neuron_diversity"),
                                           s.undefined))
            return {**out, "mean_activation": None, "activation_std": None, "top_neurons": [], "ties": None,
                    "neuron_diversity": None, "undefined": undefined}
        a = np.asarray(s.neuron_activations, dtype=np.float64)
        why = diversity_undefined(a)
        if why is not None:
            undefined["neuron_diversity"] = why
        drawn = resampled is not None and res is not None and res.defined
        top = []
        if (a > 0).any():
            top = stats.ranked(a, top_k, resampled if drawn else None, res if drawn else None, key="channel")
            for e in top:
                e["activation"] = e.pop("score")
                e.update(self.unit_location(e["channel"]))
        else:  # no ranking: an ordering of zeros is not one
            undefined["top_neurons"] = UNDEFINED["all_zero"]
        result = {**out, "num_neurons": int(a.size), "mean_activation": float(a.mean()),
                  "activation_std": float(a.std()), "top_neurons": top, "ties": stats.ties_note(top, "channel"),
                  "neuron_diversity": neuron_diversity(a), "undefined": undefined}
        if drawn:
            r = np.asarray(resampled, dtype=np.float64)  # (R, e)
            low, high = stats.percentile_interval(r.mean(1))
            result.update(mean_activation_low=float(low), mean_activation_high=float(high))
            if why is None:
                d = diversity_rows(r)  # (R,), NaN on a draw whose activations are all 0
                low, high = stats.percentile_interval(d[np.isfinite(d)]) if np.isfinite(d).any() else (None, None)
                result.update(neuron_diversity_low=None if low is None else float(low),
                              neuron_diversity_high=None if high is None else float(high))
        return result

    def unit_location(self, c: int) -> dict:
        """Where unit c sits beyond its index (a Transformer's head), for the top-neuron tables."""
        return {}

    def visualize_neurons(self, neurons: dict, layer_idx: int, plots_dir, prefix: str = "model", top_k: int = 10,
                          analysis: dict | None = None, per_text: dict | None = None,
                          tokens: list[str] | None = None) -> str:
        """The 6-panel figure: activation histogram, top units (with their 95% intervals when `analysis`, the
        attention stage's entry, has them), the top units' activation in each text (`per_text`: {unit:
        per-text activations}), token map (axes labelled with the first text's `tokens` when given; keys after
        the query, not defined, in grey), diversity (cumulative share of activation), statistics table.
        Returns the PNG path. A panel whose numbers are undefined (`analyze_neuron_behavior`'s "undefined")
        shows the reason instead."""
        import textwrap

        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        from utils import save_figure

        def say(ax, title: str, text: str) -> None:
            ax.axis("off")
            ax.set_title(title)
            ax.text(0.5, 0.5, textwrap.fill(text, 48), ha="center", va="center", fontsize=9)

        def shown(v, fmt: str) -> str:
            return "undefined" if v is None else format(v, fmt)

        s: NeuronScores = neurons[layer_idx]
        stats = analysis if analysis is not None else self.analyze_neuron_behavior(neurons, layer_idx, top_k)
        why = stats["undefined"]
        a = None if s.neuron_activations is None else np.asarray(s.neuron_activations)
        fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
        fig.suptitle(f"Attention neurons ({self.unit}s), layer {layer_idx}, method {s.method}: activation per query "
                     "token")
        top = stats["top_neurons"]
        if a is None:
            for ax, title in ((axes[0, 0], "activation distribution"), (axes[1, 1], "diversity")):
                say(ax, title, s.undefined)
        else:
            ax = axes[0, 0]
            ax.hist(a, bins=min(50, max(5, a.size // 4)), color="tab:blue")
            ax.set(title="activation distribution", xlabel=_activation_unit(s.method), ylabel=f"{self.unit}s (count)")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
            if stats["neuron_diversity"] is None:
                say(axes[1, 1], "diversity", why["neuron_diversity"])
            else:
                ax = axes[1, 1]
                share = np.cumsum(np.sort(a)[::-1]) / a.sum()
                ax.plot(np.arange(1, a.size + 1) / a.size, share, color="tab:purple")
                ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
                ax.set(title=f"diversity {stats['neuron_diversity']:.3f} (1 = uniform)",
                       xlabel=f"fraction of {self.unit}s (most active first)", ylabel="share of total activation")
        labels = [str(t["channel"]) + ("=" if t.get("tied") else "") for t in top]
        if top:
            ax = axes[0, 1]
            values = np.array([t["activation"] for t in top])
            err = None
            if all(t.get("low") is not None for t in top):
                err = np.clip(np.stack([values - [t["low"] for t in top], [t["high"] for t in top] - values]), 0, None)
            ax.bar(range(len(top)), values, color="tab:red", yerr=err, capsize=3)
            ax.set_xticks(range(len(top)), labels, rotation=45)
            ax.set(title=f"top {len(top)} {self.unit}s" + (" (95% interval over texts)" if err is not None else "")
                   + ("; '=' tied" if any(t.get("tied") for t in top) else ""), xlabel=self.unit,
                   ylabel=_activation_unit(s.method))
        else:
            say(axes[0, 1], f"top {self.unit}s", why["top_neurons"])
        if top and per_text:
            ax = axes[0, 2]
            for k, t in enumerate(top):
                v = np.asarray(per_text.get(str(t["channel"]), per_text.get(t["channel"], [])), dtype=np.float64)
                jitter = (np.arange(v.size) % 7 - 3) * 0.04
                ax.scatter(k + jitter, v, s=6, alpha=0.5, color="tab:red")
            ax.set_xticks(range(len(top)), labels, rotation=45)
            ax.set(title=f"top {self.unit}s: activation in each text", xlabel=self.unit,
                   ylabel=_activation_unit(s.method))
        else:
            say(axes[0, 2], f"top {self.unit}s: activation in each text",
                "per-text activations come with the attention stage (attention_profile)" if top else
                why.get("top_neurons", "no ranking"))
        ax = axes[1, 0]
        if s.token_map is None:
            say(ax, "token map (first text)", s.undefined or "not formed")
        else:
            cmap = plt.get_cmap("viridis").with_extremes(bad=UNDEFINED_COLOUR)
            tmap = causal_mask(s.token_map)
            im = ax.imshow(np.ma.masked_invalid(tmap), cmap=cmap, interpolation="nearest")
            fig.colorbar(im, ax=ax, label="R_l[i, j] (rolled-out relevance; each row sums to 1)"
                         if method_spec(s.method).kind == "rollout" else
                         f"mean over {self.unit}s of contrib^c[i, j]\n(units of the mixed output y)")
            ax.set(title="token map (first text)", xlabel="key token j", ylabel="query token i")
            token_ticks(ax, tokens, tmap.shape[0])
            undefined_legend(ax)
        ax = axes[1, 2]
        ax.axis("off")

        def with_interval(key: str, fmt: str) -> str:
            v, lo = stats.get(key), stats.get(f"{key}_low")
            return shown(v, fmt) + ("" if v is None or lo is None else
                                    f" [{format(lo, fmt)}, {format(stats[key + '_high'], fmt)}]")

        rows = [["neurons", f"{stats['num_neurons']}"], ["mean activation", with_interval("mean_activation", ".4g")],
                ["activation std (units)", shown(stats["activation_std"], ".4g")],
                ["diversity", with_interval("neuron_diversity", ".4f")],
                [f"top {self.unit}", f"{top[0]['channel']} ({top[0]['activation']:.4g})" if top else "undefined"]]
        ax.table(cellText=rows, colLabels=["statistic", "value"], loc="center").scale(1, 1.6)
        ax.set(title="statistics")
        return save_figure(fig, plots_dir, f"{prefix}_attention_neurons_{s.method}_layer{layer_idx}")


class MambaAttentionNeurons(AttentionNeurons):
    """Hidden attention and attention neurons of a Hugging Face Mamba model: Mamba-1 and FalconMamba (α per
    channel) or Mamba-2 (α per head, shared by the head's channels). The units are the channels of the
    inner width; the family's math is ssm.py's (`ssm_projections`, `hidden_attention_by_channel`,
    `gate_output`), and y = α x + D x through the gate (or gated norm) and out_proj is checked against the
    mixer's real output."""

    unit = "channel"

    def __init__(self, model, target: str = DEFAULT_TARGET):
        super().__init__(model, target)
        require_mamba(self.adapter, "MambaAttentionNeurons is the Mamba analyser (hidden attention exists only in "
                                    "Mamba layers); use attention_neurons_for(model), which gives every family's")
        self.mamba2 = self.adapter.ssm_kind == "mamba2"

    def describe_units(self) -> dict:
        a = self.adapter
        if not self.mamba2:
            return {"unit": self.unit, "n_units": a.inner_size, "definition": UNITS["mamba"]}
        return {"unit": self.unit, "n_units": a.inner_size, "n_heads": a.n_heads,
                "head_dim": a.inner_size // a.n_heads, "definition": UNITS["mamba2"]}

    def unit_location(self, c: int) -> dict:
        return {"head": c // (self.adapter.inner_size // self.adapter.n_heads)} if self.mamba2 else {}

    def capture(self, ids, mask, layers) -> dict:
        from delta_extraction import capture_mixer_ios

        return capture_mixer_ios(self.model, layers, ids, mask)  # {layer: (input, real output) (b, L, d)}

    def captured_io(self, captured) -> dict:
        return captured.mixer_io

    def layer_view(self, mask, layer: int, io, g: torch.Tensor | None) -> LayerView:
        h_in, real_out = io
        mixer = self.adapter.mixer(layer)
        with torch.no_grad():  # α needs no sequential scan: it is checked through the output it rebuilds
            it = MixerProjections(*ssm_projections(mixer, h_in, mask))
        g = None if g is None else g.float()  # (b, L, e)
        y = torch.empty_like(it.x)  # (b, L, e): α x + D x, filled group by group
        D = channel_D(it.D, it.x.shape[-1])  # (e,)

        def groups():
            for cs, alpha in hidden_attention_by_channel(mixer, it.delta, it.A, it.B, it.C):  # (b, g, L, L)
                y[:, :, cs] = apply_hidden_attention(alpha, it.x[:, :, cs], D[cs])
                yield cs, alpha

        def check():
            with torch.no_grad():
                return check_reconstruction(project_out(mixer, gate_output(mixer, y, it.z)), real_out, mixer=mixer)

        return LayerView(it.x, g, groups(), check, shared=self.mamba2)

    def extract_attention_vectors(self, inputs, layer_indices) -> dict:
        """{layer: {"attention_matrix": α (b, e, L, L), "attention_vectors": mean_c α (b, L, L),
        "x", "y" (= α x + D x), "z": (b, L, e), "D": (e,) per channel, "leaf": (y, z), "reconstruction":
        ReconstructionCheck, "input_ids", "attention_mask"}}.
        `inputs`: input ids (b, L) or a tokenizer output dict. α is verified against the mixer output."""
        ids, mask = self._device_ids(inputs)
        data = {}
        for layer, (h_in, real_out) in self.capture(ids, mask, list(layer_indices)).items():
            mixer = self.adapter.mixer(layer)
            with torch.no_grad():
                x, z, delta, B, C, A, D = ssm_projections(mixer, h_in, mask)  # no sequential scan needed
                b, L, e = x.shape
                alpha = x.new_empty(b, e, L, L)  # (b, e, L, L), == hidden_attention for Mamba-1 (tested)
                for cs, part in hidden_attention_by_channel(mixer, delta, A, B, C):
                    alpha[:, cs] = part
                D = channel_D(D, e)
                y = apply_hidden_attention(alpha, x, D)  # (b, L, e), the scan output via α
                check = check_reconstruction(project_out(mixer, gate_output(mixer, y, z)), real_out, mixer=mixer)
            data[layer] = {"attention_matrix": alpha, "attention_vectors": alpha.mean(1), "x": x, "y": y,
                           "z": z, "D": D, "leaf": (y, z), "reconstruction": check, "input_ids": ids,
                           "attention_mask": mask}
        return data

    def output_gradient(self, input_ids: torch.Tensor, layer: int, attention_mask=None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(g = ∂ T / ∂ y (b, L, e) at layer `layer`'s scan output y (before the gate or gated norm), T the
        analyzer's target summed over the batch (None where undefined), per-example target records
        (`passes.target_value`)), from one gradient forward
        (`passes.gradient_pass`: Mamba-1 / FalconMamba mixers run the fast scan there, tested against the
        reference scan, for its O(b L e n) backward)."""
        from passes import gradient_pass

        ids, _ = self._device_ids(input_ids if attention_mask is None else
                                  {"input_ids": input_ids, "attention_mask": attention_mask})
        grads, targets, _ = gradient_pass(self.model, self.adapter, ids, [check_layer(self.adapter, layer)],
                                          target=self.target)
        return (None if grads[layer] is None else grads[layer].float()), targets


class TransformerAttentionNeurons(AttentionNeurons):
    """Attention neurons of a GPT-2 or GPT-NeoX model; the units are the dimensions of the attention output
    before the output projection, each mixed by its head's attention weights (see the module docstring)."""

    unit = "dim"

    def __init__(self, model, target: str = DEFAULT_TARGET, adapter=None):
        """`adapter`: a hybrid's `models.AttentionLayersView` (its attention layers); default the model's own."""
        super().__init__(model, target)
        self.adapter = adapter or self.adapter
        if self.adapter.is_ssm:
            raise NotApplicable("a Mamba model: use MambaAttentionNeurons")

    def describe_units(self) -> dict:
        a = self.adapter
        return {"unit": self.unit, "n_units": a.hidden_size, "n_heads": a.n_heads, "head_dim": a.head_dim,
                "definition": UNITS["transformer"]}

    def unit_location(self, c: int) -> dict:
        return {"head": c // self.adapter.head_dim}

    def capture(self, ids, mask, layers) -> dict:
        """{layer: (A (b, H, L, L), values (b, H, L, d/H), y (b, L, d) the output projection's real input,
        its real output (b, L, d))} from one eager-attention forward that stops after the last layer."""
        from utils import trace

        paths = {la: self.adapter.attention_paths(la) for la in layers}
        with torch.no_grad(), self.adapter.eager_attention(), \
                trace(self.model, [p.attention for p in paths.values()], retain_output=1, stop=True) as weights, \
                trace(self.model, [q for p in paths.values() for q in (p.qkv, p.out_proj)], retain_input=True) as tr:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return {la: (weights[p.attention].output, self.adapter.split_values(tr[p.qkv].output),
                     tr[p.out_proj].input, tr[p.out_proj].output) for la, p in paths.items()}

    def _out_proj(self, layer: int):
        return self.model.get_submodule(self.adapter.attention_paths(layer).out_proj)

    def _project(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        proj = self._out_proj(layer)
        return proj(y.to(next(proj.parameters()).dtype))

    def _units(self, io) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A (b, H, L, L), x (b, L, d) the values as units, y_α = α x (b, L, d)) in float32 or wider."""
        A, v, _, _ = io
        f32 = torch.promote_types(A.dtype, torch.float32)
        A, v = A.to(f32), v.to(f32)
        b, H, L, hd = v.shape
        x = v.transpose(1, 2).reshape(b, L, H * hd)  # (b, L, d): unit c = head c // hd, dim c % hd
        y = (A @ v).transpose(1, 2).reshape(b, L, H * hd)  # (b, L, d): Σ_j A_h[i, j] v^c_j
        return A, x, y

    def captured_io(self, captured) -> dict:
        return captured.attention_io

    def layer_view(self, mask, layer: int, io, g: torch.Tensor | None) -> LayerView:
        A, x, y = self._units(io)
        g = None if g is None else g.float()  # (b, L, d): the projection's input is y
        hd = self.adapter.head_dim

        def groups():
            for h in range(A.shape[1]):  # one head's d/H units share its weights: a view, no copy
                yield slice(h * hd, (h + 1) * hd), A[:, h:h + 1].expand(-1, hd, -1, -1)  # (b, hd, L, L)

        def check():
            with torch.no_grad():
                return check_reconstruction(self._project(layer, y), io[3])

        return LayerView(x, g, groups(), check, shared=True)

    def extract_attention_vectors(self, inputs, layer_indices) -> dict:
        """{layer: {"attention_matrix": α (b, d, L, L) (each head's A repeated for its d/H units),
        "attention_vectors": mean_c α = the head mean of A (b, L, L), "head_attention": A (b, H, L, L),
        "x" (values) and "y" (= α x) (b, L, d), "leaf": (y,), "reconstruction": ReconstructionCheck,
        "input_ids", "attention_mask"}}; α is verified against the output projection's real output."""
        ids, mask = self._device_ids(inputs)
        data = {}
        for layer, io in self.capture(ids, mask, list(layer_indices)).items():
            A, x, y = self._units(io)
            with torch.no_grad():
                check = check_reconstruction(self._project(layer, y), io[3])
            alpha = A.repeat_interleave(self.adapter.head_dim, dim=1)  # (b, d, L, L)
            data[layer] = {"attention_matrix": alpha, "attention_vectors": alpha.mean(1), "head_attention": A,
                           "x": x, "y": y, "leaf": (io[2],), "reconstruction": check, "input_ids": ids,
                           "attention_mask": mask}
        return data

    def output_gradient(self, input_ids: torch.Tensor, layer: int, attention_mask=None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(g = ∂ T / ∂ y (b, L, d) at layer `layer`'s output-projection input y (the heads' concatenated
        output), T the analyzer's target summed over the batch (None where undefined), per-example target
        records (`passes.target_value`)), from one gradient forward (`passes.gradient_pass`)."""
        from passes import gradient_pass

        ids, _ = self._device_ids(input_ids if attention_mask is None else
                                  {"input_ids": input_ids, "attention_mask": attention_mask})
        grads, targets, _ = gradient_pass(self.model, self.adapter, ids, [check_layer(self.adapter, layer)],
                                          target=self.target)
        return (None if grads[layer] is None else grads[layer].float()), targets


def attention_neurons_for(model, target: str = DEFAULT_TARGET) -> AttentionNeurons:
    """The attention-neuron analyser of the model's family (`target`: gradient_guided's, `passes.TARGETS`)."""
    return (MambaAttentionNeurons if get_adapter(model).is_ssm else TransformerAttentionNeurons)(model, target)


def plot_attention_vector(vector: np.ndarray, layer: int, plots_dir, prefix: str, family: str = "mamba",
                          tokens: list[str] | None = None) -> str:
    """The layer's attention vector for one text (`draw_attention_map`: each query row normalised, log colour
    scale, the undefined keys after the query in grey): Mamba's hidden attention (channel mean of α), or a
    Transformer's head-mean attention weights; both axes labelled with the text's `tokens` when given."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    L = np.asarray(vector).shape[0]
    side = min(16.0, max(7.0, 0.22 * min(L, 64) + 3))
    fig, ax = plt.subplots(figsize=(side + 1.5, side), constrained_layout=True)
    draw_attention_map(ax, fig, vector, family, tokens)
    ax.set_title(f"{ax.get_title()}, layer {layer}, first text ({L} tokens)")
    stem = "hidden_attention" if family == "mamba" else "attention_map"
    return save_figure(fig, plots_dir, f"{prefix}_{stem}_layer{layer}_text0")


UNDEFINED_COLOUR = "lightgrey"
MAX_TOKEN_LABELS = 64  # a longer text labels every k-th token (with its position)


def causal_mask(m) -> np.ndarray:
    """(L, L) [query i, key j] as float with NaN where j > i: a key after its query is not defined (both
    families' token mixing is causal), never a 0."""
    m = np.array(m, dtype=np.float64)
    m[np.triu_indices(m.shape[0], 1)] = np.nan
    return m


def token_ticks(ax, tokens, L: int, x: bool = True, y: bool = True) -> None:
    """Label the axes of an (L, L) token map with the text's tokens (`tokens`: their strings, as the
    tokenizer decodes each id; escapes shown, e.g. '\\n'): every token up to MAX_TOKEN_LABELS, else every
    k-th with its position. Without tokens (or a count that does not match), integer positions."""
    from matplotlib.ticker import MaxNLocator

    if tokens is None or len(tokens) != L:
        for axis, on in ((ax.xaxis, x), (ax.yaxis, y)):
            if on:
                axis.set_major_locator(MaxNLocator(integer=True))
        return
    step = -(-L // MAX_TOKEN_LABELS)
    at = list(range(0, L, step))
    shown = [repr(str(tokens[i]))[1:-1] for i in at]
    if step > 1:
        shown = [f"{i}: {t}" for i, t in zip(at, shown)]
    size = 8 if len(at) <= 20 else 7 if len(at) <= 32 else 6 if len(at) <= 48 else 5
    if x:
        ax.set_xticks(at, shown, rotation=90, fontsize=size)
    if y:
        ax.set_yticks(at, shown, fontsize=size)


def undefined_legend(ax) -> None:
    """A legend entry for the grey upper triangle of a causal token map."""
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor=UNDEFINED_COLOUR, edgecolor="grey",
                             label="key j after query i: not defined (causal)")],
              loc="upper right", fontsize=7, framealpha=0.9)


def attention_shares(vector) -> np.ndarray:
    """|vector| (L, L) with each query row divided by its sum over the keys j <= i (the row's share of its
    attention on each key); NaN above the diagonal and on a row whose sum is 0 (no share defined)."""
    a = np.abs(causal_mask(vector))
    total = np.nansum(a, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, a / np.where(total > 0, total, 1.0), np.nan)


def draw_attention_map(ax, fig, vector: np.ndarray, family: str, tokens: list[str] | None = None) -> None:
    """One (L, L) attention vector on `ax`, titled by what it is: each query row's share of its |·| on each
    key (row-normalised, so that a row spread over many keys shows beside an attention sink), on a log colour
    scale clipped below at the 1st percentile of the positive shares, at least 1e-4 (four decades; a 0 is
    drawn at that floor); keys after the query (not defined) in grey; axes labelled with the text's `tokens`
    when given."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    share = attention_shares(vector)
    defined = np.isfinite(share)
    positive = share[defined & (share > 0)]
    floor = min(max(float(np.percentile(positive, 1)) if positive.size else 1e-3, 1e-4), 0.5)
    shown = np.where(defined, np.maximum(share, floor), np.nan)
    cmap = plt.get_cmap("magma").with_extremes(bad=UNDEFINED_COLOUR)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=LogNorm(vmin=floor, vmax=1.0),
                   interpolation="nearest")
    what = "|mean_c α|" if family == "mamba" else "|mean_h A_h|"
    fig.colorbar(im, ax=ax, label=f"share of query row i's {what} on key j (row-normalised, no unit)\n"
                                  f"log colour scale, clipped below at {floor:.2g} (the 1st percentile, at least 1e-4)")
    ax.set(title="Hidden attention (channel mean)" if family == "mamba" else "Attention (head mean)",
           xlabel="key token j", ylabel="query token i")
    token_ticks(ax, tokens, share.shape[0])
    undefined_legend(ax)


def integrate_attention_neurons(model, inputs, layer_indices=(0,), methods=METHODS, top_k: int = 10,
                                target: str = DEFAULT_TARGET) -> dict:
    """The reference path at `layer_indices` for either family: whole α, every method's neurons and their
    analysis: {"attention_data", "neurons": {method: {layer: NeuronScores}}, "mamba_neurons" (the design
    documents' name for "neurons", on every family), "analysis_results": {method: {layer: dict}},
    "analyzer"}. `layer_indices` (a non-empty list of layer indices), `methods`
    (`check_methods`), `top_k` (a whole number >= 1) and `target` (`passes.TARGETS`) are checked before any
    forward (ValueError)."""
    analyzer = attention_neurons_for(model, target)
    layer_indices = list(dict.fromkeys(check_layers(analyzer.adapter, layer_indices, "layer_indices")))
    methods, top_k = check_methods(methods), check_top_k(top_k)
    data = analyzer.extract_attention_vectors(inputs, layer_indices)
    neurons = {m: analyzer.create_neurons(data, m) for m in methods}
    analysis = {m: {lay: analyzer.analyze_neuron_behavior(neurons[m], lay, top_k) for lay in layer_indices}
                for m in methods}
    return {"attention_data": data, "neurons": neurons, "mamba_neurons": neurons, "analysis_results": analysis,
            "analyzer": analyzer}


integrate_mamba_attention_neurons = integrate_attention_neurons  # the design documents' name (every family)


class AttentionProfile:
    """The running record of `attention_profile`: `add(k, scored)` with text k's [(layer, TextScores)] (in
    text order, k = 0 first: its maps are kept), `result()` the profile. Also the attention stage's reader
    of the text pass (`request`, `read`, `finish`): it scores each text from the pass's captures. Each
    text's activations (e,) per layer and method are kept (the bootstrap over texts resamples them), with
    its number of tokens (its weight) and its gradient target."""

    def __init__(self, analyzer: "AttentionNeurons", layers, methods=METHODS, top_k: int = 10, maps_at=None,
                 n_resamples: int | None = None, seed: int = 0):
        import stats

        self.analyzer = analyzer
        self.layers = sorted(set(check_layers(analyzer.adapter, layers)))
        self.methods, self.top_k = check_methods(methods), check_top_k(top_k)
        self.maps_at = maps_at
        self.n_resamples = stats.DEFAULT_RESAMPLES if n_resamples is None else n_resamples
        self.seed = seed
        # per layer and method: per text, (activations (e,) or None, tokens); the first reason a text was left out
        self.per_text = {la: {m: [] for m in self.methods} for la in self.layers}
        self.why = {la: dict.fromkeys(self.methods) for la in self.layers}
        self.first = {la: {} for la in self.layers}  # the first text's token maps
        self.vectors, self.worst = {}, dict.fromkeys(self.layers, 0.0)
        self.targets = []  # per text, the gradient's target record (with gradient_guided)
        self.tokens = []  # per text, its tokens (its weight)
        self.n = 0

    @property
    def request(self):
        from passes import TextRequest

        read = frozenset(self.analyzer.layers_read(self.layers, self.methods))
        grad = frozenset(self.layers if needs_gradient(self.methods) else ())
        target = self.analyzer.target if grad else None
        return (TextRequest(mixer_io=read, gradient=grad, target=target) if self.analyzer.adapter.is_ssm
                else TextRequest(attention_io=read, gradient=grad, target=target))

    def read(self, text) -> None:
        self.add(text.index, self.analyzer.scores_by_layer(text.ids, self.layers, self.methods, maps=text.index == 0,
                                                           captured=text))

    def add(self, k: int, scored) -> None:
        target, tokens = None, None
        for la, ts in scored:  # α by group, verified
            self.worst[la] = max(self.worst[la], ts.reconstruction.relative_error)
            tokens = ts.n_tokens
            for m in self.methods:
                s = ts.scores[m]
                if s.neuron_activations is None:
                    self.why[la][m] = self.why[la][m] or s.undefined
                self.per_text[la][m].append(s.neuron_activations)
                if k == 0:
                    self.first[la][m] = s.token_map
            if k == 0:
                self.vectors[la] = ts.attention_vectors[0].cpu().numpy()  # (L, L)
            target = target or (ts.targets[0] if ts.targets else None)
        if target is not None:
            self.targets.append(target)
        self.tokens.append(tokens)
        self.n += 1

    def finish(self) -> dict:
        return self.result()

    def result(self) -> dict:
        import stats

        out = {}
        weights = np.asarray(self.tokens, dtype=np.float64)  # (n_texts,)
        for la in self.layers:
            maps = self.maps_at is None or la in self.maps_at
            entry = {"layer": la, "n_texts": self.n, "n_tokens": int(weights.sum()),
                     "max_reconstruction_error": self.worst[la], "methods": {},
                     "gradient_targets": list(self.targets) if needs_gradient(self.methods) else None}
            if maps:
                entry["attention_vector_first_text"] = self.vectors[la]
            for m in self.methods:
                texts = [i for i, a in enumerate(self.per_text[la][m]) if a is not None]  # where defined
                acts = resampled = res = None
                if texts:
                    x = np.stack([self.per_text[la][m][i] for i in texts]).astype(np.float64)  # (n', e)
                    w = weights[texts]
                    acts = stats.weighted_mean(x, w)  # (e,)
                    res = stats.Resamples.draw(len(texts), self.n_resamples, self.seed, "texts")
                    resampled = res.means(x, w)  # (R, e)
                scores = NeuronScores(m, acts, self.first[la][m], None if texts else self.why[la][m])
                analysis = self.analyzer.analyze_neuron_behavior({la: scores}, la, self.top_k, resampled, res)
                entry["methods"][m] = {**analysis, "neuron_activations": acts,
                                       "n_texts_averaged": len(texts), "n_tokens_averaged": int(weights[texts].sum()),
                                       "interval_method": None if res is None or not res.defined else res.method(),
                                       "activation_per_text": {str(t["channel"]): x[:, t["channel"]]
                                                               for t in analysis["top_neurons"]} if texts else {}}
                if maps:
                    entry["methods"][m]["token_map_first_text"] = self.first[la][m]
            out[la] = entry
        return out


def attention_profile(analyzer: AttentionNeurons, texts_ids, layers, methods=METHODS, top_k: int = 10,
                      progress: bool = False, desc: str = "attention", maps_at=None, n_resamples: int | None = None,
                      seed: int = 0) -> dict:
    """Each method's scores at every one of `layers` over the texts (one text at a time, every layer from
    one forward per text and one gradient forward, rollout continuing from layer to layer):
    {layer: {"layer", "n_texts", "max_reconstruction_error", "attention_vector_first_text" (L, L) the unit
    mean of α of the first text, "methods": {method: `analyze_neuron_behavior`'s dict with its intervals +
    "neuron_activations" (e,) the token-weighted mean over the texts of each text's activation per query
    token, "activation_per_text" {unit: (n_texts_averaged,)} for the top units, "token_map_first_text"
    (L, L), "n_texts_averaged", "n_tokens_averaged", "interval_method"}}}.
    Each score is averaged over the texts where it is defined (rollout over the texts of at least 2 tokens;
    gradient_guided over those whose target is defined), each text weighted by its tokens; the intervals
    are a percentile bootstrap over those texts (`n_resamples` draws, `seed`). With none, that array is None
    and the entry's "undefined" says why (`analyze_neuron_behavior`). `maps_at`: the layers whose entries
    keep the first text's (L, L) maps (default: every layer).
    Refused before any forward (ValueError): `texts_ids` not a non-empty list of (1, L_i) token-id tensors,
    `layers` not a non-empty list of layer indices (a layer given twice is scored once), unknown or no
    `methods`, a `top_k` that is not a whole number >= 1."""
    from tqdm.auto import tqdm

    texts_ids = check_token_ids(texts_ids)
    profile = AttentionProfile(analyzer, layers, methods, top_k, maps_at, n_resamples, seed)
    for k, ids in enumerate(tqdm(texts_ids, desc=desc, disable=not progress)):
        profile.add(k, analyzer.scores_by_layer(ids, profile.layers, profile.methods, maps=k == 0))
    return profile.result()


def neuron_scores(entry: dict, method: str) -> dict:
    """{layer: NeuronScores} of one method from one layer's `attention_profile` entry (for the figures);
    undefined arrays stay None, with their reasons."""
    m = entry["methods"][method]
    why = m.get("undefined") or {}
    acts = m["neuron_activations"]
    tmap = m.get("token_map_first_text")
    return {entry["layer"]: NeuronScores(method, None if acts is None else np.asarray(acts),
                                         None if tmap is None else np.asarray(tmap), why.get("mean_activation"))}


def _activation_label(method: str) -> str:
    """The y label of a method's mean activation, with its unit."""
    return "mean " + _activation_unit(method)


def _activation_unit(method: str) -> str:
    """'activation (its unit)' of a method: rollout's is a share, a contribution method's is in units of y."""
    return ("activation (share of relevance, no unit)" if method_spec(method).kind == "rollout" else
            "activation (units of the mixed output y)")


def plot_attention_depth(series: list, plots_dir, name: str) -> str:
    """Mean activation (top row, log scale) and diversity (bottom row, on all of [0, 1]) of each method over
    relative depth (layer / (n_layers − 1)), one line per model. `series`: [(label, n_layers, {layer:
    profile entry})].
    With one layer per model (nothing to draw over depth): one bar per model and method, with its 95%
    interval over the texts and its value, instead of the lines."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    methods = list(dict.fromkeys(m for _, _, by in series for e in by.values() for m in e["methods"]))
    if all(len(by) == 1 for _, _, by in series):
        return _plot_attention_bars(series, methods, plots_dir, name)
    fig, axes = plt.subplots(2, len(methods), figsize=(4.6 * len(methods), 7), squeeze=False,
                             constrained_layout=True)
    for i, (label, n_layers, by) in enumerate(series):
        layers = sorted(by)
        x = [la / max(1, n_layers - 1) for la in layers]
        for col, m in enumerate(methods):
            for row, key in enumerate(("mean_activation", "neuron_diversity")):
                values = [by[la]["methods"][m][key] for la in layers]  # None (undefined): a gap in the line
                axes[row, col].plot(x, [np.nan if v is None else v for v in values], "o-", color=f"C{i}",
                                    label=f"{label} (layers {', '.join(map(str, layers))})")
    for col, m in enumerate(methods):
        axes[0, col].set(title=m, ylabel=_activation_label(m).replace(" (", ", log scale\n("), yscale="log")
        axes[1, col].set(ylabel="diversity (1 = uniform, no unit)", xlabel="relative depth (layer / (layers - 1))",
                         ylim=(0, 1.05))  # its whole range: a small difference does not look like a cliff
        for row in range(2):
            axes[row, col].set_xlim(-0.05, 1.05)
        axes[0, col].legend(fontsize=7)
    fig.suptitle("Attention neurons over depth: mean activation (scale is model-specific) and diversity")
    return save_figure(fig, plots_dir, name)


def _plot_attention_bars(series: list, methods: list, plots_dir, name: str) -> str:
    """`plot_attention_depth` with one layer per model: per method, a bar per model of its mean activation
    (top) and diversity (bottom) at that layer, with the 95% interval over the texts; an undefined value is
    no bar, labelled so."""
    import matplotlib.pyplot as plt

    from utils import save_figure

    fig, axes = plt.subplots(2, len(methods), figsize=(max(4.0, 1.2 * len(series) + 2.2) * len(methods), 7),
                             squeeze=False, constrained_layout=True)
    labels = [f"{label}\nlayer {la} (of {n_layers})" for label, n_layers, by in series for la in by]
    for col, m in enumerate(methods):
        for row, key in enumerate(("mean_activation", "neuron_diversity")):
            ax = axes[row, col]
            values, err = [], [[], []]
            for _, _, by in series:
                e = next(iter(by.values()))["methods"].get(m) or {}
                v, lo, hi = e.get(key), e.get(f"{key}_low"), e.get(f"{key}_high")
                values.append(v)
                err[0].append(0.0 if v is None or lo is None else max(0.0, v - lo))
                err[1].append(0.0 if v is None or hi is None else max(0.0, hi - v))
            heights = [np.nan if v is None else v for v in values]
            bars = ax.bar(range(len(series)), heights, yerr=err, capsize=4,
                          color=[f"C{i}" for i in range(len(series))])
            ax.bar_label(bars, labels=["" if v is None else f"{v:.4g}" for v in values], fontsize=8,
                         label_type="center", color="white")
            for i, v in enumerate(values):
                if v is None:
                    ax.text(i, 0, "undefined", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(series)), labels, fontsize=8)
            if key == "neuron_diversity":
                ax.set(ylabel="diversity (1 = uniform, no unit)", ylim=(0, 1.05))
            else:
                ax.set(title=m, ylabel=_activation_label(m))
    fig.suptitle("Attention neurons at the one layer of each model (no depth to draw): mean activation (scale "
                 "is model-specific) and diversity; bars: 95% interval over the texts")
    return save_figure(fig, plots_dir, name)


# --------------------------------------------------------------------------------------------------
# The attention stage (a text stage: it reads the mixer or attention captures and the gradients of the
# text pass)
# --------------------------------------------------------------------------------------------------
def stage_layers(opts, layer: int) -> list[int]:
    """The attention stage's layers at `layer`: it and every --attention_layers layer."""
    return sorted({layer, *(opts.attention_layers or ())})


def attention_by_layer(results: dict) -> dict:
    """{layer: profile entry} of an attention stage's results (one layer, or every --attention_layers layer)."""
    return results.get("by_layer") or {results["layer"]: results}


def _stage_reader(ctx):
    layers = sorted({la for layer in ctx.layers for la in stage_layers(ctx.opts, layer)})
    o = ctx.opts
    if ctx.adapter.hybrid:
        return HybridAttentionRead(ctx, layers)
    return AttentionProfile(attention_neurons_for(ctx.model, o.attention_target), layers, o.attention_methods,
                            ctx.top_k, maps_at=set(ctx.layers), n_resamples=o.bootstrap_resamples, seed=o.seed)


# Why a method is left out at a hybrid's layers, by method (the others run there)
HYBRID_LEFT_OUT = {"rollout": "rollout multiplies the attention of every layer below, and a hybrid's layers below mix "
                              "positions by different mechanisms (hidden attention, softmax heads, or none): not "
                              "defined here"}


class HybridAttentionRead:
    """The attention stage's reader on a hybrid: the hidden attention at the layers with a state-space mixer
    (`MambaAttentionNeurons`) and the softmax heads at the layers with attention (`TransformerAttentionNeurons`
    on `models.AttentionLayersView`), from one text pass; Falcon-H1's layers have both, side by side. Methods
    that are not defined on a hybrid, or that need a gradient where the layer has no module to take one at
    (or, at a layer with both paths, on the attention path: the pass takes one gradient per layer, the
    state-space path's), are left out with the reason (`left_out`)."""

    def __init__(self, ctx, layers):
        from models import NotApplicable

        o, a = ctx.opts, ctx.adapter
        dropped = {m: why for m, why in HYBRID_LEFT_OUT.items() if m in o.attention_methods}
        methods = [m for m in o.attention_methods if m not in dropped]
        self.left_out = {"ssm": dict(dropped), "attention": dict(dropped)}  # per part: {method: why}
        self.profiles, self.analyzers, self.methods, self.skipped = {}, {}, {}, {}
        parts = {"ssm": [la for la in layers if a.has_ssm(la)], "attention": []}
        for la in layers:
            if not a.has_attention(la):
                if not a.has_ssm(la):  # a feed-forward block: nothing mixes positions there
                    self.skipped[la] = str(a._lacks(la, "state-space mixer or attention"))
                continue
            try:
                a.attention_paths(la)
                parts["attention"].append(la)
            except NotApplicable as exc:
                self.skipped[la] = str(exc)
        for part, part_layers in parts.items():
            if not part_layers:
                continue
            keep = list(methods)
            if needs_gradient(keep):
                try:
                    for la in part_layers:
                        if part == "attention" and a.has_ssm(la):
                            raise NotApplicable("at a layer with both paths the text pass takes its one gradient on the "
                                                "state-space path")
                        a.gradient_path(la)
                except NotApplicable as exc:
                    keep = [m for m in keep if not METHOD_SPECS[m].needs_gradient]
                    self.left_out[part].update({m: str(exc) for m in methods if m not in keep})
            if not keep:
                continue
            analyzer = _hybrid_analyzer(ctx, part)
            self.analyzers[part], self.methods[part] = analyzer, tuple(keep)
            self.profiles[part] = AttentionProfile(analyzer, part_layers, keep, ctx.top_k, maps_at=set(ctx.layers),
                                                   n_resamples=o.bootstrap_resamples, seed=o.seed)
        if not self.profiles:
            raise NotApplicable(f"no layer of {layers} has a state-space mixer or attention whose units this version "
                                f"reads ({'; '.join(self.skipped.values()) or 'feed-forward layers only'})")

    @property
    def request(self):
        from passes import TextRequest

        want = TextRequest()
        for p in self.profiles.values():
            want = want | p.request
        return want

    def read(self, text) -> None:
        for p in self.profiles.values():
            p.read(text)

    def finish(self) -> dict:
        return {"parts": {part: p.finish() for part, p in self.profiles.items()}, "left_out": self.left_out,
                "skipped": self.skipped}


def _stage_run(ctx, profile: dict):
    """Attention neurons at --layer (and every --attention_layers layer) over every text: each method's unit
    scores per query token, token-weighted over the texts, with intervals. Mamba: hidden attention of the
    channels; Transformer: the attention weights of the attention-output dims (UNITS). The entries that keep
    the first text's maps also get "first_text_tokens", its tokens as the tokenizer decodes each id (the
    maps' axis labels)."""
    o = ctx.opts
    if ctx.adapter.hybrid:
        return _hybrid_stage_run(ctx, profile)
    analyzer = attention_neurons_for(ctx.model, o.attention_target)
    return _stage_results(ctx, analyzer, profile, stage_layers(o, ctx.layer), o.attention_methods)


def _hybrid_stage_run(ctx, read: dict):
    """A hybrid's layer: the state-space path's hidden attention where the layer has a mixer, else the softmax
    heads; at a layer with both (Falcon-H1), the attention path's entry beside it (`attention_path`)."""
    from models import NotApplicable

    a, layer, parts = ctx.adapter, ctx.layer, read["parts"]
    found = [part for part in ("ssm", "attention") if layer in parts.get(part, {})]
    if not found:
        if layer in read["skipped"]:
            raise NotApplicable(read["skipped"][layer])
        part = "ssm" if a.has_ssm(layer) else "attention"
        raise NotApplicable(f"layer {layer}: no attention method applies here ({read['left_out'][part]})")
    entries = []
    for part in found:
        profile = parts[part]
        analyzer = _hybrid_analyzer(ctx, part)
        layers = [la for la in stage_layers(ctx.opts, layer) if la in profile]
        results, plots = _stage_results(ctx, analyzer, profile, layers, tuple(profile[layer]["methods"]),
                                        prefix=ctx.prefix if part == found[0] else f"{ctx.prefix}_attention_path")
        results["path"] = part
        if part != found[0] and read["left_out"][part]:
            results["methods_left_out"] = read["left_out"][part]
        entries.append((results, plots))
    results, plots = entries[0]
    results["layer_kind"] = a.layer_kind(layer)
    if read["left_out"][found[0]]:
        results["methods_left_out"] = read["left_out"][found[0]]
    if layer in read["skipped"]:  # Zamba2's hybrid layers: the shared attention is not this layer's
        results["attention_path_not_read"] = read["skipped"][layer]
    others = [la for la in stage_layers(ctx.opts, layer) if la not in parts[found[0]]]
    elsewhere = {la: {**parts[p][la], "path": p, "units": _hybrid_analyzer(ctx, p).describe_units()}
                 for la in others for p in parts if p != found[0] and la in parts[p]}
    if elsewhere:  # --attention_layers of the other kind: their entries, with their own units
        results["other_path_layers"] = elsewhere
    missing = {la: read["skipped"].get(la) or f"kind {a.layer_kind(la)}" for la in others if la not in elsewhere}
    if missing:  # --attention_layers without mixing (a feed-forward block) or not read: said, not dropped
        results["attention_layers_not_read"] = missing
    if len(entries) > 1:  # Falcon-H1: the attention path of the same layer, side by side
        results["attention_path"] = entries[1][0]
        plots = plots + entries[1][1]
    return results, plots


def _hybrid_analyzer(ctx, part: str) -> "AttentionNeurons":
    """The analyser of a hybrid's `part` ("ssm": its state-space layers, "attention": its attention layers)."""
    from models import AttentionLayersView

    if part == "ssm":
        return MambaAttentionNeurons(ctx.model, ctx.opts.attention_target)
    return TransformerAttentionNeurons(ctx.model, ctx.opts.attention_target, adapter=AttentionLayersView(ctx.adapter))


def _stage_results(ctx, analyzer, profile: dict, layers: list, methods, prefix: str | None = None):
    """The attention stage's results at ctx.layer (and its plots) from one analyser's profile over `layers`."""
    from functools import partial

    import stats
    from naming import layer_tag

    o = ctx.opts
    layer = ctx.layer
    by_layer = {la: profile[la] for la in layers}
    for entry in by_layer.values():  # each last_argmax target's token, as the tokenizer writes it
        for t in entry.get("gradient_targets") or []:
            if "token_id" in t and "token" not in t:
                t["token"] = ctx.tokenizer.decode([t["token_id"]])
    # the first text's tokens, as the tokenizer writes each, beside the entries that keep its maps (their axes)
    first = [ctx.tokenizer.decode([t]) for t in ctx.tokens.input_ids[0][0].tolist()]
    for entry in by_layer.values():
        if "attention_vector_first_text" in entry:
            entry["first_text_tokens"] = first
    family = "mamba" if analyzer.adapter.is_ssm else "transformer"
    results = {**by_layer[layer], "units": analyzer.describe_units(),
               "ranked_by": "activation: per unit, the token-weighted mean over the texts of its activation per "
                            "query token (definitions); rank stability, over draws of the texts: "
                            f"{stats.STABILITY_DEFINITION}",
               "definitions": {m: DEFINITIONS[m] for m in methods}}
    if needs_gradient(methods):
        results["target"] = o.attention_target
        results["target_definition"] = TARGETS[o.attention_target]
    d, p, k = ctx.plots_dir, prefix or ctx.prefix, ctx.top_k
    tokens = results.get("first_text_tokens")
    plots = [partial(plot_attention_vector, results["attention_vector_first_text"], layer, d, p, family, tokens)]
    plots += [partial(analyzer.visualize_neurons, neuron_scores(results, m), layer, d, p, k, results["methods"][m],
                      results["methods"][m]["activation_per_text"], tokens) for m in methods]
    if len(layers) > 1:
        results["attention_layers"] = layers
        results["by_layer"] = by_layer
        plots.append(partial(plot_attention_depth, [(p, ctx.adapter.n_layers, by_layer)], d,
                             f"{p}_attention_by_layer_{layer_tag(layers[0], layers)}"))
    return results, plots


def _unit_label(t: dict) -> str:
    """A top neuron's index, with its head for a Transformer's attention-output dims."""
    return f"{t['channel']}" + (f"/h{t['head']}" if "head" in t else "")


def attention_summary(r: dict) -> str:
    from utils import shown

    units = r.get("units") or {"unit": "channel"}
    unit = units["unit"]
    if unit == "channel" and "n_heads" in units:  # Mamba-2
        lines = [f"    hidden attention over {r['n_texts']} texts; units: the {units['n_units']} channels of the inner "
                 f"width ({units['n_heads']} heads x {units['head_dim']}), each mixed by its head's α; (α x + D x) "
                 f"through the gated norm: max rel. error {r['max_reconstruction_error']:.2e}"]
    elif unit == "channel":
        lines = [f"    hidden attention over {r['n_texts']} texts; units: channels of the inner width; (α x + D x) "
                 f"reconstruction max rel. error {r['max_reconstruction_error']:.2e}"]
    else:
        lines = [f"    attention over {r['n_texts']} texts; units: the {units['n_units']} attention-output dims "
                 f"({units['n_heads']} heads x {units['head_dim']}), each mixed by its head's weights; (A v) through "
                 f"the output projection: max rel. error {r['max_reconstruction_error']:.2e}"]
    lines.append("    activation per query token, texts weighted by tokens; [95% interval over texts]; top units with "
                 "their top-k stability ('=' tied)")
    targets = r.get("gradient_targets")
    if targets:
        lines.append("    " + _targets_line(r.get("target"), targets))
    for la, e in attention_by_layer(r).items():
        where = f"layer {la} " if "by_layer" in r else ""
        for m, a in e["methods"].items():
            top = ", ".join(_unit_label(t) + ("=" if t.get("tied") else "") + " ("
                            + _shown({"value": t["activation"], "low": t.get("low"), "high": t.get("high")}, ".3g")
                            + ("" if t.get("stability") is None else f", {100 * t['stability']:.0f}%") + ")"
                            for t in a["top_neurons"][:5])
            mean = {"value": a["mean_activation"], "low": a.get("mean_activation_low"),
                    "high": a.get("mean_activation_high")}
            div = {"value": a["neuron_diversity"], "low": a.get("neuron_diversity_low"),
                   "high": a.get("neuron_diversity_high")}
            lines.append(f"    {where}{m}: {a['num_neurons']} {unit}s, {a['n_texts_averaged']} texts; mean activation "
                         f"{_shown(mean, '.4g')}, diversity {_shown(div, '.3f')}; top: {top or 'none (no ranking)'}")
            if a.get("ties"):
                lines.append(f"      ties: {a['ties']}")
            lines += [f"      {field}: {why}" for field, why in (a.get("undefined") or {}).items()]
    lines += [f"    left out here: {m}: {why}" for m, why in (r.get("methods_left_out") or {}).items()]
    lines += [f"    --attention_layers {la} not read here: {why}" for la, why in (r.get("attention_layers_not_read") or {}).items()]
    lines += [f"    --attention_layers {la}: a layer of the other path ({e['path']}, units: {e['units']['unit']}s), its "
              "entry under other_path_layers" for la, e in (r.get("other_path_layers") or {}).items()]
    text = "".join(line + "\n" for line in lines)
    if "attention_path" in r:  # a layer with both paths (Falcon-H1): the softmax heads of the same layer
        text += "    the same layer's attention path (softmax heads):\n" + attention_summary(r["attention_path"])
    return text


def _shown(d: dict, spec: str) -> str:
    import stats

    return "undefined" if d["value"] is None else stats.shown(d, spec)


def _targets_line(target: str | None, targets: list) -> str:
    """One line on gradient_guided's targets over the texts (each text's record is in the JSON)."""
    defined = [t for t in targets if "undefined" not in t]
    left = len(targets) - len(defined)
    tail = f"; {left} texts without a target (one token)" if left else ""
    if not defined:
        return f"gradient_guided target: {target}: none defined{tail}"
    if "p" in defined[0]:
        p = np.array([t["p"] for t in defined])
        return (f"gradient_guided target: {target} (log p of the last position's most likely token): p median "
                f"{np.median(p):.2f}, range {p.min():.2f}-{p.max():.2f} over {len(defined)} texts{tail}")
    lp = np.array([t["mean_logp"] for t in defined])
    return (f"gradient_guided target: {target} (the texts' own next tokens, every position): mean log p per token "
            f"median {np.median(lp):.2f} nats over {len(defined)} texts{tail}")


def _register() -> None:
    from pipeline import Stage, register

    register(Stage("attention", _stage_run, attention_summary, reader=_stage_reader, per_layer=True))


_register()
