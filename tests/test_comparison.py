"""The sparsity, efficiency and comparison stages end to end on tiny models: every claimed plot exists,
the JSON holds the numbers the plots show, layers are matched by relative depth."""
import dataclasses
import json
import re

import numpy as np
import pytest

import comparison_plots as cp
import sparsity as sp
import stats
from comparison_wrapper import matched_layer, relative_depth
from test_cli import run_main


def test_matched_layer_by_relative_depth():
    assert matched_layer(0.0, 4) == 0 and matched_layer(1.0, 4) == 3
    assert matched_layer(relative_depth(3, 7), 4) == 1  # depth 0.5 -> 1.5: ties go to the lower layer
    assert matched_layer(relative_depth(4, 7), 4) == 2  # 0.667 -> 2.0
    assert matched_layer(0.7, 1) == 0 and relative_depth(0, 1) == 0.0


@pytest.fixture(scope="module")
def comparison_run(model_dirs, tmp_path_factory):
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    tmp = tmp_path_factory.mktemp("comparison")
    (tmp / "texts.txt").write_text("\n".join(read_texts_file(OFFLINE_TEXTS_PATH)[:8]) + "\n")
    args = ["--model", str(model_dirs["mamba_b"]), "--compare_model", str(model_dirs["gpt2"]), "--layer", "2",
            "--texts_file", "texts.txt", "--max_length", "40", "--stages", "causal", "sparsity", "efficiency",
            "comparison", "--sparsity_layers", "0", "2", "--seq_lengths", "16", "32", "64", "--save_results",
            "--no_progress"]
    p = run_main(args, tmp)
    assert p.returncode == 0, p.stderr
    res = json.loads(next((tmp / "analysis_outputs").glob("*.json")).read_text())
    return tmp, res, p.stdout


def test_every_claimed_plot_is_a_png(comparison_run):
    tmp, res, _ = comparison_run
    claimed = [p for s in ("sparsity", "efficiency", "comparison") for p in res[s]["plots"]]
    assert len(claimed) == 7 + 2 + 13
    kinds = {"percentile", "population", "usage", "optimal_threshold", "traditional", "multilayer",
             "activation_variance", "efficiency", "scaling", "summary_table", "layer_dynamics", "causal_distributions",
             "sparsity_methods"}
    assert all(any(k in p for p in claimed) for k in kinds)
    for p in claimed:
        data = (tmp / p).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 3000, p


def test_sparsity_stage_json_holds_the_plotted_numbers(comparison_run):
    _, res, stdout = comparison_run
    r = res["sparsity"]["results"]
    assert r["site"] == "ssm" and r["layer"] == 2 and r["sparsity_layers"] == [0, 2]
    single = r["single"]
    assert single["n_neurons"] == 72 and len(single["neuron_mean_abs"]) == 72  # e = 3 x 24
    # the multi-layer table is the per-layer numbers
    layers = {int(k): v for k, v in r["layers"].items()}
    ml = r["multilayer"]
    assert ml["layers"] == [0, 2]
    for name, (part, key) in {"usage Gini": ("usage", "gini"), "usage Hoyer": ("usage", "hoyer"),
                              "population Gini": ("population", "gini"), "population Hoyer": ("population", "hoyer"),
                              "population H (normalised entropy, lower = sparser)": ("population", "normalised_entropy"),
                              "population 1-H (entropy sparsity, higher = sparser)": ("population", "entropy_sparsity"),
                              }.items():
        assert ml[name] == [layers[la][part][key]["value"] for la in (0, 2)], name
        assert ml["intervals"][name] == [layers[la][part][key] for la in (0, 2)], name
    # the legacy keys are the usage measures and 1 − H, never the population ones
    assert ml["usage Gini"] == [layers[la]["gini"] for la in (0, 2)]
    assert ml["population 1-H (entropy sparsity, higher = sparser)"] == [layers[la]["entropy"]["sparsity"] for la in (0, 2)]
    assert ml["population H (normalised entropy, lower = sparser)"] == [layers[la]["entropy"]["mean_entropy"]
                                                                        for la in (0, 2)]
    # Gini / Hoyer / traditional recomputed from the stored per-neuron means
    c = np.array(single["neuron_mean_abs"])
    assert single["gini"] == single["usage"]["gini"]["value"] == pytest.approx(sp.gini(c), rel=1e-12)
    assert single["hoyer"] == single["usage"]["hoyer"]["value"] == pytest.approx(sp.hoyer(c), rel=1e-12)
    assert single["traditional"]["sparsity"] == pytest.approx((c < 0.01).mean())
    assert "scale" in r["note"] and "not comparable across architectures" in stdout


