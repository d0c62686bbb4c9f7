"""main.py end to end, as a user runs it: results, JSON, plots, exit codes, one-line errors."""
import json
import re
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import DEVICE, REPO, out_name
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


def main_here(args, cwd, monkeypatch, capsys):
    """main.main in this process (no interpreter start, no second import of torch): an object with
    returncode, stdout and stderr, as run_main's."""
    import types

    import main

    if DEVICE.type != "cpu" and "--device" not in args and "--help" not in args and "--report" not in args:
        args = [*args, "--device", DEVICE.type]
    monkeypatch.chdir(cwd)
    code = main.main([str(a) for a in args])
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n\n".join(read_texts_file(OFFLINE_TEXTS_PATH)[:12]) + "\n")
    return path


@pytest.fixture(scope="module")
def few_prompts(tmp_path_factory):
    """Four of the default prompts (one of each kind's first), for full runs whose prompts are not the point: the
    causal, faithfulness and comparison stages cost in proportion to the prompts."""
    from causal_analysis import DEFAULT_PROMPTS

    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(DEFAULT_PROMPTS[::6]) + "\n")
    return path


def test_full_run_writes_json_and_plots_that_match_the_library(model_dirs, texts_file, tmp_path, tokenizer):
    args = ["--model", str(model_dirs["mamba_b"]), "--texts_file", str(texts_file), "--layer", "1",
            "--top_k", "4", "--max_length", "20", "--save_results", "--output_dir", "out",
            "--plots_dir", "figs", "--seed", "3", "--no_progress", "--stages", "delta,causal,inter_layer,cross_layer"]
    p = run_main(args, tmp_path)
    assert p.returncode == 0, p.stderr
    files = list((tmp_path / "out").glob("*.json"))
    assert len(files) == 1 and files[0].name == f"{out_name(model_dirs['mamba_b'])}_layer1_results.json"
    res = json.loads(files[0].read_text())
    run = res["run"]
    assert run["argv"] == p.args[2:] and run["model_class"] == "MambaForCausalLM" and run["seed"] == 3
    assert run["resolved_path"] == str(model_dirs["mamba_b"].resolve()) and run["model_source"] == "local"
    assert {"torch", "transformers"} <= set(run["versions"]) and run["dtype"] == "float32"
    # the text stage's reading includes its share of the text pass; the pass's forwards are timed apart
    assert set(run["stage_timings_s"]) == {"delta", "causal", "inter_layer", "cross_layer", "text_pass"}
    assert res["passes"]["text"]["stages"] == ["delta"] and res["passes"]["text"]["forwards"] == 12
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
    got = [(n["channel"], n["score"]) for n in delta["results"]["top_neurons"]]  # η², the default ranking
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-9)
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
    # the HTML report beside the JSON: every plot of the run embedded byte for byte, every stage's summary
    import base64

    page = (tmp_path / "out" / f"{out_name(model_dirs['mamba_b'])}_layer1_report.html").read_text()
    assert f"report: out/{out_name(model_dirs['mamba_b'])}_layer1_report.html" in p.stdout
    assert page.count("data:image/png;base64,") == 6
    for plot in plots:
        assert base64.b64encode((tmp_path / plot).read_bytes()).decode() in page
    for stage in ("delta", "causal", "inter_layer", "cross_layer"):
        assert f'id="stage-{stage}"' in page and f"[{stage}] ok" in page
    assert f"channel {got[0][0]:>5}" in page and "FAILED" not in page


def test_several_layers_in_one_run_equal_one_run_per_layer(model_dirs, texts_file, few_prompts, tmp_path,
                                                            monkeypatch, capsys):
    """--layers runs the per-layer stages at each layer in one process: every number equals the
    one-layer run's (--layer L, the per-layer file names kept); the other stages run once; the depth
    profiles are those numbers; one JSON and one report hold it all."""
    base = ["--model", str(model_dirs["mamba_b"]), "--texts_file", str(texts_file), "--max_length", "20",
            "--top_k", "3", "--save_results", "--output_dir", "out", "--no_progress", "--prompts_file", str(few_prompts),
            "--stages", "delta,causal,inter_layer,attention,sparsity"]
    p = main_here([*base, "--layers", "all"], tmp_path, monkeypatch, capsys)
    assert p.returncode == 0, p.stderr
    name = out_name(model_dirs["mamba_b"])
    many = json.loads((tmp_path / "out" / f"{name}_layers0-2_results.json").read_text())
    assert many["run"]["layers"] == [0, 1, 2] and many["run"]["layer"] == 0 and set(many["layers"]) == {"0", "1", "2"}
    assert many["inter_layer"]["status"] == "ok" and "inter_layer" not in many["layers"]["0"]
    assert "[delta, layer 2] ok" in p.stdout and "[inter_layer] ok" in p.stdout
    for layer in (2,):  # the deepest: the farthest from layer 0's
        q = main_here([*base, "--layer", str(layer)], tmp_path, monkeypatch, capsys)
        assert q.returncode == 0, q.stderr
        one = json.loads((tmp_path / "out" / f"{name}_layer{layer}_results.json").read_text())
        got = many["layers"][str(layer)]
        assert got["delta"]["results"]["top_neurons"] == one["delta"]["results"]["top_neurons"]
        np.testing.assert_array_equal(got["causal"]["results"]["scores"], one["causal"]["results"]["scores"])
        for m, r in one["attention"]["results"]["methods"].items():
            np.testing.assert_allclose(got["attention"]["results"]["methods"][m]["neuron_activations"],
                                       r["neuron_activations"], rtol=1e-6)
        # both read from the attention stage's gradient forwards, whose leaf layer differs (0 here, L there):
        # the forwards agree to float rounding
        assert got["sparsity"]["results"]["single"]["gini"] == pytest.approx(
            one["sparsity"]["results"]["single"]["gini"], rel=1e-6)
    prof = many["depth_profiles"]["results"]
    assert prof["layers"] == [0, 1, 2] and prof["relative_depth"] == [0.0, 0.5, 1.0]
    for i, layer in enumerate((0, 1, 2)):
        scores = many["layers"][str(layer)]["causal"]["results"]["scores"]
        assert prof["metrics"]["causal: max impact"][i] == max(scores)
        sp = many["layers"][str(layer)]["sparsity"]["results"]["single"]
        assert prof["metrics"]["sparsity: usage Gini"][i] == sp["usage"]["gini"]["value"] == sp["gini"]
    plot = many["depth_profiles"]["plots"][0]
    assert plot.endswith(f"{name}_depth_profiles_layers0-2.png") and (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "out" / f"{name}_layers0-2_report.html").read_text()
    assert 'id="stage-causal-layer2"' in page and 'id="stage-depth_profiles"' in page


