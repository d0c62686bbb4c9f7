"""The default command at real shape: `python main.py --model M --compare_model G --enable_attention` where
M is a random-init model with mamba-130m's exact config (d_model 768, 24 layers, e 1536, n 16, vocab
50280) and G one with gpt2-124m's (12 layers, d 768, 12 heads, vocab 50257), both built here (no
download) and saved with save_pretrained beside the shipped reference tokenizer (8192 tokens, whose ids
fit both vocabularies). Texts: `--texts_file`, else 100 texts each made of `--join` consecutive texts of
the repo's data/offline_texts.txt (5 give about 130 tokens a text, near the 13,436 tokens of 100
WikiText-2 lines under the GPT-2 tokenizer). Prints the per-stage wall times from the run's JSON and the
total.

Random weights give the same shapes, FLOPs and memory traffic as the trained checkpoints, so the times
are what a user waits for; the numbers in the results are meaningless. The device's fp32 matmul rate
(a 2048³ product on the CPU with torch's default thread count, 8192³ on a GPU, as main.py runs) is printed
beside the table: on a CPU the stages are mostly matmul- and memory-bound, so compare totals from
different machines through it. On a GPU, `--device cuda`, these models' small per-token kernels are
bound by launches and the sequential scan, not by the matmul rate, so the floors there are far below
what any eager run reaches; the ratio says how far.

Beside each stage: its floor, the analytic forward FLOPs it cannot avoid (`efficiency.flops_per_token`
per layer and for the head; an input-only backward counted as one forward of the same layers) at this
machine's matmul rate, and how many times the floor the stage took:
- text_pass (the forwards every text stage reads: delta, attention, sparsity and the comparison's main-model
  sparsity): per text the capture forward up to the layer, the gradient forward of every layer and its
  input-only backward of the layers from the top down to the layer (head at the last position, twice);
- delta: its reading of the pass (recomputing Δ; not counted);
- causal: per (dim, prompt) the layers after the site's layer at every prompt position and the head at
  the last one; inter_layer: the same from each layer for the chosen dims; cross_layer: a forward of
  every layer for each (dim, source layer) row and per prompt (its clean twins are not counted);
- attention: its reading of the pass: on a Mamba forming α (2·e·n per causal (i, j) pair) at the layer, and
  with rollout at every layer below it too (rollout reads each one's α); the methods' elementwise passes
  over α are not counted;
- sparsity: its reading of the pass (the streamed statistics; no FLOP floor);
- census: its reading of the pass at every layer (group sums; no FLOP floor; `bench/census.py` measures it
  against a forward);
- faithfulness: the causal floor for each ablated row per prompt: every unit of its site (unless the causal
  stage's scan was its ground truth) and every distinct set of two or more units of its deletion curves;
- efficiency: a measurement within --efficiency_budget seconds (no floor);
- comparison: the other model's attention (as above, at its matched layer), causal scan and faithfulness
  rows, and its efficiency measurement (the budget counted as its floor).

    python bench/full_run.py [--texts_file F | --join 5] [--text_limit 100] [--max_length 256] [--layer 0]
                             [--device cpu|cuda] [-- EXTRA main.py ARGS]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_models(root: Path) -> tuple[tuple[Path, Path], dict]:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO / "reference_models" / "mamba")
    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(hidden_size=768, state_size=16, expand=2, num_hidden_layers=24,
                                         vocab_size=50280, conv_kernel=4, time_step_rank=48))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257))
    paths = root / "mamba-130m-shape", root / "gpt2-124m-shape"
    for model, path in zip((mamba, gpt2), paths):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    from models import get_adapter

    return paths, {"main": get_adapter(mamba), "other": get_adapter(gpt2)}


def stage_floors(res: dict, adapters: dict, text_lengths: dict, prompt_lengths: dict) -> dict:
    """{stage: floor in FLOPs, or None} (see the module doc). `adapters`, `text_lengths` (tokens per
    text) and `prompt_lengths` (tokens per causal prompt): {"main" / "other": ...}."""
    from efficiency import flops_per_token

    def layer_flops(side: str, L: int) -> float:  # one layer's forward FLOPs per token at context L
        return flops_per_token(adapters[side], L)["per_layer"]

    def head(side: str) -> float:
        return flops_per_token(adapters[side], 1)["head"]

    def ok(stage: str):
        return res[stage]["results"] if res.get(stage, {}).get("status") == "ok" else None

    def text_pass(side: str, layer: int) -> float:
        n, total = adapters[side].n_layers, 0.0
        for L in text_lengths[side]:
            passes = (layer + 1) + n + (n - layer)  # capture, the gradient forward, the backward from the top
            total += L * passes * layer_flops(side, L) + 2 * head(side)
        return total

    def attention(side: str, layer: int, methods) -> float:
        a, total = adapters[side], 0.0
        alphas = layer + 1 if "rollout" in methods else 1  # the layers whose α is formed
        for L in text_lengths[side]:
            if a.is_ssm:
                total += alphas * 2 * a.inner_size * int(a.config.state_size) * L * (L + 1) / 2
        return total

    def causal(side: str, layer: int, n_dims: int) -> float:
        after = adapters[side].n_layers - layer - 1
        return sum(n_dims * (L * after * layer_flops(side, L) + head(side)) for L in prompt_lengths[side])

    n, layer = adapters["main"].n_layers, res["run"]["layer"]
    floors = {"text_pass": text_pass("main", layer), "delta": None}
    c = ok("causal")
    floors["causal"] = causal("main", layer, c["n_dims"]) if c else None
    il = ok("inter_layer")
    floors["inter_layer"] = sum(causal("main", la, len(il["dims"])) for la in range(n)) if il else None
    cl = ok("cross_layer")
    floors["cross_layer"] = (sum(len(cl["dims"]) * n * L * n * layer_flops("main", L) for L in prompt_lengths["main"])
                             if cl else None)
    floors["attention"] = attention("main", layer, ok("attention")["methods"]) if ok("attention") else None
    f = ok("faithfulness")
    floors["faithfulness"] = sum(causal("main", layer, faithfulness_rows(s)) for s in f["spaces"].values()) if f else None
    floors["sparsity"] = None
    floors["census"] = None
    floors["efficiency"] = None
    cmp = ok("comparison")
    if cmp:
        other_layer = cmp["models"][1]["layer"]
        att = cmp.get("attention", {"skipped": "not run"})
        part = (text_pass("other", other_layer) + attention("other", other_layer, att["methods"])
                if "skipped" not in att else 0.0)
        if "causal" in cmp:
            part += causal("other", other_layer, len(cmp["causal"][cmp["models"][1]["label"]]["scores"]))
        fz = cmp.get("faithfulness", {})
        if "models" in fz:
            part += sum(causal("other", other_layer, faithfulness_rows(s))
                        for s in fz["models"][cmp["models"][1]["label"]]["spaces"].values())
        floors["comparison"] = part
    return floors


def faithfulness_rows(space: dict) -> int:
    """The ablated rows per prompt of one faithfulness space: its units (unless the causal stage's scan was its
    ground truth) and its sets of two or more units."""
    scanned = space.get("ground_truth_from", space.get("ground_truth", {}).get("from")) == "scanned here"
    return (space["n_units"] if scanned else 0) + space["n_sets_ablated"]


def matmul_rate(device: str = "cpu", repeats: int = 5) -> float:
    """fp32 GFLOP/s of a square matmul on `device` (the best of 3 rounds): 2048³ on the CPU with torch's
    default threads, as main.py runs; 8192³ on a GPU (torch's default fp32 matmul, as main.py runs)."""
    import torch

    m = 2048 if device == "cpu" else 8192
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return repeats * 2 * m ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts_file", default=None)
    ap.add_argument("--join", type=int, default=5, help="offline texts per synthetic text")
    ap.add_argument("--text_limit", type=int, default=100)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="main.py's --device; the matmul rate (and so the floors) is measured there")
    ap.add_argument("extra", nargs="*", help="more main.py arguments (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        (mamba, gpt2), adapters = build_models(root)
        build = time.perf_counter() - t0
        rate = matmul_rate(args.device)
        if args.texts_file is None:
            from utils import OFFLINE_TEXTS_PATH, read_texts_file

            base = read_texts_file(OFFLINE_TEXTS_PATH)
            args.texts_file = str(root / "texts.txt")
            Path(args.texts_file).write_text("\n".join(" ".join(base[(k + i) % len(base)] for i in range(args.join))
                                                       for k in range(args.text_limit)) + "\n", encoding="utf-8")
        cmd = [sys.executable, str(REPO / "main.py"), "--model", str(mamba), "--compare_model", str(gpt2),
               "--enable_attention", "--texts_file", args.texts_file, "--text_limit", str(args.text_limit),
               "--max_length", str(args.max_length), "--layer", str(args.layer), "--save_results",
               "--output_dir", str(root / "out"), "--plots_dir", str(root / "plots"), "--no_progress",
               "--device", args.device, *args.extra]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode not in (0, 1):
            sys.exit(f"main.py exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
        res = json.loads(next((root / "out").glob("*.json")).read_text())
        from transformers import AutoTokenizer

        from utils import read_texts_file, tokenize_texts

        tok = AutoTokenizer.from_pretrained(mamba)  # both models carry the same tokenizer
        lengths = tokenize_texts(tok, read_texts_file(args.texts_file)[:args.text_limit], args.max_length).lengths
        prompts = res.get("causal", {}).get("results", {}).get("prompts", [])
        prompt_lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    floors = stage_floors(res, adapters, {"main": lengths, "other": lengths},
                          {"main": prompt_lengths, "other": prompt_lengths})
    t = res["texts"]
    print(f"mamba-130m-shape vs gpt2-124m-shape (random init), layer {args.layer}, {t['n_texts']} texts, "
          f"{t['n_tokens']} tokens, max_length {t['max_length']}; models built and saved in {build:.0f} s")
    print(f"{'stage':<12} {'status':<15} {'seconds':>9} {'floor s':>9} {'x floor':>8}")
    argv = res["run"]["argv"]
    budget = float(argv[argv.index("--efficiency_budget") + 1]) if "--efficiency_budget" in argv else 15.0
    total_floor = 0.0
    for stage, seconds in res["run"]["stage_timings_s"].items():
        f = floors.get(stage)
        floor_s = None if f is None else f / (rate * 1e9) + (budget if stage == "comparison" else 0.0)
        total_floor += floor_s or (budget if stage == "efficiency" else 0.0)
        shown = ("-", "-") if floor_s is None else (f"{floor_s:.1f}", f"{seconds / floor_s:.1f}" if floor_s else "-")
        status = "ok" if stage == "text_pass" else res[stage]["status"]
        print(f"{stage:<12} {status:<15} {seconds:>9.1f} {shown[0]:>9} {shown[1]:>8}")
    print(f"{'total (main.py wall, incl. loading)':<37} {wall:>9.1f} {total_floor:>9.1f} {wall / total_floor:>8.1f}")
    sp = res.get("sparsity", {}).get("results", {})
    if sp:
        print(f"sparsity measured in {sp['measured_in']}")
    if res.get("comparison", {}).get("status") == "ok":
        other = res["comparison"]["results"]["models"][1]
        print(f"the other model's sparsity measured in {other['sparsity_measured_in']}")
    import torch

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "the CPU"
    print(f"device {args.device}: {where}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"its fp32 matmul rate: {rate:.0f} GFLOP/s (measured before the run); the floors are FLOPs at "
          f"that rate (efficiency: its --efficiency_budget, also in the comparison's floor)")


if __name__ == "__main__":
    main()
