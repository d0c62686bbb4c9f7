"""FalconMamba and Mamba-2: the recomputation against plain float64 references written here, the hidden
attention against its defining formula, the streamed attention neurons against the whole-α reference path,
the gradient against central differences, and every stage of the pipeline on tiny random configs
(Mamba-2: 8 heads in 2 groups of B and C, chunks of 8 positions, shorter than the texts)."""
import pytest
import torch
import torch.nn.functional as F

from attention_neurons import MambaAttentionNeurons, attention_neurons_for
from conftest import assert_streamed_equals_reference, make_model
from delta_extraction import capture_mixer_io, mixer_internals
from models import get_adapter
from ssm import blocked_inference, gated_rms_norm, hidden_attention_heads, mamba2_projections, project_out
from utils import trace


def _ids(L=21, b=2, seed=0):
    return torch.randint(1, 300, (b, L), generator=torch.Generator().manual_seed(seed))


def _conv(v, conv):  # causal depthwise conv over time, (b, L, c) -> (b, L, c), by explicit sums
    w, L, k = conv.weight[:, 0], v.shape[1], conv.weight.shape[-1]  # (c, k)
    out = torch.zeros_like(v) + (0 if conv.bias is None else conv.bias)
    for t in range(L):
        for j in range(k):  # tap j reads position t - (k - 1 - j)
            s = t - (k - 1 - j)
            if s >= 0:
                out[:, t] += w[:, j] * v[:, s]
    return out


def falcon_reference(mixer, h):
    """FalconMamba's mixer in float64, written out: Mamba-1 with RMS-normalised dt_low, B and C."""
    e, n, r = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
    x0, z = (h @ mixer.in_proj.weight.T).split(e, dim=-1)
    x = F.silu(_conv(x0, mixer.conv1d))
    dt, B, C = (x @ mixer.x_proj.weight.T).split([r, n, n], dim=-1)
    rms = [v / torch.sqrt((v * v).mean(-1, keepdim=True) + mixer.rms_eps) for v in (dt, B, C)]
    dt, B, C = rms
    delta = torch.log1p(torch.exp(dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias))  # softplus
    A = -torch.exp(mixer.A_log)
    s = torch.zeros(h.shape[0], e, n, dtype=h.dtype)
    ys = []
    for t in range(h.shape[1]):
        s = torch.exp(delta[:, t, :, None] * A) * s + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((s * C[:, t, None, :]).sum(-1) + mixer.D * x[:, t])
    return delta, torch.stack(ys, 1) * F.silu(z) @ mixer.out_proj.weight.T


def mamba2_scan_written_out(x, delta, A, B, C, D, G: int, P: int):
    """The Mamba-2 scan head by head, position by position: x (b, L, H·P), Δ (b, L, H), A and D (H,), B and C
    (b, L, G·N) with head h reading group h // (H / G) -> y (b, L, H·P), the D skip included."""
    H, N = delta.shape[-1], B.shape[-1] // G
    y = torch.zeros_like(x)
    for hd in range(H):
        g = hd // (H // G)
        Bg, Cg = B[..., g * N:(g + 1) * N], C[..., g * N:(g + 1) * N]  # (b, L, N)
        s = torch.zeros(x.shape[0], P, N, dtype=x.dtype)
        for t in range(x.shape[1]):
            xt = x[:, t, hd * P:(hd + 1) * P]  # (b, P)
            s = torch.exp(delta[:, t, hd] * A[hd])[:, None, None] * s + \
                delta[:, t, hd, None, None] * xt[:, :, None] * Bg[:, t, None, :]
            y[:, t, hd * P:(hd + 1) * P] = (s * Cg[:, t, None, :]).sum(-1) + D[hd] * xt
    return y


