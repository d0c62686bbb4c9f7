"""faithfulness.rank_agreement: a ranking against the measured per-unit effects (known answers)."""
import numpy as np
import pytest

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
