"""Causal impacts: equal to a plain one-ablation-at-a-time reference; planted and dead dimensions;
cross-layer causality."""
import numpy as np
import pytest
import torch

import causal_analysis as ca
from conftest import DEVICE, kl_with_input_zeroed, make_model
from models import get_adapter
from utils import trace

PROMPTS = ["The capital of France is", "Water boils", "A prime number has exactly two divisors, one and"]


_REFERENCE = {}  # (kind, layer, site, dims, scale, mean) -> the reference scores of make_model(kind)


def cached_reference_scores(kind, model, tokenizer, layer, site, dims, scale=0.0, mean=False):
    """`reference_scores` of make_model(kind) (deterministic: seed 0), computed once per session for each
    argument set (the batch-size variants of a test compare against the same reference)."""
    key = (kind, layer, site, tuple(dims), scale, mean)
    if key not in _REFERENCE:
        _REFERENCE[key] = reference_scores(model, tokenizer, layer, site, dims, scale, mean)
    return _REFERENCE[key]


def reference_scores(model, tokenizer, layer, site, dims, scale=0.0, mean=False):
    """The original's method: for every (dim, prompt), a clean run and a full ablated run, batch 1."""
    s = get_adapter(model).site(site, layer)
    pick = (lambda tr: tr[s.path].input) if s.capture == "input" else (lambda tr: tr[s.path].output)
    means = None
    if mean:
        acts = []
        for p in PROMPTS:
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids.to(DEVICE)
            with torch.no_grad(), trace(model, [s.path], retain_input=True) as tr:
                model(input_ids=ids)
            acts.append(pick(tr)[0])
        means = torch.cat(acts).double().mean(0)
    out = []
    for k in dims:
        total = 0.0
        for p in PROMPTS:
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids.to(DEVICE)
            with torch.no_grad():
                clean = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)

            def edit(name, v):
                a = (v[0] if isinstance(v, tuple) else v).clone()
                a[..., k] = means[k] if mean else a[..., k] * scale
                return (a, *v[1:]) if isinstance(v, tuple) else a

            kw = {"edit_input": edit} if s.capture == "input" else {"edit_output": edit}
            with torch.no_grad(), trace(model, [s.path], retain_output=False, **kw):
                abl = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)
            total += torch.nn.functional.kl_div(abl, clean, log_target=True, reduction="sum").item()
        out.append(total / len(PROMPTS))
    return np.array(out)


CASES = [("mamba_b", "mixer_out", 1, {}), ("mamba_b", "ssm", 2, {}), ("mamba_a", "residual", 0, {"scale": 0.5}),
         ("gpt2", "mlp", 1, {}), ("gpt2", "mlp_out", 0, {"mean": True}), ("gpt_neox", "attn_out", 1, {}),
         ("gpt2", "attn_heads", 1, {"mean": True}), ("gpt_neox", "attn_heads", 0, {})]


@pytest.mark.parametrize("kind, site, layer, opts", CASES)
def test_scores_equal_one_at_a_time_reference(kind, site, layer, opts, tokenizer):
    model = make_model(kind).to(DEVICE)
    width = get_adapter(model).site(site, layer).size
    dims = list(range(width)) if width <= 32 else list(range(0, width, 3))
    ours = ca.causal_impact_scores(model, tokenizer, PROMPTS, layer, site, dims=dims, batch_size=7,
                                   intervention_scale=opts.get("scale", 0.0),
                                   ablation="mean" if opts.get("mean") else "zero", progress=False)
    ref = reference_scores(model, tokenizer, layer, site, dims, opts.get("scale", 0.0), opts.get("mean", False))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{kind} {site} L{layer}: max relative difference {rel:.2e} (largest impact {ref.max():.2e})")
    assert rel < 1e-5 and ref.max() > 0


def test_automatic_batch_size_gives_the_same_scores(tokenizer):
    model = make_model("mamba_b").to(DEVICE)
    a = ca.causal_impact_scores(model, tokenizer, PROMPTS, 0, progress=False)
    b = ca.causal_impact_scores(model, tokenizer, PROMPTS, 0, batch_size=1, progress=False)
    assert a.shape == (24,)
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-5  # batched BLAS rounding only


