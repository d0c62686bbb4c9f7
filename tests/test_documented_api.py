"""The design documents' Python API, run as written on the shipped reference Mamba (issue 28): each snippet
verbatim, then what its names hold checked against the primary names'."""
from pathlib import Path

import pytest
import torch
from conftest import make_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = REPO / "reference_models" / "mamba"
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_attention_snippets_verbatim(reference):
    model, tokenizer = reference
    sample_input = tokenizer("The river rose slowly through the night.", return_tensors="pt")
    inputs, layer_indices, layer_idx = sample_input, [0, 1, 2], 1

    # --- the documents, as written ---
    from attention_neurons import integrate_mamba_attention_neurons, MambaAttentionNeurons
    results = integrate_mamba_attention_neurons(model, sample_input, layer_indices=[0, 1, 2],
                                                methods=['attention_weighted', 'gradient_guided'])
    attention_data = results['attention_data']
    mamba_neurons = results['mamba_neurons']
    analysis_results = results['analysis_results']
    mamba_analyzer = MambaAttentionNeurons(model)
    attention_data = mamba_analyzer.extract_attention_vectors(inputs, layer_indices)
    mamba_neurons = mamba_analyzer.create_mamba_neurons(attention_data, method='attention_weighted')
    analysis = mamba_analyzer.analyze_neuron_behavior(mamba_neurons, layer_idx)
    # --- end of the documents ---

    from attention_neurons import integrate_attention_neurons

    assert integrate_mamba_attention_neurons is integrate_attention_neurons  # one function, two names
    assert results["mamba_neurons"] is results["neurons"]
    assert set(results["mamba_neurons"]) == {"attention_weighted", "gradient_guided"}
    assert set(analysis_results["gradient_guided"]) == {0, 1, 2}
    e, L = model.config.intermediate_size, sample_input["input_ids"].shape[1]
    assert attention_data[0]["attention_matrix"].shape == (1, e, L, L)  # (b, e, L, L): α per channel
    primary = mamba_analyzer.create_neurons(attention_data, "attention_weighted")
    for la in layer_indices:
        torch.testing.assert_close(torch.as_tensor(mamba_neurons[la].neuron_activations),
                                   torch.as_tensor(primary[la].neuron_activations), rtol=0, atol=0)
        # the stage's reference path gives the same neurons
        torch.testing.assert_close(torch.as_tensor(mamba_neurons[la].neuron_activations),
                                   torch.as_tensor(results["neurons"]["attention_weighted"][la].neuron_activations))
    assert analysis["layer"] == layer_idx and analysis["num_neurons"] == e


def test_mamba_names_say_they_are_mambas():
    """The documented Mamba class on a Transformer says it is Mamba's and names the family-neutral entry; the
    documented functions take every family."""
    from attention_neurons import MambaAttentionNeurons, integrate_mamba_attention_neurons
    from models import NotApplicable

    gpt2 = make_model("gpt2")
    with pytest.raises(NotApplicable, match="MambaAttentionNeurons is the Mamba analyser.*attention_neurons_for"):
        MambaAttentionNeurons(gpt2)
    ids = torch.randint(0, gpt2.config.vocab_size, (1, 6))
    res = integrate_mamba_attention_neurons(gpt2, {"input_ids": ids}, layer_indices=[0], methods=["attention_weighted"])
    neurons = res["analyzer"].create_mamba_neurons(res["attention_data"], method="attention_weighted")
    assert neurons[0].neuron_activations.shape == (gpt2.config.n_embd,)  # a Transformer's attention-output dims


def test_library_call_verbatim(reference, tmp_path, monkeypatch):
    """`run_comprehensive_analysis(model, tokenizer, texts, layer_idx=0)` as written: the command line's default
    stages with attention, no model it was not given (the comparison is left out, saying why), no plot
    anywhere (run from an empty folder), and the documented view of the results. (The default prompts cut to
    three and the efficiency budget to 1 s, for the suite's time.)"""
    model, tokenizer = reference
    texts = ["The river rose slowly through the night.", "She opened the window and the cold came in."]
    monkeypatch.chdir(tmp_path)
    import causal_analysis
    import comparison_wrapper

    monkeypatch.setattr(causal_analysis, "DEFAULT_PROMPTS", causal_analysis.DEFAULT_PROMPTS[:3])  # the suite's time
    import functools

    import pipeline

    monkeypatch.setattr(pipeline, "Options", functools.partial(pipeline.Options, efficiency_budget=1.0))  # likewise

    monkeypatch.setattr(comparison_wrapper, "load_compare_model", lambda *a, **k: pytest.fail("loaded a model"))

    # --- the documents, as written ---
    from main import run_comprehensive_analysis
    results = run_comprehensive_analysis(model, tokenizer, texts, layer_idx=0)
    attention_results = results['analysis_results']['attention_neurons']
    # --- end of the documents ---

    assert list(tmp_path.iterdir()) == []  # nothing written
    from pipeline import ALL_STAGES

    assert "comparison" not in results and "compare_model" in results["stages_left_out"]["comparison"]
    for name in ALL_STAGES[:-1]:  # every other stage, attention included
        assert results[name]["status"] in ("ok", "not_applicable"), (name, results[name])
        assert results[name]["plots"] == [] if results[name]["status"] == "ok" else True
    assert attention_results is results["attention"]["results"]
    assert results["analysis_results"]["delta"] is results["delta"]["results"]
    assert attention_results["layer"] == 0 and set(attention_results["methods"]) == set(
        ("attention_weighted", "gradient_guided", "rollout"))


def test_library_refuses_a_comparison_without_its_model(tokenizer):
    from pipeline import run_comprehensive_analysis
    from utils import UserInputError

    with pytest.raises(UserInputError, match="comparison stage: its other model was not given.*compare_model"):
        run_comprehensive_analysis(make_model("mamba_a"), tokenizer, ["one text", "two texts"],
                                   stages=["comparison"])
    with pytest.raises(TypeError, match="layer or layer_idx"):
        run_comprehensive_analysis(make_model("mamba_a"), tokenizer, ["one text"], stages=["delta"], layer=0,
                                   layer_idx=0)


def test_readme_library_block_runs_from_another_folder(tmp_path):
    """README's "As a library" block, as written, in a fresh Python started outside the clone (the install
    makes the modules importable anywhere); its run writes nothing there. Stages cut to attention for the
    suite's time (the block's call is `run_comprehensive_analysis(..., layer=0)`, tested in full above)."""
    import re
    import subprocess
    import sys

    block = re.search(r"## As a library\n\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    code = block.replace("layer=0)", "layer=0, stages=['attention'])", 1)
    assert code != block
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
