"""Attention neurons of Transformers (GPT-2, GPT-NeoX): the units are the attention-output dims, each mixed
by its head's attention weights. Known small cases, identities against the models' own outputs, and the
streamed path against the whole-α reference."""
import numpy as np
import pytest
import torch

from attention_neurons import (TransformerAttentionNeurons, attention_neurons_for, attention_profile,
                               integrate_attention_neurons)
from conftest import assert_streamed_equals_reference, make_model
from models import GPT2Adapter, get_adapter
from ssm import ReconstructionError
from utils import trace

FAMILIES = ["gpt2", "gpt_neox"]


def _ids(L=13, b=2, seed=0):
    return torch.randint(1, 300, (b, L), generator=torch.Generator().manual_seed(seed))


def _eager_attentions(model, ids):
    """The models' own attention weights per layer (b, H, L, L), from transformers' output_attentions."""
    with torch.no_grad(), get_adapter(model).eager_attention():
        return model(input_ids=ids, output_attentions=True).attentions


@pytest.mark.parametrize("kind", FAMILIES)
def test_streamed_scores_equal_the_reference_path(kind):
    """text_scores (one head's units at a time, α never whole) equals create_neurons on the whole α
    (each head's A repeated for its d/H units), every layer, batch of two."""
    model = make_model(kind)
    an = attention_neurons_for(model)
    assert isinstance(an, TransformerAttentionNeurons) and an.describe_units()["n_units"] == 32
    assert_streamed_equals_reference(an, _ids(), range(2), label=kind)

@pytest.mark.parametrize("kind", FAMILIES)
def test_the_matrices_are_the_models_own_and_rebuild_its_output(kind):
    """A equals transformers' output_attentions; α x through the output projection equals the attention
    module's real output (y = α x is the attention itself); and the unit mean of α is the head mean of A."""
    model = make_model(kind)
    an = attention_neurons_for(model)
    ids = _ids()
    own = _eager_attentions(model, ids)
    data = an.extract_attention_vectors(ids, [0, 1])
    adapter = get_adapter(model)
    for layer in range(2):
        torch.testing.assert_close(data[layer]["head_attention"], own[layer], rtol=0, atol=0)
        torch.testing.assert_close(data[layer]["attention_vectors"], own[layer].mean(1), rtol=1e-6, atol=1e-7)
        with torch.no_grad(), trace(model, [adapter.attention_paths(layer).attention]) as tr:
            model(input_ids=ids)  # the model's own (sdpa) attention output
        rebuilt = an._project(layer, data[layer]["y"])
        rel = ((rebuilt - tr[adapter.attention_paths(layer).attention].output).abs().max()
               / tr[adapter.attention_paths(layer).attention].output.abs().max()).item()
        print(f"{kind} layer {layer}: output projection of α x against the module's output: {rel:.2e}")
        assert rel < 1e-5
    assert model.config._attn_implementation == "sdpa"  # restored after the eager capture


def test_a_wrong_value_layout_is_refused():
    """GPT-NeoX interleaves q, k, v per head; reading its values with GPT-2's [q | k | v] layout gives
    wrong values, and the reconstruction check must refuse them."""
    model = make_model("gpt_neox")
    an = attention_neurons_for(model)
    an.adapter.split_values = lambda out: GPT2Adapter.split_values(an.adapter, out)
    with pytest.raises(ReconstructionError):
        an.text_scores(_ids(), 0, ("attention_weighted",))


def test_eager_attention_is_restored_after_an_error():
    model = make_model("gpt2")
    with pytest.raises(RuntimeError, match="planted"):
        with get_adapter(model).eager_attention():
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("planted")
    assert model.config._attn_implementation == "sdpa"


def _uniform_gpt2(beta: torch.Tensor):
    """GPT-2 whose layer 0 attends uniformly (q = k = 0: A[i, j] = 1/(i+1) for j <= i) and whose values are
    the constant vector beta (d,) at every position."""
    model = make_model("gpt2")
    d = model.config.hidden_size
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight.zero_()  # Conv1D weight (d, 3d): [q | k | v] columns
        attn.c_attn.bias.zero_()
        attn.c_attn.bias[2 * d:] = beta
    return model


