"""What the benches share: random-init models with a real checkpoint's exact config (nothing downloaded), and a
tokenizer stand-in that hands the causal stages fixed token ids."""

MAMBA_130M = {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24}  # state-spaces/mamba-130m-hf


def mamba_130m(threads: int, **overrides):
    """A random-init MambaForCausalLM with mamba-130m's config (`overrides` changed), eval mode; torch set to
    `threads` CPU threads and seed 0, transformers' warnings silenced."""
    import torch
    import transformers
    from transformers import MambaConfig, MambaForCausalLM

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(**{**MAMBA_130M, **overrides})).eval()


class FixedIds:
    """A tokenizer stand-in: each prompt's ids are random tokens, as many as its words plus two (seeded), on
    `device`; called as a tokenizer, it returns them."""

    def __init__(self, prompts, vocab_size: int, device="cpu", seed: int = 2):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.ids = {p: torch.randint(0, vocab_size, (1, len(p.split()) + 2), generator=g).to(device) for p in prompts}

    def __call__(self, prompt, **kwargs):
        return {"input_ids": self.ids[prompt]}
