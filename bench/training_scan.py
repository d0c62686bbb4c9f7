"""Training-step speed of the fast scan (ssm.fast_scan_training) against the transformers slow path.

A ~1.5 M-parameter Mamba (vocab 8192, d 128, 4 layers), batch 16 x 128 tokens, AdamW step included;
both paths timed in this process on the same weights and batch. Also checks they agree (loss, grads).

    python bench/training_scan.py [--slow_steps 2] [--fast_steps 10] [--threads 2]
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch
    import transformers
    from transformers import MambaConfig, MambaForCausalLM

    from ssm import fast_scan_training

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow_steps", type=int, default=2)
    ap.add_argument("--fast_steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=8192, hidden_size=128, num_hidden_layers=4, state_size=16)
    base = MambaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, cfg.vocab_size, (16, 129))  # (b, L+1)

    def step(model, opt, fast):
        t0 = time.perf_counter()
        ctx = fast_scan_training(model) if fast else torch.enable_grad()
        with ctx:
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return time.perf_counter() - t0, loss.item()

    # agreement at identical weights: loss and gradients
    slow_m, fast_m = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    l_slow = slow_m(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
    l_slow.backward()
    with fast_scan_training(fast_m):
        l_fast = fast_m(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
        l_fast.backward()
    gdiff = max(((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
                for p, q in zip(slow_m.parameters(), fast_m.parameters()))
    print(f"model: {n_params / 1e6:.2f} M parameters, batch 16 x 128 tokens, {args.threads} threads")
    print(f"agreement: |loss_slow - loss_fast| = {abs(l_slow.item() - l_fast.item()):.2e}, "
          f"max relative grad difference {gdiff:.2e}")

    times = {}
    for name, fast, n in (("slow path", False, args.slow_steps), ("fast scan", True, args.fast_steps)):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step(model, opt, fast)  # warm-up
        times[name] = [step(model, opt, fast)[0] for _ in range(n)]
        print(f"{name}: {statistics.median(times[name]):.3f} s per training step (median of {n})")
    ratio = statistics.median(times["slow path"]) / statistics.median(times["fast scan"])
    print(f"speed-up per training step: {ratio:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
