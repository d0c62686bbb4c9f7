"""The recomputed Mamba-1 mixer (ssm.py) against the model's own forward."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, make_model
from delta_extraction import extract_deltas, mixer_internals
from ssm import (ReconstructionError, blocked_inference, check_reconstruction, mixer_forward_blocked, recompute_mixer,
                 selective_scan_reference)
from utils import trace


def _ids(model, b=2, L=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (b, L), generator=g).to(model.device)


@pytest.mark.parametrize("layer", [0, -1])
def test_reconstruction_matches_model_float32(mamba, layer):
    layer = layer % mamba.config.num_hidden_layers
    internals, check = mixer_internals(mamba, layer, _ids(mamba))
    print(f"max relative difference {check.relative_error:.3e} (abs {check.max_abs_error:.3e})")
    assert check.relative_error < 1e-4
    b, L, e, n = 2, 37, mamba.config.intermediate_size, mamba.config.state_size
    assert internals.delta.shape == (b, L, e) and internals.B.shape == (b, L, n) and internals.A.shape == (e, n)
    assert (internals.delta > 0).all()  # softplus


def test_reconstruction_on_perturbed_weights(mamba):
    """Weights far from initialisation (large Δ, shifted A, noisy projections) still reconstruct."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mixer in (blk.mixer for blk in mamba.backbone.layers):
            mixer.dt_proj.bias.add_(2.0)  # large Δ
            mixer.A_log.add_(torch.randn(mixer.A_log.shape, generator=g).to(DEVICE))
            mixer.in_proj.weight.mul_(3.0)
            mixer.x_proj.weight.add_(0.3 * torch.randn(mixer.x_proj.weight.shape, generator=g).to(DEVICE))
            mixer.D.mul_(-2.0)
    for layer in range(mamba.config.num_hidden_layers):
        _, check = mixer_internals(mamba, layer, _ids(mamba, L=64))
        print(f"layer {layer}: max relative difference {check.relative_error:.3e}")
        assert check.relative_error < 1e-4


def test_reconstruction_with_padding_mask(mamba):
    """Right padding: the mixer zeroes masked positions; the recomputation must do the same."""
    ids = _ids(mamba, b=2, L=20)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    _, check = mixer_internals(mamba, 0, ids, attention_mask=mask)
    assert check.relative_error < 1e-4


def test_bfloat16_model_reconstructs_in_float32():
    model = make_model("mamba_a").to(DEVICE, torch.bfloat16)
    internals, check = mixer_internals(model, 1, _ids(model))
    print(f"bf16: max relative difference {check.relative_error:.3e} (tolerance {check.tolerance})")
    assert internals.delta.dtype == torch.float32 and check.dtype == "bfloat16"
    assert check.relative_error < check.tolerance <= 3e-2


@pytest.mark.parametrize("zero_d, shift", [(True, 0.05), (False, 1.0)])
def test_wrong_delta_is_caught(mamba, zero_d, shift):
    """The check is not vacuous: after the real forward, shift dt_proj's bias (so our Δ differs from the
    one the model used) and recompute: the check must fail. At random init the D·x skip dominates the
    output, so a small Δ error is only visible with D = 0; a large one is caught either way."""
    path = "backbone.layers.0.mixer"
    mixer = mamba.backbone.layers[0].mixer
    if zero_d:
        with torch.no_grad():
            mixer.D.zero_()
    with torch.no_grad(), trace(mamba, [path], retain_input=True) as tr:
        mamba(input_ids=_ids(mamba), use_cache=False)
    assert check_reconstruction(recompute_mixer(mixer, tr[path].input).out, tr[path].output).ok
    with torch.no_grad():
        mixer.dt_proj.bias.add_(shift)
    wrong = recompute_mixer(mixer, tr[path].input)
    with pytest.raises(ReconstructionError):
        check_reconstruction(wrong.out, tr[path].output)


