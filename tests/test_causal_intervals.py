"""The causal stages' per-prompt numbers, intervals and rank stability, Δ log p(clean top-1) and the clean
predictions, on a tiny Mamba with two planted dimensions at layer 0 (site mixer_out):

- A (out_proj row ×30): a large effect on every prompt;
- B: reads only a gate channel c that is exactly 0 unless the current token is T (T's embedding alone has
  a nonzero coordinate u, and the gate row reads only u: silu(0) = 0), so dimension B of mixer_out is
  exactly 0 everywhere except at T, and T is the last token of prompt 0 only: ablating B changes nothing
  on the other prompts.
"""
import numpy as np
import pytest
import torch

import causal_analysis as ca
from conftest import DEVICE, make_model
from models import get_adapter
from utils import OFFLINE_TEXTS_PATH, read_texts_file, trace

PROMPTS = ["The river flows north", "A prime number has", "Water boils", "The capital of France is",
           "In the year", "She wrote a book about"]
A, B, C_GATE, U = 5, 11, 7, 0


def planted_model(tokenizer):
    model = make_model("mamba_b")
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    t = ids[0][-1]
    assert all(t not in other for other in ids[1:])
    mixer = model.backbone.layers[0].mixer
    e = mixer.out_proj.weight.shape[1]
    with torch.no_grad():
        emb = model.backbone.embeddings.weight
        emb[:, U] = 0.0
        emb[t, U] = 5.0
        gate = mixer.in_proj
        gate.weight[e + C_GATE] = 0.0
        gate.weight[e + C_GATE, U] = 20.0
        gate.bias[e + C_GATE] = 0.0
        out = mixer.out_proj
        out.weight[A] *= 30.0
        out.weight[B] = 0.0
        out.weight[B, C_GATE] = 50.0
        out.bias[B] = 0.0
    return model.to(DEVICE)


@pytest.fixture(scope="module")
def planted_run(tokenizer, tmp_path_factory):
    from pipeline import Options, run_pipeline

    model = planted_model(tokenizer)
    opts = Options(layer=0, top_k=5, prompts=tuple(PROMPTS), bootstrap_resamples=400, seed=3, progress=False,
                   plots_dir=str(tmp_path_factory.mktemp("plots")))
    res = run_pipeline(model, tokenizer, read_texts_file(OFFLINE_TEXTS_PATH)[:2], opts,
                       ["causal", "inter_layer", "cross_layer"], write_plots=False)
    for stage in ("causal", "inter_layer", "cross_layer"):
        assert res[stage]["status"] == "ok", res[stage].get("error")
    return model, tokenizer, res


def test_per_prompt_scores_average_to_the_reported_means(planted_run):
    _, _, res = planted_run
    r = res["causal"]["results"]
    kl, dl = np.asarray(r["scores_per_prompt"]), np.asarray(r["delta_logp_top1_per_prompt"])
    assert kl.shape == dl.shape == (len(PROMPTS), 24) and r["n_prompts"] == len(PROMPTS)
    np.testing.assert_array_equal(kl.mean(0), r["scores"])
    np.testing.assert_array_equal(dl.mean(0), r["delta_logp_top1"])
    for e in r["top_neurons"]:
        assert e["score"] == r["scores"][e["dim"]] and e["delta_logp_top1"] == r["delta_logp_top1"][e["dim"]]
    assert r["ranked_by"].startswith("scores") and [e["dim"] for e in r["top_neurons"]] == list(
        np.argsort(-r["scores"], kind="stable")[:5])


def test_intervals_contain_the_means(planted_run):
    _, _, res = planted_run
    r = res["causal"]["results"]
    slack = 1e-12 * np.abs(r["scores"]).max()
    assert np.all(r["scores_low"] <= r["scores"] + slack) and np.all(r["scores"] <= r["scores_high"] + slack)
    dslack = 1e-12 * np.abs(r["delta_logp_top1"]).max()
    assert np.all(r["delta_logp_top1_low"] <= r["delta_logp_top1"] + dslack)
    assert np.all(r["delta_logp_top1"] <= r["delta_logp_top1_high"] + dslack)
    for e in r["top_neurons"]:
        assert e["low"] <= e["score"] <= e["high"] and 0.0 <= e["stability"] <= 1.0
        assert e["delta_logp_top1_low"] <= e["delta_logp_top1"] <= e["delta_logp_top1_high"]
    assert "percentile bootstrap over prompts: 400 resamples" in r["interval_method"]
    assert {"scores", "delta_logp_top1", "low/high", "stability", "clean_predictions"} <= set(r["definitions"])


