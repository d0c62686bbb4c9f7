"""Operation counts at mamba-130m shape (random init), the quantity that bounds a GPU run (each aten operation is
at least one kernel launch): counted exactly with torch.profiler on the CPU, so no GPU is needed.

1. The attention stage per text: one `--length`-token text through the text pass with the attention stage's
   reader (the capture forward up to the layer, the gradient forward and backward, α group by group and the
   three methods), every aten operation the profiler records (nested ones included: an aten::linear and the
   aten::addmm inside it count as two), and the top-level ones apart.
2. The causal scan per (dim, prompt): the operations of a scan over `--dims` dims of mixer_out at layer 0 on two
   prompts (their clean runs made before, not counted), divided by dims × prompts: with the tool's own batch
   size (from free memory: many ablations share a forward) and with one ablation per forward.

    python bench/op_counts.py [--length 256] [--threads 2]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count_ops(fn) -> tuple[int, int]:
    """(every aten operation, the top-level ones) recorded while fn() runs on the CPU."""
    import os

    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no "USDT: profiler_start" lines on stderr
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    ids = {id(e) for e in events}
    top = [e for e in events if e.cpu_parent is None or id(e.cpu_parent) not in ids]
    return len(events), len(top)


def main():
    import torch
    import transformers
    from transformers import MambaConfig, MambaForCausalLM

    import attention_neurons as an
    import causal_analysis as ca
    from models import get_adapter
    from passes import run_text_pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dims", type=int, default=32, help="dims of the causal scans")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24)
    model = MambaForCausalLM(cfg).eval()
    adapter = get_adapter(model)
    ids = [torch.randint(0, cfg.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))]

    def attention_text():
        reader = an.AttentionProfile(an.attention_neurons_for(model), [0])
        run_text_pass(model, adapter, ids, {"attention": reader})

    attention_text()  # warm-up: lazy initialisation is not the stage's
    total, top = count_ops(attention_text)
    print(f"attention stage, one {args.length}-token text at layer 0: {total:,} aten operations ({top:,} top-level)")

    prompts = ca.DEFAULT_PROMPTS[:2]
    g = torch.Generator().manual_seed(2)
    prompt_ids = {p: torch.randint(0, cfg.vocab_size, (1, len(p.split()) + 2), generator=g) for p in prompts}

    class Tok:  # hands causal_analysis fixed ids (no tokenizer needed)
        def __call__(self, p, **kw):
            return {"input_ids": prompt_ids[p]}

    cleans = ca.clean_runs(model, Tok(), prompts, range(cfg.num_hidden_layers), "mixer_out")

    def scan(batch_size):
        return lambda: ca.causal_effects_by_layer(model, Tok(), prompts, [0], site="mixer_out", dims=range(args.dims),
                                                  progress=False, cleans=cleans, batch_size=batch_size)

    scan(None)()  # warm-up
    for batch_size, what in ((None, "the tool's batch size"), (1, "one ablation per forward")):
        total, top = count_ops(scan(batch_size))
        n = args.dims * len(prompts)
        print(f"causal scan of mixer_out at layer 0, {what}: {total / n:,.0f} aten operations per (dim, prompt) "
              f"({top / n:,.0f} top-level; {args.dims} dims x {len(prompts)} prompts)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