@pytest.mark.parametrize("kind", ["mamba_b", "gpt2"])
def test_planted_dominant_dimension_ranks_first_and_dead_dimension_scores_zero(kind, tokenizer):
    model = make_model(kind).to(DEVICE)
    adapter = get_adapter(model)
    planted, dead = 5, 11
    with torch.no_grad():
        if adapter.is_ssm:  # mixer_out dim k = out_proj row k
            proj = model.backbone.layers[1].mixer.out_proj
            proj.weight[planted] *= 30.0
            proj.weight[dead] = 0.0
            proj.bias[dead] = 0.0
        else:  # mlp_out dim k = c_proj column k (Conv1D weight is (in, out))
            proj = model.transformer.h[1].mlp.c_proj
            proj.weight[:, planted] *= 30.0
            proj.weight[:, dead] = 0.0
            proj.bias[dead] = 0.0
    site = "mixer_out" if adapter.is_ssm else "mlp_out"  # the site the weights were planted in
    top = ca.find_causal_neurons(model, tokenizer, PROMPTS, layer_idx=1, top_k=3, progress=False, site=site)
    assert top[0][0] == planted and top[0][1] > 3 * top[1][1]
    scores = ca.causal_impact_scores(model, tokenizer, PROMPTS, 1, site=site, progress=False)
    print(f"{kind}: planted {scores[planted]:.3e}, dead {scores[dead]:.3e}, median {np.median(scores):.3e}")
    assert scores[dead] < 1e-12 < np.median(scores)


def test_inter_layer_equals_per_layer_scores(tokenizer):
    model = make_model("mamba_b").to(DEVICE)
    curve = ca.inter_layer_causal_impact_all_layers(model, tokenizer, PROMPTS[0], 3)
    assert [layer for layer, _ in curve] == [0, 1, 2]
    for layer, score in curve:
        assert score == pytest.approx(ca.causal_impact_scores(model, tokenizer, PROMPTS[:1], layer, dims=[3],
                                                              progress=False)[0], rel=1e-5)  # batch rounding


@pytest.mark.parametrize("kind, site, opts", [("mamba_b", "mixer_out", {}), ("mamba_a", "residual", {"scale": 0.5}),
                                              ("gpt2", "mlp_out", {"mean": True}), ("gpt_neox", "residual", {})])
@pytest.mark.parametrize("batch_size", [2, 5, None])
def test_every_layer_in_shared_passes_equals_one_at_a_time_reference(kind, site, opts, batch_size, tokenizer):
    """causal_impact_by_layer puts the (layer, dim) ablations of several layers in one pass (rows join at
    their layer, copied from the unablated row 0): batch 2 and 5 split layers across passes at odd
    places, None puts everything in one pass. Every entry equals the one-at-a-time reference."""
    model = make_model(kind).to(DEVICE)
    n = get_adapter(model).n_layers
    dims = [1, 6, 3]
    ours = ca.causal_impact_by_layer(model, tokenizer, PROMPTS, range(n), site, opts.get("scale", 0.0),
                                     "mean" if opts.get("mean") else "zero", dims, batch_size, progress=False)
    assert ours.shape == (n, len(dims))
    ref = np.stack([cached_reference_scores(kind, model, tokenizer, layer, site, dims, opts.get("scale", 0.0),
                                            opts.get("mean", False)) for layer in range(n)])
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{kind} {site} batch {batch_size}: max relative difference {rel:.2e} (largest impact {ref.max():.2e})")
    assert rel < 1e-5 and ref.min() > 0
    # layers in any order, answered in the order asked
    rev = ca.causal_impact_by_layer(model, tokenizer, PROMPTS, list(range(n))[::-1], site, opts.get("scale", 0.0),
                                    "mean" if opts.get("mean") else "zero", dims, batch_size, progress=False)
    np.testing.assert_allclose(rev[::-1], ours, rtol=1e-6)


def test_shared_passes_check_their_unablated_row(tokenizer, monkeypatch):
    """A fast mixer that computed something else is caught by the unablated row of the first pass."""
    import ssm

    model = make_model("mamba_b").to(DEVICE)
    real = ssm.mixer_forward_blocked
    monkeypatch.setattr(ssm, "mixer_forward_blocked", lambda mixer, h, *a, **k: real(mixer, h, *a, **k) * 1.01)
    with pytest.raises(ssm.ReconstructionError, match="does not reproduce the clean run"):
        ca.causal_impact_by_layer(model, tokenizer, PROMPTS, [0, 1, 2], dims=[1, 2], batch_size=4, progress=False)