def test_a_dimension_large_on_every_prompt_is_stable_one_on_a_single_prompt_is_not(planted_run):
    _, _, res = planted_run
    r = res["causal"]["results"]
    kl = np.asarray(r["scores_per_prompt"])
    top = {e["dim"]: e for e in r["top_neurons"]}
    print({d: (round(e["score"], 4), round(e["low"], 4), round(e["high"], 4), e["stability"]) for d, e in top.items()})
    # the planted structure holds: B matters on prompt 0 only (exactly nothing to ablate elsewhere)
    assert kl[0, B] > 0.05 and np.all(kl[1:, B] < 1e-9)
    assert np.all(kl[:, A] > 5 * np.median(kl, axis=1))
    a, b = top[A], top[B]
    assert a["stability"] == 1.0 and a["low"] > 0.3 * a["score"]  # in the top 5 in every draw, clearly above 0
    # B: out of the top 5 whenever prompt 0 is not drawn (a share (5/6)^6 = 0.33 of draws); its interval
    # reaches 0 and is far wider relative to its mean than A's
    assert b["stability"] < 0.9 and b["low"] < 1e-9
    assert (b["high"] - b["low"]) / b["score"] > 2 * (a["high"] - a["low"]) / a["score"]


def test_delta_logp_equals_a_full_forward_with_the_dimension_zeroed(planted_run):
    model, tok, res = planted_run
    r = res["causal"]["results"]
    site = get_adapter(model).site("mixer_out", 0)
    for i, p in enumerate(PROMPTS):
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids.to(DEVICE)
        with torch.no_grad():
            clean = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)
        top = int(clean.argmax())
        assert r["clean_predictions"][i]["top"][0]["token_id"] == top
        for k in (A, B):
            def zero(name, v, k=k):
                a = (v[0] if isinstance(v, tuple) else v).clone()
                a[..., k] = 0.0
                return (a, *v[1:]) if isinstance(v, tuple) else a

            with torch.no_grad(), trace(model, [site.path], retain_output=False, edit_output=zero):
                abl = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)
            want = float(abl[top] - clean[top])
            got = r["delta_logp_top1_per_prompt"][i][k]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (k, p)
    assert r["delta_logp_top1_per_prompt"][0][B] < -1e-3  # the planted one-prompt dimension moves its top token


def test_clean_top5_match_the_models_own_softmax(planted_run):
    model, tok, res = planted_run
    r = res["causal"]["results"]
    assert [c["prompt"] for c in r["clean_predictions"]] == PROMPTS
    for c in r["clean_predictions"]:
        ids = tok(c["prompt"], return_tensors="pt", add_special_tokens=False).input_ids.to(DEVICE)
        with torch.no_grad():
            p = model(input_ids=ids).logits[0, -1].double().softmax(-1)
        want_p, want_ids = p.topk(5)
        assert [t["token_id"] for t in c["top"]] == want_ids.tolist()
        np.testing.assert_allclose([t["p"] for t in c["top"]], want_p.tolist(), rtol=1e-6)
        assert [t["token"] for t in c["top"]] == [tok.decode([i]) for i in want_ids.tolist()]


