"""faithfulness.py: a ranking against the measured per-unit effects, and deletion curves (known answers)."""
from pathlib import Path

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
    # the basic interval reflects the draws (all below 1) about the estimate 1: clipped to 1 at both ends
    assert own["spearman"]["low"] == own["spearman"]["high"] == 1.0
    assert {k: v["value"] for k, v in own["precision_at_k"].items()} == {1: 1.0, 5: 1.0, 10: 1.0}
    rev = rank_agreement(e, -e.mean(0), res)
    assert rev["spearman"]["value"] == pytest.approx(-1.0) and rev["spearman"]["high"] < 0
    assert rev["precision_at_k"][1]["value"] == 0.0


def test_a_planted_dominant_unit_ranked_first_has_precision_at_1_of_1():
    e = _effects()
    e[:, 17] *= 100.0  # unit 17 now dominates on every prompt
    scores = np.zeros(e.shape[1])
    scores[17] = 1.0  # a ranking that knows only unit 17: the other 39 tie below it
    r = rank_agreement(e, scores, stats.Resamples.draw(e.shape[0], 100, 0, "prompts"), ks=(1, 5))
    assert r["precision_at_k"][1]["value"] == 1.0
    # top 5: unit 17 is in both; the other 4 places of the ranking are shared by 39 tied units, of which the
    # truth's next 4 hold 4: expected overlap 1 + 4 * 4/39
    assert r["precision_at_k"][5]["value"] == pytest.approx((1 + 4 * 4 / 39) / 5)


def test_random_rankings_score_k_over_units_and_a_constant_ranking_exactly_that():
    e = _effects(U=50)
    truth = e.mean(0)
    rng = np.random.default_rng(1)
    draws = [precision_at_k(rng.permutation(50).astype(float), truth, 10) for _ in range(2000)]
    assert np.mean(draws) == pytest.approx(10 / 50, abs=0.01)
    assert precision_at_k(np.ones(50), truth, 10) == pytest.approx(10 / 50)  # every unit tied: exactly k/U
    r = rank_agreement(e, np.ones(50), stats.Resamples.draw(e.shape[0], 100, 0, "prompts"))
    assert r["spearman"]["value"] is None and "same score" in r["spearman"]["note"]  # a constant ranking
    flat = rank_agreement(np.zeros_like(e), truth, stats.Resamples.draw(e.shape[0], 100, 0, "prompts"))
    assert flat["spearman"]["value"] is None and "ground truth is the same" in flat["spearman"]["note"]
    assert flat["precision_at_k"][10]["value"] is None  # no top 10 to compare with


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
    from faithfulness import deletion_curve, normalised_area_interval, random_band

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
    own = normalised_area_interval(truth_kl, truth_kl, rand_kl, 3, res)
    assert own["value"] == pytest.approx(1.0) and own["low"] == pytest.approx(1.0) == own["high"]
    as_random = rand_kl.reshape(6, 3, 3).mean(2)  # (prompts, ks): each k's random mean
    assert normalised_area_interval(as_random, truth_kl, rand_kl, 3, res)["value"] == pytest.approx(0.0, abs=1e-12)
    none = normalised_area_interval(truth_kl, as_random, rand_kl, 3, res)  # the truth no better than random
    assert none["value"] is None and "nothing to normalise by" in none["note"]


