"""The stage registry and the typed options (pipeline.py)."""
import dataclasses

import pytest

import pipeline
from conftest import make_model
from pipeline import Options, Stage, register, run_comprehensive_analysis


def _noop(ctx):
    return {}, []


def test_each_module_registers_its_stages_in_run_order():
    """Every stage is registered by its analysis module (loaded when first asked for), runs after the stages
    it needs, and a registration that breaks either rule is refused."""
    assert pipeline.ALL_STAGES == ("delta", "causal", "inter_layer", "cross_layer", "attention", "sparsity",
                                   "census", "faithfulness", "efficiency", "comparison")
    for name in pipeline.ALL_STAGES:
        stage = pipeline.STAGES[name]
        assert stage.name == name and stage.run.__module__ == pipeline.STAGE_MODULES[name]
        assert all(pipeline.ALL_STAGES.index(n) < pipeline.ALL_STAGES.index(name) for n in stage.needs)
    text_stages = [n for n in pipeline.ALL_STAGES if pipeline.STAGES[n].reader is not None]
    assert text_stages == ["delta", "attention", "sparsity", "census", "efficiency", "comparison"]
    with pytest.raises(ValueError, match="stage x is not in pipeline.STAGE_MODULES"):
        register(Stage("x", _noop, str))
    with pytest.raises(ValueError, match="stage delta needs comparison, which is not a stage before it"):
        register(Stage("delta", _noop, str, needs=("comparison",)))
    assert pipeline.STAGES["delta"].needs == ()  # the refused registration changed nothing


def test_reading_a_stage_not_in_needs_fails_that_stage(monkeypatch, tokenizer):
    """A stage may read only the results it declared: an undeclared read is a recorded error, not a silent
    dependence on the run order."""
    def sneaky(ctx, read):
        return {"seen": ctx.upstream("causal")}, []

    def honest(ctx):
        return {"seen": ctx.upstream("causal") is not None}, []

    monkeypatch.setitem(pipeline.STAGES, "efficiency", dataclasses.replace(pipeline.STAGES["efficiency"], run=sneaky))
    monkeypatch.setitem(pipeline.STAGES, "inter_layer", dataclasses.replace(pipeline.STAGES["inter_layer"], run=honest))
    monkeypatch.setitem(pipeline.STAGES, "causal", dataclasses.replace(pipeline.STAGES["causal"],
                                                                      run=lambda ctx: ({"top_neurons": []}, [])))
    res = run_comprehensive_analysis(make_model("mamba_a"), tokenizer, ["one text", "two texts"],
                                     stages=["causal", "inter_layer", "efficiency"], progress=False)
    assert res["efficiency"] == {"status": "error", "wall_time_s": res["efficiency"]["wall_time_s"],
                                 "error": "RuntimeError: stage efficiency reads stage causal without declaring it "
                                          "in its needs"}
    assert res["inter_layer"]["results"] == {"seen": True}


def test_options_are_built_once_and_typed(monkeypatch, tokenizer):
    seen = {}

    def record(ctx):
        seen["opts"] = ctx.opts
        return {}, []

    monkeypatch.setitem(pipeline.STAGES, "causal", dataclasses.replace(pipeline.STAGES["causal"], run=record))
    model = make_model("mamba_a")
    run_comprehensive_analysis(model, tokenizer, ["a text"], layer=1, top_k=3, stages=["causal"], progress=False,
                               causal_dims=[4, 2], causal_site="residual", causal_batch_size=None,
                               sparsity_threshold=0.5, seq_lengths=[8])
    assert seen["opts"] == Options(layer=1, top_k=3, progress=False, causal_dims=(4, 2), causal_site="residual",
                                   sparsity_threshold=0.5, seq_lengths=(8,))
    with pytest.raises(TypeError, match="unknown option 'treshold'"):  # one name per option: no aliases
        run_comprehensive_analysis(model, tokenizer, ["a text"], stages=["causal"], treshold=0.5)
    with pytest.raises(TypeError, match="unknown option 'threshold'"):
        run_comprehensive_analysis(model, tokenizer, ["a text"], stages=["causal"], threshold=0.5)
    opts = Options(layer=1, prompts=("p q r",), progress=False)  # an Options object is used whole
    run_comprehensive_analysis(model, tokenizer, ["a text"], stages=["causal"], options=opts)
    assert seen["opts"] is opts and opts.prompt_list == ["p q r"]


def test_a_stage_that_needs_another_gets_it_and_the_run_says_so():
    """--enable_attention with --stages adds the attention stage; a faithfulness stage without a ranking in the
    run gets the stages whose rankings it checks on the family (once the family is known); the comparison
    names the parts it leaves out and the flag that adds each."""
    from comparison_wrapper import parts_left_out
    from pipeline import complete_plan

    stages, added = complete_plan(["comparison"], "mamba", enable_attention=True)
    assert stages == ["attention", "comparison"] and "--enable_attention" in added["attention"]
    stages, added = complete_plan(["faithfulness"], "mamba")
    assert stages == ["delta", "sparsity", "faithfulness"] and set(added) == {"delta", "sparsity"}
    assert complete_plan(["faithfulness"], "gpt2")[0] == ["attention", "faithfulness"]
    assert complete_plan(["faithfulness"], None) == (["faithfulness"], {})  # the family not known yet
    assert complete_plan(["sparsity", "faithfulness"], "mamba") == (["sparsity", "faithfulness"], {})
    left = parts_left_out(["sparsity", "causal", "comparison"], {"causal": None, "attention": None,
                                                                 "faithfulness": {"table": []}})
    assert left == {"causal": "the causal stage did not succeed (its entry says why)",
                    "attention": "the attention stage is not in this run (add --enable_attention)"}


def test_the_package_lists_every_module_and_imports_from_any_folder(tmp_path):
    """pyproject.toml lists every flat module (a new one must be added there), and once installed (README's
    install: `pip install -r requirements.txt`, which installs the clone in editable mode) the API imports
    from any folder and the console command answers."""
    import shutil
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    repo = Path(pipeline.__file__).resolve().parent
    listed = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == sorted(p.stem for p in repo.glob("*.py"))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", "import pipeline, census, main; print(pipeline.__file__)"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and Path(p.stdout.strip()).resolve() == repo / "pipeline.py", p.stderr
    command = shutil.which("mamba-neurons", path=str(Path(sys.executable).parent))
    assert command, "the console command is not installed beside this Python"
    q = subprocess.run([command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0 and "usage: mamba-neurons" in q.stdout
