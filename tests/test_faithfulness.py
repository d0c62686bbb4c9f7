"""faithfulness.py: a ranking against the measured per-unit effects, and deletion curves (known answers)."""
import numpy as np
import pytest
import torch

import stats
from faithfulness import precision_at_k, rank_agreement


def _effects(n=12, U=40, seed=0):
    rng = np.random.default_rng(seed)
    true = np.linspace(1.0, 0.0, U) ** 2 + 1e-3  # (U,): unit 0 matters most
    return true[None, :] * rng.lognormal(0.0, 0.3, size=(n, U))  # (n, U) per prompt, positive


def test_the_ground_truths_own_ranking_agrees_fully_and_its_reverse_disagrees():
    e = _effects()
    res = stats.Resamples.draw(e.shape[0], 200, 0, "prompts")
    own = rank_agreement(e, e.mean(0), res)
    assert own["spearman"]["value"] == pytest.approx(1.0)
    # the ranking is the full sample's truth; a draw's truth differs from it, so the interval lies just below 1
    assert 0.95 < own["spearman"]["low"] <= own["spearman"]["high"] <= 1.0
    assert own["precision_at_k"] == {1: 1.0, 5: 1.0, 10: 1.0}
    rev = rank_agreement(e, -e.mean(0), res)
    assert rev["spearman"]["value"] == pytest.approx(-1.0) and rev["spearman"]["high"] < 0
    assert rev["precision_at_k"][1] == 0.0


def test_a_planted_dominant_unit_ranked_first_has_precision_at_1_of_1():
    e = _effects()
    e[:, 17] *= 100.0  # unit 17 now dominates on every prompt
    scores = np.zeros(e.shape[1])
    scores[17] = 1.0  # a ranking that knows only unit 17: the other 39 tie below it
    r = rank_agreement(e, scores, stats.Resamples.draw(e.shape[0], 100, 0, "prompts"), ks=(1, 5))
    assert r["precision_at_k"][1] == 1.0
    # top 5: unit 17 is in both; the other 4 places of the ranking are shared by 39 tied units, of which the
    # truth's next 4 hold 4: expected overlap 1 + 4 * 4/39
    assert r["precision_at_k"][5] == pytest.approx((1 + 4 * 4 / 39) / 5)


def test_random_rankings_score_k_over_units_and_a_constant_ranking_exactly_that():
    e = _effects(U=50)
    truth = e.mean(0)
    rng = np.random.default_rng(1)
    draws = [precision_at_k(rng.permutation(50).astype(float), truth, 10) for _ in range(2000)]
    assert np.mean(draws) == pytest.approx(10 / 50, abs=0.01)
    assert precision_at_k(np.ones(50), truth, 10) == pytest.approx(10 / 50)  # every unit tied: exactly k/U
    r = rank_agreement(e, np.ones(50), stats.Resamples.draw(e.shape[0], 100, 0, "prompts"))
    assert r["spearman"] == {"value": None, "low": None, "high": None}  # undefined for a constant ranking


def test_one_prompt_has_no_interval_and_bad_input_is_refused():
    e = _effects(n=1)
    r = rank_agreement(e, e.mean(0), stats.Resamples.draw(1, 100, 0, "prompts"))
    assert r["spearman"]["value"] == pytest.approx(1.0) and r["spearman"]["low"] is None
    with pytest.raises(ValueError, match="units"):
        rank_agreement(e, np.ones(3), stats.Resamples.draw(1, 100, 0, "prompts"))
    with pytest.raises(ValueError, match="finite"):
        rank_agreement(e, np.full(e.shape[1], np.nan), stats.Resamples.draw(1, 100, 0, "prompts"))


