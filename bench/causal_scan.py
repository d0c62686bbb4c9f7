"""Causal scan speed: every dimension of layer 0's mixer_out in a mamba-130m-shaped model (random init;
`--shape mid`: d_model 256, 8 layers, same vocabulary; measured with --threads 1)
x the five default prompts, against the original's method (one ablation at a time, with a clean re-run
for each) measured in the same process on a sample of dimensions. Also: identical scores on the sample,
and the floor: the analytic FLOPs one ablated row cannot avoid (every layer after layer 0 at every
position, and the head at the last position) at this device's measured fp32 matmul rate.

    python bench/causal_scan.py [--shape 130m|mid] [--sample 8] [--threads 2] [--device cpu|cuda]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


SHAPES = {"130m": {"hidden_size": 768, "num_hidden_layers": 24}, "mid": {"hidden_size": 256, "num_hidden_layers": 8}}


def main():
    import numpy as np
    import torch
    import transformers
    from transformers import MambaConfig, MambaForCausalLM

    import causal_analysis as ca
    from models import get_adapter
    from utils import trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=8, help="dims timed with the one-at-a-time method")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--shape", default="130m", choices=sorted(SHAPES),
                    help="130m: mamba-130m's config; mid: d_model 256, 8 layers (same vocabulary)")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=50280, **SHAPES[args.shape])
    device = torch.device(args.device)
    model = MambaForCausalLM(cfg).eval().to(device)
    adapter = get_adapter(model)
    prompts = ca.DEFAULT_PROMPTS
    g = torch.Generator().manual_seed(1)  # random token ids of each prompt's word count (no tokenizer needed)
    ids = [torch.randint(0, cfg.vocab_size, (1, len(p.split()) + 2), generator=g).to(device) for p in prompts]

    class Tok:  # hands causal_analysis the fixed ids
        def __call__(self, p, **kw):
            return {"input_ids": ids[prompts.index(p)]}

    site = adapter.site("mixer_out", 0)
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(cfg.hidden_size, args.sample, replace=False).tolist())

    def one_at_a_time(k):
        total = 0.0
        for x in ids:
            with torch.no_grad():
                clean = model(input_ids=x, use_cache=False).logits[0, -1].double().log_softmax(-1)

            def edit(name, v):
                v = v.clone()
                v[..., k] = 0.0
                return v

            with torch.no_grad(), trace(model, [site.path], retain_output=False, edit_output=edit):
                abl = model(input_ids=x, use_cache=False).logits[0, -1].double().log_softmax(-1)
            total += float((clean.exp() * (clean - abl)).sum())
        return total / len(ids)

    def timed(fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        return out, time.perf_counter() - t0

    # half of the sample before the scan and half after it, so that a drift in this shared machine's
    # load during the long scan weighs on both methods alike
    one_at_a_time(sample[0])  # warm-up
    half = len(sample) // 2
    ref_a, t_a = timed(lambda: [one_at_a_time(k) for k in sample[:half]])
    scores, t_scan = timed(ca.causal_impact_scores, model, Tok(), prompts, 0, "mixer_out", progress=False)
    ref_b, t_b = timed(lambda: [one_at_a_time(k) for k in sample[half:]])
    ref = np.array(ref_a + ref_b)
    t_ref = (t_a + t_b) / (len(sample) * len(prompts))
    t_scan /= cfg.hidden_size * len(prompts)
    rel = np.abs(scores[sample] - ref).max() / np.abs(ref).max()

    # fp32 matmul FLOP/s of this device, and the analytic FLOPs of one ablated row
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    m = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    sync()
    peak = 5 * 2 * m ** 3 / (time.perf_counter() - t0)
    d, e, n, r = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
    per_token_layer = 2 * (d * 2 * e + e * (r + 2 * n) + r * e + e * d) + 9 * e * n + 2 * 4 * e
    mean_len = np.mean([x.shape[1] for x in ids])
    # per ablated row: layers 1..23 and the head; layer 0 up to the ablated site runs once per batch
    flops = (cfg.num_hidden_layers - 1) * per_token_layer * mean_len + 2 * d * cfg.vocab_size
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.shape} shape (random init), {cfg.hidden_size} dims of layer-0 mixer_out x {len(prompts)} prompts "
          f"(mean {mean_len:.1f} tokens), on {device.type} ({where})")
    print(f"largest impact on the sample {np.abs(ref).max():.3e} (mean KL)")
    print(f"one at a time, clean re-run each (sample of {len(sample)} dims): {t_ref * 1e3:.2f} ms per (dim, prompt)")
    print(f"batched scan from the cached layer input (all dims): {t_scan * 1e3:.2f} ms per (dim, prompt)")
    print(f"speed-up: {t_ref / t_scan:.1f}x (goal >= 10x); max relative score difference on the sample {rel:.1e}")
    print(f"floor per (dim, prompt): {flops / 1e6:.1f} MFLOP (the ablated row's layers after the site and the "
          f"head at the last position) = {flops / peak * 1e3:.2f} ms at this {'CPU' if device.type == 'cpu' else 'GPU'}"
          f"'s measured fp32 matmul rate {peak / 1e9:.1f} GFLOP/s; the scan takes {t_scan / (flops / peak):.1f}x "
          f"the floor ({flops / t_scan / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