def test_area_interval_ties_halves_and_the_table_order():
    from faithfulness import Space, _by_area, _halves, _ranking, normalised_area_interval, top_sets

    rng = np.random.default_rng(0)
    res = stats.Resamples.draw(8, 200, 0, "prompts")
    truth = np.array([1.0, 1.5, 2.0]) * rng.lognormal(0, 0.1, size=(8, 1))  # (n, G)
    rand = np.repeat(np.array([0.1, 0.2, 0.4]), 4)[None, :] * rng.lognormal(0, 0.1, size=(8, 12))  # (n, G * 4)
    own = truth * 0.5 + rand.reshape(8, 3, 4).mean(2) * 0.5  # halfway between
    a = normalised_area_interval(own, truth, rand, 4, res)
    assert a["value"] == pytest.approx(0.5) and a["low"] < 0.5 < a["high"]
    assert normalised_area_interval(own, truth, rand, 4, stats.Resamples.draw(8, 200, 0, "prompts"))["low"] == a["low"]
    none = normalised_area_interval(own, rand.reshape(8, 3, 4).mean(2), rand, 4, res)
    assert none["value"] is None and "does not rise above random" in none["note"]
    # equal scores: index order without a seed, a seeded random order with one (the same for the same seed)
    tied = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert top_sets(tied, [2])[0].nonzero()[0].tolist() == [1, 2]
    picks = {tuple(top_sets(tied, [2], seed)[0].nonzero()[0]) for seed in range(20)}
    assert len(picks) > 1 and all(set(p) <= {1, 2, 3, 4} for p in picks)
    assert (top_sets(tied, [2], 3) == top_sets(tied, [2], 3)).all()
    assert [h.tolist() for pair in _halves(5) for h in pair] == [[0, 2, 4], [1, 3], [1, 3], [0, 2, 4]]
    assert [h.tolist() for pair in _halves(1) for h in pair] == [[0], [0]]
    rows = [{"normalised_area": {"value": v}} for v in (0.3, None, 0.1, -0.2)]
    assert [r["normalised_area"]["value"] for r in sorted(rows, key=_by_area)] == [0.3, 0.1, -0.2, None]
    # a unit without a score (an undefined η²) is ordered last and shown as no score, never as a number
    r = _ranking("delta.eta_squared", "delta", Space("channels", "ssm", "channel", 4, ""), [0.2, np.nan, 0.5, 0.1],
                 "η²", "η²")
    assert r.n_undefined == 1 and np.argsort(-r.scores)[-1] == 1 and np.isnan(r.shown_scores()[1])


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
    assert rank_agreement(truth, truth.mean(0), res)["precision_at_k"][1]["value"] == 1.0
    ks = k_grid(truth.shape[1], 4)
    curve_kl = ca.set_ablation_effects(model, tokenizer, prompts, 1, top_sets(truth.mean(0), ks), site="ssm",
                                       progress=False).kl[:, 0]
    rand_kl = ca.set_ablation_effects(model, tokenizer, prompts, 1, random_sets(truth.shape[1], ks, 8),
                                      site="ssm", progress=False).kl[:, 0]
    curve, band = deletion_curve(curve_kl, ks, res), random_band(rand_kl, ks, 8)
    print([(p["k"], p["value"]) for p in curve], [(b["k"], b["mean"], b["high"]) for b in band])
    assert curve[0]["value"] == pytest.approx(truth.mean(0)[7], rel=1e-6)  # k = 1: the planted unit alone
    assert curve[0]["value"] > band[0]["high"]


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A second text, a little longer than the first one is.",
         "Numbers: one, two, three, four, five, six.", "In 1870 the town had a mill and a church."]
PROMPTS = ["The cat sat on the mat because", "Numbers: one, two, three,", "In 1870 the town"]
FAST = dict(prompts=PROMPTS, bootstrap_resamples=100, faithfulness_draws=20, progress=False)


def _stage(model, tokenizer, tmp_path, stages, **kw):
    from pipeline import run_comprehensive_analysis

    res = run_comprehensive_analysis(model, tokenizer, TEXTS, stages=stages, plots_dir=tmp_path, **FAST, **kw)
    for name in stages:
        assert res[name]["status"] in ("ok", "not_applicable"), (name, res[name])
    return res["faithfulness"]


