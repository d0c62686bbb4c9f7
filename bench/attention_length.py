"""Do the attention stage's scores depend on the texts' length? The same texts truncated to several lengths
(default 32, 64, 128, 256 tokens), scored by the attention stage's code (`attention_profile`, every method),
on the shipped reference pair (the Mamba and the GPT-2 Transformer trained on the same text) at one layer.

Printed per model and method: the mean activation at each length and its ratio to the longest length's,
and the overlap of each length's top-10 units with the longest length's top 10. A score that is length-fair
keeps its mean within a small factor and most of its top 10. Only texts with at least the longest length's
tokens are used, so every length sees the same texts: the paragraphs of a text file (`--data`, default
WikiText-2's test split beside the repo, ../shared/data/wikitext-2/test.txt, the reference pair's own kind
of text; one paragraph a line).

    python bench/attention_length.py [--layer 0] [--lengths 32 64 128 256] [--texts 20] [--target likelihood]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attention_neurons import METHODS, attention_neurons_for, attention_profile
    from utils import REPO_DIR

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--texts", type=int, default=20)
    p.add_argument("--target", default="likelihood")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(REPO_DIR.parent / "shared" / "data" / "wikitext-2" / "test.txt"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    longest = max(args.lengths)
    texts = [line.strip() for line in Path(args.data).read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.strip().startswith("=")]
    out = {}
    for name in ("mamba", "transformer"):
        folder = REPO_DIR / "reference_models" / name
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        ids = [torch.tensor([t]) for t in (tok(x, add_special_tokens=False)["input_ids"] for x in texts)
               if len(t) >= longest][:args.texts]
        an = attention_neurons_for(model, args.target)
        by_length = {}
        for L in sorted(args.lengths):
            entry = attention_profile(an, [i[:, :L] for i in ids], [args.layer], METHODS, top_k=10,
                                      n_resamples=200)[args.layer]
            by_length[L] = entry["methods"]
        out[name] = by_length
        print(f"\n{name} (reference), layer {args.layer}, {len(ids)} texts of >= {longest} tokens, "
              f"target {args.target}")
        for m in METHODS:
            ref = by_length[longest][m]
            ref_top = {t["channel"] for t in ref["top_neurons"]}
            cells = []
            for L in sorted(args.lengths):
                e = by_length[L][m]
                top = {t["channel"] for t in e["top_neurons"]}
                cells.append(f"L={L}: mean {e['mean_activation']:.4g} (x{e['mean_activation'] / ref['mean_activation']:.2f}),"
                             f" top-10 overlap {len(top & ref_top)}")
            print(f"  {m:>18}: " + "; ".join(cells))
    ratios = {}
    for m in METHODS:
        r = [out["mamba"][L][m]["mean_activation"] / out["transformer"][L][m]["mean_activation"]
             for L in sorted(args.lengths)]
        ratios[m] = r
        print(f"  Mamba / GPT-2 mean activation, {m}: " + ", ".join(f"L={L} {v:.3g}" for L, v in
                                                               zip(sorted(args.lengths), r)))
    return out, ratios, np


if __name__ == "__main__":
    main()
