"""Hidden attention (ssm.hidden_attention) and the attention-neuron methods."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention_neurons import (MambaAttentionNeurons, attention_weighted, gradient_guided,
                               integrate_attention_neurons, neuron_diversity, rollout_layer, rollout_step)
from conftest import assert_streamed_equals_reference, make_model
from delta_extraction import capture_mixer_io, mixer_internals
from models import NotApplicable
from ssm import apply_hidden_attention, hidden_attention, project_out, recompute_mixer
from utils import trace


def _ids(L=29, b=2, seed=0):
    return torch.randint(0, 300, (b, L), generator=torch.Generator().manual_seed(seed))


def test_hidden_attention_reproduces_the_mixer_output(mamba):
    ids = _ids().to(mamba.device)
    for layer in range(mamba.config.num_hidden_layers):
        h_in, real = capture_mixer_io(mamba, layer, ids)
        mixer = mamba.backbone.layers[layer].mixer
        it = recompute_mixer(mixer, h_in)
        alpha = hidden_attention(it.delta, it.A, it.B, it.C)  # (b, e, L, L)
        out = project_out(mixer, apply_hidden_attention(alpha, it.x, it.D) * F.silu(it.z))
        rel = ((out - real).abs().max() / real.abs().max()).item()
        print(f"layer {layer}: max relative difference {rel:.2e}")
        assert rel < 1e-4
        assert alpha.shape == (2, mamba.config.intermediate_size, 29, 29)


def test_upper_triangle_is_exactly_zero_and_large_delta_is_finite():
    model = make_model("mamba_b")
    with torch.no_grad():
        model.backbone.layers[0].mixer.dt_proj.bias.add_(8.0)  # large Δ: exp(A ΔS) spans hundreds of e-folds
    it, _ = mixer_internals(model, 0, _ids(L=256, b=1))
    S_total = it.delta.sum(1).min()  # (b, e) -> smallest cumulative Δ over the text
    assert (it.A.abs().min() * S_total) > 88  # exp(-A (S_i - S_j)) above the diagonal would overflow float32
    alpha = hidden_attention(it.delta, it.A, it.B, it.C, max_chunk_elements=1 << 20)
    assert torch.isfinite(alpha).all()
    upper = ~torch.ones(256, 256, dtype=torch.bool).tril()
    assert (alpha[..., upper] == 0).all()
    chunked_once = hidden_attention(it.delta, it.A, it.B, it.C, max_chunk_elements=1 << 40)
    assert torch.equal(alpha, chunked_once)  # chunking changes nothing


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("L, chunk", [(29, 8), (64, 16), (5, 16), (33, 1)])
def test_chunked_hidden_attention_equals_the_direct_form(dtype, tol, L, chunk, mamba):
    """The block-wise α (decay split at chunk boundaries, small matrix products) against the direct
    reference, on a real layer's internals; also with large Δ (hundreds of e-folds across the text)."""
    from ssm import hidden_attention_chunked

    model = mamba.to(dtype)
    ids = _ids(L=L, b=2).to(model.device)
    for bias in (0.0, 8.0):
        with torch.no_grad():
            model.backbone.layers[1].mixer.dt_proj.bias.add_(bias)
        h_in, _ = capture_mixer_io(model, 1, ids)
        it = recompute_mixer(model.backbone.layers[1].mixer, h_in)  # α vs α: no mixer check needed here
        ref = hidden_attention(it.delta, it.A, it.B, it.C)  # (b, e, L, L)
        fast = hidden_attention_chunked(it.delta, it.A, it.B, it.C, chunk=chunk, max_chunk_elements=1 << 12)
        rel = ((fast - ref).abs().max() / ref.abs().max()).item()
        print(f"{dtype} L={L} chunk={chunk} Δ bias {bias}: max relative difference {rel:.2e}")
        assert fast.dtype == ref.dtype and torch.isfinite(fast).all() and rel < tol
        assert (fast[..., ~torch.ones(L, L, dtype=torch.bool, device=fast.device).tril()] == 0).all()


