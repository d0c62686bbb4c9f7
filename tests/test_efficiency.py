"""Efficiency: parameter counts, analytic FLOPs by hand, measured scaling curve with its limits."""
import numpy as np
import pytest

import efficiency as ef
from conftest import DEVICE, make_model
from models import get_adapter


@pytest.mark.parametrize("kind", ["mamba_b", "gpt2", "gpt_neox"])
def test_parameter_counts_add_up(kind):
    model = make_model(kind)
    p = ef.parameter_counts(model, get_adapter(model))
    unique = {t.data_ptr(): t.numel() for t in model.parameters()}
    assert p["total"] == sum(unique.values())
    assert p["embeddings"] + p["layers"] + p["final_norm"] + p["lm_head"] + p["other"] == p["total"]
    assert p["other"] == 0
    assert sum(p["layer0_components"].values()) == p["per_layer"]
    tied = kind != "gpt_neox"  # Mamba and GPT-2 tie the head to the embeddings by default
    assert p["tied_embeddings"] == tied and (p["lm_head"] == 0) == tied


def test_flops_per_token_by_hand():
    m = make_model("mamba_a")  # d 16, e 32, n 4, k 4, r = ceil(16/16) = 1, 2 layers, V 300
    f = ef.flops_per_token(get_adapter(m), 100)
    d, e, n, k, r, V = 16, 32, 4, 4, 1, 300
    layer = 2 * d * 2 * e + 2 * k * e + 2 * e * (r + 2 * n) + 2 * r * e + 7 * e * n + 3 * e + 2 * e * d
    assert f["per_layer"] == layer and f["total"] == 2 * layer + 2 * d * V
    g = make_model("gpt2")  # d 32, f 128, 2 layers: attention grows with the context, Mamba's does not
    a, b = ef.flops_per_token(get_adapter(g), 100), ef.flops_per_token(get_adapter(g), 200)
    assert b["per_layer"] - a["per_layer"] == 2 * 32 * 100
    assert a["per_layer"] == 6 * 32 * 32 + 2 * 32 * 101 + 2 * 32 * 32 + 4 * 32 * 128
    assert ef.flops_per_token(get_adapter(m), 200)["total"] == f["total"]
    m2 = make_model("mamba2")  # d 32, I 64 = 8 heads x 8, G 2, N 8, k 4, 2 layers, V 300
    f2 = ef.flops_per_token(get_adapter(m2), 100)
    mixer = m2.backbone.layers[0].mixer
    weights = mixer.in_proj.weight.numel() + mixer.conv1d.weight.numel() + mixer.out_proj.weight.numel()
    assert weights == 32 * (2 * 64 + 2 * 2 * 8 + 8) + (64 + 2 * 2 * 8) * 4 + 64 * 32  # the formula's shapes
    assert f2["per_layer"] == 2 * weights + 6 * 64 * 8 + 2 * 8 + 3 * 64  # a multiply-add per weight, then the scan
    assert f2["total"] == 2 * f2["per_layer"] + 2 * 32 * 300


def test_scaling_curve_limits_and_memory_growth():
    m = make_model("gpt2").to(DEVICE)  # 512 positions
    adapter = get_adapter(m)
    curve = ef.scaling_curve(m, adapter, np.arange(50), seq_lengths=(16, 64, 256, 1024), efficiency_budget=60, repeats=1)
    assert [p["seq_len"] for p in curve["points"]] == [16, 64, 256]
    assert curve["skipped"] == [{"seq_len": 1024, "reason": "beyond the model's 512 positions"}]
    mem = [p["peak_memory_bytes"] for p in curve["points"]]
    assert 0 < mem[0] < mem[1] < mem[2]  # activations grow with the length
    assert all(p["time_s"] > 0 and p["flops_per_token"] > 0 for p in curve["points"])
    # a budget already spent: the first length is measured, the rest are skipped with the reason
    tight = ef.scaling_curve(m, adapter, np.arange(50), seq_lengths=(16, 32, 64), efficiency_budget=1e-9, repeats=1)
    assert len(tight["points"]) == 1 and all("budget" in s["reason"] for s in tight["skipped"])