def test_report_merges_a_shell_loop_into_the_same_profiles(model_dirs, texts_file, few_prompts, tmp_path,
                                                          monkeypatch, capsys):
    """`--report FILES` turns the JSON files of a loop over --layer into the depth profiles a --layers run
    gives, without a model; an earlier merge among the files is skipped; mixed models and repeated layers
    are refused in one line."""
    base = ["--texts_file", str(texts_file), "--max_length", "20", "--save_results", "--output_dir", "out",
            "--no_progress", "--stages", "delta,causal,sparsity", "--prompts_file", str(few_prompts)]
    name = out_name(model_dirs["mamba_b"])
    for layer in ("0", "2"):
        assert main_here(["--model", str(model_dirs["mamba_b"]), *base, "--layer", layer], tmp_path, monkeypatch,
                         capsys).returncode == 0
    assert main_here(["--model", str(model_dirs["mamba_b"]), *base, "--layers", "0,2", "--output_dir", "both"],
                     tmp_path, monkeypatch, capsys).returncode == 0
    together = json.loads((tmp_path / "both" / f"{name}_layers0_2_results.json").read_text())
    files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").glob("*.json"))
    for _ in range(2):  # the second time the first merge is among the files
        p = main_here(["--report", *sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").glob("*.json")),
                       "--output_dir", "out"], tmp_path, monkeypatch, capsys)
        assert p.returncode == 0, p.stderr
    assert "note: skipped out/" in p.stdout
    merged = json.loads((tmp_path / "out" / f"{name}_layers0_2_merged_results.json").read_text())
    assert merged["run"]["merged_from"] == files and merged["run"]["layers"] == [0, 2]
    assert merged["run"]["results_file"] == f"{name}_layers0_2_merged_results.json"  # its own JSON, not the first run's
    assert merged["depth_profiles"]["results"]["metrics"] == together["depth_profiles"]["results"]["metrics"]
    prof = together["depth_profiles"]["results"]["metrics"]
    for i, layer in enumerate(("0", "2")):  # the delta profile is of the default ranking, η², the raw variance beside it
        r = together["layers"][layer]["delta"]["results"]
        assert r["ranked_by"] == "eta_squared"
        eta = [v for v in r["per_channel"]["eta_squared"] if v is not None]
        assert prof["delta: max η²"][i] == max(eta) == r["top_neurons"][0]["score"]
        assert prof["delta: median η²"][i] == pytest.approx(np.median(eta), rel=1e-12)
        assert prof["delta: max text variance"][i] == max(r["per_channel"]["text_variance"])
        sp = together["layers"][layer]["sparsity"]["results"]["single"]
        assert prof["sparsity: usage Gini"][i] == sp["usage"]["gini"]["value"]
        assert prof["sparsity: population Gini"][i] == sp["population"]["gini"]["value"]
    page = (tmp_path / "out" / f"{name}_layers0_2_merged_report.html").read_text()
    assert 'id="stage-delta-layer2"' in page and "data:image/png;base64," in page
    # README's sequence: a --layer 0 run beside a --layers run that holds layer 0 too: read once, with a note
    both = f"both/{name}_layers0_2_results.json"
    p = main_here(["--report", files[0], both, "--output_dir", "shared"], tmp_path, monkeypatch, capsys)
    assert p.returncode == 0, p.stderr
    assert f"note: layer 0 is in both {files[0]} and {both} with the same values" in p.stdout, p.stdout
    # where the values differ, the newer run wins and the note names the file dropped
    edited = json.loads((tmp_path / files[0]).read_text())
    edited["delta"]["results"]["top_neurons"][0]["score"] += 1.0
    edited["run"]["start_time"] = "2999-01-01T00:00:00Z"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    p = main_here(["--report", "edited.json", both, "--output_dir", "shared"], tmp_path, monkeypatch, capsys)
    assert p.returncode == 0, p.stderr
    assert f"note: layer 0: edited.json and {both} differ; kept the newer, edited.json" in p.stdout, p.stdout
    # refusals: a file twice; two models
    p = main_here(["--report", files[0], files[0]], tmp_path, monkeypatch, capsys)
    assert p.returncode == 2 and p.stderr.startswith(f"error: --report {files[0]}: given twice")
    assert main_here(["--model", str(model_dirs["mamba_a"]), *base, "--layer", "1", "--output_dir", "other"],
                     tmp_path, monkeypatch, capsys).returncode == 0
    p = main_here(["--report", files[0], f"other/{out_name(model_dirs['mamba_a'])}_layer1_results.json"], tmp_path,
                  monkeypatch, capsys)
    assert p.returncode == 2 and "merge the results of one model" in p.stderr and len(p.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def bad_inputs(model_dirs, tmp_path_factory):
    """Broken model folders and awkward input files, made once."""
    import shutil

    root = tmp_path_factory.mktemp("bad_inputs")

    def model_copy(name, change):
        path = root / name
        shutil.copytree(model_dirs["mamba_b"], path)
        change(path)
        return path

    def truncate(path):
        f = path / "model.safetensors"
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)

    def unsupported(path):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "model_type": "bert", "architectures": ["BertModel"]}))

    def truncated_bin(path):  # the older torch.save format, cut in half
        from safetensors.torch import load_file

        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
        f = path / "pytorch_model.bin"
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)

    def set_config(**change):  # config.json with keys changed (None: removed)
        def edit(path):
            cfg = json.loads((path / "config.json").read_text())
            cfg.update(change)
            (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
        return edit

    def edit_weights(edit):  # model.safetensors rewritten with its tensors edited
        def change(path):
            from safetensors.torch import load_file, save_file

            tensors = load_file(path / "model.safetensors")
            edit(tensors)
            save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return change

    def fifo(path):
        (path / "model.safetensors").unlink()
        os.mkfifo(path / "model.safetensors")

    out = {
        # weight defects: each would leave tensors at their random initialisation, or not load at all
        "gpt2weights": model_copy("gpt2weights", lambda p: shutil.copy(model_dirs["gpt2"] / "model.safetensors",
                                                                       p / "model.safetensors")),
        "onemissing": model_copy("onemissing", edit_weights(lambda t: t.pop("backbone.layers.1.mixer.A_log"))),
        "wrongshape": model_copy("wrongshape", edit_weights(
            lambda t: t.update({"backbone.layers.0.mixer.D": torch.ones(7)}))),
        "nolayers": model_copy("nolayers", set_config(num_hidden_layers=None)),  # transformers' default: 32
        "fewerlayers": model_copy("fewerlayers", set_config(num_hidden_layers=2)),  # the weights have 3
        "fifo": model_copy("fifo", fifo),
        "smallvocab": model_copy("smallvocab", set_config(vocab_size=100)),  # the tokenizer gives ids up to 299
        "trunc": model_copy("trunc", truncate), "truncbin": model_copy("truncbin", truncated_bin),
        "notok": model_copy("notok", lambda p: [f.unlink() for f in p.glob("*token*")]),
        "badcfg": model_copy("badcfg", lambda p: (p / "config.json").write_text("{broken")),
        "noweights": model_copy("noweights", lambda p: (p / "model.safetensors").unlink()),
        "unsupported": model_copy("unsupported", unsupported),
        "afile": root / "afile.txt", "afolder": root / "afolder", "empty": root / "empty.txt",
        "latin1": root / "latin1.txt", "one": root / "one.txt", "long": root / "long_prompt.txt",
        "mamba": model_dirs["mamba_b"], "gpt2": model_dirs["gpt2"],
    }
    out["afile"].write_text("a file\n")
    out["afolder"].mkdir()
    out["empty"].write_text("\n  \n")
    out["latin1"].write_bytes("first line\nthe caf\u00e9 is open\n".encode("latin-1"))  # é = 0xe9 at byte 18
    out["one"].write_text("only one text here\n")
    out["long"].write_text("word " * 600 + "\n")  # more tokens than the tiny GPT-2's 512 positions
    return out


def call_main(args, cwd, monkeypatch, capsys):
    """main.main in this process, with every stage function replaced by a spy: (exit status, stdout,
    stderr, names of the stages that were started)."""
    import main

    started = []

    def spy(name):
        def run(ctx, *read):
            started.append(name)
            raise AssertionError("the spy stage ran")
        return run

    monkeypatch.chdir(cwd)
    import dataclasses

    import pipeline

    spied = {}
    for n in pipeline.ALL_STAGES:  # a text stage starts with its reader (the text pass), the others with run
        s = pipeline.STAGES[n]
        spied[n] = dataclasses.replace(s, run=spy(n), reader=s.reader and spy(n))
    monkeypatch.setattr(pipeline, "STAGES", spied)
    if DEVICE.type != "cpu" and "--device" not in args:
        args = [*args, "--device", DEVICE.type]
    code = main.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err, started


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


M, G = "{mamba}", "{gpt2}"
REFUSALS = [  # (arguments, a fragment of the one-line message)
    # the model and the comparison model
    (["--model", "{missing}"], "--model {missing}: no such folder"),
    (["--model", "{afile}"], "is a file, not a folder"),
    (["--model", "{trunc}"], "weight file model.safetensors is damaged"),
    (["--model", "{truncbin}"], "weight file pytorch_model.bin is damaged"),
    (["--model", "{notok}"], "its tokenizer turns text into no tokens"),
    (["--model", "{badcfg}"], "--model {badcfg}: could not be loaded"),
    (["--model", "{noweights}"], "no weight files"),
    (["--model", "{unsupported}"], "--model {unsupported}: architecture 'bert' is not supported"),
    (["--model", M, "--compare_model", "{missing}"], "--compare_model {missing}: no such folder"),
    (["--model", M, "--compare_model", "{unsupported}"], "--compare_model {unsupported}: architecture 'bert'"),
    (["--model", M, "--compare_model", "{trunc}"], "--compare_model {trunc}: weight file model.safetensors is damaged"),
    (["--model", M, "--compare_model", "{notok}"], "--compare_model {notok}: its tokenizer"),
    (["--model", M, "--stages", "delta", "--compare_model", "{badcfg}"], "--compare_model {badcfg}: could not be"),
    # a model that does not load whole: refused before the first stage, naming the first tensors
    (["--model", "{gpt2weights}"], "--model {gpt2weights}: 39 tensors of the config's architecture are not in the "
                                   "weights (they would stay at their random initialisation): backbone.embeddings"),
    (["--model", "{onemissing}"], "1 tensors of the config's architecture are not in the weights (they would "
                                  "stay at their random initialisation): backbone.layers.1.mixer.A_log;"),
    (["--model", "{wrongshape}"], "1 weight tensors do not fit the config, e.g. backbone.layers.0.mixer.D is (7,) "
                                  "in the weights, the config asks for (72,)"),
    (["--model", "{nolayers}"], "348 tensors of the config's architecture are not in the weights (they would stay "
                                "at their random initialisation): backbone.layers.3.mixer.A_log"),
    (["--model", "{fewerlayers}"], "the weights hold 12 tensors the config's architecture does not have: "
                                   "backbone.layers.2."),
    (["--model", "{fifo}"], "--model {fifo}: model.safetensors in the folder is not a regular file"),
    (["--model", "{smallvocab}"], "the default prompts: prompt 1 ("),
    (["--model", "{smallvocab}", "--stages", "delta"], "the default texts: text 1 ("),
    (["--model", M, "--stages", "delta,comparison", "--compare_model", "{gpt2weights}"],
     "--compare_model {gpt2weights}: 39 tensors of the config's architecture are not in the weights"),
    (["--model", M, "--stages", "delta,comparison", "--compare_model", "{nolayers}"],
     "--compare_model {nolayers}: 348 tensors"),
    (["--model", M, "--stages", "delta,comparison", "--compare_model", "{fifo}"],
     "--compare_model {fifo}: model.safetensors in the folder is not a regular file"),
    # stages that could not run, and flags that would be ignored
    (["--model", M, "--stages", "inter_layer"], "the inter_layer stage needs dimensions: give --causal_dims"),
    (["--model", M, "--stages", "delta,cross_layer"], "the cross_layer stage needs dimensions"),
    (["--model", M, "--ablation", "mean", "--intervention_scale", "0.5"],
     "--intervention_scale 0.5: applies to the zero ablation only"),
    (["--model", M, "--layers", "0-99999999"], "--layers 0-99999999: out of range for this model with 3 layers"),
    (["--model", M, "--layers", "0-99999999999999999999"], "--layers 0-99999999999999999999: out of range"),
    (["--model", "~nosuchuser/x"], "--model ~nosuchuser/x: ~nosuchuser names no known home folder"),
    (["--model", M, "--plots_dir", "~nosuchuser/x"], "--plots_dir ~nosuchuser/x: ~nosuchuser names no known home"),
    (["--model", M, "--texts_file", "~nosuchuser/t.txt"], "--texts_file ~nosuchuser/t.txt: ~nosuchuser names"),
    (["--model", M, "--save_results", "--output_dir", "~nosuchuser/o"], "--output_dir ~nosuchuser/o: ~nosuchuser"),
    (["--model", M, "--top_k", "-1"], "--top_k -1: must be at least 1"),
    (["--model", M, "--causal_dims", "-1"], "--causal_dims -1: must be at least 0"),
    # flags checked against the model's shape
    (["--model", M, "--layer", "5"], "valid layers are 0..2"),
    (["--model", M, "--layer", "-1"], "valid layers are 0..2"),
    (["--model", M, "--causal_dims", "3", "999"], "valid dims are 0..23"),
    (["--model", M, "--causal_site", "mlp"], "site 'mlp' does not exist for mamba"),
    (["--model", M, "--sparsity_layers", "0", "3"], "--sparsity_layers 3: out of range"),
    (["--model", M, "--causal_site", "ssm", "--causal_dims", "30", "70"], "cross_layer reads the residual stream"),
    (["--model", G, "--stages", "delta"], "not applicable to gpt2"),
    (["--model", M, "--enable_attention", "--attention_layers", "0", "3"],
     "--attention_layers 3: out of range for this model with 3 layers"),
    (["--model", M, "--enable_attention", "--attention_layers", "1-0"], "--attention_layers 1-0: an empty range"),
    (["--model", M, "--attention_layers", "1"], "--attention_layers 1: the attention stage is not in this run"),
    (["--model", M, "--enable_attention", "--layers", "0", "1", "--attention_layers", "1"],
     "--attention_layers 1 and --layers: --layers already runs the attention stage"),
    (["--model", G, "--max_length", "600"], "--max_length 600: this gpt2 model has 512 positions"),
    (["--model", G, "--prompts_file", "{long}"], "prompt 1 ('word word word"),
    (["--model", M, "--stages", "causal,comparison", "--compare_model", G, "--prompts_file", "{long}"],
     "on --compare_model {gpt2}: prompt 1"),
    # texts and prompts
    (["--model", M, "--texts_file", "{missing}"], "no such file"),
    (["--model", M, "--texts_file", "{empty}"], "no non-blank lines"),
    (["--model", M, "--texts_file", "{afolder}"], "--texts_file {afolder}: is a folder, not a file"),
    (["--model", M, "--texts_file", "{latin1}"], "not UTF-8 (byte 0xe9 at byte position 18, line 2)"),
    (["--model", M, "--prompts_file", "{latin1}"], "--prompts_file {latin1}: not UTF-8"),
    (["--model", M, "--prompts_file", "{missing}"], "--prompts_file"),
    (["--model", M, "--text_limit", "0"], "--text_limit 0"),
    (["--model", M, "--text_limit", "1"], "--text_limit 1: the delta stage needs at least 2 texts"),
    (["--model", M, "--texts_file", "{one}"], "--texts_file {one} gives 1: the delta stage needs at least 2"),
    # output folders
    (["--model", M, "--plots_dir", "{afile}"], "--plots_dir {afile}: is a file, not a folder"),
    (["--model", M, "--plots_dir", "{afile}/sub"], "cannot be created, {afile} is a file"),
    (["--model", M, "--plots_dir", "/proc/mamba_plots"], "--plots_dir /proc/mamba_plots: cannot be created"),
    (["--model", M, "--save_results", "--output_dir", "{afile}"], "--output_dir {afile}: is a file"),
    (["--model", M, "--save_results", "--output_dir", "/sys/mamba_out"], "--output_dir /sys/mamba_out"),
    (["--model", M, "--save_results", "--output_dir", "out"], "is a folder; move it away"),
    (["--model", M, "--save_results", "--output_dir", "out_report"], "--output_dir out_report: the report "),
    # flag values
    (["--model", M, "--layers", "5"], "--layers 5: out of range for this model with 3 layers"),
    (["--model", M, "--layers", "0", "2-1"], "--layers 2-1: an empty range; write the lower layer first (1-2)"),
    (["--model", M, "--layers", "one"], "--layers one: not a layer number, a range like 0-3, or all"),
    (["--model", M, "--layers", ","], "--layers ',': names no layer"),
    (["--model", M, "--layer", "1", "--layers", "0-2"], "--layer 1 and --layers 0-2: give one of them"),
    (["--model", M, "--stages", "nonsense"], "unknown stage"),
    (["--model", M, "--stages", ""], "names no stage"),
    (["--model", M, "--stages", ",,"], "names no stage"),
    (["--model", M, "--attention_methods", "magic"], "--attention_methods magic"),
    (["--model", M, "--ablation", "half"], "--ablation half"),
    (["--model", M, "--efficiency_budget", "0"], "--efficiency_budget 0"),
    (["--model", M, "--seed", "-1"], "--seed -1: must lie in 0..4294967295"),
    (["--model", M, "--seed", str(2 ** 32)], "--seed 4294967296"),
    (["--model", M, "--log_level", "LOUD"], "--log_level LOUD: unknown"),
    (["--model", M, "--layer", "abc"], "argument --layer: invalid int value: 'abc'"),
    (["--model", M, "--device", "tpu"], "--device 'tpu' is unknown"),
    (["--model", M, "--causal_batch_size", "0"], "--causal_batch_size 0"),
    (["--model", M, "--intervention_scale", "nan"], "argument --intervention_scale: 'nan' is not a finite number"),
    (["--model", M, "--intervention_scale=-inf"], "argument --intervention_scale: '-inf' is not a finite"),
    (["--model", M, "--sparsity_threshold", "inf"], "argument --sparsity_threshold: 'inf' is not a finite"),
    (["--model", M, "--dead_eps", "NaN"], "argument --dead_eps: 'NaN' is not a finite number"),
    (["--model", M, "--efficiency_budget", "inf"], "argument --efficiency_budget: 'inf' is not a finite"),
    (["--model", M, "--bootstrap_resamples", "5"], "--bootstrap_resamples 5: must be at least 100"),
    (["--model", M, "--faithfulness_draws", "5"], "--faithfulness_draws 5: must be at least 20"),
    (["--model", M, "--faithfulness_max_k", "0"], "--faithfulness_max_k 0: must be at least 1"),
    (["--model", M, "--attention_target", "first"], "--attention_target first: unknown; choose likelihood or"),
]


@pytest.mark.parametrize("args, message", REFUSALS, ids=[" ".join(a[2:]) or a[1] for a, _ in REFUSALS])
def test_bad_input_is_refused_in_one_line_before_any_stage(args, message, bad_inputs, tmp_path, monkeypatch,
                                                            capsys):
    """Exit 2, one line naming the value, no traceback, nothing written, and no stage started."""
    subs = {"{missing}": str(tmp_path / "missing"), **{f"{{{k}}}": str(v) for k, v in bad_inputs.items()}}

    def sub(text):
        for k, v in subs.items():
            text = text.replace(k, v)
        return text

    (tmp_path / "out" / f"{out_name(bad_inputs['mamba'])}_layer0_results.json").mkdir(parents=True)  # in the way
    (tmp_path / "out_report" / f"{out_name(bad_inputs['mamba'])}_layer0_report.html").mkdir(parents=True)
    before = tree(tmp_path)
    code, out, err, started = call_main([sub(a) for a in args], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and sub(message) in lines[0], err
    assert "Traceback" not in err and out == ""
    assert started == [] and tree(tmp_path) == before


def test_a_missing_tokenizer_is_not_blamed_on_the_texts(bad_inputs, tmp_path, monkeypatch, capsys):
    code, _, err, _ = call_main(["--model", bad_inputs["notok"]], tmp_path, monkeypatch, capsys)
    assert code == 2 and "tokenizer" in err and "text '" not in err and "remove it from the texts" not in err


def test_failed_stage_is_recorded_listed_and_exits_1(model_dirs, texts_file, tmp_path, monkeypatch, capsys):
    """A stage that raises (planted here) is recorded with its error; the other stages go on."""
    import main

    def broken(ctx, read):
        raise RuntimeError("planted failure")

    import dataclasses

    import pipeline

    monkeypatch.setitem(pipeline.STAGES, "delta", dataclasses.replace(pipeline.STAGES["delta"], run=broken))
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(model_dirs["mamba_a"]), "--texts_file", str(texts_file), "--text_limit", "2",
            "--save_results", "--output_dir", "out", "--stages", "delta", "attention", "--no_progress"]
    if DEVICE.type != "cpu":
        args += ["--device", DEVICE.type]
    assert main.main(args) == 1
    out = capsys.readouterr().out
    res = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert res["delta"] == {"status": "error", "error": "RuntimeError: planted failure",
                            "wall_time_s": res["delta"]["wall_time_s"]}
    assert "FAILED stages: delta" in out and "[delta] error" in out
    page = next((tmp_path / "out").glob("*_report.html")).read_text()
    assert "FAILED stages: delta" in page and "RuntimeError: planted failure" in page
    assert res["attention"]["status"] == "ok"  # the other stages go on
    # the attention stage's JSON numbers are the library's, averaged over the two texts
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attention_neurons import MambaAttentionNeurons
    from utils import tokenize_texts

    model = AutoModelForCausalLM.from_pretrained(model_dirs["mamba_a"]).eval()
    tok = AutoTokenizer.from_pretrained(model_dirs["mamba_a"])
    an = MambaAttentionNeurons(model)
    texts_ids = tokenize_texts(tok, read_texts_file(texts_file)[:2], 256).input_ids
    scores = [an.create_neurons(an.extract_attention_vectors(ids, [0]), m)[0]
              for ids in texts_ids for m in ("attention_weighted", "gradient_guided", "rollout")]
    n = [ids.shape[1] for ids in texts_ids]  # each text weighs its tokens
    for i, (method, r) in enumerate(res["attention"]["results"]["methods"].items()):
        a = (n[0] * scores[i].neuron_activations + n[1] * scores[i + 3].neuron_activations) / sum(n)
        np.testing.assert_allclose(r["neuron_activations"], a, rtol=1e-5)


def test_repeated_causal_dims_are_scanned_once(model_dirs, texts_file, tmp_path, monkeypatch, capsys):
    import causal_analysis as ca
    import main

    seen = []
    real = ca._ablator

    def counting(dims, *a):
        seen.extend(dims.tolist())
        return real(dims, *a)

    monkeypatch.setattr(ca, "_ablator", counting)
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(model_dirs["mamba_a"]), "--texts_file", str(texts_file), "--save_results",
            "--output_dir", "out", "--stages", "causal", "--causal_dims", "5", "3", "5", "3", "--no_progress"]
    assert main.main(args + (["--device", DEVICE.type] if DEVICE.type != "cpu" else [])) == 0
    res = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert res["causal"]["results"]["dims"] == [5, 3] and len(res["causal"]["results"]["scores"]) == 2
    assert sorted(seen) == sorted([3, 5] * len(ca.DEFAULT_PROMPTS))  # each dim once per prompt
    assert any("--causal_dims: repeated values dropped" in n for n in res["run"]["notes"])
    scores = ca.causal_impact_scores(*main_model_and_tokenizer(model_dirs["mamba_a"]), ca.DEFAULT_PROMPTS, 0,
                                     dims=[5, 3], progress=False)
    np.testing.assert_allclose(res["causal"]["results"]["scores"], scores, rtol=1e-6)


