"""The hybrid families (Jamba, Bamba, Granite 4.0, Zamba2, Nemotron-H, Falcon-H1) on tiny random configs
(conftest.HYBRID_CONFIGS: several heads in two groups of B and C, chunks of 5 positions, every multiplier a
family has away from 1): each layer's kind, the mixers' recomputation against float64 references written
out here, and every stage at every layer of each model, where it applies and saying why where it does not."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import HYBRID_CONFIGS, make_model
from delta_extraction import capture_mixer_io, mixer_internals
from models import LAYER_KINDS, NotApplicable, config_adapter, get_adapter
from test_families import _conv, mamba2_scan_written_out
from utils import UserInputError

FAMILIES = list(HYBRID_CONFIGS)
FALCON_VARIANTS = ["falcon_h1:mamba_norm_before_gate=True", "falcon_h1:mamba_rms_norm=False"]
KINDS = {"jamba": ["ssm", "attention", "ssm", "attention"], "bamba": ["ssm", "attention", "ssm", "attention"],
         "granitemoehybrid": ["ssm", "attention", "ssm", "attention"],
         "zamba2": ["ssm", "ssm+attention", "ssm", "ssm+attention", "ssm"],
         "nemotron_h": ["ssm", "feed_forward", "attention", "feed_forward", "ssm"],
         "falcon_h1": ["ssm+attention"] * 4}


def _ids(L=17, b=2, seed=0):
    return torch.randint(1, 300, (b, L), generator=torch.Generator().manual_seed(seed))


def _double(model):
    model = model.double()
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")  # torch's grouped matrix product has no float64
    return model


def _rms(v, eps):
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)


def _scan_mamba1(x, delta, A, B, C, D):
    s = torch.zeros(x.shape[0], x.shape[2], A.shape[1], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        s = torch.exp(delta[:, t, :, None] * A) * s + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((s * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(ys, 1)


def jamba_reference(mixer, h):
    """Jamba's mixer in float64, written out: Mamba-1 whose dt_low, B and C pass through weighted RMS norms."""
    e, n, r = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
    x0, z = (h @ mixer.in_proj.weight.T).split(e, dim=-1)  # x first, then the gate
    x = F.silu(_conv(x0, mixer.conv1d))
    dt, B, C = (x @ mixer.x_proj.weight.T).split([r, n, n], dim=-1)
    dt, B, C = (norm.weight * _rms(v, norm.variance_epsilon)
                for v, norm in zip((dt, B, C), (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm)))
    delta = torch.log1p(torch.exp(dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias))  # softplus, no clamp
    y = _scan_mamba1(x, delta, -torch.exp(mixer.A_log), B, C, mixer.D)
    return delta, (y * F.silu(z)) @ mixer.out_proj.weight.T


def _time_step_limit(config):
    if config.model_type in ("zamba2", "nemotron_h"):  # these clamp below only, at time_step_min
        return config.time_step_min, math.inf
    return tuple(config.time_step_limit)


def _mup(config, I, GN, H):
    """Falcon-H1's in_proj multipliers, one per part of its output: [z | x | B | C | dt]."""
    m = config.ssm_multipliers
    return torch.cat([torch.full((I,), m[0]), torch.full((I,), m[1]), torch.full((GN,), m[2]),
                      torch.full((GN,), m[3]), torch.full((H,), m[4])]).double()