def test_comparison_json_and_matching(comparison_run):
    _, res, stdout = comparison_run
    comp = res["comparison"]["results"]
    mamba, gpt2 = comp["models"]
    assert (mamba["n_layers"], gpt2["n_layers"]) == (3, 2)
    assert comp["matched_layers"] == {mamba["label"]: 2, gpt2["label"]: 1}  # relative depth 1.0 on both
    assert comp["sparsity_layers"] == {mamba["label"]: [0, 2], gpt2["label"]: [0]}
    assert set(mamba["sparsity_by_layer"]) == {"0", "1", "2"} and set(gpt2["sparsity_by_layer"]) == {"0", "1"}
    # the side-by-side bars are the per-layer numbers of the matched layers
    for side in (mamba, gpt2):
        st = side["sparsity_by_layer"][str(side["layer"])]
        bars = comp["methods_at_matched_layers"][side["label"]]
        assert bars["usage Gini"] == st["usage"]["gini"]["value"] == st["gini"]
        assert bars["population Gini"] == st["population"]["gini"]["value"]
        assert bars["population 1-H"] == st["entropy"]["sparsity"]
        assert bars["dead fraction"] == st["dead_neurons"]["fraction"]
    assert gpt2["sparsity_by_layer"]["1"]["site"] == "mlp" and gpt2["sparsity_by_layer"]["1"]["n_neurons"] == 128
    assert gpt2["sparsity_by_layer"]["1"]["traditional"]["threshold"] == 1e-5
    # the main model's efficiency is the efficiency stage's, not measured twice
    assert mamba["efficiency"]["scaling"]["points"] == res["efficiency"]["results"]["scaling"]["points"]
    pts = gpt2["efficiency"]["scaling"]["points"]
    assert [p["seq_len"] for p in pts] == [16, 32, 64]
    # causal distributions: the main model's scores are the causal stage's; the other model's site is d wide
    # like with like: Mamba's mixer_out is its block's write to the residual stream; GPT-2's counterpart is block_out
    c = comp["causal"]
    assert c[mamba["label"]]["scores"] == res["causal"]["results"]["scores"]
    assert (c[mamba["label"]]["site"], c[mamba["label"]]["site_kind"]) == ("mixer_out", "write")
    assert (c[gpt2["label"]]["site"], c[gpt2["label"]]["site_kind"]) == ("block_out", "write")
    assert c["pairing"] == "same kind" and c["note"] is None
    assert len(c[gpt2["label"]]["scores"]) == 32 and c[gpt2["label"]]["layer"] == 1
    for side in (mamba, gpt2):  # the max and median over dims, with intervals over the prompts
        e = c[side["label"]]
        for key, f in (("max_impact", np.max), ("median_impact", np.median)):
            assert e[key]["value"] == pytest.approx(f(e["scores"]), rel=1e-12)
            assert e[key]["low"] <= e[key]["value"] <= e[key]["high"]
    assert c["interval_method"].startswith("percentile bootstrap over prompts")
    assert "causal sites (same kind)" in stdout and "block_out at layer 1" in stdout
    # the summary table printed is the JSON's
    rows = {r["metric"]: r for r in comp["summary"]}
    assert rows["layers"][mamba["label"]] == 3 and rows["layers"][gpt2["label"]] == 2
    st = gpt2["sparsity_by_layer"]["1"]
    for name, d in (("usage Gini", st["usage"]["gini"]), ("population Gini", st["population"]["gini"])):
        assert rows[name + " [95%]"][gpt2["label"]] == stats.shown(d, ".4g")
    assert not any(r in rows for r in ("Gini", "Hoyer", "entropy"))  # no measure without its kind
    assert rows["forward time at L=64 (ms), the model's own forward"][gpt2["label"]] == round(pts[-1]["time_s"] * 1e3, 2)
    assert rows["causal site (kind, layer)"][gpt2["label"]] == "block_out (write, layer 1)"
    mx = c[gpt2["label"]]["max_impact"]
    assert rows["max causal impact (mean KL; top dim's interval)"][gpt2["label"]] == f"{stats.shown(mx, '.3e')} (dim {mx['dim']})"
    assert "usage Gini [95%]" in stdout and "population Gini [95%]" in stdout and gpt2["label"] in stdout


