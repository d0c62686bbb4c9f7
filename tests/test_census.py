"""The neuron census (issue 28): the F-test's tail against closed forms, planted token, positional and dead
neurons found with the right kind, the false-positive rate on shuffled activations near the stated level,
and a Mamba's positional finding."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_model

import census
import stats
from utils import OFFLINE_TEXTS_PATH, read_texts_file

TEXTS = read_texts_file(OFFLINE_TEXTS_PATH)


def test_f_survival_matches_closed_forms():
    f = np.array([0.05, 0.5, 1.0, 3.0, 10.0, 60.0])
    for d2 in (3.0, 40.0, 5000.0):  # F(2, d2): P(F ≥ f) = (1 + 2f/d2)^(−d2/2)
        np.testing.assert_allclose(stats.f_survival(f, 2, d2), (1 + 2 * f / d2) ** (-d2 / 2), rtol=1e-10)
    x = np.linspace(0.001, 0.999, 101)
    np.testing.assert_allclose(stats.beta_regularized(x, 3.7, 1.0), x ** 3.7, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats.beta_regularized(x, 1.0, 5.2), 1 - (1 - x) ** 5.2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats.beta_regularized(x, 2.5, 7.0) + stats.beta_regularized(1 - x, 7.0, 2.5), 1.0,
                               rtol=1e-12)
    t = np.array([0.3, 1.0, 3.0, 30.0])  # F(1, ν) is a squared t with ν degrees of freedom
    np.testing.assert_allclose(stats.f_survival(t ** 2, 1, 1), 1 - 2 / np.pi * np.arctan(t), rtol=1e-12)
    np.testing.assert_allclose(stats.f_survival(t ** 2, 1, 2), 1 - t / np.sqrt(2 + t ** 2), rtol=1e-10)
    assert stats.f_survival(np.array([0.0]), 4, 10)[0] == 1.0


def _planted_gpt2(token: int):
    """A tiny GPT-2 whose layer-0 MLP unit 5 reads a direction u that only the position embeddings carry
    (sin(2π p / 16) along it), unit 9 a direction v that only token `token`'s embedding carries, and unit 13
    is dead (no weights, bias −10). A constant direction w in every position embedding sets the scale, so
    that the layer norm passes u and v on nearly linearly."""
    model = make_model("gpt2")
    t = model.transformer
    d, P = t.wte.weight.shape[1], t.wpe.weight.shape[0]
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.cat([torch.ones(d, 1), torch.randn(d, 3, generator=g)], 1))[0]  # (d, 4)
    u, v, w = q[:, 1], q[:, 2], q[:, 3]  # orthonormal, each with zero mean over the d dims (the norm keeps them)
    with torch.no_grad():
        for W in (t.wte.weight, t.wpe.weight):
            W -= (W @ q[:, 1:]) @ q[:, 1:].T
        t.wpe.weight += 2.0 * w + torch.sin(2 * math.pi * torch.arange(P) / 16)[:, None] * u
        t.wte.weight[token] += 1.0 * v
        fc = t.h[0].mlp.c_fc  # Conv1D: x @ weight (d, 4d) + bias
        fc.weight[:, 5], fc.weight[:, 9], fc.weight[:, 13] = 2.0 * u, 2.0 * v, 0.0
        fc.bias[5], fc.bias[9], fc.bias[13] = 0.0, 0.0, -10.0
    return model


@pytest.fixture(scope="module")
def planted(tokenizer):
    from collections import Counter

    from pipeline import run_comprehensive_analysis

    counts = Counter(i for text in TEXTS for i in tokenizer(text)["input_ids"])
    token = next(i for i, c in counts.most_common() if 10 <= c <= 60)  # a token that recurs, not everywhere
    res = run_comprehensive_analysis(_planted_gpt2(token), tokenizer, TEXTS, stages=["census"], progress=False)
    assert res["census"]["status"] == "ok", res["census"]
    return token, res["census"]["results"]


def test_planted_token_and_positional_neurons_are_found_with_their_kind(planted, tokenizer):
    token, r = planted
    layer = r["layers"][0]
    tok, pos = layer["token"], layer["position"]
    top_token = tok["top"][0]
    assert top_token["neuron"] == 9 and top_token["is_kind"] and top_token["share"] > 0.9
    assert top_token["cross_share"] > 0.9  # it holds out of sample
    assert top_token["top_tokens"][0]["token_id"] == token  # its strongest token is the planted one
    assert top_token["top_tokens"][0]["mean_deviation"] > 1.0
    assert r["strongest"]["token"]["layer"] in (0, 1)
    by_share = {t["neuron"]: t for t in pos["top"]}
    assert pos["top"][0]["neuron"] == 5 and by_share[5]["is_kind"] and by_share[5]["share"] > 0.9
    assert by_share[5]["share_without_first"] > 0.9  # its position code is not the first token's
    assert by_share[5]["cross_share"] > 0.9 and by_share[5]["cross_share_without_first"] > 0.9
    n = layer["n_neurons"]
    # each planted unit is of its own kind only
    assert pos["p_per_neuron"][9] is None or not (pos["share_per_neuron"][9] >= r["min_share"]
                                                   and pos["p_per_neuron"][9] < r["alpha"] / n)
    assert not (tok["share_per_neuron"][5] >= r["min_share"] and tok["p_per_neuron"][5] < r["alpha"] / n)
    # the dead unit: counted dead, no share (it does not vary)
    assert 13 in layer["dead"]["indices"]
    assert tok["share_per_neuron"][13] is None and pos["share_per_neuron"][13] is None
    assert r["positional_from_layer"] == 0 and r["positional_from_layer_without_first"] == 0
    assert r["absolute_position_input"] is True


def test_summary_names_the_level_and_the_planted_token(planted, tokenizer):
    token, r = planted
    text = census.census_summary(r)
    assert "Bonferroni" in text and "adjusted η²" in text
    assert f"strongest token neuron: layer {r['strongest']['token']['layer']}" in text
    assert "positional neurons from layer 0" in text


def _site_activations(model, tokenizer, texts):
    import sparsity as sp
    from models import get_adapter

    adapter = get_adapter(model)
    sites = sp.site_map(adapter, [0])
    ids = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]
    return ids, [sp.capture_sites(model, sites, i)[0] for i in ids]  # per text (L, N)


def test_false_positive_rate_on_shuffled_activations(tokenizer):
    """Each neuron's activations shuffled over every position of every text (its own shuffle): no token
    or position drives them, so the share of neurons with p < 0.05 is about 0.05 and the Bonferroni level
    flags about none."""
    from models import get_adapter

    model = make_model("gpt2")
    ids, acts = _site_activations(model, tokenizer, TEXTS)
    lengths = [a.shape[0] for a in acts]
    pooled = np.concatenate(acts)  # (n, N) real activations (heavy-tailed GELU outputs)
    rng = np.random.default_rng(0)
    p_token, p_position, flagged = [], [], 0
    for _ in range(12):
        shuffled = np.take_along_axis(pooled, np.argsort(rng.random(pooled.shape), axis=0), axis=0)
        reader = census.CensusReader(get_adapter(model), ids, layers=[0])
        for k, part in enumerate(np.split(shuffled, np.cumsum(lengths)[:-1])):
            reader.read(SimpleNamespace(ids=ids[k], sites={0: part}))
        res = census.census_results(reader.finish(), get_adapter(model), tokenizer, 0.05, 0.0, 1e-6)
        layer = res["layers"][0]
        p_token += layer["token"]["p_per_neuron"]
        p_position += layer["position"]["p_per_neuron"]
        flagged += layer["token"]["nominal_p_only"] + layer["position"]["nominal_p_only"]
    for name, p in (("token", p_token), ("position", p_position)):
        rate = float(np.mean(np.array(p) < 0.05))
        print(f"{name} test on shuffled activations: {rate:.4f} of {len(p)} neurons at p < 0.05")
        assert 0.035 <= rate <= 0.065, (name, rate)  # binomial sd 0.0043 over 1536 p-values
    assert flagged <= 3  # 24 layer-tests at a family-wise 5%: about 1.2 expected at most


def test_mamba_census_says_where_position_appears(tokenizer):
    from pipeline import run_comprehensive_analysis

    res = run_comprehensive_analysis(make_model("mamba_b"), tokenizer, TEXTS, stages=["census"], progress=False)
    r = res["census"]["results"]
    assert r["absolute_position_input"] is False and r["position_encoding"] is None
    assert r["n_layers"] == 3 and r["site"] == "ssm" and r["n_neurons"] == 72
    line = census.positional_finding(r)
    assert line.startswith("no position input")
    assert ("yet positional neurons from layer" in line) == (r["positional_from_layer"] is not None)
    for e in r["layers"].values():
        assert 0 <= e["token"]["count"] <= e["token"]["nominal_p_only"] <= 72
        assert e["position"]["count_without_first"] <= 72


def test_group_test_undefined_without_degrees_of_freedom():
    S = np.zeros((2, 3))
    out = census.group_test(S, np.array([1, 1]), np.zeros(3), 2, np.ones(3))
    assert out["undefined"] and np.isnan(out["share"]).all()


@pytest.mark.parametrize("name,value", [("census_alpha", 0.0), ("census_alpha", 1.0), ("census_min_share", 0.0),
                                        ("census_min_share", 1.5)])
def test_census_levels_out_of_range_are_refused(name, value):
    from options import check_option_values
    from utils import UserInputError

    with pytest.raises(UserInputError, match=name):
        check_option_values({name: value}, "--")


def test_the_comparison_sets_both_models_census_side_by_side(model_dirs, tmp_path):
    """With the census in the run, the other model's census is run too and both are set side by side over
    relative depth, with a plot of both and rows in the summary table."""
    from models import load_model_and_tokenizer
    from pipeline import run_comprehensive_analysis

    main_model, tok, _ = load_model_and_tokenizer(str(model_dirs["mamba_b"]))
    res = run_comprehensive_analysis(main_model, tok, TEXTS[:6], stages=["census", "comparison"], plots_dir=tmp_path,
                                     max_length=40, progress=False, compare_model=str(model_dirs["gpt2"]),
                                     seq_lengths=[16], efficiency_budget=2.0)
    assert res["comparison"]["status"] == "ok", res["comparison"].get("error")
    c = res["comparison"]["results"]
    cz = c["census"]
    main_label, other_label = (m["label"] for m in c["models"])
    assert cz["models"][main_label]["by_depth"] == res["census"]["results"]["by_depth"]  # reused, not measured again
    assert cz["models"][main_label]["site"] == "ssm" and cz["models"][other_label]["site"] == "mlp"
    assert cz["models"][other_label]["by_depth"]["relative_depth"] == [0.0, 1.0]
    rows = {r["metric"]: r for r in c["summary"]}
    assert "census: token neurons (share of all layers' neurons)" in rows
    assert any(p.endswith("_census_by_depth.png") for p in res["comparison"]["plots"])
    assert "census" not in c["parts_left_out"]


def test_one_text_has_a_token_test_and_says_the_position_test_is_undefined(tokenizer):
    from pipeline import run_comprehensive_analysis

    res = run_comprehensive_analysis(make_model("gpt2"), tokenizer, TEXTS[:1], stages=["census"], progress=False)
    r = res["census"]["results"]
    assert r["position_test"]["positions"] == 0
    e = r["layers"][0]
    assert e["position"]["undefined"] and e["position"]["count"] == 0 and e["position"]["median_share"] is None
    assert e["token"]["undefined"] is None
    assert "position test is undefined" in census.positional_finding(r)
    assert "position test: undefined" in census.census_summary(r)


def _synthetic(texts: list, n: int, rho: float, seed: int, spike: float = 0.0):
    """Per text, (L, n) activations with AR(1) dependence `rho` along the text (no token or position effect),
    plus `spike` at position 0 in neuron 0; token ids drawn from 30 (they repeat)."""
    rng = np.random.default_rng(seed)
    out = []
    for L in texts:
        a = np.empty((L, n))
        a[0] = rng.standard_normal(n)
        for i in range(1, L):
            a[i] = rho * a[i - 1] + np.sqrt(1 - rho ** 2) * rng.standard_normal(n)
        a[0, 0] += spike
        out.append((torch.randint(0, 30, (1, L), generator=torch.Generator().manual_seed(seed + L)), a))
    return out


def _census_of(data, n: int, min_share: float = 0.5):
    from models import get_adapter

    adapter = get_adapter(make_model("gpt2"))  # the adapter's layer count and site only; n neurons faked below
    reader = census.CensusReader(adapter, [ids for ids, _ in data], layers=[0])
    reader.n_neurons = n
    reader.census = {0: census.LayerCensus(n, reader.groups)}
    for ids, a in data:
        reader.read(SimpleNamespace(ids=ids, sites={0: a.astype(np.float32)}))
    return census.census_results(reader.finish(), adapter, SimpleNamespace(decode=str), 0.05, min_share, 1e-6)


def test_a_first_token_spike_is_not_a_position_code_in_texts_of_mixed_length():
    """A neuron that only spikes at position 0 (50 sd) in texts of 4 and 120 tokens: each test centres a text
    on its own positions, so nothing of the spike reaches the test without position 0."""
    data = _synthetic([4, 120] * 20, 8, 0.0, 0, spike=50.0)
    e = _census_of(data, 8)["layers"][0]["position"]
    wo = e["without_first"]
    assert wo["share_per_neuron"][0] < 0.05 and wo["count"] == 0
    assert e["share_per_neuron"][0] > 0.5  # with position 0, it is the first position's neuron it is


def test_dependence_along_the_text_inflates_only_the_nominal_p():
    """AR(1) activations (ρ = 0.95) with no token or position effect: the nominal F-test flags many neurons
    (it assumes independent positions), the shares stay near 0 (the cross-fitted one at most 0.06 over 200
    neurons with 12 texts a half), and no neuron is of a kind at a least share of 0.2."""
    data = _synthetic([64] * 24, 200, 0.95, 1)
    r = _census_of(data, 200, min_share=0.2)
    layer = r["layers"][0]
    cross = np.array(layer["position"]["cross_share_per_neuron"])
    print(f"AR(1) 0.95: nominal p < 0.05/N for {layer['position']['nominal_p_only']} of 200 neurons (position), "
          f"{layer['token']['nominal_p_only']} (token); cross-fitted position share median {np.median(cross):.3f}")
    assert layer["position"]["nominal_p_only"] > 10  # the nominal test is fooled by the dependence ...
    assert np.median(cross) < 0.02 and cross.max() < 0.1  # ... the cross-fitted share is not
    assert layer["position"]["count"] == 0 and layer["token"]["count"] == 0