def mamba2_reference(mixer, h, config):
    """A Mamba-2 hybrid's mixer in float64, written out head by head, with Falcon-H1's multipliers and its
    choice of norm: every family's gated norm groups I / n_groups channels."""
    I, G, N, H, P = mixer.intermediate_size, mixer.n_groups, mixer.ssm_state_size, mixer.num_heads, mixer.head_dim
    falcon = config.model_type == "falcon_h1"
    if falcon:
        h = h * config.ssm_in_multiplier
    zxbcdt = h @ mixer.in_proj.weight.T
    if falcon:
        zxbcdt = zxbcdt * _mup(config, I, G * N, H)
    z, xBC, dt = zxbcdt.split([I, I + 2 * G * N, H], dim=-1)
    xBC = F.silu(_conv(xBC, mixer.conv1d))
    x, B, C = xBC.split([I, G * N, G * N], dim=-1)
    lo, hi = _time_step_limit(config)
    delta = torch.log1p(torch.exp(dt + mixer.dt_bias)).clamp(lo, hi)  # (b, L, H)
    y = mamba2_scan_written_out(x, delta, -torch.exp(mixer.A_log), B, C, mixer.D, G, P)

    def grouped_norm(v):
        return torch.cat([_rms(c, mixer.norm.variance_epsilon) for c in v.split(I // G, dim=-1)], dim=-1)

    if falcon and not config.mamba_rms_norm:
        u = y * F.silu(z)
    elif falcon and config.mamba_norm_before_gate:
        u = mixer.norm.weight * grouped_norm(y) * F.silu(z)
    else:
        u = mixer.norm.weight * grouped_norm(y * F.silu(z))
    return delta, u @ mixer.out_proj.weight.T


@pytest.mark.parametrize("kind", FAMILIES + FALCON_VARIANTS)
def test_recomputation_equals_a_float64_reference_and_the_model(kind):
    """At every state-space layer, Δ and the mixer output recomputed from the layer's weights (every
    multiplier and norm) equal the reference written out here, and the model's own output, in float64."""
    model = _double(make_model(kind))
    adapter = get_adapter(model)
    ids = _ids()
    layers = [la for la in range(adapter.n_layers) if adapter.has_ssm(la)]
    assert layers
    for layer in layers:
        mixer = adapter.mixer(layer)
        h_in, real = capture_mixer_io(model, layer, ids)
        delta_ref, out_ref = (jamba_reference(mixer, h_in) if kind == "jamba"
                              else mamba2_reference(mixer, h_in, model.config))
        it, check = mixer_internals(model, layer, ids)
        d_rel = ((it.delta - delta_ref).abs().max() / delta_ref.abs().max()).item()
        o_rel = ((it.out - out_ref).abs().max() / out_ref.abs().max()).item()
        m_rel = ((real - out_ref).abs().max() / out_ref.abs().max()).item()
        print(f"{kind} layer {layer}: Δ {d_rel:.1e}, output {o_rel:.1e}, the model's own output {m_rel:.1e}")
        # the models' norms (and Mamba-2's scan) run in float32 even in a float64 model, and the recomputation
        # with them; the references here do not: float32 rounding
        assert d_rel < 1e-6 and o_rel < 1e-6 and check.ok
        assert m_rel < 1e-5
    expect = (2, 17, 64) if kind == "jamba" else (2, 17, 8)  # Jamba: one Δ per channel; Mamba-2: per head
    assert tuple(it.delta.shape) == expect


def test_a_wrong_multiplier_is_caught():
    """The reference is sensitive: Falcon-H1's output without its multipliers is off by far more than the
    tolerance (so the check above would catch a recomputation that left them out)."""
    model = _double(make_model("falcon_h1"))
    mixer = get_adapter(model).mixer(1)
    h_in, real = capture_mixer_io(model, 1, _ids())
    config = model.config
    plain = type(config)(**{**config.to_dict(), "ssm_multipliers": [1.0] * 5, "ssm_in_multiplier": 1.0})
    _, out_plain = mamba2_reference(mixer, h_in, plain)
    assert ((out_plain - real).abs().max() / real.abs().max()).item() > 1e-2


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_layer_has_its_kind_and_its_sites(kind):
    """Layer kinds from the config alone (before the weights load), and at each layer the sites it has;
    a site a layer lacks is NotApplicable naming the layer and its kind."""
    model = make_model(kind)
    adapter = config_adapter(model.config)
    assert [adapter.layer_kind(la) for la in range(adapter.n_layers)] == KINDS[kind]
    assert get_adapter(model).describe()["layer_kinds"] == KINDS[kind]
    assert set(KINDS[kind]) <= set(LAYER_KINDS)
    adapter = get_adapter(model)
    for la, k in enumerate(KINDS[kind]):
        for name in ("block_out", "residual"):  # every layer writes to the residual stream
            site = adapter.site(name, la)
            assert site.size == model.config.hidden_size and model.get_submodule(site.path.split("#")[0]) is not None
        if "ssm" in k:
            ssm = adapter.site("ssm", la)
            assert model.get_submodule(ssm.path).in_features == ssm.size == adapter.inner_size
        else:
            with pytest.raises(NotApplicable, match=f"layer {la} .* no state-space mixer: it is of kind {k}"):
                adapter.site("ssm", la)
        if k == "attention":
            heads = adapter.site("attn_heads", la)
            assert model.get_submodule(heads.path).in_features == heads.size


def test_layer_kind_names_old_and_new_and_unknown():
    """transformers' older names ("mamba", "attention") and newer ("linear_attention", "full_attention") give the
    same kinds; a name this version does not know is one clear error."""
    old = make_model("granitemoehybrid").config
    assert config_adapter(old).layer_kind(1) == "attention"
    odd = make_model("granitemoehybrid").config
    odd.layer_types = ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]
    with pytest.raises(UserInputError, match="layer 1 .* kind 'sliding_attention'"):
        config_adapter(odd).layer_kind(1)


STAGES = ["delta", "causal", "inter_layer", "cross_layer", "attention", "sparsity", "census", "faithfulness",
          "efficiency"]


def _expected(kind: str, layer: int) -> dict:
    """Each per-layer stage's status at `layer` of family `kind`'s tiny model."""
    k = KINDS[kind][layer]
    moe = {"jamba": {1, 3}, "nemotron_h": {1}}.get(kind, set())  # no dense MLP: a mixture of experts only
    neurons = "ssm" in k or (layer not in moe and not (kind == "nemotron_h" and k == "attention"))
    attention = "ssm" in k or (k == "attention")
    return {"delta": "ok" if "ssm" in k else "not_applicable", "causal": "ok",
            "attention": "ok" if attention else "not_applicable",
            "sparsity": "ok" if neurons else "not_applicable",
            "faithfulness": "ok" if (neurons or attention) else "not_applicable"}


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_stage_at_every_layer(kind, tokenizer, tmp_path):
    """One run over every layer: each stage ok where it applies, not applicable with the layer's kind where
    it does not; the reproduction check holds at every layer; depth profiles split by layer kind."""
    from pipeline import Options, run_pipeline, stage_text
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    model = make_model(kind)
    n = model.config.num_hidden_layers
    opts = Options(max_length=24, prefix=kind, progress=False,
                   layers=tuple(range(n)), prompts=("The cat sat on the mat because", "In 1870 the town"),
                   bootstrap_resamples=200, seq_lengths=(16,), efficiency_budget=2.0)
    res = run_pipeline(model, tokenizer, read_texts_file(OFFLINE_TEXTS_PATH)[:3], opts, STAGES)
    for la in range(n):
        got = {s: e["status"] for s, e in res["layers"][la].items()}
        assert got == _expected(kind, la), (la, {s: e.get("reason") or e.get("error") for s, e in
                                                res["layers"][la].items()})
        for s, e in res["layers"][la].items():
            stage_text(s, e)  # every entry has its summary
            if e["status"] == "not_applicable":
                assert f"layer {la}" in e["reason"] or "no ranking" in e["reason"], e["reason"]
        causal = res["layers"][la]["causal"]["results"]
        check = causal["reproduction_check"]
        assert causal["site"] == "block_out" and check["path_largest_distance"] <= check["allowance"]
        delta = res["layers"][la]["delta"]
        if delta["status"] == "ok":
            r = delta["results"]
            assert (r["unit"], r["n_channels"]) == (("channel", 64) if kind == "jamba" else ("head", 8))
            assert r["reconstruction"]["max_relative_error"] <= r["reconstruction"]["tolerance"]
        att = res["layers"][la]["attention"]
        if att["status"] == "ok":
            r = att["results"]
            assert r["layer_kind"] == KINDS[kind][la]
            assert r["max_reconstruction_error"] < 1e-4  # α x (+ D x) rebuilds the real output
            assert r["path"] == ("ssm" if "ssm" in KINDS[kind][la] else "attention")
            assert "rollout" in r["methods_left_out"] and "rollout" not in r["methods"]
            if r["path"] == "attention":
                assert r["units"]["unit"] == "dim" and r["units"]["n_heads"] == 4
            if kind == "falcon_h1":  # both paths of the layer, side by side
                side = r["attention_path"]
                assert side["units"]["unit"] == "dim" and side["max_reconstruction_error"] < 1e-4
                assert "attention path" in stage_text("attention", att)
    for s in ("inter_layer", "cross_layer", "census"):
        assert res[s]["status"] == "ok", res[s].get("error")
    eff = res["efficiency"]["results"]
    assert res["efficiency"]["status"] == "ok", res["efficiency"].get("error")
    per = eff["flops_per_token_at_256"]["per_layer"]
    assert [x["scan"] > 0 for x in per] == ["ssm" in k for k in KINDS[kind]]  # the scan where a mixer is
    assert [x["attention"] > 0 for x in per] == ["attention" in k for k in KINDS[kind]]
    assert eff["neurons"]["total"] == sum(res["layers"][la]["sparsity"]["results"]["single"]["n_neurons"]
                                          for la in range(n) if res["layers"][la]["sparsity"]["status"] == "ok")
    census = res["census"]["results"]
    assert set(census["layers"]) | set(census["layers_without_site"]) == set(range(n))
    profiles = res["depth_profiles"]["results"]
    assert profiles["layer_kinds"] == KINDS[kind]
    eta = profiles["by_kind"]["delta: max η²"]
    assert sorted(la for v in eta.values() for la in v["layers"]) == [la for la in range(n) if "ssm" in KINDS[kind][la]]
    if kind == "falcon_h1":  # the path effects in the profiles, and the plot with a series per kind
        from depth_profiles import plot_depth_profiles

        assert all(v is not None for v in profiles["metrics"]["causal: attn_path ablated whole"])
        assert plot_depth_profiles(profiles, tmp_path, "profiles").endswith(".png")


def test_falcon_h1_paths_ablated_whole_equal_a_direct_ablation(tokenizer):
    """The causal stage's whole-path effects on Falcon-H1 (ssm_path, attn_path) equal the KL of a forward with
    that path's output set to 0 by a hook written here; each path also has per-unit scores as a site."""
    from pipeline import Options, run_pipeline

    model = make_model("falcon_h1")
    prompts = ("The cat sat on the mat because", "In 1870 the town")
    opts = Options(layer=2, prompts=prompts, progress=False, bootstrap_resamples=200)
    r = run_pipeline(model, tokenizer, ["one text here", "and another"], opts, ["causal"])["causal"]["results"]
    paths = r["path_effects"]
    assert set(paths) == {"ssm_path", "attn_path"}
    block = model.model.layers[2]
    for path, module in (("ssm_path", block.mamba), ("attn_path", block.self_attn)):
        for i, p in enumerate(prompts):
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                clean = torch.log_softmax(model(ids, use_cache=False).logits[0, -1].double(), -1)
                hook = module.register_forward_hook(
                    lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out))
                try:
                    ablated = torch.log_softmax(model(ids, use_cache=False).logits[0, -1].double(), -1)
                finally:
                    hook.remove()
            kl = float((clean.exp() * (clean - ablated)).sum())
            print(f"{path} prompt {i}: stage {paths[path]['kl_per_prompt'][i]:.6e}, direct {kl:.6e}")
            assert paths[path]["kl_per_prompt"][i] == pytest.approx(kl, rel=1e-3, abs=1e-9)
        assert paths[path]["kl"]["value"] > 0
    per_unit = run_pipeline(model, tokenizer, ["one text here", "and another"],
                            Options(layer=2, prompts=prompts, progress=False, causal_site="attn_path",
                                    bootstrap_resamples=200), ["causal"])["causal"]["results"]
    assert per_unit["site"] == "attn_path" and per_unit["n_dims"] == model.config.hidden_size


def test_softmax_attention_of_a_hybrid_layer_is_read_with_grouped_query_heads():
    """At an attention layer of a hybrid with grouped-query attention (4 query heads, 2 key/value heads), the
    heads' values rebuilt from v_proj give y = A v equal to the output projection's real input."""
    from attention_neurons import TransformerAttentionNeurons
    from models import AttentionLayersView

    model = make_model("bamba")
    view = AttentionLayersView(get_adapter(model))
    an = TransformerAttentionNeurons(model, adapter=view)
    io = an.capture(_ids(L=11, b=1), None, [1])[1]
    A, x, y = an._units(io)
    assert A.shape == (1, 4, 11, 11) and x.shape == (1, 11, 32)
    assert ((y - io[2]).abs().max() / io[2].abs().max()).item() < 1e-5
    assert np.allclose(A.sum(-1).numpy(), 1.0, atol=1e-5)  # each query's weights over keys sum to 1


def test_a_hybrid_from_its_folder_on_the_command_line_beside_a_mamba(model_dirs, tokenizer, tmp_path, monkeypatch,
                                                                     capsys):
    """`main.py --model <a save_pretrained Jamba> --compare_model <a Mamba>` in one run: the model loads whole,
    every default stage runs, the comparison pairs the layers, and the JSON records each layer's kind."""
    import json

    from test_cli import main_here
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    folder = tmp_path / "jamba"
    make_model("jamba").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "texts.txt").write_text("\n\n".join(read_texts_file(OFFLINE_TEXTS_PATH)[:4]) + "\n")
    (tmp_path / "prompts.txt").write_text("The cat sat on the mat because\nIn 1870 the town\n")
    args = ["--model", folder, "--compare_model", model_dirs["mamba_b"], "--layer", "2", "--enable_attention",
            "--texts_file", "texts.txt", "--prompts_file", "prompts.txt", "--max_length", "24", "--save_results",
            "--no_progress", "--bootstrap_resamples", "200", "--seq_lengths", "16"]
    p = main_here(args, tmp_path, monkeypatch, capsys)
    assert p.returncode == 0, p.stderr
    res = json.loads(next((tmp_path / "analysis_outputs").glob("*.json")).read_text())
    assert res["architecture"]["family"] == "jamba" and res["architecture"]["layer_kinds"] == KINDS["jamba"]
    statuses = {s: res[s]["status"] for s in ("delta", "causal", "attention", "sparsity", "census", "faithfulness",
                                              "comparison", "efficiency")}
    assert statuses == dict.fromkeys(statuses, "ok"), statuses
    comp = res["comparison"]["results"]
    assert [m["family"] for m in comp["models"]] == ["jamba", "mamba"]
    assert any(r["metric"].startswith("FLOPs per token") for r in comp["summary"])