def test_the_other_models_causal_site_is_of_the_same_kind(model_dirs):
    """paired_site: write ↔ write, residual ↔ residual, inner neurons ↔ inner neurons; a Transformer's
    attn_out / mlp_out (one part of its block's write) has no Mamba counterpart: the block write, with a note."""
    from transformers import AutoConfig

    from comparison_wrapper import paired_site
    from models import config_adapter

    mamba, gpt2, neox = (config_adapter(AutoConfig.from_pretrained(model_dirs[k])) for k in ("mamba_b", "gpt2", "gpt_neox"))
    for a, b in ((mamba, gpt2), (mamba, neox)):
        assert [paired_site(a, s, b) for s in ("mixer_out", "residual", "ssm")] == [
            ("block_out", None), ("residual", None), ("mlp", None)]
        assert [paired_site(b, s, a) for s in ("block_out", "residual", "mlp")] == [
            ("mixer_out", None), ("residual", None), ("ssm", None)]
        for part in ("mlp_out", "attn_out"):
            site, note = paired_site(b, part, a)
            assert site == "mixer_out" and f"{part} is of kind 'component'" in note and "not like with like" in note
            assert "--causal_site block_out" in note
    assert paired_site(gpt2, "mlp_out", neox) == ("mlp_out", None)  # two Transformers: the same component


def test_methods_table_matches_plotted_methods():
    """The side-by-side bars are the multi-layer table's measures, each under its own name (no bare "Gini" or
    "entropy": population vs usage, H vs 1 − H), and the optimal-threshold neuron sparsity."""
    import sparsity as sp

    names = [m.replace("\n", " ") for m, _ in cp.METHODS]
    assert names[:-1] == [m.split(" (")[0] for m, _ in sp.MULTILAYER_METRICS if "lower = sparser" not in m]
    assert "population 1-H" in names and "population H" not in names  # the axis reads "1 = sparse"
    assert names[-1].startswith("optimal") and not {"Gini", "Hoyer", "entropy"} & set(names)