def main_model_and_tokenizer(path):
    from models import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(str(path), DEVICE.type)
    return loaded.model, loaded.tokenizer


def test_unknown_hub_id_offline_fails_fast(tmp_path):
    """No hub retries: one download attempt retries for about 25 s; the probe gives up within 2.5 s. The
    bound leaves room for importing torch on a loaded machine (4.7-6.7 s alone on a GPU machine, up to
    19 s with 8 test workers beside it)."""
    p = run_main(["--model", "nobody-has/this-model-xyz"], tmp_path, drop_offline=True)
    assert p.returncode == 2 and "hub is unreachable" in p.stderr and p.elapsed < 20


def test_transformer_run_continues_with_delta_not_applicable(model_dirs, texts_file, few_prompts, tmp_path):
    """A GPT-2 run: delta does not apply, the attention stage runs on its heads' weights at every layer
    (--attention_layers all), and the comparison holds a Mamba's attention neurons beside them."""
    p = run_main(["--model", str(model_dirs["gpt2"]), "--texts_file", str(texts_file), "--save_results",
                  "--output_dir", "out", "--no_progress", "--seq_lengths", "16", "32", "--compare_model",
                  str(model_dirs["mamba_a"]), "--enable_attention", "--attention_layers", "all", "--prompts_file",
                  str(few_prompts), "--faithfulness_max_k", "8", "--faithfulness_draws", "20"], tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    att = res["attention"]["results"]
    assert att["units"] == {"unit": "dim", "n_units": 32, "n_heads": 2, "head_dim": 16,
                            "definition": att["units"]["definition"]}
    assert att["attention_layers"] == [0, 1] and set(att["by_layer"]) == {"0", "1"}
    assert att["max_reconstruction_error"] < 1e-5
    assert all(0 <= t["channel"] < 32 and t["head"] == t["channel"] // 16
               for t in att["methods"]["attention_weighted"]["top_neurons"])
    assert "units: the 32 attention-output dims (2 heads x 16)" in p.stdout
    comp = res["comparison"]["results"]["attention"]
    assert [m["family"] for m in comp["models"].values()] == ["gpt2", "mamba"]
    assert [m["layers"] for m in comp["models"].values()] == [[0, 1], [0, 1]]  # 2 layers beside 2 layers
    assert res["delta"]["status"] == "not_applicable" and "not applicable to gpt2" in res["delta"]["reason"]
    assert "not applicable to gpt2" in p.stdout
    assert "=== GPT-2 neuron analysis: " in p.stdout and "Mamba neuron analysis" not in p.stdout
    assert res["efficiency"]["status"] == "ok" and res["efficiency"]["results"]["scaling"]["points"]
    assert "USDT" not in p.stderr + p.stdout and "profiler_start" not in p.stderr  # the profiler is quiet


def test_help_is_fast(tmp_path):
    """--help imports none of the heavy libraries (torch, transformers, matplotlib): that is what keeps it
    fast, and it is checked as such rather than by a wall-clock bound that a loaded machine would break."""
    p = run_main(["--help"], tmp_path)
    assert p.returncode == 0 and "--enable_attention" in p.stdout and "attention_weighted" in p.stdout
    probe = (f"import runpy, sys\nsys.path.insert(0, {str(REPO)!r})\nsys.argv = [{MAIN!r}, '--help']\n"
             f"try:\n    runpy.run_path({MAIN!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    q = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert q.returncode == 0 and "HEAVY []" in q.stdout, q.stdout[-300:] + q.stderr[-300:]


def test_default_run_offline_uses_the_reference_mamba(tmp_path, few_prompts):
    """README's command with no hub and an empty cache: the shipped reference Mamba, one warning line
    for the model and one for the texts, results recorded as such. (Four prompts, a 2 s efficiency budget and
    shorter deletion curves keep it to a fraction of the default run's time; what it checks does not depend
    on them.)"""
    p = run_main(["--enable_attention", "--save_results", "--no_progress", "--prompts_file", str(few_prompts),
                  "--efficiency_budget", "2", "--faithfulness_max_k", "16", "--faithfulness_draws", "20"], tmp_path,
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
    stages = [s for s in res["run"]["stage_timings_s"] if s != "text_pass"]
    assert all(res[s]["status"] == "ok" for s in stages)
    comp = res["comparison"]["results"]
    assert comp["compare_model"]["source"] == "reference"
    assert [m["label"] for m in comp["models"]] == ["reference_mamba", "reference_transformer"]
    assert "causal" in comp  # the causal stage ran, so both distributions are there
    # the default command reads sparsity from the attention gradient forwards (both models), and says so
    where = res["sparsity"]["results"]["measured_in"]
    assert where.startswith("the text pass's gradient forwards") and f"measured in {where}" in p.stdout
    assert comp["models"][1]["sparsity_measured_in"].startswith("the text pass's gradient forwards")
    for name in stages:
        for path in res[name].get("plots", []):
            assert (tmp_path / path).read_bytes()[:4] == b"\x89PNG"
    # the report's findings: a line for every stage that has a headline, none dropped by a changed key
    from pipeline import stage_entries
    from report import HEADLINES, findings

    lines = findings(stage_entries(res))
    assert len(lines) == len([s for s in stages if s in HEADLINES]) >= 6, lines


def test_a_named_model_is_never_substituted(tmp_path):
    p = run_main(["--model", "state-spaces/mamba-130m-hf"], tmp_path,
                 env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")})
    assert p.returncode == 2 and "hub is unreachable" in p.stderr and "reference" not in p.stderr


@pytest.mark.parametrize("stages, expected, sig, status", [
    ("efficiency", "interrupted; nothing written", "SIGINT", 130),
    ("delta,efficiency", "interrupted; no results file written (the 2 plots of the stages that finished are in",
     "SIGINT", 130),
    ("efficiency", "terminated (SIGTERM); nothing written", "SIGTERM", 143),
    ("delta,efficiency", "terminated (SIGTERM); no results file written (the 2 plots of the stages that finished",
     "SIGTERM", 143),
])
def test_ctrl_c_and_sigterm_end_in_one_line_and_no_partial_file(stages, expected, sig, status, model_dirs,
                                                                texts_file, tmp_path):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler, `timeout`) while a stage runs: exit 130 / 143, one closing
    line that says what was written, no traceback, no results file and no temporary file left behind."""
    import signal

    args = [sys.executable, MAIN, "--model", str(model_dirs["mamba_b"]), "--texts_file", str(texts_file),
            "--stages", stages, "--save_results", "--output_dir", "out", "--no_progress", "--log_level", "INFO",
            "--seq_lengths", "64", "1024", "16384", "--efficiency_budget", "100"]
    if DEVICE.type != "cpu":
        args += ["--device", DEVICE.type]
    # SIGINT's default action restored in the child: a shell runs background jobs with it ignored, and Python
    # then installs no Ctrl-C handler of its own (the suite run in the background would fail here otherwise)
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stderr:
            if "stage efficiency: started" in line:
                p.send_signal(getattr(signal, sig))
                break
        _, rest = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == status, rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith(expected), rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    assert not (tmp_path / "out").exists()
    assert not [f for f in tmp_path.rglob("*") if f.name.endswith(".tmp")]
    assert len(list((tmp_path / "plots").glob("*.png")) if (tmp_path / "plots").exists() else []) == \
        (2 if "delta" in stages else 0)


def test_default_max_length_is_capped_at_a_transformers_positions_with_a_note(tokenizer, texts_file, tmp_path,
                                                                             monkeypatch, capsys):
    """A GPT-2 with 64 positions: the default --max_length (256) becomes 64, said in the notes; the texts
    are truncated there instead of failing inside a stage."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import main

    path = tmp_path / "short_gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=1, n_embd=16, n_head=2, n_positions=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(path), "--texts_file", str(texts_file), "--stages", "sparsity", "--save_results",
            "--no_progress"] + (["--device", DEVICE.type] if DEVICE.type != "cpu" else [])
    assert main.main(args) == 0
    res = json.loads(next((tmp_path / "analysis_outputs").glob("*.json")).read_text())
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in read_texts_file(texts_file))
    assert longest > 64 and res["texts"]["max_length"] == 64 and res["texts"]["n_truncated"] >= 1
    assert any("truncated to this model's 64 positions" in n for n in res["run"]["notes"])
    assert "truncated to this model's 64 positions" in capsys.readouterr().out


@pytest.mark.parametrize("module, function, kind, suffix", [("utils", "write_json", "results", "results.json"),
                                                        ("report", "write_report", "report", "report.html")])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_1(module, function, kind, suffix, model_dirs,
                                                                 texts_file, tmp_path, monkeypatch, capsys):
    """The disk fills up during a run (before the JSON, or between the JSON and the report): the summary is
    still printed, then one error line naming the file, exit 1; the JSON, when written, stays."""
    import errno
    import importlib

    import main

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(importlib.import_module(module), function, full)
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(model_dirs["mamba_a"]), "--texts_file", str(texts_file), "--stages", "delta",
            "--save_results", "--no_progress"] + (["--device", DEVICE.type] if DEVICE.type != "cpu" else [])
    assert main.main(args) == 1
    out, err = capsys.readouterr()
    assert "[delta] ok" in out
    name = f"analysis_outputs/{out_name(model_dirs['mamba_a'])}_layer0_"
    assert err.strip().splitlines() == [f"error: {kind} not written to {name}{suffix} (No space left on device)"]
    assert (tmp_path / f"{name}results.json").is_file() == (kind == "report")