@pytest.mark.parametrize("L", [3, 6, 24])
def test_a_hand_set_attention_pattern_gives_the_expected_scores(L):
    """Uniform causal attention over constant values: contrib^c[i, j] = |β_c| / (i + 1) for j <= i, every row
    sums to |β_c|, so activation_c = |β_c| per query token at every length (the score does not scale with
    L); the token map is mean_c |β_c| / (i + 1); rollout at layer 0 is Abnar & Zuidema's (A + I) / 2, and
    unit c carries 1 − (1/(i+1) + 1)/2 of token i's relevance from other tokens; every unit's rollout score
    is the same, so every listed unit is a tie."""
    d = 32
    beta = torch.linspace(-1.0, 2.0, d)
    model = _uniform_gpt2(beta)
    an = attention_neurons_for(model)
    ts = an.text_scores(_ids(L=L, b=1), 0)
    i = np.arange(L)
    A = np.tril(np.ones((L, L))) / (i + 1)[:, None]  # (L, L)
    aw = ts.scores["attention_weighted"]
    np.testing.assert_allclose(aw.neuron_activations, np.abs(beta.numpy()), rtol=1e-5)
    np.testing.assert_allclose(aw.token_map, np.abs(beta.numpy()).mean() * A, rtol=1e-5, atol=1e-7)
    ro = ts.scores["rollout"]
    np.testing.assert_allclose(ro.token_map, (A + np.eye(L)) / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ro.neuron_activations, np.mean(1 - (1 / (i + 1) + 1) / 2), rtol=1e-6)
    np.testing.assert_allclose(ts.attention_vectors[0].numpy(), A, rtol=1e-6, atol=1e-7)
    top = an.analyze_neuron_behavior({0: ro}, 0, 5)
    assert all(t["tied"] and t["rank"] == 1 for t in top["top_neurons"]) and top["ties"].startswith("rank 1:")


@pytest.mark.parametrize("kind", FAMILIES)
def test_rollout_is_abnar_and_zuidema_on_the_models_own_attention(kind):
    """For softmax attention rownorm(A_h) = A_h, so the shared rollout formula is R_l = (mean_h A_l / 2 + I / 2)
    R_{l-1}: checked against transformers' output_attentions."""
    model = make_model(kind)
    ids = _ids(b=1)
    own = _eager_attentions(model, ids)
    eye = torch.eye(ids.shape[1])
    R = eye
    for layer in range(2):
        R = (own[layer][0].mean(0) / 2 + eye / 2) @ R
        got = attention_neurons_for(model).text_scores(ids, layer, ("rollout",)).scores["rollout"].token_map
        np.testing.assert_allclose(got, R.numpy(), rtol=1e-5, atol=1e-7)


def test_gradient_is_the_derivative_of_the_target():
    """g = ∂ T / ∂ y at the output projection's input (T the default target, the text's own log-likelihood),
    against central differences on a float64 model (y is edited at the projection's input)."""
    from passes import target_value

    model = make_model("gpt2").double()
    an = attention_neurons_for(model)
    ids, layer = _ids(L=7, b=1), 0
    g, _ = an.output_gradient(ids, layer)
    path = an.adapter.attention_paths(layer).out_proj
    eps = 1e-6
    for i, c in [(0, 3), (4, 17), (6, 31)]:
        value = []
        for sign in (1, -1):
            def bump(name, y):
                y = y.clone()
                y[0, i, c] += sign * eps
                return y
            with torch.no_grad(), trace(model, [path], retain_output=False, edit_input=bump):
                value.append(target_value(model(input_ids=ids).logits, ids, "likelihood")[0].item())
        fd = (value[0] - value[1]) / (2 * eps)
        print(f"(i={i}, c={c}): autograd {g[0, i, c].item():.6e}, central difference {fd:.6e}")
        assert g[0, i, c].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    assert (g[0, :, :].abs().sum() > 0)


def test_profile_over_layers_equals_one_layer_at_a_time():
    """attention_profile at layers 0 and 1 in one pass per text (rollout continuing from layer 0) equals
    the profile of each layer alone."""
    model = make_model("gpt_neox")
    an = attention_neurons_for(model)
    texts = [_ids(L=L, b=1, seed=L) for L in (5, 9, 12)]
    both = attention_profile(an, texts, [0, 1])
    for layer in (0, 1):
        alone = attention_profile(an, texts, [layer])[layer]
        for m, entry in alone["methods"].items():
            for key in ("neuron_activations", "token_map_first_text"):
                np.testing.assert_allclose(both[layer]["methods"][m][key], entry[key], rtol=1e-6, atol=1e-9)
            assert both[layer]["methods"][m]["top_neurons"][0]["head"] == entry["top_neurons"][0]["channel"] // 16


def test_integrate_runs_the_reference_path_on_a_transformer(tmp_path):
    res = integrate_attention_neurons(make_model("gpt2"), {"input_ids": _ids()}, layer_indices=[1])
    for m, by_layer in res["analysis_results"].items():
        acts = res["neurons"][m][1].neuron_activations
        assert by_layer[1]["num_neurons"] == 32 and by_layer[1]["mean_activation"] == pytest.approx(acts.mean())
    path = res["analyzer"].visualize_neurons(res["neurons"]["gradient_guided"], 1, tmp_path, "g")
    assert open(path, "rb").read(4) == b"\x89PNG"
