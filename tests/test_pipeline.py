"""The stage registry and the typed options (pipeline.py)."""
import dataclasses

import pytest

import pipeline
from conftest import make_model
from pipeline import Options, Stage, _ordered, run_comprehensive_analysis


def _noop(ctx):
    return {}, []


def test_run_order_follows_the_stated_needs():
    assert pipeline.ALL_STAGES == ("delta", "causal", "inter_layer", "cross_layer", "attention", "sparsity",
                                   "efficiency", "comparison")
    for name, stage in pipeline.STAGES.items():  # every stage after each stage it needs
        assert all(pipeline.ALL_STAGES.index(n) < pipeline.ALL_STAGES.index(name) for n in stage.needs)
    # listed first but needing a later one: it moves after it; the rest keep the listed order
    order = _ordered([Stage("c", _noop, print, needs=("b",)), Stage("a", _noop, print), Stage("b", _noop, print)])
    assert list(order) == ["b", "c", "a"]
    with pytest.raises(ValueError, match="cycle: x -> y -> x"):
        _ordered([Stage("x", _noop, print, needs=("y",)), Stage("y", _noop, print, needs=("x",))])
    with pytest.raises(ValueError, match="needs nowhere, which is not a stage"):
        _ordered([Stage("x", _noop, print, needs=("nowhere",))])


def test_reading_a_stage_not_in_needs_fails_that_stage(monkeypatch, tokenizer):
    """A stage may read only the results it declared: an undeclared read is a recorded error, not a silent
    dependence on the run order."""
    def sneaky(ctx):
        return {"seen": ctx.upstream("causal")}, []

    def honest(ctx):
        return {"seen": ctx.upstream("causal") is not None}, []

    monkeypatch.setitem(pipeline.STAGES, "sparsity", dataclasses.replace(pipeline.STAGES["sparsity"], run=sneaky))
    monkeypatch.setitem(pipeline.STAGES, "inter_layer", dataclasses.replace(pipeline.STAGES["inter_layer"], run=honest))
    monkeypatch.setitem(pipeline.STAGES, "causal", dataclasses.replace(pipeline.STAGES["causal"],
                                                                      run=lambda ctx: ({"top_neurons": []}, [])))
    res = run_comprehensive_analysis(make_model("mamba_a"), tokenizer, ["one text", "two texts"],
                                     stages=["causal", "inter_layer", "sparsity"], progress=False)
    assert res["sparsity"] == {"status": "error", "wall_time_s": res["sparsity"]["wall_time_s"],
                               "error": "RuntimeError: stage sparsity reads stage causal without declaring it in "
                                        "its needs"}
    assert res["inter_layer"]["results"] == {"seen": True}


def test_options_are_built_once_and_typed(monkeypatch, tokenizer):
    seen = {}

    def record(ctx):
        seen["opts"] = ctx.opts
        return {}, []

    monkeypatch.setitem(pipeline.STAGES, "causal", dataclasses.replace(pipeline.STAGES["causal"], run=record))
    model = make_model("mamba_a")
    run_comprehensive_analysis(model, tokenizer, ["a text"], layer=1, top_k=3, stages=["causal"], progress=False,
                               causal={"dims": [4, 2], "site": "residual", "batch_size": None},
                               options={"threshold": 0.5, "seq_lengths": [8]})
    assert seen["opts"] == Options(layer=1, top_k=3, progress=False, causal_dims=(4, 2), causal_site="residual",
                                   sparsity_threshold=0.5, seq_lengths=(8,))
    with pytest.raises(TypeError, match="unknown option 'treshold'"):
        run_comprehensive_analysis(model, tokenizer, ["a text"], stages=["causal"], options={"treshold": 0.5})
    opts = Options(layer=1, prompts=("p q r",), progress=False)  # an Options object is used whole
    run_comprehensive_analysis(model, tokenizer, ["a text"], stages=["causal"], options=opts)
    assert seen["opts"] is opts and opts.prompt_list == ["p q r"]