def test_the_stage_finds_a_planted_channel_and_its_curves_are_consistent(tokenizer, tmp_path, monkeypatch):
    """Mamba-1, channel 7 of layer 1 driving out_proj 40x: the ground truth's top channel; every ranking of the
    run checked; each curve's first point is the single effect of the ranking's top unit, and its last (every
    unit ablated) is the same set for every ranking and for random."""
    from conftest import make_model

    import faithfulness as fa

    model = make_model("mamba_b")
    with torch.no_grad():
        model.backbone.layers[1].mixer.out_proj.weight[:, 7] *= 40.0
    real = fa.collect_rankings

    def with_a_constant_one(ctx, spaces):  # the run's rankings and one that scores every channel alike
        rankings, left = real(ctx, spaces)
        return [*rankings, fa._ranking("constant", "test", spaces["channels"], np.ones(72), "1", "1")], left

    monkeypatch.setattr(fa, "collect_rankings", with_a_constant_one)
    entry = _stage(model, tokenizer, tmp_path, ["delta", "attention", "sparsity", "faithfulness"], layer=1)
    constant = entry["results"]["spaces"]["channels"]["rankings"].pop("constant")
    assert constant["deletion"] is None and constant["normalised_area"]["value"] is None
    assert "constant" in constant["normalised_area"]["note"] and constant["spearman"]["value"] is None
    assert constant["precision_at_k"][1]["value"] is None and constant["top_units"] == []  # no order, no top
    table = entry["results"]["table"]
    assert table[-1]["ranking"] == "constant"  # undefined area: last
    entry["results"]["table"] = table[:-1]
    assert entry["status"] == "ok" and entry["results"]["left_out"] == {}
    s = entry["results"]["spaces"]["channels"]
    assert set(entry["results"]["spaces"]) == {"channels"} and s["site"] == "ssm" and s["n_units"] == 72
    truth = np.asarray(s["ground_truth"]["scores"])
    assert s["ground_truth"]["top"][0]["channel"] == 7 and int(np.argmax(truth)) == 7
    assert set(s["rankings"]) == {"delta.eta_squared", "delta.text_variance", "attention.attention_weighted",
                                  "attention.gradient_guided", "attention.rollout", "sparsity.activation_variance"}
    assert s["ks"] == [1, 2, 4, 8, 16, 32, 64, 72]
    assert s["random"]["precision_at_k"] == {1: 1 / 72, 5: 5 / 72, 10: 10 / 72}
    assert s["ground_truth"]["deletion_cross_fitted"] and s["n_sets_ablated"] > 0
    per = np.asarray(s["ground_truth"]["per_prompt"])  # (n, U): k = 1 of the ground truth's curve, cross-fitted:
    own = [per[i, int(np.argmax(per[1 - i % 2::2].mean(0)))] for i in range(len(PROMPTS))]  # the other half's top
    assert s["ground_truth"]["deletion"][0]["value"] == pytest.approx(np.mean(own), rel=1e-12)
    full = s["ground_truth"]["deletion"][-1]["value"]
    # the set of every unit: measured once for the rankings and random, and per half for the cross-fitted truth
    # (batches of another shape: float rounding)
    assert s["random"]["deletion"][-1]["mean"] == pytest.approx(full, rel=1e-6)
    for name, e in s["rankings"].items():
        top = e["top_units"][0]
        assert e["deletion"][0]["value"] == pytest.approx(truth[top["channel"]], rel=1e-6, abs=1e-12), name
        assert top["effect"]["value"] == truth[top["channel"]] and top["effect_rank"] >= 1
        assert e["deletion"][-1]["value"] == s["random"]["deletion"][-1]["mean"]  # the same set, measured once
        assert e["normalised_area"]["value"] is None or e["normalised_area"]["value"] <= 1.0 + 1e-9
    assert s["ground_truth"]["deletion"][0]["value"] > s["random"]["deletion"][0]["high"]
    table = entry["results"]["table"]
    areas = [row["normalised_area"]["value"] for row in table]
    assert len(table) == 6 and [a for a in areas if a is not None] == sorted((a for a in areas if a is not None),
                                                                            reverse=True)  # sorted by area
    assert all(a is None for a in areas[areas.index(None):]) if None in areas else True  # undefined last
    assert all(Path(p).is_file() for p in entry["plots"]) and len(entry["plots"]) == 2
    from faithfulness import faithfulness_summary

    text = faithfulness_summary(entry["results"])
    assert "top channel 7" in text and "random" in text


def test_mamba2_checks_delta_on_its_heads_and_the_rest_on_its_channels(tokenizer, tmp_path):
    import causal_analysis as ca
    from conftest import make_model

    model = make_model("mamba2")
    entry = _stage(model, tokenizer, tmp_path, ["delta", "attention", "sparsity", "faithfulness"])
    spaces = entry["results"]["spaces"]
    assert set(spaces) == {"channels", "heads"}
    assert set(spaces["heads"]["rankings"]) == {"delta.eta_squared", "delta.text_variance"}
    assert "attention.rollout" in spaces["channels"]["rankings"] and spaces["heads"]["n_units"] == 8
    # a head's ground truth is its 8 channels of ssm ablated together
    mask = np.zeros((1, 64), dtype=bool)
    mask[0, 16:24] = True
    head2 = ca.set_ablation_effects(model, tokenizer, PROMPTS, 0, mask, site="ssm", progress=False).kl[:, 0, 0]
    assert spaces["heads"]["ground_truth"]["scores"][2] == pytest.approx(head2.mean(), rel=1e-6)  # batch rounding


