"""Adapters (sites and sizes for every family) and model loading errors."""
import time

import numpy as np
import pytest
import torch

from conftest import kl_with_input_zeroed, make_model
from models import get_adapter, load_model_and_tokenizer
from utils import UserInputError, trace

FAMILIES = {"mamba_a": "mamba", "gpt2": "gpt2", "gpt_neox": "gpt_neox"}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_site_exists_fires_and_has_the_declared_width(kind):
    model = make_model(kind)
    adapter = get_adapter(model)
    assert adapter.family == FAMILIES[kind]
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for layer in range(adapter.n_layers):
        sites = [adapter.site(name, layer) for name in adapter.sites]
        with torch.no_grad(), trace(model, [s.path for s in sites], retain_input=True) as tr:
            out = model(ids, output_hidden_states=True)
        for s in sites:
            t = tr[s.path]
            value = t.input if s.capture == "input" else t.output
            assert value.shape == (1, 5, s.size), (s, value.shape)
        residual = tr[adapter.site("residual", layer).path].output
        if layer < adapter.n_layers - 1:  # the last entry is after the final norm in GPT-2 / NeoX
            offset = 0 if adapter.is_ssm else 1
            torch.testing.assert_close(residual, out.hidden_states[layer + offset])


def test_mamba_ssm_site_is_the_gated_scan_output():
    from delta_extraction import mixer_internals

    model = make_model("mamba_b")
    adapter = get_adapter(model)
    ids = torch.tensor([[7, 7, 2, 9, 4, 4]])
    internals, _ = mixer_internals(model, 1, ids)
    site = adapter.site("ssm", 1)
    with torch.no_grad(), trace(model, [site.path], retain_input=True, retain_output=False) as tr:
        model(ids)
    torch.testing.assert_close(tr[site.path].input, internals.u, rtol=1e-5, atol=1e-6)


def test_layer_out_of_range_names_the_valid_range():
    adapter = get_adapter(make_model("mamba_b"))
    with pytest.raises(UserInputError, match=r"valid layers are 0\.\.2"):
        adapter.check_layer(3)
    with pytest.raises(UserInputError):
        adapter.check_layer(-1)


def test_load_local_folder(model_dirs):
    model, tokenizer, source = load_model_and_tokenizer(str(model_dirs["mamba_b"]), "cpu", "bfloat16")
    assert type(model).__name__ == "MambaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert source.origin == "local" and source.resolved_path == str(model_dirs["mamba_b"].resolve())
    assert tokenizer("hello world")["input_ids"]


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="no such folder"):
        load_model_and_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(UserInputError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(UserInputError, match="hub is unreachable"):
        load_model_and_tokenizer("nobody-has/this-model-xyz")
    assert time.perf_counter() - t0 < 5


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match="'llama' is not supported.*GPT-2"):
        load_model_and_tokenizer(str(tmp_path))


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "mamba_a"])
def test_the_block_write_site_is_output_minus_input_and_the_sum_of_the_parts(kind):
    """Each family's site of kind "write" is what the block adds to the residual stream: residual − the
    block's input; on GPT-2 and GPT-NeoX (parallel residual) it equals attn_out + mlp_out to float rounding."""
    model = make_model(kind)
    adapter = get_adapter(model)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    name = adapter.site_of_kind("write")
    assert name == ("mixer_out" if adapter.is_ssm else "block_out")
    assert adapter.site_of_kind("residual") == "residual" and adapter.site_of_kind("inner") == (
        "ssm" if adapter.is_ssm else "mlp")
    for layer in range(adapter.n_layers):
        w, res = adapter.site(name, layer), adapter.site("residual", layer)
        parts = [adapter.site(p, layer) for p in ("attn_out", "mlp_out")] if not adapter.is_ssm else []
        paths = list(dict.fromkeys([w.path, res.path, *(p.path for p in parts)]))
        with torch.no_grad(), trace(model, paths, retain_input=True) as tr:
            model(ids)
        torch.testing.assert_close(tr[w.path].output, tr[res.path].output - tr[res.path].input, rtol=1e-5, atol=1e-6)
        if parts:
            torch.testing.assert_close(tr[w.path].output, tr[parts[0].path].output + tr[parts[1].path].output,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
def test_ablating_block_out_through_the_causal_machinery_equals_an_independent_recomputation(kind, tokenizer):
    """causal_analysis ablates block_out with its own ablator (unchanged): dim k at scale 0 gives
    KL(p_clean ‖ p_ablated) equal to that of a forward with a plain hook setting the block's output to its
    input at dim k (out'[k] = in[k])."""
    import causal_analysis as ca

    model = make_model(kind)
    adapter = get_adapter(model)
    prompt, layer, k = "The cat sat on the mat because", 1, 7
    got = ca.causal_impact_scores(model, tokenizer, [prompt], layer, site="block_out", dims=[k], progress=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    block = model.get_submodule(adapter.layer_path(layer))

    def independent(module, args, kwargs, output):
        out = output.clone()
        out[..., k] = args[0][..., k]
        return out

    with torch.no_grad():
        clean = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
        handle = block.register_forward_hook(independent, with_kwargs=True)
        try:
            ablated = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
        finally:
            handle.remove()
    kl = float((clean.exp() * (clean - ablated)).sum())
    assert kl > 0
    assert float(np.asarray(got).ravel()[0]) == pytest.approx(kl, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
def test_ablating_the_attention_units_equals_an_independent_recomputation(kind, tokenizer):
    """attn_heads is the attention neurons' unit space (the output projection's input, the heads'
    concatenated A v): the causal machinery's zero ablation of dim k gives the KL of a forward with a plain
    pre-hook zeroing that input's dim k, and its path is the one the attention stage reads."""
    import causal_analysis as ca

    model = make_model(kind)
    adapter = get_adapter(model)
    prompt, layer, k = "The cat sat on the mat because", 1, 5
    assert adapter.site("attn_heads", layer).path == adapter.attention_paths(layer).out_proj
    assert adapter.site("attn_heads", layer).size == adapter.hidden_size
    proj = model.get_submodule(adapter.attention_paths(layer).out_proj)
    with torch.no_grad():  # make dim k matter (GPT-2's Conv1D weight is (in, out), GPT-NeoX's Linear (out, in))
        (proj.weight[k] if kind == "gpt2" else proj.weight[:, k]).mul_(50.0)
    got = ca.causal_impact_scores(model, tokenizer, [prompt], layer, site="attn_heads", dims=[k], progress=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = kl_with_input_zeroed(model, proj, ids, [k])
    print(f"{kind}: machinery {got[0]:.6e}, independent {expected:.6e}")
    assert expected > 0 and got[0] == pytest.approx(expected, rel=1e-4, abs=1e-10)