def test_hand_built_three_token_case():
    alpha = torch.tensor([[[1.0, 0, 0], [0.5, 0.25, 0], [-0.2, 0.4, 0.1]]], dtype=torch.float64)  # (e=1, 3, 3)
    x = torch.tensor([[2.0], [-1.0], [4.0]], dtype=torch.float64)  # (L, e)
    g = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    # attention_weighted: |α x_j| = [[2], [1, .25], [.4, .4, .4]]; row sums (2, 1.25, 1.2): per query token
    # 4.45 / 3 (not / 6, the causal entries: that would shrink with the text's length)
    aw = attention_weighted(alpha, x)
    assert aw.neuron_activations[0] == pytest.approx(4.45 / 3)
    np.testing.assert_allclose(aw.token_map, [[2, 0, 0], [1, 0.25, 0], [0.4, 0.4, 0.4]])
    # gradient_guided: ReLU(g_i α_ij x_j) = [[2], [0, .5], [0, 0, .2]]; row sums (2, .5, .2): 2.7 / 3
    gg = gradient_guided(alpha, x, g)
    assert gg.neuron_activations[0] == pytest.approx(0.9)
    # rollout: rownorm(|α|) = [[1, 0, 0], [2/3, 1/3, 0], [2/7, 4/7, 1/7]]; Â = I/2 + that/2 =
    # [[1, 0, 0], [1/3, 2/3, 0], [1/7, 2/7, 4/7]]; carried by the unit's own half from other tokens:
    # (1/2)(1 - P_ii) = (0, 1/3, 3/7)
    ro, R = rollout_layer(alpha)
    np.testing.assert_allclose(R, [[1, 0, 0], [1 / 3, 2 / 3, 0], [1 / 7, 2 / 7, 4 / 7]], rtol=1e-12)
    assert ro.neuron_activations[0] == pytest.approx(np.mean([0, 1 / 3, 3 / 7]))


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5, dtype=torch.float64).expand(3, 5, 5)  # (e, L, L)
    R = None
    for _ in range(4):
        scores, R = rollout_layer(eye, R)
    torch.testing.assert_close(R, torch.eye(5, dtype=torch.float64))
    assert np.all(scores.neuron_activations == 0)
    torch.testing.assert_close(rollout_step(eye, R), R)


def test_rollout_rows_are_distributions_and_causal(mamba):
    an = MambaAttentionNeurons(mamba)
    top = mamba.config.num_hidden_layers - 1
    data = an.extract_attention_vectors(_ids(b=1).to(mamba.device), [top])  # lower layers fetched on the fly
    R = an.create_neurons(data, "rollout")[top].token_map
    np.testing.assert_allclose(R.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(R, 1) == 0) and np.all(R >= 0)


@pytest.mark.parametrize("target", ["likelihood", "last_argmax"])
def test_gradient_equals_finite_difference(target):
    """g = ∂ T / ∂ y at the scan output for either target T (passes.TARGETS), against central differences of
    T computed from the model's hidden states in float64; the target is recorded."""
    from passes import target_value

    model = make_model("mamba_a").double()
    with torch.no_grad():  # away from init, so the target depends on y noticeably
        for blk in model.backbone.layers:
            blk.mixer.dt_proj.bias.add_(2.0)
            blk.mixer.out_proj.weight.mul_(5.0)
    an = MambaAttentionNeurons(model, target)
    ids = _ids(L=9, b=1)
    layer = 0
    g, records = an.output_gradient(ids, layer)
    mixer = model.backbone.layers[layer].mixer
    h_in, _ = capture_mixer_io(model, layer, ids)
    it = recompute_mixer(mixer, h_in)
    path = an.adapter.mixer_path(layer)

    def value(y):
        with torch.no_grad(), trace(model, [path], retain_output=False,
                                    edit_output=lambda n, o: project_out(mixer, y * F.silu(it.z))):
            # the LM head by hand, in float64 (transformers casts the model's logits to float32)
            h = model.backbone(input_ids=ids, use_cache=False).last_hidden_state  # (1, L, d)
            return target_value(h @ model.lm_head.weight.T, ids, target)[0].item()

    # HF's RMSNorm computes in float32 even in a float64 model, so the target carries float32 rounding:
    # a central difference with eps = 1e-3 is accurate to about 1e-4 relative (a wrong gradient, e.g.
    # without the SiLU(z) gate factor, is off by order one).
    eps = 1e-3
    positions = [(i, int(g[0, i].abs().argmax())) for i in (5, 7, 8)] + [(8, 3), (2, 11)]
    for i, c in positions:
        bump = torch.zeros_like(it.y)
        bump[0, i, c] = eps
        fd = (value(it.y + bump) - value(it.y - bump)) / (2 * eps)
        print(f"{target} g[{i},{c}] autograd {g[0, i, c].item():.8e} finite difference {fd:.8e}")
        assert g[0, i, c].item() == pytest.approx(fd, rel=1e-3, abs=1e-5)
    assert g[0, :, :].abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())  # the pass froze the weights and gave them back
    (rec,) = records
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (L, V)
    if target == "last_argmax":
        assert rec["token_id"] == int(logp[-1].argmax()) and rec["p"] == pytest.approx(logp[-1].max().exp().item(),
                                                                                        rel=1e-5)
    else:
        own = logp[:-1].gather(1, ids[0, 1:, None]).mean().item()
        assert rec["n_tokens"] == 8 and rec["mean_logp"] == pytest.approx(own, rel=1e-5)