def test_a_transformer_is_checked_on_its_attention_output_and_the_mlp_ranking_is_left_out(tokenizer, tmp_path):
    from conftest import make_model

    entry = _stage(make_model("gpt2"), tokenizer, tmp_path, ["attention", "sparsity", "faithfulness"])
    r = entry["results"]
    assert set(r["spaces"]) == {"dims"} and r["spaces"]["dims"]["site"] == "attn_heads"
    assert set(r["spaces"]["dims"]["rankings"]) == {"attention.attention_weighted", "attention.gradient_guided",
                                                     "attention.rollout"}
    assert "mlp" in r["left_out"]["sparsity.activation_variance"]


def test_without_a_ranking_the_stage_does_not_apply_and_a_causal_scan_of_the_site_is_reused(tokenizer, tmp_path):
    from conftest import make_model

    # a Transformer's activation variance ranks its MLP neurons, a space without a ground truth here: no ranking
    entry = _stage(make_model("gpt2"), tokenizer, tmp_path, ["sparsity", "faithfulness"])
    assert entry["status"] == "not_applicable" and "no ranking" in entry["reason"] and "mlp" in entry["reason"]
    from pipeline import run_comprehensive_analysis

    model = make_model("mamba_a")

    res = run_comprehensive_analysis(model, tokenizer, TEXTS, stages=["causal", "sparsity", "faithfulness"],
                                     causal_site="ssm", plots_dir=tmp_path, **FAST)
    g = res["faithfulness"]["results"]["spaces"]["channels"]["ground_truth"]
    assert g["from"] == "the causal stage's scan of this site"
    assert np.array_equal(g["scores"], res["causal"]["results"]["scores"])