def test_the_report_of_a_hybrid_whose_layers_differ_in_width(tokenizer):
    """Bamba's census has neurons of two widths (the Mamba channels, the MLP's units): the report renders,
    says each layer's own width, and leads with the layers' kinds."""
    from pipeline import Options, run_pipeline
    from report import build_report

    model = make_model("bamba")
    opts = Options(max_length=20, progress=False, layers=(0, 1), bootstrap_resamples=100,
                   prompts=("The cat sat on the mat because",))
    res = run_pipeline(model, tokenizer, ["one text here and there", "and another text", "a third one"], opts,
                       ["sparsity", "census"])
    census = res["census"]["results"]
    assert census["n_neurons"] is None and {e["n_neurons"] for e in census["layers"].values()} == {64, 48}
    assert census["layers"][1]["site_description"].startswith("the dense MLP")
    sp = {la: res["layers"][la]["sparsity"]["results"]["single"] for la in (0, 1)}
    assert (sp[0]["traditional"]["threshold"], sp[1]["traditional"]["threshold"]) == (1e-2, 1e-5)  # by neuron kind
    from utils import to_jsonable

    html, _ = build_report(to_jsonable(res))  # as main.py gives it: the results as their JSON
    assert "each layer&#x27;s own width" in html or "each layer's own width" in html
    assert "layer kinds (Bamba): 0 ssm, 1 attention, 2 ssm, 3 attention" in html


