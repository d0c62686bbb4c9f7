"""Attention stage speed per text on a mamba-130m-shaped model (random init, 24 layers, e = 1536, n = 16),
against one plain transformers forward of the same model on the same text, measured in the same process.

Per text the stage runs: a forward up to the layer to capture the mixer input, α (e, L, L) block-wise
(`ssm.hidden_attention_chunked`), the reconstruction check, then the three methods: attention_weighted
(|α x| sums), gradient_guided (one forward and backward through the fast scan, then ReLU(g α x) sums) and
rollout (channel scores from the diagonal of each channel's rolled-out map). The direct α
(`ssm.hidden_attention`, the reference) is timed on one text beside it.

Floor: the gradient needs one forward and one backward of the layers above (about 3 forwards' FLOPs at
layer 0); α, the contributions and the rollout maps are e·L² numbers each (e·n·L² multiply-adds to form
α), memory-bound passes that cost a fraction of a forward at L = 256.

    python bench/attention_stage.py [--texts 3] [--length 256] [--layer 0] [--threads 2]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import numpy as np
    import torch
    import transformers
    from transformers import MambaConfig, MambaForCausalLM

    import attention_neurons as an
    from ssm import hidden_attention, hidden_attention_chunked, mixer_projections

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=3, help="texts timed (the first is reported apart: warm-up)")
    ap.add_argument("--length", type=int, default=256, help="tokens per text")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=768, state_size=16, expand=2, num_hidden_layers=24, vocab_size=50280)
    model = MambaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(0, 50000, (1, args.length), generator=g) for _ in range(args.texts)]  # (1, L) each

    def forward(ids):
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    forward(texts[0])
    plain = []
    for ids in texts:
        t0 = time.perf_counter()
        forward(ids)
        plain.append(time.perf_counter() - t0)
    fwd = float(np.median(plain))

    analyzer = an.MambaAttentionNeurons(model)
    rows = []  # per text: {part: seconds}
    for ids in texts:
        r = {}
        t0 = time.perf_counter()
        data = analyzer.extract_attention_vectors(ids, [args.layer])
        r["capture + α + check"] = time.perf_counter() - t0
        for m in an.METHODS:
            t0 = time.perf_counter()
            analyzer.create_mamba_neurons(data, m)
            r[m] = time.perf_counter() - t0
        r["stage total"] = sum(r.values())
        rows.append(r)

    from delta_extraction import capture_mixer_io

    mixer = analyzer.adapter.mixer(args.layer)

    h_in, _ = capture_mixer_io(model, args.layer, texts[-1])
    with torch.no_grad():
        _, _, delta, B, C, A, _ = mixer_projections(mixer, h_in)
        t0 = time.perf_counter()
        ref = hidden_attention(delta, A, B, C)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = hidden_attention_chunked(delta, A, B, C)
        t_fast = time.perf_counter() - t0
    rel = ((fast - ref).abs().max() / ref.abs().max()).item()

    print(f"mamba-130m shape, layer {args.layer}, L = {args.length}, {args.threads} threads, float32")
    print(f"plain forward (median of {len(plain)}): {fwd:.3f} s")
    later = rows[1:] or rows
    print(f"{'part':<22} {'first text s':>12} {'later texts s':>14} {'x forward':>10}")
    for part in rows[0]:
        mean = float(np.mean([r[part] for r in later]))
        print(f"{part:<22} {rows[0][part]:>12.3f} {mean:>14.3f} {mean / fwd:>10.2f}")
    print(f"α direct (reference) {t_ref:.3f} s, block-wise {t_fast:.3f} s: {t_ref / t_fast:.1f}x; "
          f"max relative difference {rel:.2e}")


if __name__ == "__main__":
    main()