def test_inter_layer_points_carry_intervals_of_their_per_prompt_scores(planted_run):
    _, _, res = planted_run
    causal, r = res["causal"]["results"], res["inter_layer"]["results"]
    assert r["dims"] == [e["dim"] for e in causal["top_neurons"][:3]] and r["n_prompts"] == len(PROMPTS)
    for d, curve in r["curves"].items():
        per = np.asarray(r["scores_per_prompt"][d])  # (n_prompts, n_layers)
        assert per.shape == (len(PROMPTS), 3)
        np.testing.assert_array_equal([c["score"] for c in curve], per.mean(0))
        np.testing.assert_array_equal([c["delta_logp_top1"] for c in curve],
                                      np.asarray(r["delta_logp_top1_per_prompt"][d]).mean(0))
        for c in curve:
            assert c["low"] <= c["score"] * (1 + 1e-12) and c["score"] <= c["high"] * (1 + 1e-12)
        assert curve[0]["score"] == pytest.approx(causal["scores"][int(d)], rel=1e-5)  # batch rounding only
    assert "partly by selection" in r["note"]


def test_cross_layer_means_and_their_intervals(planted_run):
    _, _, res = planted_run
    r = res["cross_layer"]["results"]
    per = np.asarray(r["change_per_prompt"])  # (n_prompts, n_dims, n_sources, n_targets)
    assert per.shape == (len(PROMPTS), 3, 3, 3)
    np.testing.assert_array_equal(per.mean(0), r["change"])
    tol = 1e-12 * np.abs(r["change"]).max()
    assert np.all(r["change_low"] <= r["change"] + tol) and np.all(r["change"] <= r["change_high"] + tol)
    assert r["max_abs_change_before_source"] == 0.0 and all(np.all(per[:, :, s, :s] == 0) for s in range(3))
    for i, e in enumerate(r["largest_change"]):
        allowed = np.abs(r["change"][i]) * (np.arange(3)[:, None] <= np.arange(3)[None, :])
        assert abs(e["value"]) == allowed.max() and e["value"] == r["change"][i, e["source"], e["target"]]
        assert e["low"] <= e["value"] <= e["high"]


def test_effects_by_layer_is_what_the_means_are_made_of(tokenizer):
    """causal_effects_by_layer per prompt = the one-prompt scan of that prompt; its KL mean over prompts is
    causal_impact_by_layer exactly."""
    model = make_model("gpt2").to(DEVICE)
    eff = ca.causal_effects_by_layer(model, tokenizer, PROMPTS[:3], [1, 0], dims=[3, 1, 3], batch_size=4,
                                     progress=False)
    assert eff.kl.shape == eff.delta_logp.shape == (3, 2, 3) and eff.clean_top.shape == (3,)
    np.testing.assert_array_equal(eff.kl[:, :, 0], eff.kl[:, :, 2])  # a repeated dim, at each position
    mean = ca.causal_impact_by_layer(model, tokenizer, PROMPTS[:3], [1, 0], dims=[3, 1, 3], batch_size=4,
                                     progress=False)
    np.testing.assert_array_equal(mean, eff.kl.mean(0))
    for i, p in enumerate(PROMPTS[:3]):
        one = ca.causal_effects_by_layer(model, tokenizer, [p], [1, 0], dims=[3, 1, 3], batch_size=4, progress=False)
        np.testing.assert_allclose(one.kl[0], eff.kl[i], rtol=1e-12)
        np.testing.assert_allclose(one.delta_logp[0], eff.delta_logp[i], rtol=1e-12)


def test_default_prompts_come_from_the_shipped_file_and_pass_the_cli_checks():
    """24+ prompts, read from data/default_prompts.txt; each passes main.check_prompts on both reference models
    (their tokenizer: the one the default run falls back to offline)."""
    from transformers import AutoConfig, AutoTokenizer

    import main
    from conftest import REPO

    assert ca.DEFAULT_PROMPTS == read_texts_file(REPO / "data" / "default_prompts.txt")
    assert len(ca.DEFAULT_PROMPTS) >= 24 and len(set(ca.DEFAULT_PROMPTS)) == len(ca.DEFAULT_PROMPTS)
    for name in ("mamba", "transformer"):
        path = REPO / "reference_models" / name
        main.check_prompts(AutoTokenizer.from_pretrained(path), ca.DEFAULT_PROMPTS, AutoConfig.from_pretrained(path),
                           "the default prompts")