@pytest.mark.parametrize("kind, partly_float32", [("mamba_a", False), ("falcon_mamba", True), ("mamba2", True)])
def test_a_float64_model_is_checked_at_the_precision_its_mixer_computes_in(kind, partly_float32):
    """FalconMamba's input norms and Mamba-2's scan run in float32 also in a float64 model: their check
    takes float32's tolerance (a 2e-8 relative difference passes; an H100 gave 1.03e-8 for FalconMamba);
    a Mamba-1 mixer is all float64, where 2e-8 is already too much. A wrong formula fails either way."""
    mixer = make_model(kind).double().backbone.layers[0].mixer
    real = torch.randn(2, 5, 16, dtype=torch.float64)
    near = real * (1 + 2e-8)  # (b, L, d)
    check = check_reconstruction(near, real, raise_on_mismatch=False, mixer=mixer)
    assert check.dtype == ("float32" if partly_float32 else "float64")
    assert check.ok == partly_float32
    assert not check_reconstruction(real * 1.01, real, raise_on_mismatch=False, mixer=mixer).ok


def test_extract_deltas_equals_softplus_of_dt_proj_by_hand(mamba):
    """Δ independently: embeddings -> block norm -> in_proj -> conv1d module -> SiLU -> x_proj -> dt_proj
    module -> softplus, for layer 0, and from the model's hidden_states for layer 1."""
    ids = _ids(mamba)
    L = ids.shape[1]
    with torch.no_grad():
        hs = mamba(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for layer, block_in in [(0, mamba.backbone.embeddings(ids)), (1, hs[0])]:
            blk = mamba.backbone.layers[layer]
            mixer = blk.mixer
            x0, _ = mixer.in_proj(blk.norm(block_in)).chunk(2, dim=-1)
            x = F.silu(mixer.conv1d(x0.transpose(1, 2))[..., :L]).transpose(1, 2)
            dt_low = mixer.x_proj(x)[..., : mixer.time_step_rank]
            by_hand = F.softplus(mixer.dt_proj(dt_low))
            ours = extract_deltas(mamba, layer, ids)
            diff = (ours - by_hand).abs().max().item()
            print(f"layer {layer}: max |Δ - Δ_by_hand| = {diff:.3e}")
            torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)


def test_reference_scan_matches_closed_form_single_step():
    """One channel, one state, two steps, by hand: s1 = Δ1 B1 x1, s2 = e^{Δ2 A} s1 + Δ2 B2 x2."""
    x = torch.tensor([[[2.0], [3.0]]])  # (b=1, L=2, e=1)
    delta = torch.tensor([[[0.5], [0.25]]])
    A = torch.tensor([[-1.0]])  # (e, n=1)
    B = torch.tensor([[[1.5], [-1.0]]])  # (b, L, n)
    C = torch.tensor([[[2.0], [4.0]]])
    D = torch.tensor([0.1])
    y = selective_scan_reference(x, delta, A, B, C, D)
    s1 = 0.5 * 1.5 * 2.0
    s2 = torch.exp(torch.tensor(-0.25)) * s1 + 0.25 * -1.0 * 3.0
    expected = torch.tensor([[[2.0 * s1 + 0.1 * 2.0], [4.0 * s2 + 0.1 * 3.0]]])
    torch.testing.assert_close(y, expected)


# the blocked forward-only mixer (ablation scans) against transformers' own slow path, by dtype
BLOCKED_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", list(BLOCKED_TOLERANCE))
@pytest.mark.parametrize("b, L", [(1, 1), (1, 23), (3, 5), (4, 23), (2, 61)])
@pytest.mark.parametrize("block_elements", [None, 50])
def test_blocked_mixer_equals_model_mixer(mamba, dtype, b, L, block_elements):
    """The model's mixer's numbers to float rounding (printed), for one channel chunk and for many
    (block_elements=50: chunks of 1-2 channels), batch 1 and batched, every layer; L = 61 runs the scan in
    chunks of positions, the shorter ones its step loop."""
    model = mamba.to(dtype)
    g = torch.Generator().manual_seed(b * 100 + L)
    h = torch.randn(b, L, model.config.hidden_size, generator=g).to(DEVICE, dtype)
    worst = 0.0
    for blk in model.backbone.layers:
        with torch.no_grad():
            real = blk.mixer(h)
            ours = mixer_forward_blocked(blk.mixer, h, block_elements=block_elements)
        assert ours.dtype == real.dtype and ours.shape == real.shape
        worst = max(worst, ((ours.double() - real.double()).abs().max() / real.double().abs().max()).item())
    print(f"{dtype} b={b} L={L} block={block_elements}: max relative difference {worst:.1e}")
    assert worst <= BLOCKED_TOLERANCE[dtype]


