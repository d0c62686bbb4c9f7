"""Census reading speed at real shape (random init): the census stage's reading of one text (its group sums at
every layer's neuron site) against one forward of the same text that captures those sites, in the same process,
on a mamba-130m-shaped Mamba (24 layers of 1536 ssm channels) and a gpt2-124m-shaped GPT-2 (12 layers of 3072
MLP neurons). The reading has no FLOP floor of its own (elementwise sums); its ratio to the capture forward is
what it adds to the text pass.

    python bench/census.py [--texts 8] [--length 256] [--threads 2]
"""
import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

    import census
    import sparsity as sp
    from models import get_adapter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"mamba-130m shape": MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=768,
                                                                num_hidden_layers=24)).eval(),
              "gpt2-124m shape": GPT2LMHeadModel(GPT2Config()).eval()}
    g = torch.Generator().manual_seed(1)
    for name, model in models.items():
        adapter = get_adapter(model)
        # token ids drawn from 2000 of the vocabulary, so that tokens repeat as in text
        ids = [torch.randint(0, 2000, (1, args.length), generator=g) for _ in range(args.texts)]
        sites = sp.site_map(adapter, range(adapter.n_layers))
        reader = census.CensusReader(adapter, ids)
        t_forward = t_read = 0.0
        for k, x in enumerate(ids):
            t0 = time.perf_counter()
            acts = sp.capture_sites(model, sites, x)
            t1 = time.perf_counter()
            reader.read(SimpleNamespace(ids=x, sites=acts))
            t2 = time.perf_counter()
            if k:  # the first text warms up
                t_forward, t_read = t_forward + t1 - t0, t_read + t2 - t1
        t0 = time.perf_counter()
        reader.finish()
        t_finish = time.perf_counter() - t0
        n = args.texts - 1
        print(f"{name}: {adapter.n_layers} layers x {reader.n_neurons} neurons, {reader.groups.positions} positions, "
              f"{len(reader.groups.token_ids)} token groups; per text: capture forward {t_forward / n:.3f} s, census "
              f"reading {t_read / n:.3f} s ({t_read / t_forward:.2f}x the forward); finish (the tests of every "
              f"layer) {t_finish:.2f} s once")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
