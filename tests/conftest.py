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


def make_model(kind: str, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig,
                              MambaForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind in MAMBA_SHAPES:
        return MambaForCausalLM(MambaConfig(**common, **MAMBA_SHAPES[kind])).eval()
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
    for kind in [*MAMBA_SHAPES, "gpt2", "gpt_neox"]:
        path = tmp_path_factory.mktemp(kind)
        make_model(kind).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[kind] = path
    return out


@pytest.fixture(params=list(MAMBA_SHAPES))
def mamba(request):
    return make_model(request.param).to(DEVICE)
