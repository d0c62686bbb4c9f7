"""Adapters (sites and sizes for every family) and model loading errors."""
import time

import pytest
import torch

from conftest import make_model
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