def test_a_hybrid_as_the_other_model_of_the_comparison(tokenizer):
    """A Mamba beside Nemotron-H: the attention rows are the methods both have (rollout only on the Mamba,
    said), each side's sparsity layers are those it has neurons at; at a depth where Nemotron-H's layer has
    no neurons of its own, the comparison says so."""
    from comparison_wrapper import CompareModel
    from models import LoadedModel, ModelSource
    from pipeline import Options, run_pipeline

    other = LoadedModel(make_model("nemotron_h"), tokenizer, ModelSource("nemotron_h", None, "local"))
    stages = ["causal", "attention", "sparsity", "census", "comparison"]
    texts = ["one text here and there", "and another text", "a third one"]
    kw = dict(max_length=20, progress=False, bootstrap_resamples=100, prompts=("The cat sat on the mat because",),
              causal_dims=(0, 1), seq_lengths=(16,), efficiency_budget=2.0)
    res = run_pipeline(make_model("mamba_b"), tokenizer, texts, Options(layer=0, **kw), stages,
                       compare=CompareModel(other, None))
    assert res["comparison"]["status"] == "ok", res["comparison"].get("error")
    comp = res["comparison"]["results"]
    att = comp["attention"]
    assert "rollout" not in att["methods"] and "rollout" in att["methods_left_out"]
    label = comp["models"][1]["label"]
    assert comp["models"][1]["family"] == "nemotron_h"
    assert comp["sparsity_layers"][label] == [0]  # layers 1 (MoE) and 2 (attention) have no neurons
    assert comp["models"][1]["efficiency"]["neurons"]["layers_with_neurons"] == [0, 3, 4]
    res = run_pipeline(make_model("mamba_b"), tokenizer, texts, Options(layer=1, **kw), stages,
                       compare=CompareModel(other, None))  # depth 0.5: Nemotron-H's attention block
    assert res["comparison"]["status"] == "not_applicable" and "choose another --layer" in res["comparison"]["reason"]


