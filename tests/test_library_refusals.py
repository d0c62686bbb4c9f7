"""The library entry points refuse what they cannot answer with a ValueError that names the argument and
the value, before any forward pass of the model (a pre-hook on the model counts the forwards)."""
import contextlib

import numpy as np
import pytest
import torch

import attention_neurons as an
import causal_analysis as ca
import delta_extraction as de
import efficiency as ef
import sparsity as sp
from conftest import make_model
from models import get_adapter

PROMPT = "The capital of France is"


@contextlib.contextmanager
def no_forward(model):
    """Fails the test if the model runs a forward inside the block."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        yield
    finally:
        handle.remove()
    assert not calls, f"{len(calls)} forward(s) ran before the refusal"


def refused(model, message, f, *args, **kwargs):
    with no_forward(model), pytest.raises(ValueError, match=message):
        f(*args, **kwargs)


@pytest.fixture(scope="module")
def mamba():
    return make_model("mamba_b")  # 3 layers, d 24, e 72


@pytest.fixture(scope="module")
def ids(tokenizer):
    return [tokenizer(t, return_tensors="pt").input_ids for t in ("The cat sat on the mat.", "A longer text, too.")]


# --------------------------------------------------------------------------------------------------
# causal_analysis
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": PROMPT}, "prompts must be a list of strings, not a single string"),  # not 24 one-letter prompts
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": [PROMPT, 3]}, "prompts must be strings; got an item of type int"),
    ({"dims": [1.5]}, r"dims item 1\.5: must be a whole number"),  # not truncated to 1
    ({"dims": [True]}, "dims item True: must be a whole number"),
    ({"dims": [-1]}, r"dims must lie in 0\.\.23"),
    ({"dims": 3}, "must be a list of whole numbers"),
    ({"dims": []}, "dims is empty"),
    ({"layer_idx": True}, "layer_idx True: must be a whole number"),
    ({"layer_idx": 1.0}, r"layer_idx 1\.0: must be a whole number"),
    ({"layer_idx": -1}, r"layer_idx -1: must be in 0\.\.2"),
    ({"layer_idx": 3}, r"layer_idx 3: must be in 0\.\.2"),
    ({"intervention_scale": True}, "intervention_scale True: must be a finite number"),
    ({"intervention_scale": "0"}, "intervention_scale '0': must be a finite number"),
    ({"intervention_scale": float("inf")}, "intervention_scale inf"),
    ({"batch_size": True}, "batch_size True"),
    ({"batch_size": 0}, "batch_size 0: must be at least 1"),
])
def test_causal_impact_scores_refusals(mamba, tokenizer, kwargs, message):
    args = {"prompts": [PROMPT], "layer_idx": 0, **kwargs}
    refused(mamba, message, ca.causal_impact_scores, mamba, tokenizer, args.pop("prompts"), args.pop("layer_idx"),
            progress=False, **args)


@pytest.mark.parametrize("top_k", [-1, 0, True, 2.0])
def test_find_causal_neurons_refuses_a_bad_top_k(mamba, tokenizer, top_k):
    """top_k = -1 once listed every dimension but one."""
    refused(mamba, f"top_k {top_k!r}", ca.find_causal_neurons, mamba, tokenizer, [PROMPT], 0, top_k=top_k,
            progress=False)


def test_find_causal_neurons_ranks_each_distinct_dim_once(mamba, tokenizer):
    got = ca.find_causal_neurons(mamba, tokenizer, [PROMPT], 1, top_k=5, dims=[7, 2, 7, 2], progress=False)
    assert sorted(d for d, _ in got) == [2, 7]
    scores = ca.causal_impact_scores(mamba, tokenizer, [PROMPT], 1, dims=[2, 7], progress=False)
    assert dict(got) == pytest.approx({2: scores[0], 7: scores[1]}, rel=1e-12)


@pytest.mark.parametrize("layers, message", [
    ([0, 0], "a layer is given more than once"), (1, "must be a list of layer indices"),
    ([True], "layers True"), ([], "layers is empty"), ([0, 3], r"layers 3: must be in 0\.\.2"),
    ("01", "must be a list of layer indices")])
def test_causal_impact_by_layer_refuses_bad_layers(mamba, tokenizer, layers, message):
    refused(mamba, message, ca.causal_impact_by_layer, mamba, tokenizer, [PROMPT], layers, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": [PROMPT]}, "prompt must be one string"),
    ({"dims": [1.5]}, r"dims item 1\.5"), ({"dims": [24]}, r"dims must lie in 0\.\.23"),
    ({"sources": [True]}, "sources True"), ({"sources": [5]}, "sources 5"), ({"sources": []}, "sources is empty"),
    ({"batch_size": 0}, "batch_size 0"), ({"intervention_scale": float("nan")}, "intervention_scale nan")])
def test_cross_layer_matrix_refusals(mamba, tokenizer, kwargs, message):
    args = {"prompt": PROMPT, "dims": [1], **kwargs}
    refused(mamba, message, ca.cross_layer_matrix, mamba, tokenizer, args.pop("prompt"), args.pop("dims"),
            "residual", **args)


def test_cross_layer_matrix_measures_a_repeated_dim_once_and_returns_it_where_asked(mamba, tokenizer):
    once = ca.cross_layer_matrix(mamba, tokenizer, PROMPT, [5, 2], "residual")
    twice = ca.cross_layer_matrix(mamba, tokenizer, PROMPT, [2, 5, 2], "residual")
    assert twice["dims"].tolist() == [2, 5, 2]
    for key in ("clean", "ablated", "change"):
        np.testing.assert_array_equal(twice[key], once[key][[1, 0, 1]])


@pytest.mark.parametrize("f, args, message", [
    (ca.cross_layer_causal_influence, (PROMPT, 1, 0, -1), "target_layer -1"),
    (ca.cross_layer_causal_influence, (PROMPT, 1, 0, True), "target_layer True"),
    (ca.inter_layer_causal_impact_all_layers, (PROMPT, 1.5), r"dim 1\.5"),
    (ca.inter_layer_causal_impact_all_layers, ([PROMPT], 1), "prompt must be one string")])
def test_single_prompt_causal_functions_refuse(mamba, tokenizer, f, args, message):
    refused(mamba, message, f, mamba, tokenizer, *args)


# --------------------------------------------------------------------------------------------------
# delta_extraction
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("texts_ids, layers, message", [
    ("ids_tensor", [0], "must be a list of .1, L. token-id tensors"),  # a bare tensor is not a list of texts
    ("empty", [0], "texts_ids is empty"),
    ("one", [0], "needs at least 2 texts"),
    ("float", [0], "integer tensor of token ids"),
    ("no_tokens", [0], "has no tokens"),
    ("ok", [True], "layers True"), ("ok", [9], "layers 9"), ("ok", [], "layers is empty"), ("ok", 0, "list of layer")])
def test_delta_statistics_refusals(mamba, tokenizer, ids, texts_ids, layers, message):
    texts_ids = {"ids_tensor": torch.cat([ids[0][:, :5], ids[1][:, :5]]), "one": ids[:1], "ok": ids,
                 "float": [ids[0].float(), ids[1]], "no_tokens": [ids[0], ids[1][:, :0]], "empty": []}[texts_ids]
    refused(mamba, message, de.delta_statistics_by_layer, mamba, tokenizer, texts_ids, layers, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"texts": "The cat sat on the mat."}, "texts must be a list of strings, not a single string"),
    ({"texts": []}, "texts is empty"), ({"top_k": -1}, "top_k -1"), ({"max_length": 0}, "max_length 0"),
    ({"layer_idx": 1.5}, r"layer_idx 1\.5"), ({"texts": ["one text"]}, "needs at least 2 texts")])
def test_find_delta_sensitive_neurons_refusals(mamba, tokenizer, kwargs, message):
    args = {"texts": ["The cat sat.", "A dog ran."], **kwargs}
    refused(mamba, message, de.find_delta_sensitive_neurons, mamba, tokenizer, args.pop("texts"), **args)


def test_delta_top_refuses_a_bad_k(mamba, tokenizer, ids):
    stats = de.delta_channel_statistics(mamba, tokenizer, ids, 0, progress=False)
    for k in (-1, 0, True, 1.5):
        with pytest.raises(ValueError, match="top_k"):
            stats.top(k)
    assert len(stats.top(10 ** 6)) == stats.mean_delta.shape[0]  # more than there are: every unit, once


# --------------------------------------------------------------------------------------------------
# attention_neurons
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mamba_b", "gpt2"])
@pytest.mark.parametrize("case, message", [
    ({"texts_ids": "tensor"}, "must be a list of .1, L. token-id tensors"),
    ({"texts_ids": []}, "texts_ids is empty"),
    ({"layers": [True]}, "layers True"), ({"layers": [5]}, "layers 5"), ({"layers": []}, "layers is empty"),
    ({"methods": "rollout"}, "not a single string"),  # not the methods 'r', 'o', 'l', ...
    ({"methods": []}, "methods is empty"), ({"methods": ["rolout"]}, "unknown method 'rolout'"),
    ({"top_k": -1}, "top_k -1"), ({"top_k": True}, "top_k True")])
def test_attention_profile_refusals(kind, case, message, ids):
    model = make_model(kind)
    args = {"texts_ids": ids, "layers": [1], "methods": an.METHODS, "top_k": 5, **case}
    if isinstance(args["texts_ids"], str):
        args["texts_ids"] = ids[0]
    refused(model, message, an.attention_profile, an.attention_neurons_for(model), **args)


def test_attention_entry_points_refuse(mamba, ids):
    analyzer = an.attention_neurons_for(mamba)
    refused(mamba, "layer True", analyzer.text_scores, ids[0], True)
    refused(mamba, r"layers 1\.5", lambda: next(iter(analyzer.scores_by_layer(ids[0], [1.5]))))
    refused(mamba, "inputs must be input ids", analyzer.text_scores, ["The cat"], 0)
    refused(mamba, "input ids must be a .b, L. integer tensor", analyzer.text_scores, ids[0][:, :0], 0)
    refused(mamba, "top_k 0", an.integrate_attention_neurons, mamba, ids[0], [0], top_k=0)
    refused(mamba, "layer_indices -1", an.integrate_attention_neurons, mamba, ids[0], [-1])
    scores = {0: an.NeuronScores("attention_weighted", np.ones(72), np.ones(72), None)}
    with pytest.raises(ValueError, match="top_k -1"):
        analyzer.analyze_neuron_behavior(scores, 0, top_k=-1)


# --------------------------------------------------------------------------------------------------
# sparsity and efficiency
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": "tensor"}, "must be a list of .1, L. token-id tensors"), ({"input_ids": []}, "input_ids is empty"),
    ({"layers": [True]}, "layers True"), ({"layers": [3]}, "layers 3"),
    ({"sparsity_threshold": float("nan")}, "sparsity_threshold nan"),
    ({"sparsity_threshold": True}, "sparsity_threshold True"), ({"dead_eps": float("inf")}, "dead_eps inf")])
def test_layer_sparsity_refusals(mamba, ids, kwargs, message):
    args = {"input_ids": ids, "layers": [0], **kwargs}
    if isinstance(args["input_ids"], str):
        args["input_ids"] = ids[0]
    refused(mamba, message, sp.layer_sparsity, mamba, get_adapter(mamba), **args)


def test_sparsity_profile_and_pure_measures_refuse(mamba, ids):
    refused(mamba, "layers 9", sp.SparsityProfile, mamba, get_adapter(mamba), [9], ids)
    refused(mamba, "sparsity_threshold nan", sp.SparsityProfile, mamba, get_adapter(mamba), [0], ids, float("nan"))
    a = np.abs(np.random.default_rng(0).standard_normal((10, 4)))
    for f, message in ((lambda: sp.traditional(a, True), "threshold True"),
                       (lambda: sp.optimal_threshold(a, True), "target fraction True"),
                       (lambda: sp.optimal_threshold(a, 1.5), r"target fraction 1\.5")):
        with pytest.raises(ValueError, match=message):
            f()


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_lengths": [16.5]}, r"seq_lengths item 16\.5"), ({"seq_lengths": [True]}, "seq_lengths item True"),
    ({"seq_lengths": []}, "seq_lengths is empty"), ({"seq_lengths": "64"}, "seq_lengths '64'"),
    ({"seq_lengths": [0]}, "seq_lengths item 0"), ({"efficiency_budget": 0}, "efficiency_budget 0"),
    ({"efficiency_budget": float("nan")}, "efficiency_budget nan"), ({"repeats": 0}, "repeats 0")])
def test_scaling_curve_refusals(mamba, kwargs, message):
    args = {"seq_lengths": [16], "efficiency_budget": 5.0, **kwargs}
    refused(mamba, message, ef.scaling_curve, mamba, get_adapter(mamba), np.arange(20), **args)