def test_gradient_pass_gives_the_weights_back_on_error(monkeypatch):
    """the gradient pass takes the weights out of the graph; an error inside must not leave a user's model
    frozen."""
    import ssm

    model = make_model("mamba_a")
    model.backbone.norm_f.weight.requires_grad_(False)  # a weight the user froze stays frozen
    an = MambaAttentionNeurons(model)

    def broken(*a, **kw):
        raise RuntimeError("planted")

    monkeypatch.setattr(ssm, "mixer_forward", broken)
    with pytest.raises(RuntimeError, match="planted"):
        an.output_gradient(_ids(L=9, b=1), 0)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "backbone.norm_f.weight")
    assert not model.backbone.norm_f.weight.requires_grad


def test_diversity_known_values():
    assert neuron_diversity(np.ones(8)) == pytest.approx(1.0)
    assert neuron_diversity(np.eye(8)[2]) == pytest.approx(0.0)
    a = np.random.default_rng(0).gamma(0.5, 1.0, 40)
    assert neuron_diversity(a * 1e300) == pytest.approx(neuron_diversity(a), rel=1e-12)  # scale-free
    assert neuron_diversity(a * 2.0 ** -900) == neuron_diversity(a)


def test_diversity_and_ranking_of_all_zero_activations_are_undefined():
    """No NaN diversity and no ranking of zeros: None / [] and the reason; the mean (0) is measured."""
    from attention_neurons import UNDEFINED, NeuronScores, diversity_undefined

    assert neuron_diversity(np.zeros(8)) is None and diversity_undefined(np.zeros(8)) == UNDEFINED["all_zero"]
    assert neuron_diversity(np.ones(1)) is None and diversity_undefined(np.ones(1)) == UNDEFINED["one_unit"]
    analyzer = MambaAttentionNeurons(make_model("mamba_b"))
    e = analyzer.describe_units()["n_units"]
    stats = analyzer.analyze_neuron_behavior({0: NeuronScores("rollout", np.zeros(e), None)}, 0)
    assert stats["top_neurons"] == [] and stats["neuron_diversity"] is None
    assert stats["mean_activation"] == 0.0 and stats["activation_std"] == 0.0
    assert stats["undefined"] == {"top_neurons": UNDEFINED["all_zero"], "neuron_diversity": UNDEFINED["all_zero"]}