def test_on_an_additive_model_the_ground_truths_deletion_curve_is_the_sum_of_single_effects(tokenizer, tmp_path):
    """A GPT-2 built so that attention-output dim k of layer 0 is nonzero only where prompt k's own token
    stands (every other token shares one embedding, value column k reads only token k's): ablating a set of
    dims changes each prompt by its own dim alone, so a set's mean KL is the sum of its dims' single effects,
    and the ground truth's deletion curve is the running sum of the sorted effects (monotone)."""
    import causal_analysis as ca
    from conftest import make_model
    from faithfulness import k_grid, top_sets

    prompts = ["The cat sat on the mat because", "Numbers: one, two, three,", "In 1870 the town", "Why not zebra"]
    ids = [set(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    own = [min(s - set().union(*(o for j, o in enumerate(ids) if j != i))) for i, s in enumerate(ids)]  # (4,)
    model = make_model("gpt2")
    d = model.config.n_embd  # 32
    with torch.no_grad():
        emb = model.transformer.wte.weight
        emb.zero_()
        emb[:, 0] = 1.0  # every token: e_0
        for k, t in enumerate(own):
            emb[t, 0], emb[t, 1 + k] = 0.0, 1.0  # prompt k's own token: e_(1+k)
        model.transformer.wpe.weight.zero_()
        attn = model.transformer.h[0].attn.c_attn  # Conv1D: weight (d, 3d), values in columns 2d..3d
        attn.weight[:, 2 * d:] = 0.0
        attn.bias[2 * d:] = 0.0
        for k in range(len(own)):  # value dim k reads e_(1+k) - e_(1+4+k): orthogonal to e_0 and to the mean
            attn.weight[1 + k, 2 * d + k], attn.weight[1 + 4 + k, 2 * d + k] = 200.0, -200.0
    single = ca.causal_effects_by_layer(model, tokenizer, prompts, [0], site="attn_heads", progress=False).kl[:, 0]
    assert (single[:, 4:] < 1e-9).all() and all(single[i, i] > 1e-4 for i in range(4))  # (n, U): dims 0-3 only
    truth = single.mean(0)
    ks = k_grid(d, 8)
    sets = ca.set_ablation_effects(model, tokenizer, prompts, 0, top_sets(truth, ks), site="attn_heads",
                                   progress=False).kl[:, 0].mean(0)  # (len(ks),)
    running = np.cumsum(np.sort(truth)[::-1])[np.array(ks) - 1]
    print("deletion", sets, "sum of singles", running)
    assert sets == pytest.approx(running, rel=1e-5, abs=1e-9)  # float32 forwards, batched differently
    assert (np.diff(sets) >= -1e-9).all()


def test_the_comparison_sets_both_models_faithfulness_side_by_side(model_dirs, tmp_path):
    """A Transformer beside a Mamba: each model's rankings against its own ground truth, by ranking name; the
    Mamba side (the other model) also runs delta (asked for, not applicable to the main model), whose rankings it
    checks; the summary table has a row per
    ranking, and a ranking a model lacks says so."""
    from models import load_model_and_tokenizer
    from pipeline import run_comprehensive_analysis

    model, tok, _ = load_model_and_tokenizer(str(model_dirs["gpt2"]))
    res = run_comprehensive_analysis(model, tok, TEXTS, stages=["delta", "attention", "sparsity", "faithfulness",
                                                                "comparison"],
                                     plots_dir=tmp_path, compare_model=str(model_dirs["mamba_a"]), seq_lengths=[16],
                                     efficiency_budget=2.0, **FAST)
    assert res["comparison"]["status"] == "ok", res["comparison"].get("error")
    fz = res["comparison"]["results"]["faithfulness"]
    main, other = (m["label"] for m in res["comparison"]["results"]["models"])
    assert fz["models"][main]["spaces"]["dims"]["site"] == "attn_heads"
    assert fz["models"][other]["spaces"]["channels"]["site"] == "ssm"
    by = {row["ranking"]: row for row in fz["rankings"]}
    assert by["delta.eta_squared"][main] is None and by["delta.eta_squared"][other] is not None
    assert by["attention.rollout"][main] == next(r for r in res["faithfulness"]["results"]["table"]
                                                 if r["ranking"] == "attention.rollout")
    rows = {r["metric"]: r for r in res["comparison"]["results"]["summary"]}
    row = rows["faithfulness: delta.eta_squared (ρ; area)"]
    assert row[main] == "no such ranking" and row[other].startswith("ρ ")


def test_depth_profiles_follow_each_rankings_area_over_layers():
    from depth_profiles import depth_profiles

    def entry(v):
        return {"status": "ok", "results": {"table": [{"ranking": "attention.rollout", "normalised_area": {"value": v}}]}}

    p = depth_profiles({0: {"faithfulness": entry(0.5)}, 2: {"faithfulness": entry(None)}}, 3)
    assert p["metrics"]["faithfulness: normalised area, attention.rollout"] == [0.5, None]
    assert p["left_out"] == [{"layer": 2, "metric": "faithfulness: normalised area, attention.rollout",
                              "reason": "normalised_area.value is undefined (null)"}]


def test_the_command_line_adds_the_rankings_a_lone_faithfulness_stage_checks(model_dirs, tmp_path):
    import json

    from test_cli import run_main
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    (tmp_path / "texts.txt").write_text("\n".join(read_texts_file(OFFLINE_TEXTS_PATH)[:4]) + "\n")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    p = run_main(["--model", str(model_dirs["mamba_a"]), "--texts_file", "texts.txt", "--prompts_file", "prompts.txt",
                  "--stages", "faithfulness", "--max_length", "24", "--faithfulness_draws", "20",
                  "--bootstrap_resamples", "100", "--save_results", "--no_progress"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "note: stage delta added: the faithfulness stage checks its ranking" in p.stdout
    res = json.loads(next((tmp_path / "analysis_outputs").glob("*.json")).read_text())
    assert set(res["stages_added"]) == {"delta", "sparsity"} and res["faithfulness"]["status"] == "ok"
    assert set(res["faithfulness"]["results"]["spaces"]["channels"]["rankings"]) == {
        "delta.eta_squared", "delta.text_variance", "sparsity.activation_variance"}
