"""Faithfulness stage speed at mamba-130m shape (random init): its ground truth (every channel of layer 0's
ssm, 1536, ablated alone) and its deletion sets (the top-k sets of six rankings and 50 random sets per k,
k = 1, 2, 4, ... 1536, and the ground truth's own, cross-fitted over two halves of the prompts; the sets of
one unit read from the ground truth, as the stage does), against the
causal stage's scan (every dim of layer 0's mixer_out, 768) in the same process, on the first `--prompts`
default prompts; per ablated (unit or set, prompt) row, beside the floor of one row (every layer after
layer 0 at every position, and the head at the last position) at this device's measured fp32 matmul rate.

    python bench/faithfulness.py [--prompts 6] [--threads 2] [--device cpu|cuda]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # full_run's matmul rate


def main():
    import numpy as np
    import torch
    import transformers
    from transformers import MambaConfig, MambaForCausalLM

    import causal_analysis as ca
    import faithfulness as fa

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6, help="how many of the 24 default prompts")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24)
    device = torch.device(args.device)
    model = MambaForCausalLM(cfg).eval().to(device)
    prompts = ca.DEFAULT_PROMPTS[:args.prompts]
    g = torch.Generator().manual_seed(1)  # random token ids of each prompt's word count (no tokenizer needed)
    ids = [torch.randint(0, cfg.vocab_size, (1, len(p.split()) + 2), generator=g).to(device) for p in prompts]

    class Tok:  # hands causal_analysis the fixed ids
        def __call__(self, p, **kw):
            return {"input_ids": ids[prompts.index(p)]}

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    n, U, d = len(prompts), cfg.intermediate_size, cfg.hidden_size
    cleans = {s: ca.clean_runs(model, Tok(), prompts, range(cfg.num_hidden_layers), s) for s in ("mixer_out", "ssm")}
    _, t_causal = timed(lambda: ca.causal_effects_by_layer(model, Tok(), prompts, [0], site="mixer_out",
                                                           progress=False, cleans=cleans["mixer_out"]))
    truth, t_truth = timed(lambda: ca.causal_effects_by_layer(model, Tok(), prompts, [0], site="ssm", progress=False,
                                                              cleans=cleans["ssm"]).kl[:, 0])
    rng = np.random.default_rng(0)
    ks = fa.k_grid(U)
    # as the stage: six rankings' and the random sets on every prompt, the ground truth's own top sets chosen on
    # one half of the prompts and measured on the other (each distinct set of two or more units once)
    rankings = [rng.random(U) for _ in range(6)]
    sets = np.concatenate([*(fa.top_sets(s, ks, 0) for s in rankings), fa.random_sets(U, ks, 50)])
    plan = [(np.arange(n), sets)] + [(on, fa.top_sets(truth[chosen].mean(0), ks, 0)) for on, chosen in fa._halves(n)]
    rows, t_sets = 0, 0.0
    for on, masks in plan:
        distinct = np.unique(masks, axis=0)
        distinct = distinct[distinct.sum(1) > 1]  # one-unit sets: the ground truth's
        _, t = timed(lambda: ca.set_ablation_effects(model, Tok(), [prompts[i] for i in on], 0, distinct, site="ssm",
                                                     progress=False, cleans=[cleans["ssm"][i] for i in on]))
        rows, t_sets = rows + len(distinct) * len(on), t_sets + t
    per_causal, per_truth, per_set = t_causal / (d * n), t_truth / (U * n), t_sets / rows

    from efficiency import flops_per_token
    from full_run import matmul_rate
    from models import get_adapter

    peak = matmul_rate(args.device) * 1e9
    adapter = get_adapter(model)
    floor = np.mean([((cfg.num_hidden_layers - 1) * x.shape[1] * flops_per_token(adapter, x.shape[1])["per_layer"]
                      + flops_per_token(adapter, 1)["head"]) for x in ids]) / peak  # one row: layers after 0, head
    mean_len = np.mean([x.shape[1] for x in ids])
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    sets_per_prompt = rows / n
    print(f"mamba-130m shape (random init), layer 0, {n} prompts (mean {mean_len:.1f} tokens), on {device.type} "
          f"({where}), fp32 matmul {peak / 1e9:.1f} GFLOP/s; floor per ablated row {floor * 1e3:.2f} ms")
    print(f"causal stage's scan, {d} dims of mixer_out: {per_causal * 1e3:.2f} ms per (dim, prompt), "
          f"{per_causal / floor:.1f}x the floor")
    print(f"faithfulness ground truth, {U} channels of ssm: {per_truth * 1e3:.2f} ms per (unit, prompt), "
          f"{per_truth / per_causal:.2f}x the causal scan's")
    print(f"faithfulness deletion sets, {sets_per_prompt:.0f} sets of 2 or more channels per prompt: {per_set * 1e3:.2f} "
          f"ms per (set, prompt), {per_set / per_causal:.2f}x the causal scan's")
    print(f"the stage ablates {U + sets_per_prompt:.0f} rows per prompt ({U} units + {sets_per_prompt:.0f} sets): "
          f"{(t_truth + t_sets) / (U * n) * 1e3:.2f} ms per (unit, prompt) in all, "
          f"{(t_truth + t_sets) / (U * n) / per_causal:.2f}x the causal scan's per (dim, prompt); at the 24 default "
          f"prompts about {(t_truth + t_sets) * 24 / n:.0f} s against the causal stage's {t_causal * 24 / n:.0f} s")


if __name__ == "__main__":
    main()
