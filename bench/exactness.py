"""Exactness at real shape, against the float64 yardstick: a fast path is exact when it is no farther from the
model's float64 forward than the model's own forward in float32 is (the project allows 2x).

On a random-init model with mamba-130m's exact config (24 layers; the residual stream reaches a few hundred),
for one `--length`-token text and the default prompts' lengths:
1. logits: max |logits − float64 logits| / max |float64 logits| of the model's own float32 forward, of the
   fast scan (`ssm.fast_scan`: the gradient pass's mixers) and of the blocked forward
   (`ssm.blocked_inference`: the ablation scans' mixers), and each path's ratio to the model's own, the
   float64 forward being the model's in `utils.in_float64` (the causal stage's yardstick);
2. the causal stage's reproduction check on the prompts: per prompt, the model's own max |Δ log p| from
   float64 at the last position and the ablation path's (from layer 0's cached input), and how much of the
   allowance (2x the model's own largest distance on these prompts, plus 1e-6) the path uses.

    python bench/exactness.py [--length 256] [--prompts 6] [--threads 2]
"""
import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    import torch

    import causal_analysis as ca
    import ssm
    from models import get_adapter
    from real_shape import FixedIds, mamba_130m
    from utils import in_float64

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=6, help="how many of the default prompts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = mamba_130m(args.threads)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth_model = copy.deepcopy(model)
        with in_float64(truth_model):  # as the causal stage's yardstick: its residual stream in float64 too
            truth = truth_model(input_ids=ids, use_cache=False, output_hidden_states=True)
        scale = truth.logits.abs().max().item()
        resid = max(h.abs().max().item() for h in truth.hidden_states)
        del truth_model
        paths = {"the model's own float32 forward": model(input_ids=ids, use_cache=False).logits}
        with ssm.fast_scan(model):
            paths["fast scan (gradient pass)"] = model(input_ids=ids, use_cache=False).logits
        with ssm.blocked_inference(model):
            paths["blocked forward (ablation scans)"] = model(input_ids=ids, use_cache=False).logits
    print(f"mamba-130m shape (random init), one {args.length}-token text: largest |residual| {resid:.0f}, "
          f"largest |logit| {scale:.3g}")
    own = (paths["the model's own float32 forward"].double() - truth.logits).abs().max().item() / scale
    for name, logits in paths.items():
        d = (logits.double() - truth.logits).abs().max().item() / scale
        print(f"  {name}: {d:.2e} from float64 (relative), {d / own:.2f}x the model's own")

    prompts = ca.DEFAULT_PROMPTS[:args.prompts]
    cleans = ca.clean_runs(model, FixedIds(prompts, model.config.vocab_size), prompts, [0], "mixer_out")
    allowed = cleans[0].allowance
    print(f"the causal stage's reproduction check (nats), from layer 0's cached input, {len(prompts)} default prompts' "
          f"lengths (allowed: {ca.CHECK_MARGIN:g} x the model's own largest, {max(c.own_error for c in cleans):.2e}, "
          f"+ {ca.CHECK_FLOOR:g} = {allowed:.2e}):")
    worst = 0.0
    with torch.no_grad(), ca.run_from_layer(model, get_adapter(model), 0):
        for c in cleans:
            logp, err = ca._check_start_from_layer(model, c, 0)  # the stage's own check (raises beyond the allowance)
            worst = max(worst, err)
            print(f"  {c.input_ids.shape[1]:>3} tokens: own {c.own_error:.2e}, ablation path {err:.2e} "
                  f"({err / allowed:.0%} of the allowance); |path − own| {(logp - c.logp).abs().max().item():.2e} "
                  "(the old fixed check: 1e-4)")
    print(f"  the largest: {worst:.2e}, {worst / allowed:.0%} of the allowance")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