def test_peak_memory_counts_a_known_allocation():
    """A module whose forward allocates one float32 (1000, 1000) buffer: the peak is at least 4 MB,
    and close to it."""
    import torch

    class Alloc(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            buf = torch.ones(1000, 1000, device=input_ids.device)
            return buf.sum()

    peak = ef.peak_forward_memory(Alloc(), torch.zeros(1, 3, dtype=torch.long, device=DEVICE))
    assert 4_000_000 <= peak < 4_100_000


@pytest.mark.parametrize("kind", ["mamba_b", "gpt2"])
def test_a_length_that_cannot_fit_is_skipped_before_it_runs(kind):
    """The memory estimate bounds what was measured, and a length far beyond the machine's memory is
    skipped with the estimate as its reason (never run, so never an out-of-memory kill)."""
    model = make_model(kind).to(DEVICE)
    adapter = get_adapter(model)
    r = ef.scaling_curve(model, adapter, np.arange(50), [10 ** 12, 64, 256, 256], efficiency_budget=60)
    assert [p["seq_len"] for p in r["points"]] == [64, 256]  # sorted, repeats once
    for p in r["points"]:
        assert p["peak_memory_bytes"] <= ef.forward_bytes_estimate(adapter, p["seq_len"])
    (skip,) = r["skipped"]
    assert skip["seq_len"] == 10 ** 12
    assert ("positions" in skip["reason"]) if adapter.max_positions else ("estimated" in skip["reason"])


# --------------------------------------------------------------------------------------------------
# What is timed: the implementation, the fast-scan curve and its logits check, the achieved GFLOP/s
# --------------------------------------------------------------------------------------------------
def _kernels_in_use(model) -> bool:
    """mamba-ssm's scan resolved by transformers and the model on CUDA (never on the project's CPU VMs)."""
    import importlib.util

    return next(model.parameters()).device.type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None


@pytest.mark.parametrize("kind", ["mamba_b", "falcon_mamba", "mamba2", "gpt2"])
def test_the_timed_implementation_is_named(kind):
    model = make_model(kind).to(DEVICE)
    impl = ef.timed_implementation(model, get_adapter(model))
    assert impl["device"] == str(DEVICE)
    if kind == "gpt2":
        assert impl["attn_implementation"] == model.config._attn_implementation
        assert impl["per_position_loop"] is False and f"'{model.config._attn_implementation}'" in impl["description"]
    elif _kernels_in_use(model):
        assert impl["name"] == "CUDA kernels" and impl["per_position_loop"] is False
    elif kind == "mamba2":  # transformers' PyTorch chunked scan: no loop over positions
        assert impl["name"] == "transformers chunked scan" and impl["per_position_loop"] is False
    else:  # transformers' slow path, read from the kernel functions it resolved (their PyTorch bodies)
        assert impl["name"] == "transformers slow path" and impl["per_position_loop"] is True
        assert "modeling_" in impl["detected_by"] and "mamba_selective_scan" in impl["detected_by"]


@pytest.mark.parametrize("method", ["slow_forward", "cuda_kernels_forward"])
def test_older_transformers_mixer_method_is_probed(method):
    """transformers before the per-function fallbacks: the mixer's forward chose between
    cuda_kernels_forward and slow_forward; the method it calls is what was timed (a planted mixer subclass
    in the older layout, whose forward picks `method`)."""
    model = make_model("mamba_a")
    mixer = model.backbone.layers[0].mixer
    base = type(mixer)

    class OldMixer(base):
        def forward(self, hidden_states, *args, **kwargs):
            return getattr(self, method)(hidden_states, *args, **kwargs)

        def cuda_kernels_forward(self, hidden_states, *args, **kwargs):
            return base.forward(self, hidden_states, *args, **kwargs)

        slow_forward = cuda_kernels_forward

    mixer.__class__ = OldMixer
    impl = ef.timed_implementation(model, get_adapter(model))
    assert ("slow_forward" in impl["description"]) == (method == "slow_forward")
    assert impl["per_position_loop"] is (method == "slow_forward")
    assert "slow_forward" not in mixer.__dict__ and "cuda_kernels_forward" not in mixer.__dict__  # restored


def test_fast_scan_curve_beside_the_models_own():
    """A Mamba-1 model: its own forward and the fast scan, both at every length, the fast scan's logits
    checked at each against the model's own (tiny model: far inside the tolerance); the achieved GFLOP/s
    is the analytic FLOPs over the measured time; on a CPU neither curve reflects the architecture and the
    fast scan is named as the closer one."""
    model = make_model("mamba_b").to(DEVICE)
    adapter = get_adapter(model)
    r = ef.scaling_curves(model, adapter, np.arange(50), seq_lengths=(8, 16), efficiency_budget=60, repeats=1)
    own, fast = r["scaling"], r["scaling_fast_scan"]
    assert [p["seq_len"] for p in own["points"]] == [p["seq_len"] for p in fast["points"]] == [8, 16]
    assert fast["implementation"]["name"] == "project fast scan"
    chk = fast["logits_check"]
    assert chk["ok"] and chk["failed_at"] is None and chk["lengths_checked"] == [8, 16] and chk["lengths_unchecked"] == []
    assert chk["tolerance"] == ef.fast_scan_tolerance(model.dtype) == 1e-3
    assert 0 <= chk["max_relative_diff"] < 1e-5 and chk["max_abs_diff"] >= 0
    for p in own["points"] + fast["points"]:
        assert p["achieved_gflops_per_s"] == pytest.approx(p["flops_per_token"] * p["seq_len"] / p["time_s"] / 1e9)
        assert (p["aten_ops"] is None) == (DEVICE.type == "cuda")
    assert own["budget_share_s"] == fast["budget_share_s"] == 30 and r["timing_budget"]["total_s"] == 60
    summary = ef.efficiency_summary({"parameters": ef.parameter_counts(model, adapter),
                                     "neurons": ef.neuron_counts(adapter), **r})
    if not _kernels_in_use(model):  # the slow path loops over positions, the fast scan runs them in chunks
        assert r["architecture_curve"]["curve"] == "scaling_fast_scan" and r["architecture_curve"]["exact"] is True
        assert "in chunks of positions, no Python loop over them" in r["architecture_curve"]["reason"]
        assert own["points"][0]["aten_ops"] > fast["points"][0]["aten_ops"]  # the slow path's loop dispatches more
        assert "reflects the architecture" in summary and ef._arch_mark(r) == " (architecture)"
    else:
        assert r["architecture_curve"]["exact"] is True and "reflects the architecture" in summary
    assert "project fast scan" in summary


def test_a_fast_scan_that_differs_is_an_error_not_a_timing(monkeypatch):
    """A fast scan planted to scale each mixer's output by 1.5: the logits check fails at the first length,
    the curve is an error with no points, and no curve is said to reflect the architecture."""
    import ssm

    real = ssm.mixer_forward
    monkeypatch.setattr(ssm, "mixer_forward", lambda *a, **k: 1.5 * real(*a, **k))
    model = make_model("mamba_b").to(DEVICE)
    r = ef.scaling_curves(model, get_adapter(model), np.arange(50), seq_lengths=(8, 16), efficiency_budget=60,
                          repeats=1)
    fast = r["scaling_fast_scan"]
    assert fast["points"] == [] and "L=8" in fast["error"] and "not timed" in fast["error"]
    failed = fast["logits_check"]["failed_at"]
    assert fast["logits_check"]["ok"] is False and failed["seq_len"] == 8 and failed["relative_diff"] > 1e-3
    assert fast["skipped"] == []  # stopped by the error, not skipped
    assert [p["seq_len"] for p in r["scaling"]["points"]] == [8, 16]  # the model's own curve is unaffected
    if not _kernels_in_use(model):
        assert r["architecture_curve"]["curve"] is None


def test_a_transformer_has_one_curve_with_the_whole_budget():
    model = make_model("gpt2").to(DEVICE)
    r = ef.scaling_curves(model, get_adapter(model), np.arange(50), seq_lengths=(16,), efficiency_budget=7, repeats=1)
    assert r["scaling_fast_scan"] is None and r["scaling"]["budget_share_s"] == 7
    assert r["scaling"]["implementation"]["attn_implementation"] == model.config._attn_implementation
    assert r["architecture_curve"]["curve"] == "scaling"


def test_the_budget_stops_each_curve_after_its_first_length():
    """A budget already spent: each curve measures its first length, then stops; the skips say so."""
    model = make_model("mamba_b").to(DEVICE)
    r = ef.scaling_curves(model, get_adapter(model), np.arange(50), seq_lengths=(4, 8, 16), efficiency_budget=1e-9,
                          repeats=1)
    for key in ("scaling", "scaling_fast_scan"):
        assert [p["seq_len"] for p in r[key]["points"]] == [4]
        assert [s["seq_len"] for s in r[key]["skipped"]] == [8, 16] and all("budget" in s["reason"]
                                                                            for s in r[key]["skipped"])


@pytest.mark.parametrize("active, informative", [("all", False), ("some", True), ("none", False)])
def test_an_efficiency_ratio_of_exactly_one_or_zero_is_flagged(active, informative):
    """The ratio at exactly 1 (every neuron above the threshold) or 0 (none) says where the threshold sits,
    not what the model does: flagged, with the threshold in the note and the summary."""
    model = make_model("mamba_a")  # 32 neurons per layer
    adapter = get_adapter(model)
    means = {"all": np.full(32, 0.5), "some": np.r_[np.full(8, 0.5), np.full(24, 0.001)], "none": np.zeros(32)}[active]
    stats = {"neuron_mean_abs": means, "traditional": {"threshold": 0.01}, "layer": 0,
             "activation_variance": {"mean": 1.0}, "gini": 0.1, "hoyer": 0.1, "entropy": {"sparsity": 0.5}}
    n = ef.neuron_counts(adapter, stats)
    assert n["efficiency_ratio"] == {"all": 1.0, "some": 0.25, "none": 0.0}[active]
    assert n["efficiency_ratio_informative"] is informative
    assert (n["efficiency_ratio_note"] is None) == informative
    summary = ef.efficiency_summary({"parameters": ef.parameter_counts(model, adapter), "neurons": n,
                                     "scaling": {"points": [], "skipped": []},
                                     "architecture_curve": {"curve": None, "reason": "none measured"},
                                     "timing_budget": {"total_s": 1, "spent_s": 0, "rule": "r"}})
    assert ("uninformative at threshold 0.01" in summary) is not informative
    if not informative:
        assert n["efficiency_ratio_note"].startswith("uninformative at threshold 0.01")
