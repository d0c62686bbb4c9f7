"""Selective-scan math for Mamba-1 (and FalconMamba) and Mamba-2 layers, recomputed from the mixer input
and the layer's weights.

Shape glossary (used in the shape comments throughout the project):
    b  batch            l / L  sequence length
    d  d_model (hidden_size)        e  d_inner (intermediate_size = expand * d)
    n  SSM state size   r  dt rank  k  conv kernel width

The Mamba-1 mixer, step by step as transformers' slow path computes it, from the mixer input h (b, L, d):
    1. in_proj(h) splits into x0 (b, L, e) and the gate z (b, L, e);
    2. x = SiLU(causal depthwise conv1d of x0 over time, width k, left-padded, with bias)   (b, L, e);
    3. x_proj(x) splits into dt_low (b, L, r), B (b, L, n), C (b, L, n) (FalconMamba: each then divided by
       its root mean square over the last dim, sqrt(mean(v²) + rms_eps): a weightless RMS norm);
    4. Δ = softplus(dt_low · dt_proj.weightᵀ + dt_proj.bias)   (b, L, e): "delta";
    5. A = −exp(A_log) (e, n); discretised Ā_t = exp(Δ_t A), and the input term Δ_t B_t x_t;
    6. the scan, per channel and state: s_t = Ā_t s_{t−1} + Δ_t B_t x_t, y_t = C_t · s_t + D x_t;
    7. u = y · SiLU(z) (b, L, e), and out_proj(u) (b, L, d) is the mixer's output.
The recomputation follows these steps, in float32 (float64 for a float64 model), and is
verified by `check_reconstruction`: `out_proj(u)` must equal the mixer's real output. Hugging Face does
not call `conv1d` / `dt_proj` as modules (and fuses everything on CUDA), so hooks on them capture
nothing; the mixer's *input* is the only reliable capture point.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import mixer_adapter  # light: what each family's mixer computes is the adapter's knowledge

# Largest allowed reconstruction error, max|ours - real| / max|real|, by the dtype the model ran in.
# float32: the 1e-4. bfloat16/float16: the model itself rounds every projection to 8 / 11
# mantissa bits while we compute in float32, so agreement is limited by the model's own rounding.
RECONSTRUCTION_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}


class ReconstructionError(RuntimeError):
    """The recomputed mixer output does not match the model's own: the recomputed Δ cannot be trusted."""


@dataclass
class MixerInternals:
    """Everything inside one mixer for one input, in float32 (float64 for a float64 model). Shapes are
    Mamba-1's; Mamba-2's differ where noted in the Mamba-2 section (Δ (b, L, H), B and C (b, L, G, N),
    A and D (H,), e = I, u the gated RMS norm's output)."""

    x: torch.Tensor  # (b, L, e) conv1d + SiLU output: the scan input
    z: torch.Tensor  # (b, L, e) gate
    delta: torch.Tensor  # (b, L, e) Δ = softplus(dt_proj(dt_low))
    B: torch.Tensor  # (b, L, n)
    C: torch.Tensor  # (b, L, n)
    A: torch.Tensor  # (e, n) = -exp(A_log)
    D: torch.Tensor  # (e,)
    y: torch.Tensor  # (b, L, e) scan output including the D skip, before the gate
    u: torch.Tensor  # (b, L, e) y * SiLU(z), the input of out_proj
    out: torch.Tensor  # (b, L, d) out_proj(u): must equal the mixer's output


def weightless_rms_norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    """v / sqrt(mean(v², last dim) + eps), in float32, returned in v's dtype."""
    f = v.float()
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).type_as(v)