def mamba2_reference(mixer, h):
    """Mamba-2's mixer in float64, written out head by head, step by step."""
    I, G, N, H, P = mixer.intermediate_size, mixer.n_groups, mixer.ssm_state_size, mixer.num_heads, mixer.head_dim
    z, xBC, dt = (h @ mixer.in_proj.weight.T).split([I, I + 2 * G * N, H], dim=-1)
    xBC = F.silu(_conv(xBC, mixer.conv1d))
    x, B, C = xBC.split([I, G * N, G * N], dim=-1)
    lo, hi = mixer.time_step_limit
    delta = torch.log1p(torch.exp(dt + mixer.dt_bias)).clamp(lo, hi)  # (b, L, H)
    y = mamba2_scan_written_out(x, delta, -torch.exp(mixer.A_log), B, C, mixer.D, G, P)
    v = y * F.silu(z)
    gs = mixer.norm.group_size
    v = torch.cat([c / torch.sqrt((c * c).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
                   for c in v.split(gs, dim=-1)], dim=-1)
    return delta, (mixer.norm.weight * v) @ mixer.out_proj.weight.T


@pytest.mark.parametrize("kind, reference", [("falcon_mamba", falcon_reference), ("mamba2", mamba2_reference)])
def test_recomputation_equals_a_float64_reference_and_the_model(kind, reference):
    model = make_model(kind).double()
    ids = _ids()
    for layer in range(model.config.num_hidden_layers):
        mixer = model.backbone.layers[layer].mixer
        h_in, real = capture_mixer_io(model, layer, ids)
        delta_ref, out_ref = reference(mixer, h_in)
        it, check = mixer_internals(model, layer, ids)
        d_rel = ((it.delta - delta_ref).abs().max() / delta_ref.abs().max()).item()
        o_rel = ((it.out - out_ref).abs().max() / out_ref.abs().max()).item()
        m_rel = ((real - out_ref).abs().max() / out_ref.abs().max()).item()
        print(f"{kind} layer {layer}: Δ {d_rel:.1e}, output {o_rel:.1e}, the model's own output {m_rel:.1e}")
        # FalconMamba's RMS norms and Mamba-2's gated norm run in float32 even in a float64 model; the
        # recomputation does the same (to match the model), the reference here does not: float32 rounding
        tol = 1e-6
        assert d_rel < (1e-12 if kind == "mamba2" else tol) and o_rel < tol and check.ok
        assert m_rel < 1e-5  # the model's norms compute in float32 even in a float64 model
    expect_delta = (2, 21, 8) if kind == "mamba2" else (2, 21, 72)  # Mamba-2: one Δ per head
    assert tuple(it.delta.shape) == expect_delta


def test_mamba2_hidden_attention_is_its_formula_and_rebuilds_the_scan():
    """α_h[i, j] = (C_i · B_j) exp(A_h Σ_{k=j+1..i} Δ_k) Δ_j (j ≤ i) by explicit loops, and
    y = α_h x + D_h x equals the model's scan output (through the gated norm and out_proj: its mixer output)."""
    model = make_model("mamba2").double()
    mixer = model.backbone.layers[1].mixer
    ids = _ids(L=11, b=1)
    h_in, real = capture_mixer_io(model, 1, ids)
    with torch.no_grad():
        x, z, delta, B, C, A, D = mamba2_projections(mixer, h_in)
        heads = dict(hidden_attention_heads(delta, A, B, C))
    H, P, L = 8, 8, 11
    for h in (0, 5, 7):
        g = h // 4
        for i in range(L):
            for j in range(L):
                want = 0.0 if j > i else float((C[0, i, g] @ B[0, j, g]) * torch.exp(A[h] * delta[0, j + 1:i + 1, h].sum())
                                               * delta[0, j, h])
                assert heads[h][0, i, j].item() == pytest.approx(want, rel=1e-12, abs=1e-300)
    y = torch.cat([heads[h] @ x[:, :, h * P:(h + 1) * P] + D[h] * x[:, :, h * P:(h + 1) * P] for h in range(H)], -1)
    out = project_out(mixer, gated_rms_norm(mixer, y, z))
    assert ((out - real).abs().max() / real.abs().max()).item() < 1e-5


def test_falcon_blocked_forward_is_the_models_own():
    """The cache-blocked forward the causal and sparsity stages run equals FalconMamba's own (its norms
    included) to float32 rounding, for one row and for a batch. Bit for bit on this project's 2-core CPU
    VMs (printed), but not by construction: its matrix products have other shapes than the model's, and on
    a GPU machine's 16-core CPU (torch 2.11) the two were not bitwise equal."""
    model = make_model("falcon_mamba")
    for b in (1, 3):
        ids = _ids(b=b)
        with torch.no_grad():
            own = model(ids, use_cache=False).logits
            with blocked_inference(model, block_elements=1 << 10):
                blocked = model(ids, use_cache=False).logits
        rel = ((own - blocked).abs().max() / own.abs().max()).item()
        print(f"b={b}: bitwise equal {torch.equal(own, blocked)}, max relative difference {rel:.1e}")
        assert rel <= 1e-6


@pytest.mark.parametrize("kind", ["falcon_mamba", "mamba2"])
def test_streamed_attention_neurons_equal_the_reference_path(kind):
    model = make_model(kind)
    an = attention_neurons_for(model)
    assert type(an) is MambaAttentionNeurons
    assert_streamed_equals_reference(an, _ids(), range(model.config.num_hidden_layers), label=kind)

@pytest.mark.parametrize("kind", ["falcon_mamba", "mamba2"])
def test_gradient_equals_central_differences(kind):
    """g = ∂ T / ∂ y at the scan output (T the default target, the text's own log-likelihood), against
    central differences through the model with the mixer's output rebuilt from a bumped y."""
    from passes import target_value

    model = make_model(kind).double()
    an = attention_neurons_for(model)
    ids, layer = _ids(L=9, b=1), 0
    g, _ = an.output_gradient(ids, layer)
    mixer = model.backbone.layers[layer].mixer
    it, _ = mixer_internals(model, layer, ids)
    rebuild = (lambda y: project_out(mixer, gated_rms_norm(mixer, y, it.z))) if kind == "mamba2" else \
        (lambda y: project_out(mixer, y * F.silu(it.z)))  # written out here, not ssm.gate_output

    def logit(y):
        with torch.no_grad(), trace(model, [an.adapter.mixer_path(layer)], retain_output=False,
                                    edit_output=lambda n, o: rebuild(y)):
            h = model.backbone(input_ids=ids, use_cache=False).last_hidden_state  # (1, L, d)
            return target_value(h @ model.lm_head.weight.T, ids, "likelihood")[0].item()  # the default target

    # the models' norms compute in float32, so the logit carries float32 rounding (noise ~1e-7 / eps), and
    # the gated norm curves sharply (error ~eps²): the eps that balances them, measured, gives central
    # differences good to about 5e-4 relative on the large entries; a wrong gradient (e.g. without the gate
    # or the norm) is off by order one
    eps = {"falcon_mamba": 1e-2, "mamba2": 1e-3}[kind]
    for i, c in [(8, int(g[0, 8].abs().argmax())), (6, int(g[0, 6].abs().argmax())), (3, 5)]:
        bump = torch.zeros_like(it.y)
        bump[0, i, c] = eps
        fd = (logit(it.y + bump) - logit(it.y - bump)) / (2 * eps)
        print(f"{kind} g[{i},{c}] autograd {g[0, i, c].item():.8e} central difference {fd:.8e}")
        assert g[0, i, c].item() == pytest.approx(fd, rel=2e-3, abs=1e-4)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("kind", ["falcon_mamba", "mamba2"])
def test_every_stage_runs_and_says_its_units(kind, tokenizer, tmp_path):
    from pipeline import ALL_STAGES, Options, run_pipeline
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    model = make_model(kind)
    opts = Options(max_length=30, plots_dir=str(tmp_path), prefix=kind, progress=False, seq_lengths=(16,),
                   efficiency_budget=3.0, prompts=("The cat sat on the mat because", "In 1870 the town"))
    stages = [s for s in ALL_STAGES if s != "comparison"]
    res = run_pipeline(model, tokenizer, read_texts_file(OFFLINE_TEXTS_PATH)[:4], opts, stages)
    for s in stages:
        assert res[s]["status"] == "ok", (s, res[s].get("error"))
    adapter = get_adapter(model)
    delta, att = res["delta"]["results"], res["attention"]["results"]
    if kind == "mamba2":
        assert delta["unit"] == "head" and delta["n_channels"] == 8
        assert att["units"]["n_heads"] == 8 and att["units"]["n_units"] == 64
        assert all(t["head"] == t["channel"] // 8 for t in att["methods"]["attention_weighted"]["top_neurons"])
    else:
        assert delta["unit"] == "channel" and delta["n_channels"] == adapter.inner_size == 72
    assert res["architecture"]["family"] == kind and res["sparsity"]["results"]["site"] == "ssm"
    assert res["cross_layer"]["results"]["max_abs_change_before_source"] == 0.0


def test_a_mamba2_beside_a_mamba1_from_the_command_line(model_dirs, tmp_path):
    """save_pretrained folders of both families through main.py: a Mamba-2 as --model, a Mamba-1 as
    --compare_model, with the attention stage and the comparison; the printed summary names the units."""
    import json

    from test_cli import run_main
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    (tmp_path / "texts.txt").write_text("\n".join(read_texts_file(OFFLINE_TEXTS_PATH)[:4]) + "\n")
    p = run_main(["--model", str(model_dirs["mamba2"]), "--compare_model", str(model_dirs["mamba_b"]),
                  "--texts_file", "texts.txt", "--max_length", "24", "--enable_attention", "--stages",
                  "delta,attention,sparsity,comparison", "--seq_lengths", "16", "--save_results", "--no_progress"],
                 tmp_path)
    assert p.returncode == 0, p.stderr
    assert "=== Mamba-2 neuron analysis" in p.stdout and "8 heads, 4 texts" in p.stdout
    res = json.loads(next((tmp_path / "analysis_outputs").glob("*.json")).read_text())
    comp = res["comparison"]["results"]
    assert [s["family"] for s in comp["models"]] == ["mamba2", "mamba"]
    assert [m["units"]["n_units"] for m in comp["attention"]["models"].values()] == [64, 72]


def test_a_transformer_beside_a_falcon_mamba_in_the_comparison(model_dirs, tokenizer, tmp_path):
    """The comparison with a FalconMamba on the other side: its sparsity at every layer, its causal impacts
    and its attention neurons at the matched layers (the other model's math through its own adapter)."""
    from pipeline import Options, run_pipeline
    from utils import OFFLINE_TEXTS_PATH, read_texts_file

    opts = Options(max_length=24, plots_dir=str(tmp_path), prefix="g", progress=False, seq_lengths=(16,),
                   efficiency_budget=3.0, compare_model=str(model_dirs["falcon_mamba"]), attention_layers=(1,))
    res = run_pipeline(make_model("gpt2"), tokenizer, read_texts_file(OFFLINE_TEXTS_PATH)[:3], opts,
                       ["causal", "attention", "sparsity", "comparison"])
    assert res["comparison"]["status"] == "ok", res["comparison"].get("error")
    comp = res["comparison"]["results"]
    assert [s["family"] for s in comp["models"]] == ["gpt2", "falcon_mamba"]
    assert set(comp["models"][1]["sparsity_by_layer"]) == {0, 1, 2}
    other = comp["models"][1]["label"]
    assert comp["causal"][other]["site"] == "mixer_out" and len(comp["causal"][other]["scores"]) == 24
    att = comp["attention"]["models"]
    assert att[other]["layers"] == [0, 2] and att[other]["units"]["n_units"] == 72  # depths 0 and 1 of 3 layers
    assert all(e["max_reconstruction_error"] < 1e-4 for e in att[other]["by_layer"].values())
