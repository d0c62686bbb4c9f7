"""The chunked linear recurrence (ssm.linear_scan_) against the step loop, and the float64 yardstick: a fast
path is exact when it is no farther from the model's float64 forward than the model's own forward is."""
from types import SimpleNamespace

import pytest
import torch

import causal_analysis as ca
import ssm
from conftest import make_model
from models import get_adapter
from utils import in_float64


def _recurrence(L, seed=0, dtype=torch.float64, shape=(2, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    b, *rest = shape
    a = torch.rand(b, L, *rest, generator=g, dtype=dtype)  # decays in [0, 1]
    a[:, ::5] = 0.0  # decays that underflowed, and none at all
    a[:, 1::7] = 1.0
    u = torch.randn(b, L, *rest, generator=g, dtype=dtype)
    return a, u


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk", [2, 3, 8])
@pytest.mark.parametrize("L", [1, 2, 7, 24, 25, 64, 67, 300])
def test_chunked_scan_equals_the_step_loop(L, chunk, reverse):
    """Every length (whole chunks or not, one level of chunks or several), forwards and backwards in time:
    float64 to 1e-12, float32 within its own rounding of the float64 step loop (both printed)."""
    a, u = _recurrence(L)
    ref = ssm.linear_scan_reference(a, u, reverse)
    got = ssm.linear_scan_(a, u.clone(), reverse, chunk)
    d64 = (got - ref).abs().max().item()
    got32 = ssm.linear_scan_(a.float(), u.float(), reverse, chunk).double()
    loop32 = ssm.linear_scan_reference(a.float(), u.float(), reverse).double()
    d32, loop_d32 = ((got32 - ref).abs().max().item(), (loop32 - ref).abs().max().item())
    print(f"L={L} chunk={chunk} reverse={reverse}: float64 {d64:.1e}; float32 {d32:.1e} (the step loop's {loop_d32:.1e})")
    assert d64 <= 1e-12 * max(1.0, ref.abs().max().item())
    assert d32 <= 2 * loop_d32 + 1e-6 * ref.abs().max().item()


def test_chunked_scan_is_finite_where_every_decay_vanishes_or_is_one():
    """Decays of exactly 0 (an underflowed exp(Δ A)) and 1 (Δ = 0) in whole chunks: no NaN, and the states are
    u itself (a = 0) or the running sum of u (a = 1)."""
    u = torch.randn(1, 100, 3)
    zero, one = torch.zeros_like(u), torch.ones_like(u)
    for reverse in (False, True):
        torch.testing.assert_close(ssm.linear_scan_(zero, u.clone(), reverse), u, rtol=0, atol=0)
        running = (u.flip(1).cumsum(1).flip(1) if reverse else u.cumsum(1)).double()
        torch.testing.assert_close(ssm.linear_scan_(one.double(), u.double().clone(), reverse), running)


def test_the_fast_scan_backward_equals_autograd_through_the_step_loop_at_chunked_length():
    """The fast scan's hand-written backward (its adjoint recurrence chunked too) against autograd through the
    reference scan, at a length that runs two levels of chunks, in float64."""
    g = torch.Generator().manual_seed(0)
    b, L, e, n = 2, 90, 3, 4
    x = torch.randn(b, L, e, generator=g, dtype=torch.float64, requires_grad=True)
    delta = (torch.rand(b, L, e, generator=g, dtype=torch.float64) * 2).requires_grad_()
    A = (-torch.rand(e, n, generator=g, dtype=torch.float64) * 3).requires_grad_()
    B, C = (torch.randn(b, L, n, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    D = torch.randn(e, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = (x, delta, A, B, C, D)
    gy = torch.randn(b, L, e, generator=g, dtype=torch.float64)
    y_ref = ssm.selective_scan_reference(*inputs)
    y = ssm.selective_scan_fast(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(y_ref, inputs, gy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _logits_distance(logits, truth) -> float:
    return ((logits.double() - truth).abs().max() / truth.abs().max()).item()


@pytest.mark.parametrize("kind", ["mamba_b", "falcon_mamba"])
def test_fast_paths_are_as_exact_as_the_models_own_float32_forward(kind):
    """The yardstick: the model's float64 forward. The fast scan (the gradient pass's) and the blocked forward
    (the ablation scans') in float32 are each at most 2x as far from it as the model's own float32 forward
    (plus a float32 rounding), at a length that runs the scan in chunks; printed."""
    model = make_model(kind)
    with torch.no_grad():
        for blk in model.backbone.layers:  # larger Δ than at init: the scan carries weight in the output
            blk.mixer.dt_proj.bias.add_(1.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = model(input_ids=ids, use_cache=False).logits
        with ssm.fast_scan(model):
            fast = model(input_ids=ids, use_cache=False).logits
        with ssm.blocked_inference(model, block_elements=64):
            blocked = model(input_ids=ids, use_cache=False).logits
        with in_float64(model):
            truth = model(input_ids=ids, use_cache=False).logits
    d_own, d_fast, d_blocked = (_logits_distance(t, truth) for t in (own, fast, blocked))
    print(f"{kind}: relative distance from float64: own {d_own:.1e}, fast scan {d_fast:.1e}, blocked {d_blocked:.1e}")
    for d in (d_fast, d_blocked):
        assert d <= 2 * d_own + 1.2e-7


def test_in_float64_round_trips_every_tensor_exactly_also_on_error():
    model = make_model("gpt2")  # tied input and output embeddings
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with in_float64(model):
        assert all(p.dtype == torch.float64 for p in model.parameters())
        assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(RuntimeError, match="planted"), in_float64(model):
        raise RuntimeError("planted")
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


class _Logits:
    """A stand-in model whose forward returns given last-position logits."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, **kwargs):
        return type("Out", (), {"logits": self.logits[None, None]})()


def test_the_reproduction_check_allows_twice_the_models_own_distance_from_float64():
    """The causal stage's check: a path whose log p is 1.9x as far from the float64 log p as the model's own
    forward's largest distance on the run's prompts passes, one 2.1x as far fails, at small and large
    distances; the allowance is of the largest, so a prompt where the model's own happens to be closer is
    not failed for it."""
    V = 50
    truth = torch.log_softmax(torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)

    def clean(distance):
        own = truth.clone()
        own[7] += distance  # the model's own forward, `distance` from float64
        return ca.CleanRun(None, {0: None}, {}, own, truth)

    for shift in (1e-4, 3e-3):  # far above CHECK_FLOOR
        logits = truth.clone()
        logits[3] += shift  # the path's logits: its log p moves at every token, most at token 3
        err = (torch.log_softmax(logits, -1) - truth).abs().max().item()
        for factor, ok in ((1.9, True), (2.1, False)):
            cleans = [clean(err / factor), clean(err / factor / 10)]
            assert cleans[0].own_error == pytest.approx(err / factor)
            for c in cleans:  # the same allowance on both prompts, as clean_runs gives it
                c.allowance = ca.check_allowance(cleans)
                if ok:
                    baseline, distance = ca._check_start_from_layer(_Logits(logits), SimpleNamespace(hybrid=False), c, 0)
                    torch.testing.assert_close(baseline, torch.log_softmax(logits, -1))
                    assert distance == pytest.approx(err)
                else:
                    with pytest.raises(ssm.ReconstructionError, match="float64 forward"):
                        ca._check_start_from_layer(_Logits(logits), SimpleNamespace(hybrid=False), c, 0)


def test_clean_runs_carry_their_float64_log_p_and_leave_the_model_as_it_was(tokenizer):
    """Each clean run has its float64 log p and the whole pass's allowance (also where a stage reads some of
    the prompts); the model is as before; clean runs made without the yardstick are refused in one line."""
    model = make_model("mamba_b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = ["the cat sat on the mat", "one two three"]
    cleans = ca.clean_runs(model, tokenizer, prompts, [0, 1], "mixer_out")
    for c in cleans:
        assert c.logp_float64.dtype == torch.float64 and 0 < c.own_error < 1e-4
        assert c.allowance == ca.check_allowance(cleans) == 2 * max(d.own_error for d in cleans) + ca.CHECK_FLOOR
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert next(model.parameters()).dtype == torch.float32
    assert all(blk.residual_in_fp32 for blk in model.backbone.layers)
    bare = [ca.clean_run(model, get_adapter(model), c.input_ids, [0, 1], "mixer_out") for c in cleans]
    with pytest.raises(ValueError, match="make them with clean_runs"):
        ca.causal_effects_by_layer(model, tokenizer, prompts, [0], site="mixer_out", dims=[0], cleans=bare,
                                   progress=False)


def test_an_ablation_that_changes_nothing_scores_zero(tokenizer):
    """The effects are measured against the unablated pass along the same path, so scaling a dimension by 1
    gives KL 0 and Δ log p 0 to the rounding of the batch's shape, not the two paths' difference."""
    model = make_model("mamba_b")
    prompts = ["the cat sat on the mat", "one two three four five six seven eight nine ten eleven twelve"]
    cleans = ca.clean_runs(model, tokenizer, prompts, [0, 2], "mixer_out")
    eff = ca.causal_effects_by_layer(model, tokenizer, prompts, [0, 2], site="mixer_out", dims=range(6),
                                     intervention_scale=1.0, progress=False, cleans=cleans)
    print(f"largest KL {eff.kl.max():.1e}, largest |Δ log p| {abs(eff.delta_logp).max():.1e}")
    assert abs(eff.kl).max() <= 1e-12 and abs(eff.delta_logp).max() <= 1e-6
    check = ca.reproduction_check(eff, cleans)  # what the causal stage's results carry
    recomputed = 0.0  # the unablated pass from each start layer, against the float64 log p, by hand
    for start in (0, 2):
        with torch.no_grad(), ca.run_from_layer(model, get_adapter(model), start):
            for c in cleans:
                logits = model(inputs_embeds=c.resid_in[start], use_cache=False, logits_to_keep=1).logits[0, -1]
                recomputed = max(recomputed, (torch.log_softmax(logits.double(), -1) - c.logp_float64).abs().max().item())
    assert check["path_largest_distance"] == pytest.approx(recomputed, rel=1e-6) and recomputed > 0
    assert check["path_largest_distance"] <= check["allowance"] == cleans[0].allowance
    assert check["model_own_largest_distance"] == max(c.own_error for c in cleans) > 0


def test_the_chunked_scan_runs_few_operations_however_long_the_recurrence():
    """What bounds a GPU run is the number of operations, not their size: at 64x the length the chunked scan
    records under 3x the aten operations (one chunk level more per 8x; the step loop: 64x), counted with
    torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    def ops(L, reverse):
        a, u = _recurrence(L, dtype=torch.float32, shape=(1, 2))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ssm.linear_scan_(a, u, reverse)
        return sum(e.name.startswith("aten::") for e in prof.events())

    for reverse in (False, True):
        short, long = ops(64, reverse), ops(4096, reverse)
        print(f"reverse={reverse}: {short} operations at L=64, {long} at L=4096")
        assert long < 3 * short