def test_each_stage_is_printed_as_soon_as_it_ends(model_dirs, texts_file, tmp_path, monkeypatch, capsys):
    """While the second stage runs, the header and the first stage's summary are already on stdout."""
    import main

    seen = {}
    import dataclasses

    import pipeline

    real = pipeline.STAGES["causal"].run

    def watching(ctx):
        seen["before causal"] = capsys.readouterr().out
        return real(ctx)

    monkeypatch.setitem(pipeline.STAGES, "causal", dataclasses.replace(pipeline.STAGES["causal"], run=watching))
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(model_dirs["mamba_a"]), "--texts_file", str(texts_file), "--stages", "delta,causal",
            "--no_progress"] + (["--device", DEVICE.type] if DEVICE.type != "cpu" else [])
    assert main.main(args) == 0
    before, after = seen["before causal"], capsys.readouterr().out
    assert "=== Mamba neuron analysis" in before and "[delta] ok" in before and "top delta-sensitive" in before
    assert "[causal]" not in before and "[causal] ok" in after and "[delta]" not in after


def test_folders_of_the_same_name_never_share_files_and_a_fuller_file_is_not_replaced(model_dirs, texts_file,
                                                                                      tmp_path, monkeypatch, capsys):
    """runA/final and runB/final write different files; a re-run with fewer stages is refused (exit 2,
    the file untouched); a re-run with the same stages replaces the file and says so."""
    import shutil

    import main

    for run in ("runA", "runB"):
        shutil.copytree(model_dirs["mamba_a"], tmp_path / run / "final")
    monkeypatch.chdir(tmp_path)

    def run(folder, stages):
        args = ["--model", f"{folder}/final", "--texts_file", str(texts_file), "--stages", stages, "--save_results",
                "--output_dir", "out", "--no_progress", "--max_length", "16"]
        code = main.main(args + (["--device", DEVICE.type] if DEVICE.type != "cpu" else []))
        return code, capsys.readouterr()

    assert run("runA", "delta,sparsity")[0] == 0 and run("runB", "delta")[0] == 0
    files = sorted(p.name for p in (tmp_path / "out").glob("*_results.json"))
    assert len(files) == 2 and all(f.startswith("final-") for f in files), files
    a = tmp_path / "out" / f"{out_name(tmp_path / 'runA' / 'final')}_layer0_results.json"
    before = a.read_bytes()
    code, cap = run("runA", "delta")
    assert code == 2 and cap.out == "" and "Traceback" not in cap.err
    assert cap.err.strip().splitlines() == [
        f"error: --output_dir out: out/{a.name} holds an earlier run of this model and layer with results of "
        "sparsity, which this run does not run; move the file away, choose another --output_dir, or run those "
        "stages too"]
    assert a.read_bytes() == before
    code, cap = run("runA", "sparsity,delta")
    assert code == 0 and f"note: replaced out/{a.name} (an earlier run of this model and layer, started " in cap.out
    assert json.loads(a.read_text())["run"]["notes"][-1].startswith(f"replaced out/{a.name}")


