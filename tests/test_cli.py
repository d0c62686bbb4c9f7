"""main.py end to end, as a user runs it: results, JSON, plots, exit codes, one-line errors."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import DEVICE, REPO
from utils import OFFLINE_TEXTS_PATH, read_texts_file

MAIN = str(REPO / "main.py")


def run_main(args, cwd, env_extra=None, drop_offline=False):
    """main.py in a subprocess; on TEST_DEVICE (when not cpu) unless the args name a device."""
    if DEVICE.type != "cpu" and "--device" not in args and "--help" not in args:
        args = [*args, "--device", DEVICE.type]
    env = dict(os.environ, **(env_extra or {}))
    if drop_offline:
        env.pop("HF_HUB_OFFLINE", None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, MAIN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    p.elapsed = time.perf_counter() - t0
    return p


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n\n".join(read_texts_file(OFFLINE_TEXTS_PATH)[:12]) + "\n")
    return path


def test_full_run_writes_json_and_plots_that_match_the_library(model_dirs, texts_file, tmp_path, tokenizer):
    args = ["--model", str(model_dirs["mamba_b"]), "--texts_file", str(texts_file), "--layer", "1",
            "--top_k", "4", "--max_length", "20", "--save_results", "--output_dir", "out",
            "--plots_dir", "figs", "--seed", "3", "--no_progress", "--stages", "delta,causal,inter_layer,cross_layer"]
    p = run_main(args, tmp_path)
    assert p.returncode == 0, p.stderr
    files = list((tmp_path / "out").glob("*.json"))
    assert len(files) == 1 and files[0].name == f"{model_dirs['mamba_b'].name}_layer1_results.json"
    res = json.loads(files[0].read_text())
    run = res["run"]
    assert run["argv"] == p.args[2:] and run["model_class"] == "MambaForCausalLM" and run["seed"] == 3
    assert run["resolved_path"] == str(model_dirs["mamba_b"].resolve()) and run["model_source"] == "local"
    assert {"torch", "transformers"} <= set(run["versions"]) and run["dtype"] == "float32"
    assert set(run["stage_timings_s"]) == {"delta", "causal", "inter_layer", "cross_layer"}
    assert run["start_time"].endswith("Z")
    texts = read_texts_file(texts_file)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert res["texts"]["n_texts"] == 12 and res["texts"]["n_truncated"] == sum(n > 20 for n in lengths)
    assert res["texts"]["n_tokens"] == sum(min(n, 20) for n in lengths)

    delta = res["delta"]
    assert delta["status"] == "ok" and delta["wall_time_s"] > 0
    assert delta["results"]["reconstruction"]["max_relative_error"] < 1e-4
    # the same numbers as the library computes in this process
    from conftest import make_model
    from delta_extraction import find_delta_sensitive_neurons

    expected = find_delta_sensitive_neurons(make_model("mamba_b").to(DEVICE), tokenizer, texts, 1, 4, max_length=20)
    got = [(n["channel"], n["variance"]) for n in delta["results"]["top_neurons"]]
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert got == pytest.approx(expected, rel=1e-9)
    for c, _ in got:
        assert f"channel {c:>5}" in p.stdout
    assert len(delta["plots"]) == 2
    # causal stages: every dimension scored; the library gives the same ranking; causality holds
    import causal_analysis as ca

    causal = res["causal"]["results"]
    assert res["causal"]["status"] == "ok" and len(causal["scores"]) == 24 and causal["site"] == "mixer_out"
    lib = ca.find_causal_neurons(make_model("mamba_b").to(DEVICE), tokenizer, ca.DEFAULT_PROMPTS, 1, 4,
                                 progress=False)
    assert [t["dim"] for t in causal["top_neurons"]] == [d for d, _ in lib]
    assert [t["score"] for t in causal["top_neurons"]] == pytest.approx([s for _, s in lib], rel=1e-6)
    assert res["inter_layer"]["results"]["dims"] == [d for d, _ in lib[:3]]
    for d, score in lib[:3]:  # the curve at the analysed layer is the causal stage's own number
        at_layer = res["inter_layer"]["results"]["curves"][str(d)][1]
        assert at_layer["layer"] == 1 and at_layer["score"] == pytest.approx(score, rel=1e-5)
    assert res["cross_layer"]["results"]["max_abs_change_before_source"] == 0.0
    plots = [p for s in ("delta", "causal", "inter_layer", "cross_layer") for p in res[s]["plots"]]
    assert len(plots) == 6
    for plot in plots:
        data = (tmp_path / plot).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "no such folder"),
    (["--model", "{mamba}", "--layer", "5"], "valid layers are 0..2"),
    (["--model", "{mamba}", "--texts_file", "{missing}"], "no such file"),
    (["--model", "{mamba}", "--texts_file", "{empty}"], "no non-blank lines"),
    (["--model", "{mamba}", "--text_limit", "0"], "--text_limit 0"),
    (["--model", "{mamba}", "--stages", "nonsense"], "unknown stage"),
    (["--model", "{gpt2}", "--stages", "delta"], "not applicable to gpt2"),
    (["--model", "{mamba}", "--attention_methods", "magic"], "--attention_methods magic"),
    (["--model", "{mamba}", "--causal_dims", "3", "999"], "valid dims are 0..23"),
    (["--model", "{mamba}", "--causal_site", "mlp"], "site 'mlp' does not exist for mamba"),
    (["--model", "{mamba}", "--prompts_file", "{missing}"], "--prompts_file"),
    (["--model", "{mamba}", "--ablation", "half"], "--ablation half"),
    (["--model", "{mamba}", "--sparsity_layers", "0", "3"], "--sparsity_layers 3: out of range"),
    (["--model", "{mamba}", "--compare_model", "{missing}"], "no such folder"),
    (["--model", "{mamba}", "--efficiency_budget", "0"], "--efficiency_budget 0"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, model_dirs, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    subs = {"{missing}": str(tmp_path / "missing"), "{mamba}": str(model_dirs["mamba_b"]),
            "{gpt2}": str(model_dirs["gpt2"]), "{empty}": str(tmp_path / "empty.txt")}
    p = run_main([subs.get(a, a) for a in args], tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert not (tmp_path / "plots").exists()


def test_unknown_hub_id_offline_fails_fast(tmp_path):
    p = run_main(["--model", "nobody-has/this-model-xyz"], tmp_path, drop_offline=True)
    assert p.returncode == 2 and "hub is unreachable" in p.stderr and p.elapsed < 5


def test_transformer_run_continues_with_delta_not_applicable(model_dirs, texts_file, tmp_path):
    p = run_main(["--model", str(model_dirs["gpt2"]), "--texts_file", str(texts_file), "--save_results",
                  "--output_dir", "out", "--no_progress", "--seq_lengths", "16", "32", "--compare_model",
                  str(model_dirs["mamba_a"])], tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert res["delta"]["status"] == "not_applicable" and "not applicable to gpt2" in res["delta"]["reason"]
    assert "not applicable to gpt2" in p.stdout


def test_failed_stage_is_recorded_listed_and_exits_1(model_dirs, texts_file, tmp_path):
    p = run_main(["--model", str(model_dirs["mamba_a"]), "--texts_file", str(texts_file), "--text_limit", "1",
                  "--save_results", "--output_dir", "out", "--stages", "delta", "attention", "--no_progress"], tmp_path)
    assert p.returncode == 1
    res = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert res["delta"]["status"] == "error" and "at least 2 texts" in res["delta"]["error"]
    assert "FAILED stages: delta" in p.stdout
    assert res["attention"]["status"] == "ok"  # the other stages go on
    # the attention stage's JSON numbers are the library's for that one text
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attention_neurons import MambaAttentionNeurons
    from utils import tokenize_texts

    model = AutoModelForCausalLM.from_pretrained(model_dirs["mamba_a"]).eval()
    tok = AutoTokenizer.from_pretrained(model_dirs["mamba_a"])
    ids = tokenize_texts(tok, read_texts_file(texts_file)[:1], 256).input_ids[0]
    an = MambaAttentionNeurons(model)
    data = an.extract_attention_vectors(ids, [0])
    for method, r in res["attention"]["results"]["methods"].items():
        lib = an.create_mamba_neurons(data, method)[0]
        np.testing.assert_allclose(r["neuron_activations"], lib.neuron_activations, rtol=1e-5)
        np.testing.assert_allclose(r["neuron_importance"], lib.neuron_importance, rtol=1e-5, atol=1e-12)


def test_help_is_fast(tmp_path):
    p = run_main(["--help"], tmp_path)
    assert p.returncode == 0 and "--enable_attention" in p.stdout and "attention_weighted" in p.stdout
    assert p.elapsed < 2


def test_default_run_offline_uses_the_reference_mamba(tmp_path):
    """README's command with no hub and an empty cache: the shipped reference Mamba, one warning line
    for the model and one for the texts, results recorded as such."""
    p = run_main(["--enable_attention", "--save_results", "--no_progress"], tmp_path,
                 env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")})
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3 and "reference mamba" in warnings[0] and "reference transformer" in warnings[1]
    assert "offline_texts.txt" in warnings[2]
    res = json.loads((tmp_path / "analysis_outputs" / "reference_mamba_layer0_results.json").read_text())
    assert res["run"]["model_source"] == "reference" and res["run"]["model_class"] == "MambaForCausalLM"
    assert res["run"]["resolved_path"] == str(REPO / "reference_models" / "mamba")
    assert res["texts"]["source"].startswith("offline:") and res["texts"]["n_texts"] == 50
    assert res["delta"]["status"] == "ok"
    assert res["delta"]["results"]["reconstruction"]["max_relative_error"] < 1e-4
    assert (tmp_path / "plots" / "reference_mamba_delta_variance_layer0.png").stat().st_size > 5000
    assert all(res[s]["status"] == "ok" for s in res["run"]["stage_timings_s"])
    comp = res["comparison"]["results"]
    assert comp["compare_model"]["source"] == "reference"
    assert [m["label"] for m in comp["models"]] == ["reference_mamba", "reference_transformer"]
    assert "causal" in comp  # the causal stage ran, so both distributions are there
    for name in res["run"]["stage_timings_s"]:
        for path in res[name].get("plots", []):
            assert (tmp_path / path).read_bytes()[:4] == b"\x89PNG"


def test_a_named_model_is_never_substituted(tmp_path):
    p = run_main(["--model", "state-spaces/mamba-130m-hf"], tmp_path,
                 env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")})
    assert p.returncode == 2 and "hub is unreachable" in p.stderr and "reference" not in p.stderr