def test_integrate_and_visualize(tmp_path):
    model = make_model("mamba_b")
    res = integrate_attention_neurons(model, {"input_ids": _ids(b=2)}, layer_indices=[1])
    assert set(res["neurons"]) == {"attention_weighted", "gradient_guided", "rollout"}
    e = model.config.intermediate_size
    for method, by_layer in res["analysis_results"].items():
        stats = by_layer[1]
        acts = res["neurons"][method][1].neuron_activations
        assert stats["num_neurons"] == e and stats["mean_activation"] == pytest.approx(acts.mean())
        assert stats["top_neurons"][0]["channel"] == int(np.argmax(acts))
        assert 0 <= stats["neuron_diversity"] <= 1
    assert res["attention_data"][1]["attention_vectors"].shape == (2, 29, 29)
    path = res["analyzer"].visualize_neurons(res["neurons"]["rollout"], 1, tmp_path, "m")
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_not_applicable_to_transformers():
    with pytest.raises(NotApplicable, match="gpt2"):
        MambaAttentionNeurons(make_model("gpt2"))


def _unit_rows_by_hand(alpha):
    """rownorm(|α|) per unit, an all-zero row the identity's: written out here, not attention_neurons'."""
    L = alpha.shape[-1]
    out = torch.zeros_like(alpha)
    for c in range(alpha.shape[0]):
        for i in range(L):
            r = alpha[c, i].abs().sum()
            out[c, i] = alpha[c, i].abs() / r if r > 0 else torch.eye(L, dtype=alpha.dtype)[i]
    return out