def test_heads_narrower_than_the_model_and_a_site_on_some_layers(tokenizer):
    """Nemotron-H with head_dim 6 (4 heads: 24 attention dims in a 32-wide model): the attention layer's units
    and site are 24 wide. inter_layer at `ssm` runs at the layers that have it (the others said), and at the
    per-layer `neurons` site it is not applicable."""
    from pipeline import Options, run_pipeline

    model = make_model("nemotron_h:head_dim=6")
    adapter = get_adapter(model)
    assert adapter.site("attn_heads", 2).size == 24
    kw = dict(max_length=20, progress=False, bootstrap_resamples=100, prompts=("The cat sat on the mat because",))
    res = run_pipeline(model, tokenizer, ["one text here and there", "and another"], Options(layer=2, **kw),
                       ["attention"])
    r = res["attention"]["results"]
    assert r["units"]["n_units"] == 24 and r["max_reconstruction_error"] < 1e-4
    res = run_pipeline(model, tokenizer, ["one text"], Options(layer=0, causal_site="ssm", causal_dims=(3,), **kw),
                       ["causal", "inter_layer"])
    inter = res["inter_layer"]["results"]
    assert [c["layer"] for c in inter["curves"]["3"]] == [0, 4] and set(inter["layers_without_site"]) == {1, 2, 3}
    res = run_pipeline(model, tokenizer, ["one text"], Options(layer=0, causal_site="neurons", causal_dims=(3,), **kw),
                       ["causal", "inter_layer"])
    assert res["inter_layer"]["status"] == "not_applicable"