def test_blocked_mixer_with_padding_mask(mamba):
    ids = _ids(mamba, b=3, L=11)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    h = mamba.backbone.embeddings(ids)
    mixer = mamba.backbone.layers[0].mixer
    with torch.no_grad():
        real = mixer(h, attention_mask=mask)
        ours = mixer_forward_blocked(mixer, h, attention_mask=mask, block_elements=50)
    print(f"max |difference| {(ours - real).abs().max().item():.1e}")
    torch.testing.assert_close(ours, real, rtol=1e-6, atol=1e-7)


def test_blocked_inference_whole_model_logits_and_restore(mamba):
    """All mixers swapped inside the block: whole-model logits unchanged; hooks on out_proj still fire;
    the model's own forward is back afterwards."""
    ids = _ids(mamba, b=5, L=13)
    with torch.no_grad():
        real = mamba(input_ids=ids, use_cache=False).logits
        path = "backbone.layers.0.mixer.out_proj"
        with blocked_inference(mamba, block_elements=64), trace(mamba, [path], retain_input=True) as tr:
            ours = mamba(input_ids=ids, use_cache=False).logits
        assert tr[path].input.shape == (5, 13, mamba.config.intermediate_size)
    print(f"max |logit difference| {(ours - real).abs().max().item():.1e}")
    torch.testing.assert_close(ours, real, rtol=1e-6, atol=1e-6)
    assert all("forward" not in blk.mixer.__dict__ for blk in mamba.backbone.layers)
    with pytest.raises(ValueError, match="without a cache"):
        mixer_forward_blocked(mamba.backbone.layers[0].mixer, real[..., :16], cache_params=object())


def test_a_mixers_family_comes_from_its_adapter_not_its_attributes():
    """What ssm.py does with a mixer follows its family's adapter (`models.mixer_adapter`, by the mixer's
    class), not the attributes it happens to have: a Mamba-1 mixer given Mamba-2's `n_groups` and `dt_bias`
    and FalconMamba's `rms_eps` is still recomputed as Mamba-1 (and its output still matches); FalconMamba's
    and Mamba-2's mixers are recognised; a module of no supported family is refused in one line."""
    from models import FalconMambaAdapter, Mamba2Adapter, MambaAdapter, mixer_adapter
    from ssm import computes_partly_in_float32, input_norms, is_mamba2_mixer

    model = make_model("mamba_a")
    mixer = model.backbone.layers[0].mixer
    ids = _ids(model, L=9)
    with torch.no_grad(), trace(model, ["backbone.layers.0.mixer"], retain_input=True) as tr:
        model(input_ids=ids, use_cache=False)
    mixer.n_groups, mixer.dt_bias, mixer.rms_eps = 1, torch.nn.Parameter(torch.zeros(3)), 1e-6
    assert mixer_adapter(mixer) is MambaAdapter
    assert not is_mamba2_mixer(mixer) and not computes_partly_in_float32(mixer)
    v = torch.randn(2, 3, 4)
    assert all(a is b for a, b in zip(input_norms(mixer, v, v, v), (v, v, v)))  # no RMS norm for Mamba-1
    got = recompute_mixer(mixer, tr["backbone.layers.0.mixer"].input).out
    assert check_reconstruction(got, tr["backbone.layers.0.mixer"].output).ok

    falcon = make_model("falcon_mamba").backbone.layers[0].mixer
    assert mixer_adapter(falcon) is FalconMambaAdapter
    assert not is_mamba2_mixer(falcon) and computes_partly_in_float32(falcon)
    assert not torch.equal(input_norms(falcon, v, v, v)[0], v)
    mamba2 = make_model("mamba2").backbone.layers[0].mixer
    assert mixer_adapter(mamba2) is Mamba2Adapter and is_mamba2_mixer(mamba2) and computes_partly_in_float32(mamba2)

    for module in (torch.nn.Linear(2, 2), make_model("gpt2").transformer.h[0].attn):
        with pytest.raises(TypeError, match=f"{type(module).__name__} is not the mixer of a supported state-space"):
            recompute_mixer(module, torch.zeros(1, 2, 2))