def test_the_comparison_reuses_the_sparsity_stage_and_gets_the_same_numbers(model_dirs, tmp_path, monkeypatch):
    """The sparsity stage and the comparison read the main model's sites from the same text pass (no
    forward of their own: `layer_sparsity` never runs), and the comparison's per-layer sparsity of the
    main model equals `layer_sparsity`'s own forwards to float rounding, and the sparsity stage's exactly."""
    from test_sparsity import assert_sparsity_close

    from main import run_comprehensive_analysis
    from utils import tokenize_texts
    from models import get_adapter, load_model_and_tokenizer
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    main_model, tok, _ = load_model_and_tokenizer(str(model_dirs["mamba_b"]))
    texts = read_texts_file(OFFLINE_TEXTS_PATH)[:6]
    calls = []
    real = sp.layer_sparsity
    monkeypatch.setattr(sp, "layer_sparsity", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    res = run_comprehensive_analysis(main_model, tok, texts, layer=1, stages=["sparsity", "comparison"],
                                     plots_dir=tmp_path, max_length=40, progress=False,
                                     compare_model=str(model_dirs["gpt2"]), seq_lengths=[16], efficiency_budget=5.0)
    assert res["comparison"]["status"] == "ok", res["comparison"].get("error")
    assert calls == []  # both read the text pass, on both models
    alone = real(main_model, get_adapter(main_model), tokenize_texts(tok, texts, 40).input_ids, range(3))
    shared = res["comparison"]["results"]["models"][0]["sparsity_by_layer"]
    assert set(shared) == set(alone) == {0, 1, 2}
    assert_sparsity_close(shared, alone)
    assert res["sparsity"]["results"]["single"]["gini"] == shared[1]["gini"]
    np.testing.assert_array_equal(res["sparsity"]["results"]["single"]["neuron_mean_abs"], shared[1]["neuron_mean_abs"])


@pytest.fixture(scope="module")
def attention_comparison(model_dirs, tmp_path_factory):
    """The attention stage at --layer 2 and --attention_layers 0 of a 3-layer Mamba, then the comparison with a
    2-layer GPT-2 (the headline layer is not the first: the maps and summary rows follow --layer)."""
    from models import load_model_and_tokenizer
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    tmp = tmp_path_factory.mktemp("attention_comparison")
    main_model, tok, _ = load_model_and_tokenizer(str(model_dirs["mamba_b"]))
    other, other_tok, _ = load_model_and_tokenizer(str(model_dirs["gpt2"]))
    texts = read_texts_file(OFFLINE_TEXTS_PATH)[:4]
    from pipeline import Options, run_pipeline

    opts = Options(layer=2, attention_layers=(0,), max_length=30, plots_dir=str(tmp), prefix="m", progress=False,
                   compare_model=str(model_dirs["gpt2"]), seq_lengths=(16,), efficiency_budget=5.0)
    res = run_pipeline(main_model, tok, texts, opts, ["attention", "comparison"])
    return res, (main_model, tok), (other, other_tok), texts


def test_the_comparison_holds_both_models_attention_neurons(attention_comparison):
    """The main model's side is the attention stage's own numbers (reused, not measured again); the other
    model's equals attention_profile at the layers of the same relative depth on its own tokens; the
    summary rows hold those numbers; the depth plot and the side-by-side maps exist."""
    import attention_neurons as an
    from utils import tokenize_texts

    res, _, (other, other_tok), texts = attention_comparison
    assert res["attention"]["status"] == "ok" and res["comparison"]["status"] == "ok", res["comparison"].get("error")
    stage, comp = res["attention"]["results"], res["comparison"]["results"]
    att = comp["attention"]
    main_label, other_label = [s["label"] for s in comp["models"]]
    assert att["matched_layers"] == {main_label: 2, other_label: 1}
    assert att["models"][main_label]["layers"] == [0, 2] and att["models"][other_label]["layers"] == [0, 1]
    assert all(att["models"][main_label]["by_layer"][la]["methods"] is stage["by_layer"][la]["methods"]
               for la in (0, 2))  # the attention stage's own numbers
    names = [p.rsplit("/", 1)[-1] for p in res["attention"]["plots"]]
    assert "m_hidden_attention_layer2_text0.png" in names and "m_attention_by_layer_layers0_2.png" in names
    assert att["models"][other_label]["units"]["unit"] == "dim"
    other_by = att["models"][other_label]["by_layer"]
    assert "attention_vector_first_text" in other_by[1] and "attention_vector_first_text" not in other_by[0]
    ids = tokenize_texts(other_tok, texts, 30).input_ids
    expect = an.attention_profile(an.attention_neurons_for(other), ids, [0, 1])
    for la in (0, 1):
        for m, e in expect[la]["methods"].items():
            got = att["models"][other_label]["by_layer"][la]["methods"][m]
            np.testing.assert_allclose(got["neuron_activations"], e["neuron_activations"], rtol=1e-6)
            assert got["neuron_diversity"] == pytest.approx(e["neuron_diversity"], rel=1e-6)
    rows = {r["metric"]: r for r in comp["summary"]}
    for m in an.METHODS:
        row = rows[f"attention {m}: diversity [95%]"]
        for label, a in ((main_label, stage["by_layer"][2]["methods"][m]), (other_label, expect[1]["methods"][m])):
            assert row[label] == stats.shown({"value": a["neuron_diversity"], "low": a["neuron_diversity_low"],
                                              "high": a["neuron_diversity_high"]}, ".4f")
        shown = rows[f"attention {m}: mean activation [95%]"][other_label]  # "value [low, high]"
        e = expect[1]["methods"][m]
        assert [float(v) for v in shown.replace("[", "").replace("]", "").replace(",", "").split()] == pytest.approx(
            [e["mean_activation"], e["mean_activation_low"], e["mean_activation_high"]], rel=1e-3)
    names = [p.rsplit("/", 1)[-1] for p in res["comparison"]["plots"]]
    assert any(n.endswith("_attention_by_depth.png") for n in names)
    assert any(n.endswith("_attention_maps.png") for n in names)
    for p in res["comparison"]["plots"]:
        assert open(p, "rb").read(4) == b"\x89PNG"


def test_the_other_models_sparsity_is_read_from_its_attention_gradient_forwards(attention_comparison):
    """With the attention part, the other model's every-layer sparsity comes from its run's text pass (the
    gradient forwards, no forward of its own) and equals `layer_sparsity` on its own tokens to float
    rounding; the main model's from this run's text pass."""
    from test_sparsity import assert_sparsity_close

    from models import get_adapter
    from utils import tokenize_texts

    res, _, (other, other_tok), texts = attention_comparison
    main_side, other_side = res["comparison"]["results"]["models"]
    assert other_side["sparsity_measured_in"].startswith("the text pass's gradient forwards (the first text")
    assert main_side["sparsity_measured_in"].startswith("the text pass's gradient forwards (the first text")
    adapter = get_adapter(other)
    want = sp.layer_sparsity(other, adapter, tokenize_texts(other_tok, texts, 30).input_ids, range(adapter.n_layers))
    assert_sparsity_close(other_side["sparsity_by_layer"], want)


def test_the_attention_stage_over_several_layers_equals_one_layer_runs(attention_comparison, tmp_path):
    """--attention_layers: the stage at layers 0 and 2 in one pass per text equals a one-layer stage at 2
    (rollout at 2 continues from layer 0 instead of restarting), and its headline is --layer's (2)."""
    from pipeline import Options, run_pipeline

    res, (model, tok), _, texts = attention_comparison
    stage = res["attention"]["results"]
    assert stage["layer"] == 2 and stage["attention_layers"] == [0, 2]
    assert stage["methods"] is stage["by_layer"][2]["methods"]
    # the first text's (L, L) maps are kept at --layer only (at 24 layers they would swell the JSON)
    assert "attention_vector_first_text" in stage and "attention_vector_first_text" not in stage["by_layer"][0]
    assert all("token_map_first_text" not in e for e in stage["by_layer"][0]["methods"].values())
    alone = run_pipeline(model, tok, texts, Options(layer=2, max_length=30, progress=False, plots_dir=str(tmp_path),
                                                    prefix="a"), ["attention"])
    for m, e in alone["attention"]["results"]["methods"].items():
        np.testing.assert_allclose(stage["by_layer"][2]["methods"][m]["neuron_activations"], e["neuron_activations"],
                                   rtol=1e-5, atol=1e-12)


def test_a_failed_attention_stage_leaves_the_comparison_without_an_attention_part(model_dirs, tmp_path, monkeypatch):
    """A failing attention stage is listed with its error; the comparison records why it has no attention
    part (nothing stands in for it) and keeps its other parts."""
    import attention_neurons as an
    from models import load_model_and_tokenizer
    from pipeline import Options, run_pipeline
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    def planted(*a, **k):
        raise RuntimeError("planted attention failure")

    monkeypatch.setattr(an.AttentionProfile, "read", planted)
    model, tok, _ = load_model_and_tokenizer(str(model_dirs["mamba_b"]))
    opts = Options(max_length=30, plots_dir=str(tmp_path), prefix="m", progress=False,
                   compare_model=str(model_dirs["gpt2"]), seq_lengths=(16,), efficiency_budget=5.0)
    res = run_pipeline(model, tok, read_texts_file(OFFLINE_TEXTS_PATH)[:3], opts, ["attention", "comparison"])
    assert res["attention"]["status"] == "error" and "planted" in res["attention"]["error"]
    comp = res["comparison"]["results"]
    assert "skipped" in comp["attention"] and not any(r["metric"].startswith("attention") for r in comp["summary"])


def test_the_sparsity_stage_reads_the_attention_stages_forwards(model_dirs, tmp_path, monkeypatch):
    """With the attention stage's gradient_guided in the run, the sparsity stage reads every site from the
    text pass's gradient forwards, says so in `measured_in`, and its numbers equal a sparsity-only run's
    (the capture forwards, the model's own) to float rounding; without gradient_guided there is no gradient
    forward and the sites come from the capture forwards. Gradient-forward sites further from the model's
    own forward than SITE_TOLERANCE are not used: read from the capture forwards, and said."""
    from test_sparsity import assert_sparsity_close

    import passes
    from models import load_model_and_tokenizer
    from pipeline import Options, run_pipeline
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    model, tok, _ = load_model_and_tokenizer(str(model_dirs["mamba_b"]))
    texts = read_texts_file(OFFLINE_TEXTS_PATH)[:4]
    opts = Options(layer=1, max_length=30, plots_dir=str(tmp_path), prefix="m", progress=False)
    alone = run_pipeline(model, tok, texts, opts, ["sparsity"])["sparsity"]["results"]
    assert alone["measured_in"] == "the text pass's capture forwards (the model's own)"
    real = sp.layer_sparsity
    calls = []
    monkeypatch.setattr(sp, "layer_sparsity", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = run_pipeline(model, tok, texts, opts, ["attention", "sparsity"])
    assert res["attention"]["status"] == "ok" and res["sparsity"]["status"] == "ok", res["sparsity"].get("error")
    shared = res["sparsity"]["results"]
    assert shared["measured_in"].startswith("the text pass's gradient forwards (the first text") and not calls
    assert_sparsity_close(shared["single"], alone["single"])
    assert_sparsity_close(shared["layers"], alone["layers"])
    opts = dataclasses.replace(opts, attention_methods=("attention_weighted",))
    res = run_pipeline(model, tok, texts, opts, ["attention", "sparsity"])
    assert res["sparsity"]["results"]["measured_in"] == "the text pass's capture forwards (the model's own)"
    monkeypatch.setattr(passes, "SITE_TOLERANCE", 1e-30)  # the gradient forward's sites differ by rounding (> 0)
    res = run_pipeline(model, tok, texts, dataclasses.replace(opts, attention_methods=("gradient_guided",)),
                       ["attention", "sparsity"])
    assert res["sparsity"]["status"] == "ok" and not calls
    assert re.fullmatch(r"the text pass's capture forwards \(the model's own; the gradient forwards' sites differed "
                        r"by \S+, relative, > 1e-30\)", res["sparsity"]["results"]["measured_in"])
    assert_sparsity_close(res["sparsity"]["results"]["single"], alone["single"])


def test_the_causal_part_states_each_site_and_a_pairing_of_different_kinds(model_dirs):
    """A GPT-2 main run at mlp_out beside a Mamba: the Mamba side runs its block write (mixer_out) and the
    causal part says the pairing is of different kinds, with the note; the intervals are over the prompts
    (the same draws for both sides), and a side without per-prompt scores has none (never invented)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from comparison_wrapper import causal_side_by_side, paired_site
    from models import config_adapter

    gpt2, mamba = (config_adapter(AutoConfig.from_pretrained(model_dirs[k])) for k in ("gpt2", "mamba_b"))
    site, note = paired_site(gpt2, "mlp_out", mamba)
    rng = np.random.default_rng(0)
    kl = rng.exponential(1e-3, size=(6, 32))
    main = SimpleNamespace(label="g", layer=1, adapter=gpt2, causal={
        "site": "mlp_out", "scores": kl.mean(0), "scores_per_prompt": kl, "prompts": ["p"] * 6, "ablation": "zero"})
    other = SimpleNamespace(label="m", layer=2, adapter=mamba, causal={"site": site, "scores": kl[:, :24].mean(0)})
    c = causal_side_by_side(main, other, note, n_resamples=200, seed=3)
    assert c["pairing"] == "different kinds" and c["note"] == note
    assert (c["g"]["site"], c["g"]["site_kind"], c["m"]["site"], c["m"]["site_kind"]) == (
        "mlp_out", "component", "mixer_out", "write")
    res = stats.Resamples.draw(6, 200, 3, "prompts")
    top = int(np.argmax(kl.mean(0)))  # the top dimension's own interval, the dimension held fixed
    assert c["g"]["max_impact"] == {**stats.interval(kl.mean(0)[top], res.means(kl)[:, top], res), "dim": top}
    assert c["g"]["max_impact"]["low"] <= c["g"]["max_impact"]["value"] <= c["g"]["max_impact"]["high"]
    assert c["m"]["max_impact"] == {"value": kl[:, :24].mean(0).max(), "low": None, "high": None,
                                    "dim": int(np.argmax(kl[:, :24].mean(0)))}


def test_the_largest_causal_impact_names_the_dimension_asked_for_not_its_position():
    """With --causal_dims the scores follow that list: the comparison's max_impact names the dimension itself."""
    from comparison_wrapper import Side, causal_side_by_side
    from conftest import make_model
    from models import get_adapter

    adapter = get_adapter(make_model("gpt2"))
    kl = np.array([[0.1, 0.9, 0.2], [0.2, 0.7, 0.1]])  # (prompts, dims asked)
    causal = {"site": "block_out", "dims": np.array([30, 5, 17]), "scores": kl.mean(0), "scores_per_prompt": kl,
              "prompts": ["a", "b"]}
    sides = [Side(label, adapter, "main", 0, {}, {}, "", {}, causal=causal) for label in ("one", "two")]
    out = causal_side_by_side(*sides, n_resamples=100)
    assert out["one"]["max_impact"]["dim"] == 5 and out["one"]["max_impact"]["value"] == pytest.approx(0.8)
    no_per_prompt = {k: v for k, v in causal.items() if k != "scores_per_prompt"}
    out = causal_side_by_side(*(Side(s.label, adapter, "main", 0, {}, {}, "", {}, causal=no_per_prompt)
                                for s in sides))
    assert out["one"]["max_impact"]["dim"] == 5