def test_the_deletion_grid_and_sets():
    from faithfulness import k_grid, random_sets, top_sets

    assert k_grid(40) == [1, 2, 4, 8, 16, 32, 40] and k_grid(64) == [1, 2, 4, 8, 16, 32, 64]
    assert k_grid(40, 10) == [1, 2, 4, 8, 10] and k_grid(1) == [1]
    with pytest.raises(ValueError):
        k_grid(0)
    m = top_sets(np.array([0.1, 0.9, 0.5, 0.9]), [1, 2, 3])  # units 1 and 3 tied: index order
    assert m.tolist() == [[False, True, False, False], [False, True, False, True], [False, True, True, True]]
    r = random_sets(10, [1, 4], 5, seed=2)
    assert r.shape == (10, 10) and r[:5].sum(1).tolist() == [1] * 5 and r[5:].sum(1).tolist() == [4] * 5
    assert (random_sets(10, [1, 4], 5, seed=2) == r).all()  # seeded


def test_normalised_area_is_1_for_the_truth_0_for_random_and_undefined_without_a_gap():
    from faithfulness import deletion_curve, normalised_area, random_band

    ks = [1, 2, 4]
    res = stats.Resamples.draw(6, 100, 0, "prompts")
    rng = np.random.default_rng(0)
    truth_kl = np.array([1.0, 1.5, 2.0]) * rng.lognormal(0, 0.1, size=(6, 1))  # (prompts, ks)
    truth = deletion_curve(truth_kl, ks, res)
    assert [p["k"] for p in truth] == ks and all(p["low"] <= p["high"] for p in truth)
    assert truth[0]["value"] == pytest.approx(truth_kl[:, 0].mean())
    rand_kl = np.repeat(np.array([0.1, 0.2, 0.4]), 3)[None, :] * np.ones((6, 1))  # 3 draws per k, all alike
    band = random_band(rand_kl, ks, 3)
    assert [b["mean"] for b in band] == pytest.approx([0.1, 0.2, 0.4]) and band[0]["low"] == pytest.approx(0.1)
    assert normalised_area(truth, truth, band) == pytest.approx(1.0)
    as_random = [{"k": b["k"], "value": b["mean"]} for b in band]
    assert normalised_area(as_random, truth, band) == pytest.approx(0.0)
    assert normalised_area(truth, as_random, band) is None  # the truth no better than random: nothing to scale by


def test_on_a_model_the_planted_units_deletion_beats_random(tokenizer):
    """A tiny Mamba whose inner channel 7 drives out_proj 40x: the ground truth (each channel of the ssm site
    ablated alone) puts it first, a ranking that knows it has precision@1 = 1, and its deletion curve starts
    above every random draw."""
    import causal_analysis as ca
    from conftest import make_model
    from faithfulness import deletion_curve, k_grid, random_band, random_sets, top_sets

    model = make_model("mamba_b")
    with torch.no_grad():
        model.backbone.layers[1].mixer.out_proj.weight[:, 7] *= 40.0
    prompts = ["The cat sat on the mat because", "Numbers: one, two, three,", "In 1870 the town"]
    truth = ca.causal_effects_by_layer(model, tokenizer, prompts, [1], site="ssm", progress=False).kl[:, 0]  # (n, U)
    assert int(np.argmax(truth.mean(0))) == 7
    res = stats.Resamples.draw(len(prompts), 100, 0, "prompts")
    assert rank_agreement(truth, truth.mean(0), res)["precision_at_k"][1] == 1.0
    ks = k_grid(truth.shape[1], 4)
    curve_kl = ca.set_ablation_effects(model, tokenizer, prompts, 1, top_sets(truth.mean(0), ks), site="ssm",
                                       progress=False).kl[:, 0]
    rand_kl = ca.set_ablation_effects(model, tokenizer, prompts, 1, random_sets(truth.shape[1], ks, 8),
                                      site="ssm", progress=False).kl[:, 0]
    curve, band = deletion_curve(curve_kl, ks, res), random_band(rand_kl, ks, 8)
    print([(p["k"], p["value"]) for p in curve], [(b["k"], b["mean"], b["high"]) for b in band])
    assert curve[0]["value"] == pytest.approx(truth.mean(0)[7], rel=1e-6)  # k = 1: the planted unit alone
    assert curve[0]["value"] > band[0]["high"]
