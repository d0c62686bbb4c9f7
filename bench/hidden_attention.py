"""Time and peak memory of ssm.hidden_attention for one mamba-130m-shaped layer (random init).

Each sequence length runs in a fresh process so its peak resident memory is its own. Reported: wall time,
the α output's size (b·e·L² float32), and the peak memory above the process's size just before the call,
with and without the output. The issue's budget: extra memory under 2 GB at e = 1536, L = 512.

    python bench/hidden_attention.py [--lengths 128 512] [--threads 2]
"""
import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(L: int, threads: int, queue) -> None:
    import torch
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from ssm import hidden_attention, mixer_projections

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=768, state_size=16, expand=2, num_hidden_layers=24, vocab_size=50280)
    mixer = MambaMixer(cfg, layer_idx=0)
    with torch.no_grad():
        h = torch.randn(1, L, 768)  # (b, L, d)
        x, z, delta, B, C, A, D = mixer_projections(mixer, h)
        before = _rss_bytes()
        t0 = time.perf_counter()
        alpha = hidden_attention(delta, A, B, C)  # (1, 1536, L, L)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out_bytes = alpha.numel() * alpha.element_size()
    queue.put((L, seconds, out_bytes, peak - before, bool(torch.isfinite(alpha).all())))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    print("e = 1536, n = 16, b = 1, float32")
    print(f"{'L':>5} {'seconds':>9} {'output GB':>10} {'peak extra GB':>14} {'extra beyond output GB':>23} finite")
    for L in args.lengths:
        q = ctx.Queue()
        p = ctx.Process(target=measure, args=(L, args.threads, q))
        p.start()
        L, seconds, out_bytes, extra, finite = q.get()
        p.join()
        print(f"{L:>5} {seconds:>9.2f} {out_bytes / 1e9:>10.3f} {extra / 1e9:>14.3f} "
              f"{(extra - out_bytes) / 1e9:>23.3f} {finite}")


if __name__ == "__main__":
    main()
