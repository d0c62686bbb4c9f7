"""The bootstrap behind every interval and rank stability (stats.py): coverage on data of known
distribution, planted stable and unstable units, ties, weighted means, the undefined one-item case."""
import numpy as np
import pytest

import stats


def test_draws_are_seeded_and_each_resample_has_n_items():
    a = stats.Resamples.draw(7, 200, seed=3)
    b = stats.Resamples.draw(7, 200, seed=3)
    c = stats.Resamples.draw(7, 200, seed=4)
    assert np.array_equal(a.counts, b.counts) and not np.array_equal(a.counts, c.counts)
    assert (a.counts.sum(1) == 7).all() and a.counts.shape == (200, 7)
    assert "200 resamples" in a.method() and "seed 3" in a.method()


def test_resampled_weighted_means_match_a_direct_loop():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(6, 3)), rng.integers(1, 50, size=6).astype(float)
    res = stats.Resamples.draw(6, 50, seed=1)
    got = res.means(x, w)
    for r in range(5):
        idx = np.repeat(np.arange(6), res.counts[r].astype(int))
        assert np.allclose(got[r], (w[idx, None] * x[idx]).sum(0) / w[idx].sum())
    assert np.allclose(stats.weighted_mean(x, w), (w[:, None] * x).sum(0) / w.sum())


@pytest.mark.parametrize("draw", [lambda g, n: g.normal(1.0, 2.0, n), lambda g, n: g.exponential(1.0, n)])
def test_interval_of_a_mean_covers_the_true_mean_about_95_percent(draw):
    """Percentile bootstrap at n = 40: coverage within a few points of 95% (normal and skewed data; the
    exponential's mean is 1)."""
    hits, trials = 0, 400
    for s in range(trials):
        g = np.random.default_rng(1000 + s)
        d = stats.mean_interval(draw(g, 40), stats.Resamples.draw(40, 400, seed=s))
        hits += d["low"] <= 1.0 <= d["high"]
    assert 0.90 <= hits / trials <= 0.98, hits / trials


def test_planted_rank_stable_unit_stays_in_the_top_k_and_a_one_item_effect_does_not():
    """Unit 0 is large on every item; unit 1 is huge on one item only (its mean is higher than unit 0's,
    but it drops out of the top 1 whenever that item is not drawn, about (1 − 1/n)^n ≈ 36% of draws)."""
    rng = np.random.default_rng(0)
    n, units = 10, 50
    x = rng.normal(0, 0.1, size=(n, units))
    x[:, 0] += 5.0
    x[3, 1] += 60.0
    res = stats.Resamples.draw(n, 2000, seed=0)
    top = stats.ranked(x.mean(0), 2, res.means(x), res, key="dim")
    by_dim = {e["dim"]: e for e in top}
    assert by_dim[0]["stability"] == 1.0
    assert 0.5 < by_dim[1]["stability"] < 0.75
    assert by_dim[0]["low"] <= by_dim[0]["score"] <= by_dim[0]["high"]
    assert by_dim[0]["high"] - by_dim[0]["low"] < 0.2 < by_dim[1]["high"] - by_dim[1]["low"]


def test_ties_share_a_rank_and_are_reported():
    scores = np.array([0.913, 0.5, 0.913 * (1 + 1e-8), 0.2, 0.913])
    assert stats.ranks(scores).tolist() == [1, 4, 1, 5, 1]
    top = stats.ranked(scores, 3)
    assert [e["rank"] for e in top] == [1, 1, 1] and all(e["tied"] for e in top)
    assert "tied" in stats.ties_note(top)
    assert stats.ties_note(stats.ranked(np.array([3.0, 2.0, 1.0]), 3)) is None


def test_units_tied_across_the_cut_share_the_top_k_places():
    """48 units tied at the top (one head's units under rollout) and a top 10: each unit is in the top 10 in
    10/48 of the places, not in all of them; a unit clearly above keeps 1; the note says how many share the
    rank and how many are listed."""
    scores = np.r_[np.full(48, 0.4), 0.9, np.linspace(0.1, 0.2, 20)]  # (69,): one clear top, 48 tied below it
    res = stats.Resamples.draw(5, 100, 0)
    resampled = np.tile(scores, (100, 1))  # every draw the same: the ties stay ties
    stab = stats.top_k_stability(resampled, 10)
    assert stab[48] == 1.0 and np.allclose(stab[:48], 9 / 48) and stab.sum() == pytest.approx(10)
    top = stats.ranked(scores, 10, resampled, res)
    assert top[0]["n_tied"] == 1 and all(e["n_tied"] == 48 and e["rank"] == 2 for e in top[1:])
    note = stats.ties_note(top)
    assert "48 units share this rank, 9 listed" in note


def test_one_item_has_no_interval():
    res = stats.Resamples.draw(1, 100)
    assert not res.defined
    d = stats.mean_interval([2.5], res)
    assert d == {"value": 2.5, "low": None, "high": None}
    assert "no interval: one item" in stats.shown(d)
    assert stats.shown({**d, "note": "undefined on 3 draws"}) == "2.5 (no interval: undefined on 3 draws)"
    assert stats.shown({"value": None, "low": None, "high": None, "note": "a constant ranking"}) == \
        "undefined (a constant ranking)"
    d = {"value": 0.5, "low": 0.4, "high": 0.7, "corrected": 0.6}
    assert stats.shown(d, ".2f") == "0.50 [0.40, 0.70] (corrected 0.60)"
    assert stats.shown(d, ".2f", corrected=False) == "0.50 [0.40, 0.70]"
    top = stats.ranked(np.array([1.0, 2.0]), 1, res.means(np.array([[1.0, 2.0]])), res)
    assert "stability" not in top[0]


def test_spearman_known_values():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert stats.spearman([1, 1, 1], [1, 2, 3]) is None
    assert stats.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