@pytest.mark.parametrize("kind, site", [("mamba_b", "mixer_out"), ("gpt2", "residual")])
def test_cross_layer_passes_of_any_size_agree(kind, site, tokenizer):
    """Sources split over passes of 1, 2 or all sources give the same matrix, exactly causal in each."""
    model = make_model(kind).to(DEVICE)
    n = get_adapter(model).n_layers
    full = ca.cross_layer_matrix(model, tokenizer, PROMPTS[2], [2, 9], site)
    for bs in (2, 4):  # 1 and 2 sources a pass (2 dims each)
        m = ca.cross_layer_matrix(model, tokenizer, PROMPTS[2], [2, 9], site, batch_size=bs)
        for s in range(n):
            assert np.all(m["change"][:, s, :s] == 0.0)
        np.testing.assert_allclose(m["change"], full["change"], rtol=1e-5, atol=1e-6 * np.abs(full["change"]).max())
        np.testing.assert_allclose(m["clean"], full["clean"], rtol=1e-6)
    one = ca.cross_layer_matrix(model, tokenizer, PROMPTS[2], [9], site, sources=[n - 1, 0, 0])
    np.testing.assert_allclose(one["change"][0, 1], full["change"][1, 0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(one["change"][0, 1], one["change"][0, 2])  # a source given twice


@pytest.mark.parametrize("kind, site", [("mamba_b", "mixer_out"), ("gpt2", "residual")])
def test_cross_layer_is_causal(kind, site, tokenizer):
    model = make_model(kind).to(DEVICE)
    n = get_adapter(model).n_layers
    m = ca.cross_layer_matrix(model, tokenizer, PROMPTS[2], dims=[2, 9], site=site)
    assert m["change"].shape == (2, n, n)
    for s in range(n):
        assert np.all(m["change"][:, s, :s] == 0.0)  # targets before the source: exactly unchanged
    assert np.abs(m["change"][:, :, -1]).max() > 0
    if site == "residual":  # zero-ablating residual dim k after layer s leaves 0 there
        for s in range(n):
            assert np.all(m["ablated"][:, s, s] == 0.0)
    one = ca.cross_layer_causal_influence(model, tokenizer, PROMPTS[2], 9, 0, n - 1, site=site)
    assert one["change"] == pytest.approx(m["change"][1, 0, n - 1], rel=1e-6, abs=1e-9)
    assert one["change"] == pytest.approx(one["ablated"] - one["clean"])


def test_cross_layer_is_exactly_causal_on_the_reference_mamba():
    """On a trained model, batch-shape rounding would show up before the source layer if the clean
    and ablated passes were computed differently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import REPO

    path = REPO / "reference_models" / "mamba"
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval().to(DEVICE), AutoTokenizer.from_pretrained(path)
    m = ca.cross_layer_matrix(model, tok, ca.DEFAULT_PROMPTS[0], dims=[24, 159, 185], site="mixer_out")
    for s in range(model.config.num_hidden_layers):
        assert np.all(m["change"][:, s, :s] == 0.0)
    assert np.abs(m["change"]).max() > 1e-3


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "prompts is empty"),
    ("The capital of France is", {}, "not a single string"),
    ([PROMPTS[0], 7], {}, "must be strings"),
    (PROMPTS, {"batch_size": 0}, "batch_size 0"),
    (PROMPTS, {"batch_size": -2}, "batch_size -2"),
    (PROMPTS, {"batch_size": 1.5}, "batch_size 1.5"),
    (PROMPTS, {"dims": []}, "dims is empty"),
    (PROMPTS, {"dims": "12"}, "not a string"),
    (PROMPTS, {"dims": [3, 24]}, "dims must lie in 0..23"),
    (PROMPTS, {"intervention_scale": float("nan")}, "intervention_scale nan"),
    (PROMPTS, {"ablation": "half"}, "ablation 'half'"),
])
def test_causal_scores_refuse_what_they_cannot_answer(prompts, kwargs, message, tokenizer):
    model = make_model("mamba_b").to(DEVICE)
    with pytest.raises(ValueError, match=message):
        ca.causal_impact_scores(model, tokenizer, prompts, 0, progress=False, **kwargs)


def test_repeated_dims_are_scanned_once_and_returned_in_the_order_asked(tokenizer, monkeypatch):
    model = make_model("mamba_b").to(DEVICE)
    seen = []
    real = ca._ablator
    monkeypatch.setattr(ca, "_ablator", lambda dims, *a: seen.extend(dims.tolist()) or real(dims, *a))
    got = ca.causal_impact_scores(model, tokenizer, PROMPTS, 1, dims=[7, 2, 7, 2, 7], progress=False)
    assert sorted(seen) == sorted([2, 7] * len(PROMPTS))
    once = ca.causal_impact_scores(model, tokenizer, PROMPTS, 1, dims=[7, 2], progress=False)
    np.testing.assert_array_equal(got, once[[0, 1, 0, 1, 0]])


def test_an_overflowing_scale_is_an_error_not_nan(tokenizer):
    """GPT-2's LayerNorm turns a 1e38-scaled dimension into inf/NaN logits: that must raise, never
    come back as NaN scores (Mamba's RMSNorm rescales it, so its scores stay finite and are returned)."""
    model = make_model("gpt2").to(DEVICE)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        ca.causal_impact_scores(model, tokenizer, PROMPTS, 0, dims=[0, 1], intervention_scale=1e38, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite residual"):
        ca.cross_layer_matrix(model, tokenizer, PROMPTS[0], [0], "residual", 1e38)
    finite = ca.causal_impact_scores(make_model("mamba_a").to(DEVICE), tokenizer, PROMPTS, 0, dims=[0, 1],
                                     intervention_scale=1e38, progress=False)
    assert np.isfinite(finite).all() and (finite > 0).all()


@pytest.mark.parametrize("prompt, dims, message", [
    (PROMPTS, [1], "one string"), (PROMPTS[0], [], "dims is empty"), (PROMPTS[0], [99], "in 0..23"),
    (PROMPTS[0], "3", "not a string")])
def test_cross_layer_refuses_bad_arguments(prompt, dims, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        ca.cross_layer_matrix(make_model("mamba_b"), tokenizer, prompt, dims, "mixer_out")


@pytest.mark.parametrize("kind, site, ablation", [("mamba_b", "ssm", "zero"), ("gpt2", "attn_heads", "mean"),
                                                   ("mamba_b", "mixer_out", "mean")])
def test_a_set_of_one_dimension_is_that_dimensions_effect(kind, site, ablation, tokenizer):
    """set_ablation_effects with one-dimension sets gives each dimension's own effect (KL and Δ log p, per
    prompt), as causal_effects_by_layer measures it, for the zero and the mean ablation."""
    model = make_model(kind).to(DEVICE)
    width = get_adapter(model).site(site, 1).size
    dims = [0, 3, width - 1]
    masks = np.eye(width, dtype=bool)[dims]  # (3, W)
    sets = ca.set_ablation_effects(model, tokenizer, PROMPTS, 1, masks, site=site, ablation=ablation, progress=False)
    single = ca.causal_effects_by_layer(model, tokenizer, PROMPTS, [1], site=site, dims=dims, ablation=ablation,
                                        progress=False)
    assert sets.kl.shape == single.kl.shape == (len(PROMPTS), 1, 3)
    np.testing.assert_allclose(sets.kl, single.kl, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(sets.delta_logp, single.delta_logp, rtol=1e-6, atol=1e-12)
    assert (sets.clean_top == single.clean_top).all()


@pytest.mark.parametrize("kind", ["mamba_b", "gpt2"])
def test_a_set_ablated_together_equals_an_independent_forward(kind, tokenizer):
    """Several dimensions of the attention neurons' site ablated together (Mamba ssm: out_proj's input;
    GPT-2 attn_heads: c_proj's input) give the KL of a forward with a plain pre-hook zeroing them; the empty
    set gives 0 (the clean run, reproduced)."""
    model = make_model(kind).to(DEVICE)
    adapter = get_adapter(model)
    site = "ssm" if adapter.is_ssm else "attn_heads"
    layer, chosen = 1, [2, 5, 11, 17]
    w = adapter.site(site, layer)
    masks = np.zeros((2, w.size), dtype=bool)
    masks[0, chosen] = True  # row 1: the empty set
    got = ca.set_ablation_effects(model, tokenizer, PROMPTS, layer, masks, site=site, progress=False).kl[:, 0]
    proj = model.get_submodule(w.path)
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(DEVICE)
        expected = kl_with_input_zeroed(model, proj, ids, chosen)
        print(f"{kind} prompt {i}: set {got[i, 0]:.6e}, independent {expected:.6e}, empty set {got[i, 1]:.1e}")
        assert got[i, 0] == pytest.approx(expected, rel=1e-4, abs=1e-9)
        assert abs(got[i, 1]) < 1e-9


def test_bad_sets_are_refused_before_any_forward(tokenizer):
    model = make_model("mamba_b")
    width = get_adapter(model).site("mixer_out", 0).size
    for bad in (np.zeros((0, width), dtype=bool), np.zeros((2, width + 1), dtype=bool), np.zeros((2, width)),
                np.zeros(width, dtype=bool)):
        with pytest.raises(ValueError, match="masks must be"):
            ca.set_ablation_effects(model, tokenizer, PROMPTS, 0, bad, progress=False)
