"""Attention stage speed per text on a mamba-130m-shaped model (random init, 24 layers, e = 1536, n = 16),
or with `--family gpt2` on a gpt2-124m-shaped one (12 layers, d = 768, 12 heads), or with `--family mamba2`
on a mamba2-130m-shaped one (24 layers, d = 768, 24 heads of 64, state 128, 1 group), against one plain
transformers forward of the same model on the same text, measured in the same process.

Per text the stage (`MambaAttentionNeurons.text_scores`) runs: a forward up to the layer to capture the
mixer input, the recomputed internals and their check, the gradient for gradient_guided (one forward and
backward through the fast scan; timed again on its own, as "of which gradient"), then α block-wise one
channel group at a time (`ssm.hidden_attention_groups`), each group read by every method while in cache:
attention_weighted (|α x| sums), gradient_guided (ReLU(g α x) sums), rollout (channel scores from the
diagonal of each channel's rolled-out map), and (α x + D x) for the reconstruction check. The reference
path (the whole α from `extract_attention_vectors`, then `create_neurons` per method) is timed on
the same texts, and the direct α (`ssm.hidden_attention`) against the block-wise one on one text.

GPT-2: an eager-attention forward up to the layer captures every layer's attention weights, values and
output-projection input; the gradient is one forward and backward of the layers above; the methods read
one head's d/H units at a time (α^c = the head's weights, a view); the reference path repeats each head's
weights for its units.

Floor: the gradient needs one forward and one backward of the layers above (about 3 forwards' FLOPs at
layer 0); α, the contributions and the rollout maps are e·L² numbers each (e·n·L² multiply-adds to form
α), memory-bound passes that cost a fraction of a forward at L = 256.

    python bench/attention_stage.py [--family mamba|gpt2|mamba2] [--texts 3] [--length 256] [--layer 0] [--threads 2]
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
    from transformers import (GPT2Config, GPT2LMHeadModel, Mamba2Config, Mamba2ForCausalLM, MambaConfig,
                              MambaForCausalLM)

    import attention_neurons as an
    from ssm import hidden_attention, hidden_attention_chunked, mixer_projections

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("mamba", "gpt2", "mamba2"), default="mamba")
    ap.add_argument("--texts", type=int, default=3, help="texts timed (the first is reported apart: warm-up)")
    ap.add_argument("--length", type=int, default=256, help="tokens per text")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.family == "mamba":
        model = MambaForCausalLM(MambaConfig(hidden_size=768, state_size=16, expand=2, num_hidden_layers=24,
                                             vocab_size=50280)).eval()
    elif args.family == "mamba2":
        model = Mamba2ForCausalLM(Mamba2Config(hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64,
                                               state_size=128, n_groups=1, expand=2, chunk_size=256,
                                               vocab_size=50288)).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)).eval()
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

    analyzer = an.attention_neurons_for(model)
    rows = []  # per text: {part: seconds}
    for ids in texts:
        r = {}
        t0 = time.perf_counter()
        analyzer.text_scores(ids, args.layer, an.METHODS)
        r["stage: all methods"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyzer.output_gradient(ids, args.layer)
        r["  of which gradient"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = analyzer.extract_attention_vectors(ids, [args.layer])
        for m in an.METHODS:
            analyzer.create_neurons(data, m)
        r["reference path"] = time.perf_counter() - t0
        rows.append(r)

    shape = {"mamba": "mamba-130m", "gpt2": "gpt2-124m", "mamba2": "mamba2-130m"}[args.family]
    print(f"{shape} shape, layer {args.layer}, L = {args.length}, {args.threads} threads, float32")
    print(f"plain forward (median of {len(plain)}): {fwd:.3f} s")
    later = rows[1:] or rows
    print(f"{'part':<22} {'first text s':>12} {'later texts s':>14} {'x forward':>10}")
    for part in rows[0]:
        mean = float(np.mean([r[part] for r in later]))
        print(f"{part:<22} {rows[0][part]:>12.3f} {mean:>14.3f} {mean / fwd:>10.2f}")
    if args.family != "mamba":
        return
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

    print(f"α direct (reference) {t_ref:.3f} s, block-wise {t_fast:.3f} s: {t_ref / t_fast:.1f}x; "
          f"max relative difference {rel:.2e}")


if __name__ == "__main__":
    main()
