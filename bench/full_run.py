"""The default command at real shape: `python main.py --model M --compare_model G --enable_attention` where
M is a random-init model with mamba-130m's exact config (d_model 768, 24 layers, e 1536, n 16, vocab
50280) and G one with gpt2-124m's (12 layers, d 768, 12 heads, vocab 50257), both built here (no
download) and saved with save_pretrained beside the shipped reference tokenizer (8192 tokens, whose ids
fit both vocabularies). Texts: `--texts_file`, else 100 texts each made of `--join` consecutive texts of
the repo's data/offline_texts.txt (5 give about 130 tokens a text, near the 13,436 tokens of 100
WikiText-2 lines under the GPT-2 tokenizer). Prints the per-stage wall times from the run's JSON and the
total.

Random weights give the same shapes, FLOPs and memory traffic as the trained checkpoints, so the times
are what a user waits for; the numbers in the results are meaningless. The machine's fp32 matmul rate
(a 2048³ product, torch's default thread count, as main.py runs) is printed beside the table: the stages
are mostly matmul- and memory-bound, so compare totals from different machines through it.

    python bench/full_run.py [--texts_file F | --join 5] [--text_limit 100] [--max_length 256] [--layer 0]
                             [-- EXTRA main.py ARGS]
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


def build_models(root: Path) -> tuple[Path, Path]:
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
    return paths


def matmul_rate(m: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an m×m matmul on the CPU with torch's default threads (the best of 3 rounds)."""
    import torch

    a, b = torch.randn(m, m), torch.randn(m, m)
    a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return repeats * 2 * m ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts_file", default=None)
    ap.add_argument("--join", type=int, default=5, help="offline texts per synthetic text")
    ap.add_argument("--text_limit", type=int, default=100)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("extra", nargs="*", help="more main.py arguments (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        mamba, gpt2 = build_models(root)
        build = time.perf_counter() - t0
        rate = matmul_rate()
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
               *args.extra]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode not in (0, 1):
            sys.exit(f"main.py exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
        res = json.loads(next((root / "out").glob("*.json")).read_text())
    t = res["texts"]
    print(f"mamba-130m-shape vs gpt2-124m-shape (random init), layer {args.layer}, {t['n_texts']} texts, "
          f"{t['n_tokens']} tokens, max_length {t['max_length']}; models built and saved in {build:.0f} s")
    print(f"{'stage':<12} {'status':<15} {'seconds':>9}")
    for stage, seconds in res["run"]["stage_timings_s"].items():
        print(f"{stage:<12} {res[stage]['status']:<15} {seconds:>9.1f}")
    print(f"{'total (main.py wall, incl. loading)':<37} {wall:>9.1f}")
    print(f"this machine's fp32 matmul rate: {rate:.0f} GFLOP/s (2048³, before the run)")


if __name__ == "__main__":
    main()