def test_a_falcon_h1_mixer_without_its_norm_has_no_gradient_method_and_says_so(tokenizer):
    from pipeline import Options, run_pipeline

    model = make_model("falcon_h1:mamba_rms_norm=False")
    opts = Options(layer=1, max_length=20, progress=False, bootstrap_resamples=100)
    r = run_pipeline(model, tokenizer, ["one text here and there", "and another"], opts,
                     ["delta", "attention"])["attention"]["results"]
    assert set(r["methods"]) == {"attention_weighted"}
    assert "gradient_guided" in r["methods_left_out"] and "mamba_rms_norm" in r["methods_left_out"]["gradient_guided"]
    assert r["attention_path"]["path"] == "attention" and "gradient_guided" in r["attention_path"]["methods_left_out"]


def test_layer_kinds_of_the_published_default_configs():
    """transformers' default configs (Jamba's is Jamba-v0.1's: attention at layer 4 of every 8; Zamba2's hybrid
    layers are its config's hybrid_layer_ids): the kinds from the config alone, no weights."""
    import transformers

    jamba = config_adapter(transformers.JambaConfig())
    assert [la for la in range(32) if jamba.layer_kind(la) == "attention"] == [4, 12, 20, 28]
    zamba = config_adapter(transformers.Zamba2Config())
    assert [la for la in range(zamba.n_layers) if zamba.layer_kind(la) == "ssm+attention"] == \
        list(transformers.Zamba2Config().hybrid_layer_ids)
    falcon = config_adapter(transformers.FalconH1Config())
    assert {falcon.layer_kind(la) for la in range(falcon.n_layers)} == {"ssm+attention"}


