"""Operation counts at mamba-130m shape (random init), the quantity that bounds a GPU run: counted exactly with
torch.profiler on the CPU, so no GPU is needed. Every count is given twice: every aten operation the profiler
records (nested ones included: an aten::linear and the aten::addmm inside it count as two; the issue's measure),
and those of them that launch work ("compute": without the view and metadata operations, which launch no
kernel on a GPU: as_strided, select, slice, view, unbind, ...).

1. The attention stage per text: one `--length`-token text through the text pass with the attention stage's
   reader (the first text: its token maps are formed), in parts: (a) the capture forward up to the layer, whose
   mixer at the layer runs the model's own forward (transformers' slow path: its per-position loop is the
   model's, the reference every text's recomputation is checked against); (b) the gradient forward and backward
   through every layer (the fast scan); (c) α group by group and the three methods. Counted as the stage runs on
   a CPU (α in groups of channels that fit its cache: `ssm.ATTENTION_GROUP_ELEMENTS`) and as it runs on an
   accelerator (`ssm.ACCELERATOR_GROUP_ELEMENTS`: one group at this shape), each with the chunked scan
   (`ssm.linear_scan_`) and with a step loop in its place (two operations per position, the scan before it).
2. The causal scan per (dim, prompt): a scan over `--dims` dims of mixer_out at layer 0 on two prompts (their
   clean runs made before, not counted), divided by dims × prompts, with the tool's own batch size and with one
   ablation per forward, with the chunked scan and with the step loop. The default prompts are 5-17 tokens, so
   the blocked forward's scan is mostly its step loop either way (`linear_scan_` loops up to 3 chunks).

    python bench/op_counts.py [--length 256] [--threads 2] [--dims 32]
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# aten operations that only make a view or read metadata: no kernel launch on a GPU
VIEW_OPS = {"aten::" + n for n in (
    "as_strided", "select", "slice", "view", "unbind", "unsqueeze", "squeeze", "permute", "transpose", "t", "expand",
    "reshape", "_reshape_alias", "unflatten", "flatten", "narrow", "split", "split_with_sizes", "chunk", "alias",
    "detach", "resolve_conj", "resolve_neg", "result_type", "numpy_T", "_unsafe_view", "lift_fresh", "view_as",
    "expand_as", "promote_types", "is_nonzero", "size", "stride", "contiguous", "to", "type_as", "empty",
    "empty_like", "empty_strided", "set_", "as_strided_", "resize_", "movedim", "diagonal", "_to_copy_noop")}


def count_ops(fn) -> tuple[int, int]:
    """(every aten operation, those that launch work) recorded while fn() runs on the CPU. An aten::to or
    aten::contiguous that copies shows its aten::copy_ (counted) inside."""
    import os

    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no "USDT: profiler_start" lines on stderr
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return len(events), sum(e.name not in VIEW_OPS for e in events)


def step_loop_(a, h, reverse=False, chunk=None):
    """`ssm.linear_scan_`'s contract by the step loops it replaced: forwards two operations per position (a
    multiply into a buffer, an add), backwards one (an addcmul_ on indexed slices), as the previous version."""
    import torch

    if reverse:
        for t in range(h.shape[1] - 2, -1, -1):
            h[:, t].addcmul_(a[:, t + 1], h[:, t + 1])
        return h
    hs, as_ = h.unbind(1), a.unbind(1)
    step = torch.empty_like(hs[0])
    for t in range(1, h.shape[1]):
        torch.mul(as_[t], hs[t - 1], out=step)
        hs[t].add_(step)
    return h


@contextlib.contextmanager
def configured(accelerator: bool, step_loop: bool):
    """The stage's settings as on an accelerator (α in as few groups as fit ACCELERATOR_GROUP_ELEMENTS, the
    blocked forward's channels all at once) or as on this CPU; the chunked scan or the step loop."""
    import ssm

    saved = ssm.ATTENTION_GROUP_ELEMENTS, ssm.CPU_BLOCK_ELEMENTS, ssm.linear_scan_
    if accelerator:
        ssm.ATTENTION_GROUP_ELEMENTS, ssm.CPU_BLOCK_ELEMENTS = ssm.ACCELERATOR_GROUP_ELEMENTS, 1 << 40
    if step_loop:
        ssm.linear_scan_ = step_loop_
    try:
        yield
    finally:
        ssm.ATTENTION_GROUP_ELEMENTS, ssm.CPU_BLOCK_ELEMENTS, ssm.linear_scan_ = saved


def main():
    import torch

    import attention_neurons as an
    import causal_analysis as ca
    import passes
    from models import get_adapter
    from real_shape import FixedIds, mamba_130m

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dims", type=int, default=32, help="dims of the causal scans")
    args = ap.parse_args()
    model = mamba_130m(args.threads)
    adapter = get_adapter(model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))
    analyzer = an.attention_neurons_for(model)

    def whole():
        passes.run_text_pass(model, adapter, [ids], {"attention": an.AttentionProfile(analyzer, [0])})

    text = passes.capture_forward(model, adapter, ids, mixer_io={0})
    parts = {"(a) capture forward (the model's own mixer at the layer)":
             lambda: passes.capture_forward(model, adapter, ids, mixer_io={0}),
             "(b) gradient forward and backward, 24 layers": lambda: passes.gradient_pass(model, adapter, ids, [0]),
             "(c) α and the three methods": lambda: list(analyzer.scores_by_layer(ids, [0], an.METHODS, maps=True,
                                                                                  captured=text)),
             "the whole text pass": whole}
    grads, records, _ = passes.gradient_pass(model, adapter, ids, [0])
    text.gradients, text.target = grads, records[0] if records else None
    print(f"attention stage, one {args.length}-token text at layer 0: aten operations, all / compute")
    for accelerator in (False, True):
        for step_loop in (True, False):
            with configured(accelerator, step_loop):
                counts = {}
                for name, fn in parts.items():
                    fn()  # warm-up: lazy initialisation is not the stage's
                    counts[name] = count_ops(fn)
            where = "as on an accelerator" if accelerator else "as on a CPU"
            print(f"  {where}, {'step loop' if step_loop else 'chunked scan'}: " + "; ".join(
                f"{name} {a:,} / {c:,}" for name, (a, c) in counts.items()))

    prompts = ca.DEFAULT_PROMPTS[:2]
    tok = FixedIds(prompts, model.config.vocab_size)
    cleans = ca.clean_runs(model, tok, prompts, range(model.config.num_hidden_layers), "mixer_out")

    def scan(batch_size):
        return lambda: ca.causal_effects_by_layer(model, tok, prompts, [0], site="mixer_out", dims=range(args.dims),
                                                  progress=False, cleans=cleans, batch_size=batch_size)

    n = args.dims * len(prompts)
    for batch_size, what in ((None, "the tool's batch size"), (1, "one ablation per forward")):
        for step_loop in (True, False):
            with configured(False, step_loop):
                scan(batch_size)()  # warm-up
                total, compute = count_ops(scan(batch_size))
            sizes = [batch_size or ca._auto_batch_size(adapter, c.input_ids.shape[1], args.dims, ids.device)
                     for c in cleans]  # the tool's choice depends on this machine's free memory
            print(f"causal scan of mixer_out at layer 0, {what}, {'step loop' if step_loop else 'chunked scan'}: "
                  f"{total / n:,.0f} / {compute / n:,.0f} aten operations per (dim, prompt) (all / compute; {args.dims} "
                  f"dims x {len(prompts)} prompts of {[c.input_ids.shape[1] for c in cleans]} tokens, batch sizes "
                  f"{sizes})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
