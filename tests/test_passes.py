"""The text pass (passes.py): one capture forward and at most one gradient forward per text feed every
text stage, with one layer or many; the multi-layer gradient pass equals a pass per layer."""
import numpy as np
import pytest
import torch

from conftest import make_model
from models import get_adapter
from passes import gradient_pass

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A second text, a little longer than the first one is.",
         "Third: short."]


def _ids(tokenizer):
    from utils import tokenize_texts

    return tokenize_texts(tokenizer, TEXTS, 40).input_ids


@pytest.mark.parametrize("kind", ["mamba_b", "falcon_mamba", "mamba2", "gpt2"])
def test_one_gradient_pass_for_several_layers_equals_a_pass_per_layer(kind, tokenizer):
    """g at a lower layer is differentiated through the layers above it, also where those are differentiated
    too: the gradients of one pass at every layer equal each layer's own pass to float rounding, with the
    same target."""
    model = make_model(kind)
    adapter = get_adapter(model)
    ids = _ids(tokenizer)[1]
    layers = list(range(adapter.n_layers))
    together, target, _ = gradient_pass(model, adapter, ids, layers)
    for la in layers:
        alone, t_alone, _ = gradient_pass(model, adapter, ids, [la])
        rel = float((together[la] - alone[la]).abs().max() / alone[la].abs().max())
        print(f"{kind} layer {la}: max relative difference {rel:.2e}")
        assert target == t_alone and together[la].shape == alone[la].shape and rel < 1e-5
    assert all(p.requires_grad for p in model.parameters())


def _count_embeddings(model):
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("kind, stages", [("mamba_b", ["delta", "attention", "sparsity"]),
                                          ("mamba2", ["delta", "attention", "sparsity"]),
                                          ("gpt2", ["attention", "sparsity"])])
@pytest.mark.parametrize("layers", [None, "all"])
def test_text_stages_embed_each_text_at_most_twice(kind, stages, layers, tokenizer, tmp_path):
    """Every text stage of a run, at one layer or at every layer, reads one text pass: each text's tokens
    enter the model at most twice (the capture forward and the gradient forward)."""
    from pipeline import Options, run_pipeline

    model = make_model(kind)
    n_layers = get_adapter(model).n_layers
    opts = Options(layers=tuple(range(n_layers)) if layers else None, plots_dir=str(tmp_path), progress=False,
                   max_length=40)
    calls, handle = _count_embeddings(model)
    try:
        res = run_pipeline(model, tokenizer, TEXTS, opts, stages)
    finally:
        handle.remove()
    entries = [e for by in res.get("layers", {}).values() for e in by.values()] or [res[s] for s in stages]
    assert all(e["status"] == "ok" for e in entries), [e.get("error") for e in entries]
    assert sum(calls) <= 2 * len(TEXTS) and all(b == 1 for b in calls), calls
    assert res["passes"]["text"]["forwards"] == len(calls) == 2 * len(TEXTS)
    assert res["passes"]["text"]["sites_from"].startswith("the text pass's gradient forwards")