def test_a_plot_that_cannot_be_written_keeps_the_stage_numbers_and_names_the_file(model_dirs, texts_file, tmp_path,
                                                                                  monkeypatch, capsys):
    import errno

    from matplotlib.figure import Figure

    import main

    savefig = Figure.savefig

    def full_for_heatmaps(self, fname, *a, **kw):  # the disk is full when the heatmap's temporary file is written
        if "heatmap" in str(fname):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))
        return savefig(self, fname, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", full_for_heatmaps)
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(model_dirs["mamba_a"]), "--texts_file", str(texts_file), "--stages", "delta",
            "--save_results", "--no_progress", "--max_length", "16"]
    assert main.main(args + (["--device", DEVICE.type] if DEVICE.type != "cpu" else [])) == 1
    out = capsys.readouterr().out
    res = json.loads(next((tmp_path / "analysis_outputs").glob("*_results.json")).read_text())
    delta = res["delta"]
    assert delta["status"] == "ok" and delta["results"]["top_neurons"]
    lost = delta["plots_not_written"]
    assert len(lost) == 1 and "heatmap" in lost[0]["path"] and lost[0]["error"] == "No space left on device"
    assert not (tmp_path / lost[0]["path"]).exists() and lost[0]["path"] not in delta["plots"]
    assert [p for p in delta["plots"] if (tmp_path / p).is_file()] == delta["plots"] and len(delta["plots"]) == 1
    assert f"plot NOT written: {lost[0]['path']} (No space left on device)" in out
    assert f"plots NOT written (the stages' numbers are kept): {lost[0]['path']}" in out
    assert not [f for f in tmp_path.rglob("*") if f.name.endswith(".tmp")]


def test_a_full_stdout_is_one_line_on_stderr(model_dirs, texts_file, tmp_path):
    p = subprocess.run([sys.executable, MAIN, "--model", str(model_dirs["mamba_a"]), "--texts_file", str(texts_file),
                        "--stages", "delta", "--no_progress", "--max_length", "16"],
                       cwd=tmp_path, stdout=open("/dev/full", "w"), stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: the summary could not be written to standard output (No space left on device)"]


def test_help_states_each_default_once():
    from main import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in re.split(r" (?=--\w)", text):
        assert len(re.findall(r"\bdefault\b", option, re.I)) <= 2, option  # "default 256, or ..." at most, stated once