@pytest.mark.parametrize("kind", FAMILIES)
def test_flops_from_the_weights_are_the_matrix_products_the_forward_runs(kind):
    """Each hybrid's analytic FLOPs per token from its weights (every projection, router, shared block and
    conv; k of E experts) equal the matrix products and convolutions torch's flop counter sees in one forward
    (experts in their plain loop, so that each routed token's products are counted; the counter's convolution
    includes the k − 1 padded outputs, taken out here)."""
    from torch.utils.flop_counter import FlopCounterMode

    import efficiency as ef

    model = make_model(kind)
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")
    adapter = get_adapter(model)
    L = 16
    fl = ef.flops_per_token(adapter, L)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(_ids(L=L, b=1), use_cache=False)
    counts = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    k = adapter.mixer(next(la for la in range(adapter.n_layers) if adapter.has_ssm(la))).conv1d.kernel_size[0]
    counted = (counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) + counts.get("aten.convolution", 0) * L / (L + k - 1)) / L
    analytic = sum(x["weights"] for x in fl["per_layer"]) + fl["head"]
    print(f"{kind}: from the weights {analytic}, counted {counted:.1f} per token")
    assert analytic == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("kind", ["mamba_b", "mamba2"])
def test_the_rule_from_the_weights_gives_a_pure_familys_formula(kind):
    """On Mamba-1's and Mamba-2's layers the per-weight rule equals the pure families' written formulas."""
    import efficiency as ef

    model = make_model(kind)
    adapter = get_adapter(model)
    rule = sum(ef.layer_flops_from_weights(adapter, la, 256)["total"] for la in range(adapter.n_layers))
    formula = ef.flops_per_token(adapter, 256)
    assert rule == formula["per_layer"] * adapter.n_layers


def test_a_site_the_layer_lacks_is_one_line_before_any_stage(tokenizer, tmp_path, monkeypatch, capsys):
    """`--causal_site ssm` at an attention layer of a hybrid: exit status 2, one line naming the layer's kind
    and the layers that have the site, nothing written."""
    from test_cli import main_here

    folder = tmp_path / "bamba"
    make_model("bamba").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    p = main_here(["--model", folder, "--layer", "1", "--causal_site", "ssm", "--stages", "causal"], tmp_path,
                  monkeypatch, capsys)
    assert p.returncode == 2
    line = p.stderr.strip().splitlines()[-1]
    assert "--causal_site ssm: not at --layer 1: layer 1" in line and "kind attention" in line
    assert "choose layers among 0, 2" in line
    assert not (tmp_path / "analysis_outputs").exists()


def test_every_layer_of_a_run_is_checked_for_its_site_and_dims(tokenizer, tmp_path, monkeypatch, capsys):
    """--layers: --causal_dims beyond the site's width at any of them (Nemotron-H's neurons: 64 at layer 0, 48 at
    layer 3) is one line naming that layer; a site no layer has (Zamba2's shared attention heads) says so."""
    from test_cli import main_here

    for kind in ("nemotron_h", "zamba2"):
        make_model(kind).save_pretrained(tmp_path / kind)
        tokenizer.save_pretrained(tmp_path / kind)
    p = main_here(["--model", tmp_path / "nemotron_h", "--layers", "0", "3", "4", "--causal_site", "neurons",
                   "--causal_dims", "50", "--stages", "causal"], tmp_path, monkeypatch, capsys)
    assert p.returncode == 2 and "--causal_dims 50: out of range for site neurons of width 48 at layer 3" in p.stderr
    p = main_here(["--model", tmp_path / "zamba2", "--layers", "all", "--causal_site", "attn_heads", "--stages",
                   "causal"], tmp_path, monkeypatch, capsys)
    assert p.returncode == 2 and "no layer of this model has it" in p.stderr
    assert not (tmp_path / "analysis_outputs").exists()