def test_without_a_gradient_the_sites_come_from_the_models_own_forward(tokenizer, tmp_path):
    """No gradient_guided: one capture forward per text, whose mixers at the sparsity layers run their own
    forward; its numbers equal `layer_sparsity`'s (the blocked forward, checked) to float rounding."""
    import sparsity as sp
    from pipeline import Options, run_pipeline

    model = make_model("mamba_b")
    adapter = get_adapter(model)
    opts = Options(plots_dir=str(tmp_path), progress=False, max_length=40,
                   attention_methods=("attention_weighted", "rollout"), sparsity_layers=(0, 1, 2))
    calls, handle = _count_embeddings(model)
    try:
        res = run_pipeline(model, tokenizer, TEXTS, opts, ["delta", "attention", "sparsity"])
    finally:
        handle.remove()
    assert len(calls) == len(TEXTS)
    got = res["sparsity"]["results"]
    assert got["measured_in"] == "the text pass's capture forwards (the model's own)"
    want = sp.layer_sparsity(model, adapter, _ids(tokenizer), [0, 1, 2])
    for la in (0, 1, 2):
        for key in ("traditional", "entropy"):
            assert got["layers"][la][key]["sparsity"] == pytest.approx(want[la][key]["sparsity"], rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(got["layers"][la]["neuron_variance"], want[la]["neuron_variance"], rtol=1e-5,
                                   atol=1e-12)


def test_a_reader_that_fails_fails_its_stage_only(tokenizer, tmp_path, monkeypatch):
    """A text stage whose reading raises on some text is recorded as an error; the other text stages of the
    same pass finish."""
    import delta_extraction as de
    from pipeline import Options, run_pipeline

    def broken(self, ids, ios):
        raise RuntimeError("planted")

    monkeypatch.setattr(de.DeltaProfile, "add", broken)
    res = run_pipeline(make_model("mamba_a"), tokenizer, TEXTS, Options(plots_dir=str(tmp_path), progress=False),
                       ["delta", "attention", "sparsity"])
    assert res["delta"]["status"] == "error" and res["delta"]["error"] == "RuntimeError: planted"
    assert res["attention"]["status"] == "ok" and res["sparsity"]["status"] == "ok"


def test_efficiency_without_the_sparsity_stage_reads_the_text_pass(tokenizer, tmp_path, monkeypatch):
    """The efficiency stage's active neurons come from the sparsity stage when it runs, else from the
    text pass (no forwards of the texts of its own): the same numbers either way."""
    import sparsity as sp
    from pipeline import Options, run_pipeline

    model = make_model("mamba_a")
    opts = Options(plots_dir=str(tmp_path), progress=False, seq_lengths=(8,), efficiency_budget=5.0)
    with_sparsity = run_pipeline(model, tokenizer, TEXTS, opts, ["sparsity", "efficiency"])
    monkeypatch.setattr(sp, "layer_sparsity", lambda *a, **k: pytest.fail("forwards of its own"))
    alone = run_pipeline(model, tokenizer, TEXTS, opts, ["attention", "efficiency"])
    assert alone["passes"]["text"]["stages"] == ["attention", "efficiency"]
    want, got = with_sparsity["efficiency"]["results"]["neurons"], alone["efficiency"]["results"]["neurons"]
    assert got["active"] == want["active"] and got["efficiency_ratio"] == pytest.approx(want["efficiency_ratio"])


def test_a_failing_gradient_forward_fails_only_the_stages_that_need_it(tokenizer, tmp_path, monkeypatch):
    """The gradient forward raises on the second text (planted): the attention stage (its gradients) and
    the sparsity stage (its sites came from that forward) fail with its error; delta, which reads only
    the capture forward, finishes, and the later texts run no gradient forward."""
    import passes
    from pipeline import Options, run_pipeline

    real, calls = passes.gradient_pass, []

    def planted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("planted gradient failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "gradient_pass", planted)
    res = run_pipeline(make_model("mamba_a"), tokenizer, TEXTS, Options(plots_dir=str(tmp_path), progress=False),
                       ["delta", "attention", "sparsity"])
    assert res["delta"]["status"] == "ok" and res["delta"]["results"]["n_texts"] == len(TEXTS)
    for stage in ("attention", "sparsity"):
        assert res[stage] == {"status": "error", "error": "RuntimeError: planted gradient failure",
                              "wall_time_s": 0.0}
    assert len(calls) == 2


def test_the_blocked_mixers_are_checked_on_the_first_text(tokenizer, monkeypatch):
    """Mixers in which nothing is read run the blocked forward; on the first text each is compared with the
    mixer's own forward on the same input, and a planted difference fails the pass's readers."""
    import delta_extraction as de
    import passes
    import ssm

    model = make_model("mamba_b")
    adapter = get_adapter(model)
    real = ssm.mixer_forward_blocked
    monkeypatch.setattr(ssm, "mixer_forward_blocked", lambda *a, **k: real(*a, **k) * 1.01)
    done = passes.run_text_pass(model, adapter, _ids(tokenizer), {"delta": de.DeltaProfile(model, tokenizer, [2])})
    assert "ReconstructionError" in done.errors["delta"] and "blocked mixer forward differs" in done.errors["delta"]


@pytest.mark.parametrize("target", ["likelihood", "last_argmax"])
def test_the_attention_stage_records_each_texts_target(tokenizer, tmp_path, target):
    """--attention_target chooses what gradient_guided's gradient is of; the stage records each text's target
    (last_argmax: the token, its id and p, the argmax of the model's own last-position distribution;
    likelihood: the number of predicted tokens and their mean log p, the model's own), and the results say
    which target and what it means."""
    from passes import TARGETS
    from pipeline import Options, run_pipeline
    from utils import tokenize_texts

    model = make_model("mamba_b")
    opts = Options(plots_dir=str(tmp_path), progress=False, attention_target=target, bootstrap_resamples=100)
    r = run_pipeline(model, tokenizer, TEXTS, opts, ["attention"])["attention"]["results"]
    assert r["target"] == target and r["target_definition"] == TARGETS[target]
    ids = tokenize_texts(tokenizer, TEXTS, opts.max_length).input_ids
    assert len(r["gradient_targets"]) == len(TEXTS) == len(ids)
    for rec, x in zip(r["gradient_targets"], ids):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)  # (L, V)
        if target == "last_argmax":
            assert rec["token_id"] == int(logp[-1].argmax()) and rec["token"] == tokenizer.decode([rec["token_id"]])
            assert rec["p"] == pytest.approx(float(logp[-1].max().exp()), rel=1e-4)
        else:
            own = logp[:-1].gather(1, x[0, 1:, None]).mean()
            assert rec["n_tokens"] == x.shape[1] - 1 and rec["mean_logp"] == pytest.approx(float(own), rel=1e-4)
