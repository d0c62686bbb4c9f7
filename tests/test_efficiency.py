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
