"""Sparsity measures: known values, invariances, streamed == in-memory, dead neurons in a real model."""
import numpy as np
import pytest
import torch

import sparsity as sp
from conftest import DEVICE, make_model
from models import get_adapter


@pytest.mark.parametrize("n", [2, 7, 100])
def test_gini_and_hoyer_known_values(n):
    uniform, onehot = np.full(n, 3.0), np.eye(n)[n // 2] * 5.0
    assert sp.gini(uniform) == pytest.approx(0.0, abs=1e-12)
    assert sp.gini(onehot) == pytest.approx(1.0 - 1.0 / n, abs=1e-12)
    assert sp.hoyer(uniform) == pytest.approx(0.0, abs=1e-12)
    assert sp.hoyer(onehot) == pytest.approx(1.0, abs=1e-12)


def test_gini_scale_invariance_and_robin_hood():
    rng = np.random.default_rng(0)
    c = rng.gamma(0.7, 1.0, 50)
    g = sp.gini(c)
    assert sp.gini(c * 1e-4) == pytest.approx(g, rel=1e-12) and sp.gini(c * 37.0) == pytest.approx(g, rel=1e-12)
    assert sp.hoyer(c * 1e3) == pytest.approx(sp.hoyer(c), rel=1e-12)
    rich, poor = int(np.argmax(c)), int(np.argmin(c))
    t = (c[rich] - c[poor]) / 4  # a transfer from rich to poor that keeps their order
    d = c.copy()
    d[rich] -= t
    d[poor] += t
    assert sp.gini(d) < g
    # the 2-D form is the Gini of the per-neuron mean |a|
    a = rng.standard_normal((30, 50))
    assert sp.gini(a) == sp.gini(np.abs(a).mean(0))
    assert sp.gini(np.zeros(4)) is None and sp.hoyer(np.zeros(4)) is None  # undefined: said, not NaN


def test_entropy_sparsity_known_values():
    assert sp.entropy(np.full((5, 8), -2.0)) == pytest.approx(0.0, abs=1e-12)  # uniform energy: H = 1
    assert sp.entropy(np.eye(8)[[1, 3, 3]] * 4.0) == pytest.approx(1.0, abs=1e-12)  # one neuron per token: H = 0
    two = np.array([[1.0, 1.0, 0.0, 0.0]])  # two equal neurons of four: H = log 2 / log 4
    assert sp.entropy(two) == pytest.approx(0.5, abs=1e-12)
    h = sp.token_entropy(np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert np.isnan(h[0]) and h[1] == pytest.approx(1.0)


def test_traditional_percentile_and_optimal_threshold():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((400, 64)) * np.geomspace(1e-4, 10, 64)
    c = np.abs(a).mean(0)
    assert sp.traditional(a, 0.01) == pytest.approx((c < 0.01).mean())
    p = sp.percentile(a)
    tau = np.percentile(np.abs(a.astype(np.float32)), sp.PERCENTILES, method="inverted_cdf")
    np.testing.assert_array_equal(p["thresholds"], tau)
    np.testing.assert_array_equal(p["sparsity"], [(c < t).mean() for t in tau])
    x = np.abs(a.astype(np.float32)).ravel()
    for target in (0.5, 0.9, 0.37):
        tau = sp.optimal_threshold(a, target)
        # τ hits the target: at least that fraction of |a| is ≤ τ, less than it is < τ
        assert (x <= tau).mean() >= target > (x < tau).mean()
        assert tau in x


def test_streamed_statistics_equal_in_memory():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((1013, 48)) * rng.gamma(0.5, 1.0, 48)
    a[:, 5] = 0.0  # a dead neuron
    a[:, 9] = 1e-7  # ties at a tiny value
    a[17] = 0.0  # an all-zero token
    for size in (1, 64, 1013):
        lengths = [len(a[i:i + size]) for i in range(0, len(a), size)]  # each chunk is one text of the intervals
        ref = sp.comprehensive_sparsity(a, threshold=0.01, eps=1e-6, lengths=lengths, n_resamples=200)
        got = sp.stream_sparsity(lambda: (a[i:i + size] for i in range(0, len(a), size)), 48, 0.01, 1e-6,
                                 n_resamples=200)
        for key in ("percentile", "optimal_threshold", "traditional"):
            assert got[key] == ref[key], key  # exact order statistics and counts
        for key in ("gini", "hoyer"):
            assert got[key] == pytest.approx(ref[key], rel=1e-12)
        assert got["n_texts"] == ref["n_texts"] == len(lengths)
        for family, names in (("population", ("normalised_entropy", "entropy_sparsity", "gini", "hoyer")),
                              ("usage", ("gini", "hoyer"))):
            for m in names:
                assert_leaves_close(got[family][m], ref[family][m], 1e-12, f"{family}.{m}")
        assert got["population"]["n_tokens_defined"] == ref["population"]["n_tokens_defined"]
        for m in sp.POPULATION:
            np.testing.assert_array_equal(got["population"]["histograms"][m], ref["population"]["histograms"][m])
        np.testing.assert_allclose(got["neuron_mean_abs"], ref["neuron_mean_abs"], rtol=1e-12)
        np.testing.assert_allclose(got["neuron_variance"], ref["neuron_variance"], rtol=1e-10, atol=1e-30)
        assert got["entropy"]["sparsity"] == pytest.approx(ref["entropy"]["sparsity"], rel=1e-12)
        assert got["entropy"]["n_zero_tokens"] == ref["entropy"]["n_zero_tokens"] == 1
        np.testing.assert_array_equal(got["entropy"]["histogram_counts"], ref["entropy"]["histogram_counts"])
        np.testing.assert_array_equal(got["dead_neurons"]["indices"], ref["dead_neurons"]["indices"])
    assert list(ref["dead_neurons"]["indices"]) == [5, 9]
    assert ref["population"]["n_tokens_defined"] == {m: len(a) - 1 for m in sp.POPULATION}  # the zero token
    np.testing.assert_allclose(ref["neuron_variance"], a.var(0), rtol=1e-12, atol=1e-30)


def test_second_pass_reads_the_kept_bits_within_the_budget_and_recomputes_past_it():
    """With room for the first pass's |a| the source is read once, without room twice (the budget is
    passed mid-stream: what was kept is dropped), and both give exactly the numbers of the in-memory
    statistics."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((600, 32)) * rng.gamma(0.5, 1.0, 32)
    ref = sp.comprehensive_sparsity(a, threshold=0.01, eps=1e-6, lengths=[100] * 6)  # the chunks are the texts
    for budget, calls_expected in ((a.size * 4, 1), (a.size * 4 - 1, 2), (0, 2)):
        calls = []

        def chunks():
            calls.append(1)
            return (a[i:i + 100] for i in range(0, len(a), 100))

        got = sp.stream_sparsity(chunks, 32, 0.01, 1e-6, cache_bytes=budget)
        assert len(calls) == calls_expected, budget
        for key in ("percentile", "optimal_threshold", "traditional"):
            assert got[key] == ref[key], (budget, key)
        assert_leaves_close(got["usage"], ref["usage"], 1e-12, "usage")
        assert got["n_texts"] == 6  # a second pass does not count the texts again


@pytest.mark.parametrize("kind", ["mamba_a", "gpt2"])
def test_dead_neurons_found_in_a_tiny_model(kind, tokenizer):
    """Zero the weights that feed three neurons of layer 1's inner site: exactly those are dead, streamed
    over several texts, and the other layer has none."""
    model = make_model(kind).to(DEVICE)
    adapter = get_adapter(model)
    dead = [2, 7, 11]
    with torch.no_grad():
        if kind == "gpt2":  # mlp.act = gelu(c_fc(x)): c_fc is a Conv1D (in, out)
            fc = model.transformer.h[1].mlp.c_fc
            fc.weight[:, dead] = 0.0
            fc.bias[dead] = 0.0
        else:  # ssm = y · SiLU(z): the gate rows of in_proj -> z = 0 -> SiLU(0) = 0
            mixer = model.backbone.layers[1].mixer
            e = mixer.intermediate_size
            mixer.in_proj.weight[[e + d for d in dead]] = 0.0
    ids = [tokenizer(t, return_tensors="pt").input_ids for t in ["The cat sat.", "A much longer text, with words."]]
    stats = sp.layer_sparsity(model, adapter, ids, [0, 1])
    assert list(stats[1]["dead_neurons"]["indices"]) == dead
    assert stats[0]["dead_neurons"]["count"] == 0
    assert stats[1]["n_tokens"] == sum(x.shape[1] for x in ids)
    assert stats[1]["traditional"]["threshold"] == (0.01 if kind == "mamba_a" else 1e-5)


NAN = np.array([[1.0, np.nan], [0.5, 2.0]])
INF = np.array([[1.0, np.inf], [0.5, 2.0]])


@pytest.mark.parametrize("f", [
    lambda a: sp.traditional(a, 0.01), sp.percentile, sp.entropy, sp.token_entropy, sp.gini, sp.hoyer,
    sp.optimal_threshold, sp.dead_neurons, sp.neuron_means, lambda a: sp.comprehensive_sparsity(a, 0.01),
    lambda a: sp.stream_sparsity(lambda: [a], a.shape[1] if a.ndim == 2 else 0, 0.01)],
    ids=["traditional", "percentile", "entropy", "token_entropy", "gini", "hoyer", "optimal_threshold",
         "dead_neurons", "neuron_means", "comprehensive", "streamed"])
@pytest.mark.parametrize("a, message", [
    (np.zeros((0, 5)), "empty|no activations were seen"), (np.zeros((4, 0)), "empty|got shape"), (NAN, "1 NaN"), (INF, "1 infinite"),
    (np.zeros(0), "shape|empty")], ids=["no tokens", "no neurons", "nan", "inf", "empty vector"])
def test_sparsity_measures_refuse_empty_and_nonfinite_input(f, a, message):
    with pytest.raises(ValueError, match=message):
        f(a)


def test_sparsity_thresholds_must_be_finite_and_streams_not_empty():
    a = np.abs(np.random.default_rng(1).standard_normal((20, 6)))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            sp.traditional(a, bad)
        with pytest.raises(ValueError, match="threshold"):
            sp.comprehensive_sparsity(a, bad)
        with pytest.raises(ValueError, match="eps"):
            sp.dead_neurons(a, bad)
    with pytest.raises(ValueError, match="no activations were seen"):
        sp.stream_sparsity(lambda: [], 6, 0.01)
    with pytest.raises(ValueError, match="no activations were seen"):
        sp.stream_sparsity(lambda: [np.zeros((0, 6))], 6, 0.01)
    with pytest.raises(ValueError, match="overflow float32"):  # finite in float64, not as float32 order statistics
        sp.percentile(np.full((3, 2), 1e39))
    # a NaN in a later chunk of a stream is found too
    with pytest.raises(ValueError, match="NaN"):
        sp.stream_sparsity(lambda: [a, np.full((2, 6), np.nan)], 6, 0.01)


def assert_leaves_close(got, want, rel: float, where: str = "") -> None:
    """`got` equals `want` leaf by leaf: the same dict keys and list lengths, strings, bools and None equal,
    every number within `rel` relative (what pytest.approx(want, rel=rel) checked on the nested structure
    before pytest 9.2, which refuses nested structures)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_leaves_close(got[key], want[key], rel, f"{where}.{key}")
    elif isinstance(want, (list, tuple, np.ndarray)):
        assert isinstance(got, (list, tuple, np.ndarray)) and len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_leaves_close(g, w, rel, f"{where}[{i}]")
    elif want is None or isinstance(want, (str, bool)):
        assert got == want, f"{where}: {got!r} != {want!r}"
    else:
        assert got == pytest.approx(want, rel=rel), f"{where}: {got} != {want} within {rel:g} relative"


def test_model_sparsity_equals_the_model_own_forward_and_a_wrong_fast_forward_is_caught(tokenizer, monkeypatch):
    """layer_sparsity streams a Mamba through the blocked mixer forward (its scan in chunks of positions,
    rounding in another order): its statistics equal those of the activations captured through the model's
    own forward to float rounding, and a blocked forward that computed something else is refused on the
    first text."""
    import ssm
    from utils import tokenize_texts, trace, OFFLINE_TEXTS_PATH, read_texts_file

    model = make_model("mamba_b").to(DEVICE)
    adapter = get_adapter(model)
    ids = tokenize_texts(tokenizer, read_texts_file(OFFLINE_TEXTS_PATH)[:5], 32).input_ids
    site = adapter.site("ssm", 1)
    own = []
    for x in ids:
        with torch.no_grad(), trace(model, [site.path], retain_input=True) as tr:
            model(input_ids=x.to(DEVICE), use_cache=False)
        own.append(tr[site.path].input[0].float().cpu().numpy())  # (L, e)
    expected = sp.comprehensive_sparsity(np.concatenate(own), 0.01)
    got = sp.layer_sparsity(model, adapter, ids, [1], 0.01)[1]
    for key in ("gini", "hoyer", "percentile", "optimal_threshold"):
        assert_leaves_close(got[key], expected[key], 1e-5, key)
    np.testing.assert_allclose(got["neuron_mean_abs"], expected["neuron_mean_abs"], rtol=1e-5)

    real = ssm.mixer_forward_blocked
    monkeypatch.setattr(ssm, "mixer_forward_blocked", lambda mixer, h, *a, **k: real(mixer, h, *a, **k) * 1.01)
    with pytest.raises(ssm.ReconstructionError, match="blocked mixer forward differs"):
        sp.layer_sparsity(model, adapter, ids, [1, 2], 0.01)


def assert_sparsity_close(got: dict, want: dict, where: str = "") -> None:
    """Two sparsity results of the same activations computed along different forward paths (equal to float
    rounding): every number within 1e-4 relative, counts and dead-neuron lists equal."""
    assert set(got) == set(want), where
    for key, w in want.items():
        g = got[key]
        if isinstance(w, dict):
            assert_sparsity_close(g, w, f"{where}.{key}")
        elif isinstance(w, str) or w is None:
            assert g == w, f"{where}.{key}"
        elif isinstance(w, (int, np.integer)) and not isinstance(w, bool):
            assert g == w, f"{where}.{key}: {g} != {w}"
        else:
            np.testing.assert_allclose(np.asarray(g, dtype=float), np.asarray(w, dtype=float), rtol=1e-4, atol=1e-9,
                                       err_msg=f"{where}.{key}")


@pytest.mark.parametrize("kind", ["mamba_b", "gpt2", "mamba2"])
def test_sparsity_read_from_the_gradient_forwards_equals_its_own_forwards(kind, tokenizer):
    """The text pass with a gradient forward (gradient_guided): every layer's sparsity read from it (one
    full forward per text, through the fast scan on a Mamba) equals `layer_sparsity` with forwards of its
    own, to float rounding; every text is read once, and the first text's sites were checked against the
    model's own forward. The max relative difference is printed."""
    import attention_neurons as an
    from passes import run_text_pass
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    model = make_model(kind).to(DEVICE)
    adapter = get_adapter(model)
    ids = [tokenizer(t, return_tensors="pt").input_ids[:, :30] for t in read_texts_file(OFFLINE_TEXTS_PATH)[:4]]
    layers = range(adapter.n_layers)
    readers = {"sparsity": sp.SparsityRead(model, adapter, layers, ids),
               "attention": an.AttentionProfile(an.attention_neurons_for(model), [1], an.METHODS)}
    done = run_text_pass(model, adapter, ids, readers)
    assert not done.errors and done.forwards == 2 * len(ids)
    got, want = done.results["sparsity"]["stats"], sp.layer_sparsity(model, adapter, ids, layers)
    assert done.results["sparsity"]["measured_in"].startswith("the text pass's gradient forwards (the first text")
    rel = max(np.abs(got[la]["neuron_mean_abs"] - want[la]["neuron_mean_abs"]).max()
              / np.abs(want[la]["neuron_mean_abs"]).max() for la in layers)
    print(f"{kind}: neuron mean |a| from the gradient forwards vs own forwards: max relative difference {rel:.2e}")
    assert got[0]["n_tokens"] == sum(x.shape[1] for x in ids)
    assert_sparsity_close(got, want)


def test_gradient_forward_sites_are_checked_before_they_are_used(tokenizer, monkeypatch):
    """A planted difference in the gradient forward's sites beyond SITE_TOLERANCE of the model's own forward
    (on the first text) is refused: every text's sites are then read from the capture forwards (the model's
    own), said in "measured_in", and the numbers are those of `layer_sparsity`."""
    import attention_neurons as an
    import passes

    model = make_model("mamba_b")
    adapter = get_adapter(model)
    ids = [tokenizer(t, return_tensors="pt").input_ids for t in ["The cat sat on the mat.", "A longer text, with words."]]
    real = passes.gradient_pass

    def planted(*args, **kwargs):
        grads, target, sites = real(*args, **kwargs)
        return grads, target, {la: a * (1 + 3 * passes.SITE_TOLERANCE) for la, a in sites.items()}

    monkeypatch.setattr(passes, "gradient_pass", planted)
    readers = {"sparsity": sp.SparsityRead(model, adapter, [0, 2], ids),
               "attention": an.AttentionProfile(an.attention_neurons_for(model), [0], an.METHODS)}
    done = passes.run_text_pass(model, adapter, ids, readers)
    where = done.results["sparsity"]["measured_in"]
    assert where.startswith("the text pass's capture forwards (the model's own; the gradient forwards' sites "
                            "differed by 0.003")
    assert_sparsity_close(done.results["sparsity"]["stats"], sp.layer_sparsity(model, adapter, ids, [0, 2]))


def test_scale_free_measures_are_computed_scale_free():
    """Hoyer, Gini and entropy of a scaled copy equal the unscaled values: exactly for a power-of-two scale
    (every division by the max is then exact), to rounding for any other, down to 1e-200 and up to 1e200
    (where squares overflow float64: Hoyer used to give 1.547 and entropy NaN there)."""
    rng = np.random.default_rng(3)
    c = rng.gamma(0.7, 1.0, 50)
    a = rng.standard_normal((40, 50)) * rng.gamma(0.5, 1.0, 50)
    a[7] = 0.0  # an all-zero token stays left out
    want = {"hoyer": sp.hoyer(c), "gini": sp.gini(c), "entropy": sp.entropy(a)}
    for scale in (2.0 ** 600, 2.0 ** -600, 2.0 ** 40):
        assert (sp.hoyer(c * scale), sp.gini(c * scale), sp.entropy(a * scale)) == tuple(want.values()), scale
        np.testing.assert_array_equal(sp.token_entropy(a * scale), sp.token_entropy(a))
    for scale in (1e200, 1e-200, 37.0):
        assert sp.hoyer(c * scale) == pytest.approx(want["hoyer"], rel=1e-12)
        assert sp.gini(c * scale) == pytest.approx(want["gini"], rel=1e-12)
        assert sp.entropy(a * scale) == pytest.approx(want["entropy"], rel=1e-12)
    # near float64's limit the per-neuron mean no longer overflows either
    big = np.abs(a) * (1e308 / np.abs(a).max())
    assert sp.gini(big) == pytest.approx(sp.gini(a), rel=1e-12)
    # known values unchanged
    assert sp.hoyer(np.eye(9)[4] * 1e250) == pytest.approx(1.0, abs=1e-12)
    assert sp.entropy(np.array([[1e200, 1e200, 0.0, 0.0]])) == pytest.approx(0.5, abs=1e-12)


def test_undefined_measures_are_none_with_their_reason_in_memory_and_streamed():
    """All-zero activations: entropy, Gini and Hoyer are undefined, None with the reason, never NaN; one
    neuron: entropy and Hoyer are undefined, Gini is 0; the streamed statistics say the same."""
    zeros = np.zeros((6, 5))
    one = np.abs(np.random.default_rng(4).standard_normal((6, 1))) + 0.1
    assert sp.entropy(zeros) is None and sp.entropy(one) is None
    assert sp.hoyer(one) is None and sp.gini(one) == 0.0
    no_energy = dict.fromkeys(("population.normalised_entropy", "population.gini", "population.hoyer",
                               "population.entropy_sparsity"), sp.UNDEFINED["no_energy"])
    for a, undefined in ((zeros, {**no_energy, "usage.gini": sp.UNDEFINED["all_zero"],
                                  "usage.hoyer": sp.UNDEFINED["all_zero"]}),
                         (one, {"population.normalised_entropy": sp.UNDEFINED["one_neuron_entropy"],
                                "population.entropy_sparsity": sp.UNDEFINED["one_neuron_entropy"],
                                "population.hoyer": sp.UNDEFINED["one_neuron_hoyer"],
                                "usage.hoyer": sp.UNDEFINED["one_neuron_hoyer"]})):
        for got in (sp.comprehensive_sparsity(a, 0.01, lengths=[2, 4]),
                    sp.stream_sparsity(lambda: [a[:2], a[2:]], a.shape[1], 0.01)):
            assert got["undefined"] == undefined
            assert got["entropy"]["sparsity"] is None and got["entropy"]["mean_entropy"] is None
            assert got["hoyer"] is None and (got["gini"] is None) == (a is zeros)
            assert got["entropy"]["n_zero_tokens"] == (6 if a is zeros else 0)
            for key in undefined:  # every undefined measure is None at its place, not NaN
                family, m = key.split(".")
                assert got[family][m] is None, key
            if a is one:  # the Gini of one value is 0, per token and in usage
                assert got["population"]["gini"]["value"] == 0.0 and got["usage"]["gini"]["value"] == 0.0
            table = sp.multilayer_table({0: {**got, "relative_depth": 0.0}})
            assert table["usage Hoyer"] == [None] and table["population Hoyer"] == [None]
            assert table["population H (normalised entropy, lower = sparser)"] == [None]
            assert table["intervals"]["usage Hoyer"] == [None]
    defined = sp.comprehensive_sparsity(np.random.default_rng(5).standard_normal((8, 6)), 0.01)
    assert defined["undefined"] == {} and all(isinstance(defined[k], float) for k in ("gini", "hoyer"))


def test_undefined_measures_are_drawn_as_undefined(tmp_path):
    """The plots take a layer whose measures are undefined (no NaN reaches a label)."""
    got = {**sp.comprehensive_sparsity(np.zeros((6, 5)), 0.01), "layer": 0, "relative_depth": 0.0}
    paths = sp.sparsity_plots([("zeros", got)], [("zeros", {0: got})], tmp_path, "t")
    assert len(paths) == 7 and all(p.endswith(".png") for p in paths)


@pytest.mark.parametrize("k", [100, "top"])
def test_streamed_float32_activations_near_the_top_of_the_range(k):
    """float32 activations of 1e30 (squares overflow float32) and up to 3.4e38 (float32's largest): the
    streamed statistics stay finite and a power-of-two scale changes only the scale-dependent ones, exactly
    as it should (thresholds and means by the scale, variances by its square)."""
    rng = np.random.default_rng(6)
    a = (rng.standard_normal((300, 16)) * rng.gamma(0.5, 1.0, 16)).astype(np.float32)
    k = int(np.floor(np.log2(np.finfo(np.float32).max / np.abs(a).max()))) if k == "top" else k
    big = a * np.float32(2.0 ** k)
    assert np.isfinite(big).all() and (k < 127 or np.abs(big).max() > 1e38)
    ref = sp.stream_sparsity(lambda: (a[i:i + 64] for i in range(0, len(a), 64)), 16, 0.0)
    got = sp.stream_sparsity(lambda: (big[i:i + 64] for i in range(0, len(big), 64)), 16, 0.0)
    for key in ("gini", "hoyer"):
        assert got[key] == ref[key], key
    assert got["entropy"]["sparsity"] == ref["entropy"]["sparsity"]
    for m in ("normalised_entropy", "entropy_sparsity", "gini", "hoyer"):  # scale-free, exactly
        assert got["population"][m] == ref["population"][m], m
    assert got["usage"] == ref["usage"]
    assert got["percentile"]["sparsity"] == ref["percentile"]["sparsity"]
    np.testing.assert_array_equal(got["percentile"]["thresholds"], np.asarray(ref["percentile"]["thresholds"]) * 2.0 ** k)
    np.testing.assert_array_equal(got["neuron_mean_abs"], ref["neuron_mean_abs"] * 2.0 ** k)
    np.testing.assert_allclose(got["neuron_variance"], ref["neuron_variance"] * 4.0 ** k, rtol=1e-12)
