"""Tiny random-config models and an offline tokenizer, built once per test session (no network)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from utils import OFFLINE_TEXTS_PATH  # noqa: E402

VOCAB = 300
# The device-aware tests (mixer numerics, causal scans, sparsity, peak memory, the CLI end to end) run
# on TEST_DEVICE, default cpu; on a GPU machine: TEST_DEVICE=cuda python -m pytest -q tests
DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained on the repo's own offline texts, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(OFFLINE_TEXTS_PATH)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


MAMBA_SHAPES = {
    # two shapes: different d, expand, state size, conv width, dt rank, biases
    "mamba_a": dict(hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
    "mamba_b": dict(hidden_size=24, state_size=8, num_hidden_layers=3, expand=3, conv_kernel=3,
                    time_step_rank=5, use_bias=True),
}


# The hybrid families (issue 31): several heads in several groups of B and C, chunks of 5 positions (the
# texts are longer), and every multiplier a family has set away from 1; both layer kinds in every model.
HYBRID_CONFIGS = {
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
        num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=5, time_step_limit=(0.0, 10.0))),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        hidden_size=32, intermediate_size=16, shared_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=4,
        num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=2, mamba_chunk_size=5, embedding_multiplier=2.0, logits_scaling=3.0, residual_multiplier=0.5,
        attention_multiplier=0.3, position_embedding_type="rope", time_step_limit=(0.0, 10.0))),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=5,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba"], num_attention_heads=4,
        num_key_value_heads=4, n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        chunk_size=5, num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        hidden_size=32, layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=8,
        mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=5, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=16,
        n_group=1, topk_group=1, routed_scaling_factor=2.5, time_step_min=0.01)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
        mamba_chunk_size=5, mamba_rms_norm=True, mamba_norm_before_gate=False, lm_head_multiplier=0.7,
        embedding_multiplier=1.5, mlp_multipliers=[0.8, 1.3], key_multiplier=0.9, attention_out_multiplier=1.1,
        attention_in_multiplier=0.6, ssm_multipliers=[0.5, 1.2, 0.7, 1.4, 0.9], ssm_in_multiplier=1.25,
        ssm_out_multiplier=0.8, time_step_limit=(0.0, 10.0))),
}


def out_name(folder) -> str:
    """The name part of a local model folder's output files (its name and a hash of its path)."""
    from naming import model_prefix

    return model_prefix(str(folder), "local", str(folder))


def make_model(kind: str, seed: int = 0):
    from transformers import (FalconMambaConfig, FalconMambaForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind in MAMBA_SHAPES:
        return MambaForCausalLM(MambaConfig(**common, **MAMBA_SHAPES[kind])).eval()
    if kind == "mamba2":  # 8 heads of 8 dims in 2 groups of B and C; chunks of 8 positions (texts are longer)
        return Mamba2ForCausalLM(Mamba2Config(**common, hidden_size=32, expand=2, num_heads=8, head_dim=8, n_groups=2,
                                              state_size=8, chunk_size=8, num_hidden_layers=2, conv_kernel=4,
                                              use_conv_bias=True)).eval()
    if kind == "falcon_mamba":  # Mamba-1 with RMS-normalised Δ input, B and C
        return FalconMambaForCausalLM(FalconMambaConfig(**common, **MAMBA_SHAPES["mamba_b"])).eval()
    if kind in HYBRID_CONFIGS or kind.split(":")[0] in HYBRID_CONFIGS:  # "falcon_h1:key=value,..." overrides
        import transformers

        name, _, extra = kind.partition(":")
        config_class, model_class, kwargs = HYBRID_CONFIGS[name]
        kwargs = {**kwargs, **{k: eval(v) for k, v in (kv.split("=") for kv in extra.split(",") if kv)}}
        config = getattr(transformers, config_class)(**common, **kwargs)
        return getattr(transformers, model_class)(config).eval()
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**common, n_layer=2, n_embd=32, n_head=2, n_positions=512)).eval()
    if kind == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common, num_hidden_layers=2, hidden_size=32,
                                                num_attention_heads=2, intermediate_size=64,
                                                max_position_embeddings=512)).eval()
    raise KeyError(kind)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """{kind: folder} of save_pretrained folders (model + tokenizer) for every tiny model."""
    out = {}
    for kind in [*MAMBA_SHAPES, "falcon_mamba", "mamba2", "gpt2", "gpt_neox"]:
        path = tmp_path_factory.mktemp(kind)
        make_model(kind).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[kind] = path
    return out


@pytest.fixture(params=list(MAMBA_SHAPES))
def mamba(request):
    return make_model(request.param).to(DEVICE)


def assert_streamed_equals_reference(an, ids, layers, methods=None, label: str = "") -> None:
    """An attention-neuron analyser's streamed scores (`text_scores`, α one unit group at a time) against
    the whole-α reference path (`create_neurons` on `extract_attention_vectors`), every field of every
    method at each layer, with the maximum relative differences printed. gradient_guided: the streamed
    path's g is taken at the scan's y, the reference's at α x + D x (equal to float32 rounding), hence 1e-5."""
    import numpy as np

    from attention_neurons import METHODS

    methods = tuple(methods or METHODS)
    for layer in layers:
        ts = an.text_scores(ids, layer, methods)
        data = an.extract_attention_vectors(ids, [layer])
        assert set(ts.scores) == set(methods)
        assert ts.reconstruction.ok and ts.reconstruction.relative_error < 1e-5
        torch.testing.assert_close(ts.attention_vectors, data[layer]["attention_vectors"], rtol=1e-5, atol=1e-7)
        for m in methods:
            ref, got = an.create_neurons(data, m)[layer], ts.scores[m]
            for field in ("neuron_activations", "token_map"):
                r, g = np.asarray(getattr(ref, field)), np.asarray(getattr(got, field))
                rel = np.abs(r - g).max() / np.abs(r).max()
                print(f"{label} layer {layer} {m} {field}: max relative difference {rel:.2e}")
                assert r.shape == g.shape and rel < (1e-5 if m == "gradient_guided" else 1e-6)


def kl_with_input_zeroed(model, module, ids, dims) -> float:
    """KL(p_clean ‖ p_ablated) at the last position (float64) of a forward of `ids` (1, L) whose `module` gets
    its first input with `dims` zeroed, by a plain pre-hook: an independent check of the causal machinery."""
    def zeroed(mod, args):
        y = args[0].clone()
        y[..., dims] = 0.0
        return (y, *args[1:])

    with torch.no_grad():
        clean = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
        handle = module.register_forward_pre_hook(zeroed)
        try:
            ablated = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
        finally:
            handle.remove()
    return float((clean.exp() * (clean - ablated)).sum())