@pytest.mark.parametrize("L", [1, 2, 9])
def test_rollout_channel_scores_equal_the_full_per_channel_product(L):
    """rollout_layer reads only the diagonal of P^c R, P^c = rownorm(|α^c|); the score (1 − w)(1 − that diagonal)
    must equal the one from the product formed in full (the plain reference). For L = 1 (one token: no other token
    carries relevance) the scores are undefined, said so (None and the reason), and R_ℓ is still formed."""
    from attention_neurons import IDENTITY_WEIGHT as w
    from attention_neurons import UNDEFINED, _rownorm, rollout_layer

    g = torch.Generator().manual_seed(L)
    alpha = torch.randn(5, L, L, generator=g, dtype=torch.float64).tril()  # (e, L, L)
    alpha[3] = 0.0  # an all-zero channel: every row the identity's
    R = _rownorm(torch.rand(L, L, generator=g, dtype=torch.float64).tril() + torch.eye(L, dtype=torch.float64))
    eye = torch.eye(L, dtype=torch.float64)
    P = _unit_rows_by_hand(alpha)  # (e, L, L)
    full = P @ R  # (e, L, L)
    carried = (1 - w) * (1.0 - torch.diagonal(full, dim1=-2, dim2=-1))  # (e, L)
    scores, R_next = rollout_layer(alpha, R)
    if L == 1:
        assert scores.neuron_activations is None and scores.undefined == UNDEFINED["rollout_one_token"]
    else:
        np.testing.assert_allclose(scores.neuron_activations, carried.mean(-1).numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(R_next.numpy(), ((w * eye + (1 - w) * P.mean(0)) @ R).numpy(), rtol=1e-12)
    np.testing.assert_allclose(R_next.sum(-1).numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("kind", ["mamba_b", "gpt2"])
def test_rollout_bounds_are_the_same_for_both_families(kind):
    """At layer 0 (R_{-1} = I) a unit's rollout activation per position is (1 − w)(1 − P^c[i, i]): 0 for a
    unit that attends only to its own token, (1 − w)(L − 1)/L for one that never does (row 0 has only its
    own token), whatever the scale of α, for a Mamba channel and a Transformer head alike; on a real model's
    maps the scores lie in [0, 1 − w] at every layer."""
    from attention_neurons import IDENTITY_WEIGHT as w
    from attention_neurons import attention_neurons_for, rollout_layer

    L = 6
    own = torch.eye(L, dtype=torch.float64)[None] * 7.5  # (1, L, L): only the diagonal, any scale
    others = torch.ones(L, L, dtype=torch.float64).tril(-1)
    others[0, 0] = 3.0  # row 0 can only hold its own token
    for alpha, expected in ((own, 0.0), (others[None] * 1e-4, (1 - w) * (L - 1) / L)):
        scores, _ = rollout_layer(alpha)
        assert scores.neuron_activations[0] == pytest.approx(expected, abs=1e-15)
    an = attention_neurons_for(make_model(kind))
    for layer, bound in ((0, 1 - w), (1, 1 - w)):
        a = an.text_scores(_ids(L=13, b=1), layer, ("rollout",)).scores["rollout"].neuron_activations
        print(f"{kind} layer {layer}: rollout activations in [{a.min():.3f}, {a.max():.3f}], bound {bound}")
        assert a.min() >= 0 and a.max() <= bound + 1e-12


@pytest.mark.parametrize("L", [1, 2, 9])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("identity", [True, False])
def test_fast_unit_parts_equal_the_per_entry_products(L, shared, identity):
    """`_fast_parts` (rows from matrix products of α⁺, α⁻ with x⁺, x⁻; rollout from |α| and its row sums;
    once per head for shared α) equals the per-entry products of `_contribution_parts` / `_rollout_parts`,
    in float64 to 1e-12, for signed α, R_{ℓ-1} the identity or not, L = 1, an all-zero row, and rollout
    with the other methods or alone. A row whose every contribution is negative comes out exactly
    0 (no cancellation)."""
    from attention_neurons import (METHODS, _contribution_parts, _fast_parts, _gradient_contrib, _rollout_parts,
                                   _rownorm, _weighted_contrib)

    gen = torch.Generator().manual_seed(L + 10 * shared)
    c = 6
    f64 = dict(generator=gen, dtype=torch.float64)
    alpha = torch.randn(1 if shared else c, L, L, **f64).tril()  # (c, L, L), signed
    x, g = torch.randn(L, c, **f64), torch.randn(L, c, **f64)  # (L, c)
    if L > 1:  # the last row of unit 0 (every j is causal there): every g α x < 0
        alpha[0, L - 1] = -(alpha[0, L - 1].abs() + 0.1)
        x[:, 0], g[L - 1, 0] = x[:, 0].abs() + 0.1, 1.0
        alpha[0, 0] = 0.0  # an all-zero row: rollout's P row is the identity's
    full = alpha.expand(c, L, L)  # what the reference sees: one α per unit
    R = None if identity else _rownorm(torch.rand(L, L, **f64).tril() + torch.eye(L, dtype=torch.float64))
    got = _fast_parts(alpha[0] if shared else alpha, x, g, METHODS, shared, R, maps=True)
    ref = {"attention_weighted": _contribution_parts(_weighted_contrib(full, x)),
           "gradient_guided": _contribution_parts(_gradient_contrib(full, x, g)),
           "rollout": _rollout_parts(full, torch.eye(L, dtype=torch.float64) if R is None else R)}
    for m in METHODS:
        for k, (a, b) in enumerate(zip(got[m], ref[m])):
            diff = (a.expand_as(b) - b).abs().max().item()
            print(f"{m} part {k} L={L} shared={shared}: max difference {diff:.2e}")
            torch.testing.assert_close(a.expand_as(b), b, rtol=1e-12, atol=1e-13)
    if L > 1:
        assert got["gradient_guided"][0][0, L - 1].item() == 0.0
    alone = _fast_parts(alpha[0] if shared else alpha, x, g, ("rollout",), shared, R, maps=False)  # from |α| only
    for a, b in zip(alone["rollout"], ref["rollout"]):
        torch.testing.assert_close(a.expand_as(b), b, rtol=1e-12, atol=1e-13)
    no_maps = _fast_parts(alpha[0] if shared else alpha, x, g, METHODS, shared, R, maps=False)
    for m in ("attention_weighted", "gradient_guided"):
        assert no_maps[m][1] is None and torch.equal(no_maps[m][0], got[m][0])


def test_scores_without_maps_equal_the_scores_with_them():
    """maps=False (every text after the first in the attention stage) leaves out the token maps and the unit
    mean of α, and changes no activation or importance."""
    for name in ("mamba_b", "gpt2"):
        from attention_neurons import attention_neurons_for

        an = attention_neurons_for(make_model(name))
        ids = _ids(L=11, b=2)
        with_maps = dict(an.scores_by_layer(ids, [0, 1]))
        without = dict(an.scores_by_layer(ids, [0, 1], maps=False))
        for la in (0, 1):
            assert without[la].attention_vectors is None and with_maps[la].attention_vectors is not None
            for m, s in with_maps[la].scores.items():
                t = without[la].scores[m]
                np.testing.assert_array_equal(t.neuron_activations, s.neuron_activations)
                assert (t.token_map is None) == (m != "rollout")


@pytest.mark.parametrize("group_elements", [None, 5 * 4096])  # one group; groups of 5 channels (72 = 14·5 + 2)
@pytest.mark.parametrize("methods", [("attention_weighted", "gradient_guided", "rollout"), ("rollout",)])
def test_streamed_text_scores_equal_the_reference_path(group_elements, methods, monkeypatch):
    """text_scores consumes α one channel group at a time and never holds it whole; its scores must equal
    create_neurons on the whole α from extract_attention_vectors, at every layer (rollout at the
    top layer streams the layers below it), for a batch of two, and with several groups."""
    import ssm

    monkeypatch.setattr(ssm, "ATTENTION_GROUP_ELEMENTS", group_elements or ssm.ATTENTION_GROUP_ELEMENTS)
    model = make_model("mamba_b")  # e = 72, n = 8; at L = 29, b = 2 a channel's largest intermediate is 4096 floats
    an = MambaAttentionNeurons(model)
    assert_streamed_equals_reference(an, _ids(L=29, b=2), range(model.config.num_hidden_layers), methods)

@pytest.mark.parametrize("L", [1, 2, 8])  # one token (no off-diagonal entry), a partial chunk, exactly one chunk
def test_streamed_text_scores_on_short_texts(L):
    """The streamed and the reference path agree on short texts; on one token, what is undefined (rollout's
    scores; gradient_guided's under the likelihood target, which has no next token) is None with the reason
    on both, never NaN or zeros."""
    from attention_neurons import UNDEFINED
    from passes import TARGET_UNDEFINED

    model = make_model("mamba_b")
    an = MambaAttentionNeurons(model)
    ids = _ids(L=L, b=1, seed=L)
    top = model.config.num_hidden_layers - 1
    ts = an.text_scores(ids, top)
    data = an.extract_attention_vectors(ids, [top])
    for m in ts.scores:
        ref = an.create_neurons(data, m)[top]
        for field in ("neuron_activations", "token_map"):
            undefined = L == 1 and (m == "gradient_guided" or (m == "rollout" and field != "token_map"))
            if undefined:
                assert getattr(ts.scores[m], field) is None and getattr(ref, field) is None, (m, field)
                continue
            got = np.asarray(getattr(ts.scores[m], field))
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, getattr(ref, field), rtol=1e-5, atol=1e-9)
        if L == 1:
            why = {"rollout": UNDEFINED["rollout_one_token"], "gradient_guided": TARGET_UNDEFINED["likelihood"]}
            assert ts.scores[m].undefined == ref.undefined == why.get(m)


def test_streamed_rollout_captures_every_lower_layer_in_one_forward():
    """Rollout at the top layer needs every lower layer's α: their mixer inputs come from one forward (the
    gradient for gradient_guided is one more)."""
    model = make_model("mamba_b")
    an = MambaAttentionNeurons(model)
    top = model.config.num_hidden_layers - 1
    for methods, forwards in ((("rollout",), 1), (("rollout", "gradient_guided"), 2)):
        with trace(model, ["backbone.embeddings"], retain_output=False) as tr:
            an.text_scores(_ids(L=9, b=1), top, methods)
        assert tr["backbone.embeddings"].calls == forwards


def test_rollout_continues_from_an_earlier_layers_map():
    """text_scores(..., rolled=(k, R_k)) streams only the layers between k and ℓ and gives the same scores
    as rolling out from layer 0, to float rounding (a layer read in one path runs its own forward in the
    capture, in the other the blocked forward, whose scan rounds in another order)."""
    model = make_model("mamba_b")
    an = MambaAttentionNeurons(model)
    ids = _ids(L=11, b=2)
    first = an.text_scores(ids, 0, ("rollout",))
    for layer in (1, 2):
        whole = an.text_scores(ids, layer, ("rollout",))
        cont = an.text_scores(ids, layer, ("rollout",), rolled=(0, first.rollout_R))
        for field in ("neuron_activations", "token_map"):
            np.testing.assert_allclose(getattr(cont.scores["rollout"], field), getattr(whole.scores["rollout"], field),
                                       rtol=1e-6, atol=1e-7)
        for a, b in zip(cont.rollout_R, whole.rollout_R):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not below layer 1"):
        an.text_scores(ids, 1, ("rollout",), rolled=(1, first.rollout_R))


@pytest.mark.parametrize("kind", ["mamba_b", "mamba2"])
def test_streamed_text_scores_refuse_a_wrong_reconstruction(kind, monkeypatch):
    """A planted error in α (every group × 1.1: the output moves by 4e-4 relative in Mamba-1, as α x is a
    small part of this random-init mixer's output beside D x) must be caught by the (α x + D x) check
    (through the gate, or Mamba-2's gated norm), not scored."""
    import attention_neurons
    import ssm

    real = ssm.hidden_attention_by_channel

    def skewed(*a, **kw):
        for cs, alpha in real(*a, **kw):
            yield cs, alpha * 1.1

    monkeypatch.setattr(attention_neurons, "hidden_attention_by_channel", skewed)
    an = MambaAttentionNeurons(make_model(kind))
    with pytest.raises(ssm.ReconstructionError):
        an.text_scores(_ids(L=29, b=1), 1, ("attention_weighted",))


@pytest.mark.parametrize("kind", ["mamba_b", "gpt2"])
def test_one_token_texts_say_what_is_undefined(kind, tmp_path):
    """attention_profile on one-token texts: rollout's scores are undefined (no other token carries relevance)
    and so are gradient_guided's under the likelihood target (no next token): None / [] with the reason,
    never NaN or a list of zeros; attention_weighted still ranks the units. Beside a longer text, each
    undefined score is averaged over the texts where it is defined, so it equals the longer text's alone.
    The figures draw the undefined entries."""
    from attention_neurons import UNDEFINED, attention_neurons_for, attention_profile, neuron_scores, plot_attention_depth
    from passes import TARGET_UNDEFINED

    model = make_model(kind)
    analyzer = attention_neurons_for(model)
    one = [_ids(L=1, b=1, seed=s) for s in (1, 2)]
    entry = attention_profile(analyzer, one, [1])[1]
    for m, why in (("rollout", UNDEFINED["rollout_one_token"]), ("gradient_guided", TARGET_UNDEFINED["likelihood"])):
        r = entry["methods"][m]
        assert r["neuron_activations"] is None and r["top_neurons"] == [] and r["neuron_diversity"] is None
        assert r["mean_activation"] is None and r["n_texts_averaged"] == 0
        assert r["undefined"]["neuron_diversity"] == r["undefined"]["top_neurons"] == why
    assert entry["gradient_targets"] == [{"target": "likelihood", "undefined": TARGET_UNDEFINED["likelihood"]}] * 2
    r = entry["methods"]["attention_weighted"]
    assert np.isfinite(r["neuron_activations"]).all() and 0 <= r["neuron_diversity"] <= 1
    assert r["top_neurons"] and all(t["activation"] > 0 for t in r["top_neurons"]) and r["n_texts_averaged"] == 2
    for m in entry["methods"]:
        path = analyzer.visualize_neurons(neuron_scores(entry, m), 1, tmp_path, f"{kind}_{m}", 10, entry["methods"][m],
                                          entry["methods"][m]["activation_per_text"])
        assert open(path, "rb").read(4) == b"\x89PNG"
    plot_attention_depth([(kind, 2, {1: entry})], tmp_path, f"{kind}_depth")

    longer = _ids(L=9, b=1, seed=3)
    mixed = attention_profile(analyzer, [one[0], longer], [1])[1]["methods"]
    alone = attention_profile(analyzer, [longer], [1])[1]["methods"]
    for m in ("rollout", "gradient_guided"):
        np.testing.assert_allclose(mixed[m]["neuron_activations"], alone[m]["neuron_activations"], rtol=1e-12)
        assert mixed[m]["n_texts_averaged"] == 1 and mixed[m]["undefined"] == {}
    assert mixed["attention_weighted"]["n_texts_averaged"] == 2