def weighted_rms_norm(v: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · (v / sqrt(mean(v², last dim) + eps)), the norm in float32 and cast back to v's dtype before the
    weight (as transformers' RMS norms compute it)."""
    return weight.to(v.dtype) * weightless_rms_norm(v, eps)


def input_norms(mixer, dt_low: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """(dt_low, B, C) as the scan uses them: FalconMamba's mixer (its adapter's `normalises_scan_inputs`)
    normalises each with a weightless RMS norm over its last dim (eps `mixer.rms_eps`), Jamba's with weighted
    RMS norms (`dt_layernorm`, `b_layernorm`, `c_layernorm`: their weights and eps); a Mamba-1 mixer uses
    them as they are."""
    if mixer_adapter(mixer).weighted_scan_input_norms:
        norms = (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm)
        return tuple(weighted_rms_norm(v, n.weight, n.variance_epsilon) for v, n in zip((dt_low, B, C), norms))
    if not mixer_adapter(mixer).normalises_scan_inputs:
        return dt_low, B, C
    return tuple(weightless_rms_norm(v, mixer.rms_eps) for v in (dt_low, B, C))


def mixer_projections(mixer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Steps 1-5 of the module doc: x, z, Δ, B, C, A, D from the mixer input `hidden_states` (b, L, d).
    Computed in float32 (float64 for a float64 model)."""
    f32 = torch.promote_types(hidden_states.dtype, torch.float32)
    h = hidden_states.to(f32)  # (b, L, d)
    mask = None if attention_mask is None else attention_mask.to(f32)[:, :, None]  # (b, L, 1)
    if mask is not None:
        h = h * mask
    w_in = mixer.in_proj.weight.to(f32)  # (2e, d)
    b_in = None if mixer.in_proj.bias is None else mixer.in_proj.bias.to(f32)
    xz = F.linear(h, w_in, b_in)  # (b, L, 2e)
    x0, z = xz.chunk(2, dim=-1)  # (b, L, e) each
    L = h.shape[1]
    e = x0.shape[-1]
    conv_w = mixer.conv1d.weight.to(f32)  # (e, 1, k)
    conv_b = None if mixer.conv1d.bias is None else mixer.conv1d.bias.to(f32)
    k = conv_w.shape[-1]
    x = F.conv1d(x0.transpose(1, 2), conv_w, conv_b, padding=k - 1, groups=e)[..., :L]  # (b, e, L)
    x = mixer.act(x).transpose(1, 2)  # (b, L, e)
    if mask is not None:
        x = x * mask
    r, n = int(mixer.time_step_rank), int(mixer.ssm_state_size)
    dt_low, B, C = input_norms(mixer, *torch.split(F.linear(x, mixer.x_proj.weight.to(f32)), [r, n, n], dim=-1))
    delta = F.softplus(F.linear(dt_low, mixer.dt_proj.weight.to(f32), mixer.dt_proj.bias.to(f32)))  # (b, L, e)
    A = -torch.exp(mixer.A_log.to(f32))  # (e, n)
    D = mixer.D.to(f32)  # (e,)
    return x, z, delta, B, C, A, D


def selective_scan_reference(x, delta, A, B, C, D):
    """Plain sequential scan (step 6 of the module doc), the reference every faster scan is tested against.

    x, delta: (b, L, e); A: (e, n); B, C: (b, L, n); D: (e,). Returns y (b, L, e), D skip included.
    """
    b, L, e = x.shape
    dA = torch.exp(delta[..., None] * A)  # (b, L, e, n)  Ā_t = exp(Δ_t A)
    dBx = delta[..., None] * B[:, :, None, :] * x[..., None]  # (b, L, e, n)  Δ_t B_t x_t
    s = x.new_zeros(b, e, A.shape[1])  # (b, e, n)
    ys = []
    for t in range(L):
        s = dA[:, t] * s + dBx[:, t]  # (b, e, n)
        ys.append((s * C[:, t, None, :]).sum(-1))  # (b, e)
    return torch.stack(ys, dim=1) + x * D  # (b, L, e)


def project_out(mixer, u: torch.Tensor) -> torch.Tensor:
    """out_proj(u) in u's dtype (float32 or float64): (b, L, e) -> (b, L, d)."""
    b_out = None if mixer.out_proj.bias is None else mixer.out_proj.bias.to(u.dtype)
    return F.linear(u, mixer.out_proj.weight.to(u.dtype), b_out)


def recompute_mixer(mixer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> MixerInternals:
    """Recompute a mixer's forward from its input (b, L, d), in float32 (float64 for a float64 model),
    keeping every internal: Mamba-1 / FalconMamba by the steps of the module doc, Mamba-2 by those of
    the Mamba-2 section below (the mixer's class tells which)."""
    with torch.no_grad():
        x, z, delta, B, C, A, D = ssm_projections(mixer, hidden_states, attention_mask)
        scan = mamba2_scan_reference if is_mamba2_mixer(mixer) else selective_scan_reference
        y = scan(x, delta, A, B, C, D)  # (b, L, e)
        u = gate_output(mixer, y, z)  # (b, L, e)
        out = project_out(mixer, u)  # (b, L, d)
    return MixerInternals(x, z, delta, B, C, A, D, y, u, out)


def ssm_projections(mixer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """x, z, Δ, B, C, A, D of either kind of mixer: `mixer_projections` (Mamba-1, FalconMamba) or
    `mamba2_projections` (Mamba-2)."""
    fn = mamba2_projections if is_mamba2_mixer(mixer) else mixer_projections
    return fn(mixer, hidden_states, attention_mask)


def gate_output(mixer, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """u, the input of out_proj, from the scan output y and the gate z (b, L, e): y · SiLU(z) (Mamba-1,
    FalconMamba) or Mamba-2's gated RMS norm."""
    return gated_rms_norm(mixer, y, z) if is_mamba2_mixer(mixer) else y * F.silu(z)


def channel_D(D: torch.Tensor, e: int) -> torch.Tensor:
    """The D skip per channel (e,): Mamba-2's one D per head repeated for the head's e / H channels."""
    return D if D.shape[0] == e else D.repeat_interleave(e // D.shape[0])


def hidden_attention_by_channel(mixer, delta, A, B, C):
    """The hidden attention of either kind of mixer, one channel group at a time: yields (channel slice,
    α of those channels (b, g, L, L)), with y^c = Σ_j α^c[i, j] x^c_j + D_c x^c_i for every channel c.
    Mamba-1 / FalconMamba: `hidden_attention_groups`. Mamba-2: one head at a time (`hidden_attention_heads`),
    its α_h shared by the head's channels (an expanded view, no copy)."""
    if not is_mamba2_mixer(mixer):
        yield from hidden_attention_groups(delta, A, B, C)
        return
    P = int(mixer.head_dim)
    for h, alpha in hidden_attention_heads(delta, A, B, C):  # (b, L, L)
        yield slice(h * P, (h + 1) * P), alpha[:, None].expand(-1, P, -1, -1)  # (b, P, L, L)


# --------------------------------------------------------------------------------------------------
# Mamba-2 (Mamba2ForCausalLM), as transformers 5.x computes it
# --------------------------------------------------------------------------------------------------
# Shapes: I inner width (= H heads x P head dims; a channel c is head c // P), G groups of B and C shared by
# H / G heads each (head h reads group h // (H / G)), N state size. From the mixer input h (b, L, d):
#   1. in_proj(h) splits into the gate z (I), xBC (I + 2 G N) and dt (H);
#   2. xBC = SiLU(causal depthwise conv1d of xBC over time, width k, with bias), split into x (I), B (G, N),
#      C (G, N); conv1d runs as a function, so its module hooks never fire;
#   3. Δ = clamp(softplus(dt + dt_bias), time_step_limit): one value per head and position (b, L, H);
#   4. A = −exp(A_log): one value per head (H,);
#   5. per head h, dim p and state n: s_t = exp(Δ_t A_h) s_{t−1} + Δ_t x_t B_t, y_t = C_t · s_t + D_h x_t
#      (transformers runs it in chunks of `chunk_size` positions; the recurrence is the same);
#   6. u = the gated RMS norm: weight · RMSnorm(y · SiLU(z)) over groups of I / G_norm channels;
#   7. out_proj(u) (b, L, d) is the mixer's output.
def is_mamba2_mixer(mixer) -> bool:
    """A Mamba-2 layer's mixer, by its family's adapter (`models.mixer_adapter`: TypeError for a module that
    is no supported family's mixer)."""
    return mixer_adapter(mixer).ssm_kind == "mamba2"


def computes_partly_in_float32(mixer) -> bool:
    """True where transformers runs part of the mixer in float32 even in a float64 model, so the model's
    own output carries float32 rounding there: Mamba-2's scan, and FalconMamba's weightless RMS norms of
    Δ's low-rank input, B and C (on an H100 a float64 FalconMamba's recomputation differed from the model
    by 1.03e-8, over float64's tolerance). Its family's adapter says (`float32_parts`)."""
    return bool(mixer_adapter(mixer).float32_parts)


def mamba2_projections(mixer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Steps 1-4 of the Mamba-2 section: x (b, L, I), z (b, L, I), Δ (b, L, H), B and C (b, L, G, N),
    A (H,), D (H,), in float32 (float64 for a float64 model)."""
    f32 = torch.promote_types(hidden_states.dtype, torch.float32)
    h = hidden_states.to(f32)  # (b, L, d)
    mask = None if attention_mask is None else attention_mask.to(f32)[:, :, None]  # (b, L, 1)
    if mask is not None:
        h = h * mask
    I, G, N, H = int(mixer.intermediate_size), int(mixer.n_groups), int(mixer.ssm_state_size), int(mixer.num_heads)
    b_in = None if mixer.in_proj.bias is None else mixer.in_proj.bias.to(f32)
    h = h * getattr(mixer, "ssm_in_multiplier", 1.0)  # Falcon-H1's µP multiplier of the mixer input
    projected = F.linear(h, mixer.in_proj.weight.to(f32), b_in)  # (b, L, I + I + 2GN + H)
    if getattr(mixer, "mup_vector", None) is not None:  # Falcon-H1: one multiplier each for z, x, B, C and dt
        projected = projected * mixer.mup_vector.to(f32)  # (1, 1, I + I + 2GN + H)
    z, xBC, dt = torch.split(projected, [I, I + 2 * G * N, H], dim=-1)
    L = h.shape[1]
    conv_w = mixer.conv1d.weight.to(f32)  # (I + 2GN, 1, k)
    conv_b = None if mixer.conv1d.bias is None else mixer.conv1d.bias.to(f32)
    xBC = F.conv1d(xBC.transpose(1, 2), conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=conv_w.shape[0])
    xBC = mixer.act(xBC[..., :L]).transpose(1, 2)  # (b, L, I + 2GN)
    if mask is not None:
        xBC = xBC * mask
    x, B, C = torch.split(xBC, [I, G * N, G * N], dim=-1)
    lo, hi = mixer.time_step_limit
    delta = torch.clamp(F.softplus(dt + mixer.dt_bias.to(f32)), min=lo, max=hi)  # (b, L, H)
    A = -torch.exp(mixer.A_log.to(f32))  # (H,)
    return x, z, delta, B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)), A, mixer.D.to(f32)


def _per_head(v: torch.Tensor, H: int) -> torch.Tensor:
    """B or C (b, L, G, N) as each head reads it: (b, L, H, N), head h from group h // (H / G)."""
    return v.repeat_interleave(H // v.shape[2], dim=2)


def mamba2_scan_reference(x, delta, A, B, C, D):
    """Plain sequential Mamba-2 scan (step 5), the reference the model's chunked scan is checked against:
    x (b, L, I), Δ (b, L, H), A (H,), B and C (b, L, G, N), D (H,) -> y (b, L, I), D skip included."""
    b, L, I = x.shape
    H = A.shape[0]
    xh = x.unflatten(-1, (H, I // H))  # (b, L, H, P)
    Bh, Ch = _per_head(B, H), _per_head(C, H)  # (b, L, H, N)
    s = x.new_zeros(b, H, I // H, B.shape[-1])  # (b, H, P, N)
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, t] * A)[:, :, None, None]  # (b, H, 1, 1)
        s = dA * s + (delta[:, t, :, None] * xh[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, H, P, N)
        ys.append((s * Ch[:, t, :, None, :]).sum(-1))  # (b, H, P)
    y = torch.stack(ys, dim=1) + xh * D[:, None]  # (b, L, H, P)
    return y.flatten(2)  # (b, L, I)


def gated_rms_norm(mixer, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Step 6: weight · RMSnorm(y · SiLU(z)) over groups of channels (`mixer.norm.group_size`, or I / its
    `n_groups`), in float32 as transformers computes it (also in a float64 model), returned in y's dtype.
    Falcon-H1's mixer may instead gate after the norm (`norm.norm_before_gate`: weight · RMSnorm(y) · SiLU(z)),
    or have no norm (`mamba_rms_norm` false: y · SiLU(z))."""
    norm = mixer.norm
    if not getattr(mixer, "mamba_rms_norm", True):  # Falcon-H1 without its norm (transformers tests truthiness)
        return y * F.silu(z)
    before = getattr(norm, "norm_before_gate", False)
    group = int(getattr(norm, "group_size", 0) or y.shape[-1] // int(norm.n_groups))
    v = y.float() if before else y.float() * F.silu(z.float())  # (b, L, I)
    v = v.unflatten(-1, (-1, group))  # (b, L, groups, I / groups)
    v = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).flatten(2)  # (b, L, I)
    if before:  # Falcon-H1's order: weight · norm(y) in float32, then the gate
        return (norm.weight.float() * v * F.silu(z.float())).to(y.dtype)
    return norm.weight.to(y.dtype) * v.to(y.dtype)  # (b, L, I)


def hidden_attention_heads(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """Mamba-2's hidden attention, one head at a time: yields (h, α_h (b, L, L)) with

        α_h[i, j] = (C_i · B_j) exp(A_h Σ_{k=j+1..i} Δ_k) Δ_j  for j ≤ i, else 0

    (B, C of the head's group), so that y_i = Σ_j α_h[i, j] x_j + D_h x_i for each of the head's P dims.
    The decay's exponent is a difference of cumulative Δ taken in float64 (no cancellation error at long
    L) and the entries j > i are set to −∞ before exp. Δ (b, L, H), A (H,), B and C (b, L, G, N)."""
    f32 = torch.promote_types(delta.dtype, torch.float32)
    b, L, H = delta.shape
    S = torch.cumsum(delta.double(), dim=1)  # (b, L, H)
    causal = torch.ones(L, L, dtype=torch.bool, device=delta.device).tril()  # (L, L)
    per = H // B.shape[2]
    for h in range(H):
        g = h // per
        seg = S[:, :, None, h] - S[:, None, :, h]  # (b, L, L): Σ_{k=j+1..i} Δ_k
        decay = torch.exp(torch.where(causal, A[h].double() * seg, -torch.inf)).to(f32)  # (b, L, L)
        CB = torch.einsum("bin,bjn->bij", C[:, :, g].to(f32), B[:, :, g].to(f32))  # (b, L, L)
        yield h, CB * decay * delta[:, None, :, h].to(f32)  # (b, L, L)


@dataclass
class ReconstructionCheck:
    relative_error: float  # max|ours - real| / max|real|
    max_abs_error: float
    tolerance: float
    dtype: str

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance


def check_reconstruction(recomputed_out: torch.Tensor, real_out: torch.Tensor, raise_on_mismatch: bool = True,
                         mixer=None) -> ReconstructionCheck:
    """Compare our `out_proj(u)` (b, L, d) with the mixer's real output (b, L, d).

    The tolerance depends on the precision the model computed in (RECONSTRUCTION_TOLERANCE): the dtype it
    ran in, except that transformers runs a Mamba-2 mixer's scan and FalconMamba's input norms in float32
    also in a float64 model (`computes_partly_in_float32`; give `mixer` for that). A mismatch raises
    ReconstructionError (unless `raise_on_mismatch=False`): never fall back to unverified numbers.
    """
    wide = torch.promote_types(real_out.dtype, torch.float32)
    real = real_out.detach().to(wide)
    diff = (recomputed_out.detach().to(wide) - real).abs().max().item()
    scale = real.abs().max().item()
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    precision = torch.float32 if (mixer is not None and computes_partly_in_float32(mixer)
                                  and real_out.dtype == torch.float64) else real_out.dtype
    tol = RECONSTRUCTION_TOLERANCE.get(precision, 1e-4)
    check = ReconstructionCheck(rel, diff, tol, str(precision).replace("torch.", ""))
    if raise_on_mismatch and not check.ok:
        raise ReconstructionError(
            f"recomputed mixer output differs from the model's: relative error {rel:.3g} > {tol:g} "
            f"({check.dtype}); this transformers version's Mamba mixer may compute differently from the "
            "steps in ssm.py's module doc")
    return check


# --------------------------------------------------------------------------------------------------
# The first-order linear recurrence, in chunks of positions (the scans' fast form)
# --------------------------------------------------------------------------------------------------
# Positions per chunk of `linear_scan_`: each level of the chunked scan costs about 7·SCAN_CHUNK tensor
# operations and leaves a recurrence SCAN_CHUNK times shorter, so a 256-position scan takes three levels
# (256, 32, 4), about 130 operations, against two per position (512) for a step loop.
SCAN_CHUNK = 8


def linear_scan_reference(a: torch.Tensor, u: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """The recurrence along dim 1 one position at a time, the reference `linear_scan_` is tested against:
    h_t = a_t h_{t−1} + u_t (h_{−1} = 0), or with `reverse` h_t = a_{t+1} h_{t+1} + u_t (h_L = 0).
    a, u (b, L, ...) of one shape; returns h (b, L, ...)."""
    L = u.shape[1]
    h = u.clone()
    steps = range(L - 2, -1, -1) if reverse else range(1, L)
    for t in steps:
        h[:, t] += a[:, t + 1] * h[:, t + 1] if reverse else a[:, t] * h[:, t - 1]
    return h


def _steps_(a: torch.Tensor, h: torch.Tensor, ts: range, reverse: bool) -> torch.Tensor:
    """The step loop in place over the positions `ts` (a range, each t ≥ 1): h_t += a_t h_{t−1} in increasing
    t; with `reverse`, h_{t−1} += a_t h_t in decreasing t. Returns h."""
    lo = ts.start - 1
    hs, as_ = h[:, lo:ts.stop].unbind(1), a[:, lo:ts.stop].unbind(1)  # views (b, ...) of positions lo..
    for i in (range(len(ts), 0, -1) if reverse else range(1, len(ts) + 1)):  # i = t − lo
        hs[i - 1].addcmul_(as_[i], hs[i]) if reverse else hs[i].addcmul_(as_[i], hs[i - 1])
    return h


def linear_scan_(a: torch.Tensor, h: torch.Tensor, reverse: bool = False, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """`linear_scan_reference` in place, in chunks of `chunk` positions: h (b, L, ...) holds u on entry and
    the states on return (returned); a (b, L, ...) the decays, each in [0, 1] (a Mamba scan's exp(Δ A)).

    With positions split into K chunks of Q = `chunk` (positions after the last whole chunk one at a time):
    1. each chunk's recurrence from a zero state, all chunks at once: Q − 1 steps over (b, K, ...) slices;
    2. the states carried between chunks: chunk k's decay across it D_k = Π_{t ∈ k} a_t and its local last
       state E_k satisfy H_k = D_k H_{k−1} + E_k, a recurrence K = L/Q long: this function, recursively;
    3. each chunk's states corrected by the carried state decayed to them: h_t += (Π_{s ≤ t in k} a_s) H_{k−1}
       (the products by a loop over the chunk's Q positions beside step 1's).
    (With `reverse`, the same from the other end: the carry into chunk k is its successor's first state.)
    Every factor is a product of decays in [0, 1]: nothing overflows, and the result equals the step loop's
    up to float rounding (in another order). In place, so outside autograd (the fast scan's backward is
    written by hand). The Python loops run O(Q · log_Q L) times, plus up to Q − 1 positions after the last
    whole chunk of each level, one at a time; a recurrence of at most 3Q positions is the step loop itself."""
    L = h.shape[1]
    Q = int(chunk)
    if Q < 2:
        raise ValueError(f"chunk must be at least 2 positions, got {chunk}")
    if L <= 3 * Q:  # a short recurrence: the step loop itself (fewer operations than a chunked level)
        return _steps_(a, h, range(1, L), reverse)
    K, whole = L // Q, L - L % Q
    if whole < L:  # the last L − whole positions one at a time, after the whole chunks (before them in reverse)
        if reverse:  # position whole − 1 takes in what comes back from the rest, then the whole chunks run
            _steps_(a, h, range(whole, L), True)
            linear_scan_(a[:, :whole], h[:, :whole], True, Q)
            return h
        linear_scan_(a[:, :whole], h[:, :whole], False, Q)
        return _steps_(a, h, range(whole, L), False)
    hv, av = h.unflatten(1, (K, Q)), a.unflatten(1, (K, Q))  # (b, K, Q, ...)
    hs, as_ = hv.unbind(2), av.unbind(2)  # Q views (b, K, ...) each
    if not reverse:
        decay = torch.empty_like(av)  # (b, K, Q, ...): Π a from the chunk's first position to this one
        ds = decay.unbind(2)
        ds[0].copy_(as_[0])
        for q in range(1, Q):  # 1. within each chunk (a product loop: a cumprod is slower on a CPU)
            hs[q].addcmul_(as_[q], hs[q - 1])
            torch.mul(as_[q], ds[q - 1], out=ds[q])
        ends = linear_scan_(ds[Q - 1], hs[Q - 1].clone(), False, Q)  # 2. (b, K, ...): H_k
        hv[:, 1:].addcmul_(decay[:, 1:], ends[:, :-1, None])  # 3. H_{k−1} decayed into chunk k's positions
        return h
    for q in range(Q - 2, -1, -1):  # 1. within each chunk, from its end
        hs[q].addcmul_(as_[q + 1], hs[q + 1])
    # S[k, q] = Π a over (q, the first position of chunk k+1]: products over the rest of the chunk and one step
    # into the next (no next chunk after the last: 0)
    decay = torch.empty_like(av)  # (b, K, Q, ...)
    ds = decay.unbind(2)
    ds[Q - 1][:, :-1] = as_[0][:, 1:]
    ds[Q - 1][:, -1] = 0
    for q in range(Q - 2, -1, -1):
        torch.mul(as_[q + 1], ds[q + 1], out=ds[q])
    # 2. G_{first of k} = E_k + S[k, 0] G_{first of k+1}: the recursion's decay at k+1 is S[k, 0] (at 0 unread)
    firsts = linear_scan_(torch.cat([ds[0][:, :1], ds[0][:, :-1]], 1), hs[0].clone(), True, Q)  # (b, K, ...)
    hv[:, :-1].addcmul_(decay[:, :-1], firsts[:, 1:, None])  # 3. G_{first of k+1} decayed back into chunk k
    return h


# --------------------------------------------------------------------------------------------------
# Fast scan for training: the same recurrence, with a hand-written backward
# --------------------------------------------------------------------------------------------------
class _SelectiveScan(torch.autograd.Function):
    """y = scan(x, Δ, A, B, C) + D x with an explicit reverse-time backward.

    Autograd through the step-by-step slow path records one indexing op per step on a (b, L, e, n)
    tensor, and each of their backwards writes a full-size gradient: O(L²) memory traffic. Here the
    forward stores the states h (b, L, e, n) and the backward runs the adjoint recurrence
        G_t = C_t g_t + Ā_{t+1} G_{t+1}          (G_t = ∂loss/∂h_t, g_t = ∂loss/∂y_t)
    once, then every parameter gradient is one vectorised expression. O(b L e n) time and memory. Both
    recurrences run in chunks of positions (`linear_scan_`), not one position at a time.
    """

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D):
        dA = torch.exp_(delta[..., None] * A)  # (b, L, e, n)
        h = (delta * x)[..., None] * B[:, :, None, :]  # (b, L, e, n): Δ_t B_t x_t, overwritten by h_t
        linear_scan_(dA, h)  # h_t = Ā_t h_{t-1} + Δ_t B_t x_t, in chunks of positions
        y = torch.einsum("blen,bln->ble", h, C) + x * D  # (b, L, e)
        ctx.save_for_backward(x, delta, A, B, C, D, dA, h)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, delta, A, B, C, D, dA, h = ctx.saved_tensors
        G = gy[..., None] * C[:, :, None, :]  # (b, L, e, n): ∂loss/∂h_t through y_t, then through h_{t+1}
        linear_scan_(dA, G, reverse=True)  # G_t = C_t g_t + Ā_{t+1} G_{t+1}, in chunks of positions
        gC = torch.einsum("blen,ble->bln", h, gy)  # (b, L, n)
        GB = torch.einsum("blen,bln->ble", G, B)  # (b, L, e)
        gB = torch.einsum("blen,ble->bln", G, delta * x)  # (b, L, n)
        # ∂loss/∂(Δ_t A) = G_t ⊙ h_{t-1} ⊙ Ā_t, zero at t = 0 (h_{-1} = 0); G is not needed after this
        g_logdA = G[:, 1:].mul_(dA[:, 1:]).mul_(h[:, :-1])  # (b, L-1, e, n)
        g_delta = GB * x  # (b, L, e)
        g_delta[:, 1:] += torch.einsum("blen,en->ble", g_logdA, A)
        # A and D are weights: their gradients only when asked for (training), not for input gradients
        gA = torch.einsum("blen,ble->en", g_logdA, delta[:, 1:]) if ctx.needs_input_grad[2] else None  # (e, n)
        gx = GB * delta + gy * D  # (b, L, e)
        gD = (gy * x).sum((0, 1)) if ctx.needs_input_grad[5] else None  # (e,)
        return gx, g_delta, gA, gB, gC, gD


def selective_scan_fast(x, delta, A, B, C, D):
    """Same contract as `selective_scan_reference`, with a cheap backward (for training)."""
    return _SelectiveScan.apply(x, delta, A, B, C, D)


def mixer_forward(mixer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  scan=selective_scan_fast, on_y=None) -> torch.Tensor:
    """A Mamba-1 mixer's forward with a chosen scan, differentiable; float32 inside, the
    input's dtype out. Used in training in place of the Hugging Face slow path. `on_y(y)`: given the scan
    output y (b, L, e, float32, D skip included) before the gate, returns the y to go on with (the
    gradient pass takes its gradient there)."""
    x, z, delta, B, C, A, D = mixer_projections(mixer, hidden_states, attention_mask)
    y = scan(x, delta, A, B, C, D)  # (b, L, e)
    if on_y is not None:
        y = on_y(y)
    u = y * F.silu(z)  # (b, L, e)
    # out_proj is called as a module (not through its weights) so that hooks on it fire as in the model
    return mixer.out_proj(u.to(mixer.out_proj.weight.dtype)).to(hidden_states.dtype)  # (b, L, d)


def _fast_mixer_call(mixer, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    return mixer_forward(mixer, hidden_states, attention_mask)


class swapped_mixer_forward:
    """Context manager: every Mamba mixer of `model` (or those of `layers`) runs `fn(mixer, hidden_states,
    cache_params=None, attention_mask=None, **kwargs)` instead of its own forward inside the block. Only
    the forward method is swapped, on the instances (hooks on the mixer and its submodules still fire);
    the weights stay the model's own."""

    def __init__(self, model, fn, layers=None):
        blocks = model.backbone.layers
        self.mixers = [blocks[i].mixer for i in (range(len(blocks)) if layers is None else layers)]
        self.fn = fn

    def __enter__(self):
        for m in self.mixers:
            m.forward = functools.partial(self.fn, m)
        return self

    def __exit__(self, *exc):
        for m in self.mixers:
            m.__dict__.pop("forward", None)
        return False


def fast_scan(model) -> swapped_mixer_forward:
    """The whole model's forward (and backward) through the project's fast scan: inside the block every
    Mamba-1 / FalconMamba mixer runs `mixer_forward` (float32 projections, `selective_scan_fast`), no cache.
    The efficiency stage times the model with it beside the model's own forward."""
    return swapped_mixer_forward(model, _fast_mixer_call)


def fast_scan_training(model) -> swapped_mixer_forward:
    """Every mixer runs `mixer_forward` (fast scan, cheap backward) inside the block; what is saved
    afterwards is a plain MambaForCausalLM checkpoint. Caching (generation) is not supported inside."""
    return fast_scan(model)


# --------------------------------------------------------------------------------------------------
# Forward-only mixer for many-row inference (ablation scans): transformers' operations, cache-blocked
# --------------------------------------------------------------------------------------------------
# Floats per (b, L, c, n) block on a CPU: 2^19 (2 MB) keeps a channel chunk's scan tensors in cache.
CPU_BLOCK_ELEMENTS = 1 << 19


def mixer_forward_blocked(mixer, hidden_states, cache_params=None, attention_mask=None,
                          block_elements: int | None = None, **kwargs) -> torch.Tensor:
    """transformers' slow-path MambaMixer forward (no cache): its projections, convolution and gate in the
    same order and dtypes, with the scan in chunks of positions (`linear_scan_`) and its (b, L, c, n)
    tensors computed one channel chunk at a time. On a CPU the slow path's full-size (b, e, L, n) tensors
    fall out of cache, and at many rows (ablation batches) that memory traffic costs as much as the
    matmuls; on a GPU its step loop's kernel launches cost more than the work. Forward only. The scan
    rounds in another order than the slow path's step loop (h_t = Ā_t h_{t-1} + Δ_t B_t x_t), so the
    result equals the model's to float rounding, not bitwise; y_t = h_t · C_t by matmul.

    `block_elements`: floats per chunk (default CPU_BLOCK_ELEMENTS on a CPU, all channels at once on an
    accelerator). Callers verify the result against the model's own forward (causal_analysis does, for
    every prompt, against the float64 yardstick: causal_analysis._check_start_from_layer)."""
    if cache_params is not None:
        raise ValueError("mixer_forward_blocked runs without a cache (use_cache=False)")
    dtype = hidden_states.dtype
    if attention_mask is not None:  # as transformers' apply_mask_to_padding_states
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
    b, L, _ = hidden_states.shape
    x, gate = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, e, L) each
    w = mixer.conv1d.weight  # (e, 1, k)
    x = F.conv1d(x.to(w.dtype), w, mixer.conv1d.bias, padding=w.shape[-1] - 1, groups=w.shape[0])[..., :L]
    x = mixer.act(x).to(dtype).transpose(1, 2)  # (b, L, e)
    if attention_mask is not None:
        x = (x * attention_mask[:, :, None]).to(dtype)
    r, n = int(mixer.time_step_rank), int(mixer.ssm_state_size)
    dt, B, C = input_norms(mixer, *torch.split(mixer.x_proj(x), [r, n, n], dim=-1))  # (b,L,r), (b,L,n), (b,L,n)
    dt = mixer.dt_proj.weight @ dt.transpose(1, 2)  # (b, e, L)
    if mixer.dt_proj.bias is not None:
        dt = dt + mixer.dt_proj.bias.float().to(dt.dtype)[..., None]  # in dt's dtype, as there
    dt = F.softplus(dt).transpose(1, 2).contiguous()  # (b, L, e), contiguous: the blocks below are (b, L, c, n)
    A = -torch.exp(mixer.A_log.float())  # (e, n)
    u = x.float()  # (b, L, e)
    Bf = B.float()[:, :, None, :]  # (b, L, 1, n)
    Cm = C[..., None]  # (b, L, n, 1)
    e = A.shape[0]
    budget = block_elements or (CPU_BLOCK_ELEMENTS if hidden_states.device.type == "cpu" else b * L * e * n)
    chunk = max(1, min(e, budget // (b * L * n)))
    # y laid out (b, e, L) as there: out_proj then gets the same transposed view (a matmul rounds by layout)
    y = torch.empty(b, e, L, dtype=torch.promote_types(dtype, C.dtype), device=x.device)  # (b, e, L)
    for c0 in range(0, e, chunk):
        cs = slice(c0, min(e, c0 + chunk))
        dtc = dt[:, :, cs, None]  # (b, L, c, 1)
        dA = (A[cs] * dtc).exp_()  # (b, L, c, n): exp(A Δ), in place
        h = dtc * Bf  # (b, L, c, n): (Δ B) then · x, transformers' order; becomes the states h_t
        h.mul_(u[:, :, cs, None])
        linear_scan_(dA, h)  # h_t = Ā_t h_{t-1} + Δ_t B_t x_t, in chunks of positions
        y[:, cs] = torch.matmul(h.to(dtype), Cm)[..., 0].transpose(1, 2)  # (b, c, L): y_t = h_t · C_t
    y = y + x.transpose(1, 2) * mixer.D.float()[:, None]  # (b, e, L): the skip in the input dtype, as there
    y = y * F.silu(gate)  # (b, e, L)
    return mixer.out_proj(y.transpose(1, 2).to(dtype))  # (b, L, d)


def blocked_inference(model, block_elements: int | None = None, layers=None) -> swapped_mixer_forward:
    """Every mixer (or those of `layers`) runs `mixer_forward_blocked` inside the block (forward only, no
    cache)."""
    return swapped_mixer_forward(model, functools.partial(mixer_forward_blocked, block_elements=block_elements),
                                 layers)


# --------------------------------------------------------------------------------------------------
# Hidden attention
# --------------------------------------------------------------------------------------------------
def hidden_attention(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     max_chunk_elements: int = 1 << 24) -> torch.Tensor:
    """The scan unrolled as one causal attention matrix per channel, float32 (or float64 for float64
    inputs), shape (b, e, L, L):

        α^c[i, j] = Σ_n C_i[n] · exp(A[c, n] · (S^c_i − S^c_j)) · Δ^c_j · B_j[n]  for j ≤ i, else 0,
        S^c_t = Σ_{k ≤ t} Δ^c_k,

    so that y^c_i = Σ_j α^c[i, j] x^c_j + D_c x^c_i exactly (the D skip is not part of α).
    delta (b, L, e), A (e, n), B and C (b, L, n). The exponent's argument is formed and the entries
    j > i are zeroed *before* exp, so nothing overflows for any Δ; channels are processed in chunks so
    that the (b, chunk, n, L, L) intermediate stays under `max_chunk_elements` floats (64 MB).
    """
    f32 = torch.promote_types(delta.dtype, torch.float32)
    delta, A, B, C = delta.to(f32), A.to(f32), B.to(f32), C.to(f32)
    b, L, e = delta.shape
    n = A.shape[1]
    S = torch.cumsum(delta, dim=1).transpose(1, 2)  # (b, e, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=delta.device).tril()  # (L, L) [i, j]: j <= i
    CB = torch.einsum("bin,bjn->bnij", C, B)[:, None]  # (b, 1, n, L, L): C_i[n] B_j[n], the same for every channel
    dt = delta.transpose(1, 2)[:, :, None, :]  # (b, e, 1, L): Δ^c_j, broadcast over i
    alpha = delta.new_empty(b, e, L, L)  # (b, e, L, L)
    chunk = max(1, min(e, max_chunk_elements // max(1, b * L * L * n)))
    for c0 in range(0, e, chunk):
        cs = slice(c0, min(e, c0 + chunk))
        diff = S[:, cs, :, None] - S[:, cs, None, :]  # (b, c, L, L): S_i − S_j
        diff.masked_fill_(~causal, 0.0)  # j > i -> 0 before exp
        decay = diff[:, :, None] * A[cs, :, None, None]  # (b, c, n, L, L): A[c, n] (S_i − S_j) <= 0
        decay.exp_().mul_(CB)  # exp(...) · C_i[n] B_j[n]
        torch.sum(decay, dim=2, out=alpha[:, cs])  # (b, c, L, L)
    alpha.mul_(dt).masked_fill_(~causal, 0.0)  # · Δ^c_j; exactly 0 above the diagonal
    return alpha


def apply_hidden_attention(alpha: torch.Tensor, x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """y (b, L, e) = Σ_j α^c[i, j] x^c_j + D_c x^c_i, from α (b, e, L, L), x (b, L, e), D (e,)."""
    return torch.einsum("bcij,bjc->bic", alpha, x.to(alpha.dtype)) + x * D


# Floats in the largest intermediate of one channel group of `hidden_attention_groups`: on a CPU 2^21 (8 MB)
# keeps a group's α and its temporaries in the last-level cache while the consumers read them (of
# 2^20 .. 2^24, 2^21 and 2^22 were the fastest for the attention stage at L = 149 and 256 on a 2-core CPU);
# on an accelerator 2^27 (512 MB), so that a layer's channels come in few groups (at mamba-130m's width
# and 256 tokens, one): every group costs its own kernel launches.
ATTENTION_GROUP_ELEMENTS = 1 << 21
ACCELERATOR_GROUP_ELEMENTS = 1 << 27


def hidden_attention_groups(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                            chunk: int = 8, max_chunk_elements: int | None = None):
    """`hidden_attention`'s α, one group of channels at a time, computed block-wise over chunks of `chunk`
    positions (the chunked "state space duality" form, per channel) without an exp per (channel, state,
    i, j). Yields `(cs, α_g)`: a slice of channels and their α (b, g, L, L) (a view, valid until the next
    group is computed). `hidden_attention_chunked` assembles the whole α from it; the attention stage
    consumes the groups as they come, so α is never held whole.

    With S^c_t = Σ_{k ≤ t} Δ^c_k, positions split into K chunks, P_I the last position before chunk I
    (S at P_0 is 0) and E_J the last position of chunk J, an entry of α with i in chunk I and j in an
    earlier chunk J < I is
        α^c[i, j] = Σ_n U^c[i, n] · W^c_IJ[n] · V^c[j, n],
        U^c[i, n] = C_i[n] exp(A[c, n] (S_i − S_{P_I})),   V^c[j, n] = Δ^c_j B_j[n] exp(A[c, n] (S_{E_J} − S_j)),
        W^c_IJ[n] = exp(A[c, n] (S_{P_I} − S_{E_J})) = Π_{J < K' < I} w^c_K'[n],  w^c_K'[n] = exp(A[c, n] (S_{E_K'} − S_{P_K'})),
    the decay from j to i split at the chunk boundaries between them. Every exponent is ≤ 0 (A < 0, S
    non-decreasing), so every factor lies in [0, 1]: nothing overflows, and the product equals the single
    exp up to float rounding. Row block I is one matrix product U_I M_I with M_I[n, j] = W_IJ[n] V[j, n]
    over the columns j before chunk I, and M_{I+1} is M_I scaled by the decay across chunk I (w_I) with
    chunk I's columns V_Iᵀ appended (W_{I+1, I} = 1): one (n, L) buffer per channel, scaled in place, row
    block after row block. The diagonal blocks (i, j in one chunk) are formed directly as in
    `hidden_attention` (argument masked before exp). Cost per channel: L·chunk·n exps, about L²·n/2
    multiply-adds and L²·n/(2·chunk) multiplies for the scaling, against L²·n exps for the direct form.
    Chunk 8 was the fastest of 4, 8, 16 and 32 on a 2-core CPU at e = 1536, n = 16, L = 256 (0.21 s against
    0.28, 0.25 and 0.42), and tied with 4 at L = 182 (0.12 s).
    Channels are grouped so that the largest intermediate (α itself or the diagonal blocks' exp argument)
    stays under `max_chunk_elements` floats (default ATTENTION_GROUP_ELEMENTS on a CPU,
    ACCELERATOR_GROUP_ELEMENTS elsewhere). delta (b, L, e), A (e, n),
    B and C (b, L, n).
    """
    f32 = torch.promote_types(delta.dtype, torch.float32)
    delta, A, B, C = delta.to(f32), A.to(f32), B.to(f32), C.to(f32)
    b, L, e = delta.shape
    n, Q = A.shape[1], int(chunk)
    K = -(-L // Q)  # number of chunks
    Lp = K * Q  # padded length: padded positions have Δ = B = C = 0, so they add nothing; cut off below
    if Lp > L:
        delta, B, C = (F.pad(t, (0, 0, 0, Lp - L)) for t in (delta, B, C))
    S = torch.cumsum(delta, dim=1).transpose(1, 2).reshape(b, e, K, Q)  # (b, e, K, Q)
    S_end = S[..., -1]  # (b, e, K): S at E_J
    S_prev = F.pad(S_end[..., :-1], (1, 0))  # (b, e, K): S at P_I (0 before the first chunk)
    dt = delta.transpose(1, 2).reshape(b, e, K, Q)  # (b, e, K, Q)
    Bc, Cc = B.reshape(b, K, Q, n), C.reshape(b, K, Q, n)  # (b, K, Q, n)
    inside = torch.ones(Q, Q, dtype=torch.bool, device=delta.device).tril()  # (Q, Q) [i, j]: j <= i
    CB = torch.einsum("bkin,bkjn->bkijn", Cc, Bc)[:, None]  # (b, 1, K, Q, Q, n)
    idx = torch.arange(K, device=delta.device)
    per_channel = b * max(Lp * Lp, K * Q * Q * n)
    budget = max_chunk_elements or (ATTENTION_GROUP_ELEMENTS if delta.device.type == "cpu"
                                    else ACCELERATOR_GROUP_ELEMENTS)
    group = max(1, min(e, budget // per_channel))
    for c0 in range(0, e, group):
        cs = slice(c0, min(e, c0 + group))
        g = cs.stop - cs.start
        Ac = A[cs][None, :, None, None, :]  # (1, g, 1, 1, n)
        Sg, dtg = S[:, cs], dt[:, cs]  # (b, g, K, Q)
        U = Cc[:, None] * torch.exp((Sg - S_prev[:, cs, :, None])[..., None] * Ac)  # (b, g, K, Q, n)
        V = (Bc[:, None] * dtg[..., None]) * torch.exp((S_end[:, cs, :, None] - Sg)[..., None] * Ac)  # (b,g,K,Q,n)
        w = torch.exp((S_end[:, cs] - S_prev[:, cs])[..., None] * Ac[:, :, 0])  # (b, g, K, n): across chunk K'
        Vt = V.permute(0, 1, 4, 2, 3).reshape(b, g, n, Lp)  # (b, g, n, L'): V[j, n] by column j
        M = Vt.clone()  # (b, g, n, L'): M_I in its first I·Q columns
        out = delta.new_zeros(b, g, Lp, Lp)  # (b, g, L', L'): 0 right of the diagonal blocks
        for I in range(1, K):
            cols = I * Q  # the columns before chunk I
            out[:, :, cols:cols + Q, :cols] = torch.matmul(U[:, :, I], M[..., :cols])  # (b, g, Q, I·Q): row block I
            if I < K - 1:
                M[..., :cols].mul_(w[:, :, I, :, None])  # M_{I+1}: the older columns decay across chunk I
        # diagonal blocks, directly: Σ_n C_i B_j exp(A (S_i − S_j)) Δ_j for j <= i in one chunk
        diff = (Sg[..., :, None] - Sg[..., None, :]).masked_fill(~inside, 0.0)  # (b, g, K, Q, Q)
        diag = (torch.exp(diff[..., None] * Ac[:, :, :, None]) * CB).sum(-1)  # (b, g, K, Q, Q)
        diag = diag * dtg[..., None, :] * inside  # · Δ_j, exactly 0 above the diagonal
        out.view(b, g, K, Q, K, Q)[:, :, idx, :, idx, :] = diag.permute(2, 0, 1, 3, 4)  # advanced indexing: K first
        yield cs, out[:, :, :L, :L]  # (b, g, L, L)


def hidden_attention_chunked(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             chunk: int = 8, max_chunk_elements: int | None = None) -> torch.Tensor:
    """`hidden_attention`'s α (b, e, L, L), assembled from `hidden_attention_groups` (see there)."""
    b, L, e = delta.shape
    out = delta.new_empty(b, e, L, L, dtype=torch.promote_types(delta.dtype, torch.float32))  # (b, e, L, L)
    for cs, alpha in hidden_attention_groups(delta, A, B, C, chunk, max_chunk_elements):
        out[:, cs] = alpha
    return out
