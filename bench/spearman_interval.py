"""How often the faithfulness stage's intervals for Spearman's ρ cover the value they estimate: ρ between a
fixed ranking and the mean effect over all prompts of this kind (the noise-free ground truth), when the
ground truth is measured on a sample of prompts. Simulated: U units with lognormal mean effects μ, a
ranking s = log μ + noise, per-prompt effects μ · lognormal noise (mean 1), times a factor per prompt shared by
every unit (`--shared`: some prompts move every unit more, as real prompts do); per repetition, the observed ρ̂
against the sample mean, the percentile interval and the basic interval of ρ over bootstrap draws of the
prompts (`faithfulness.basic_interval`), and the corrected estimate 2ρ̂ − mean(draws).

    python bench/spearman_interval.py [--units 200] [--prompts 24] [--sigma 1.2] [--shared 0] [--reps 300]
                                      [--resamples 300]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import numpy as np

    import stats
    from faithfulness import basic_interval

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--sigma", type=float, default=1.2, help="per-prompt lognormal noise")
    ap.add_argument("--shared", type=float, default=0.0, help="lognormal σ of a per-prompt factor on every unit")
    ap.add_argument("--ranking_noise", type=float, default=1.5, help="noise of the ranking around log μ")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--resamples", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mu = rng.lognormal(-3.0, 1.5, args.units)  # (U,)
    s = np.log(mu) + rng.normal(0.0, args.ranking_noise, args.units)  # (U,) the ranking
    target = stats.spearman(s, mu)
    hits = {"percentile": 0, "basic": 0}
    observed, corrected = [], []
    for r in range(args.reps):
        e = mu[None, :] * rng.lognormal(0.0, args.sigma, (args.prompts, args.units)) / np.exp(args.sigma ** 2 / 2)
        e = e * rng.lognormal(0.0, args.shared, (args.prompts, 1)) / np.exp(args.shared ** 2 / 2)  # (n, U)
        res = stats.Resamples.draw(args.prompts, args.resamples, r, "prompts")
        rho = stats.spearman(s, e.mean(0))
        drawn = np.array([stats.spearman(s, t) for t in res.means(e)])
        lo, hi = np.percentile(drawn, [2.5, 97.5])
        hits["percentile"] += lo <= target <= hi
        b = basic_interval(rho, drawn, res, (-1.0, 1.0))
        hits["basic"] += b["low"] <= target <= b["high"]
        observed.append(rho)
        corrected.append(b["corrected"])
    print(f"{args.units} units, {args.prompts} prompts, per-prompt noise σ = {args.sigma}, shared per-prompt factor "
          f"σ = {args.shared}, {args.reps} repetitions, "
          f"{args.resamples} resamples; ρ against the noise-free effect: {target:.3f}")
    print(f"observed ρ: mean {np.mean(observed):.3f}; corrected: mean {np.mean(corrected):.3f}")
    for name, h in hits.items():
        print(f"{name} interval covers it in {h / args.reps:.0%} of repetitions")


if __name__ == "__main__":
    main()
