"""The fast training scan against the plain reference and the HF slow path; training determinism;
the shipped reference models."""
import json
import math

import pytest
import torch

from conftest import REPO, make_model
from ssm import fast_scan_training, selective_scan_fast, selective_scan_reference
import train_reference_models as trm

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _scan_inputs(dtype, b=2, L=23, e=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, e, generator=g, dtype=dtype)
    delta = torch.rand(b, L, e, generator=g, dtype=dtype) * 1.5 + 0.01
    A = -torch.rand(e, n, generator=g, dtype=dtype) * 4
    B, C = torch.randn(b, L, n, generator=g, dtype=dtype), torch.randn(b, L, n, generator=g, dtype=dtype)
    D = torch.randn(e, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, delta, A, B, C, D)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_scan_matches_reference_forward_and_gradients(dtype):
    inputs = _scan_inputs(dtype)
    y_ref = selective_scan_reference(*inputs)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, inputs, g)
    y_fast = selective_scan_fast(*inputs)
    grads_fast = torch.autograd.grad(y_fast, inputs, g)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    print(f"{dtype}: forward max rel diff {rel(y_fast, y_ref):.2e}; grads "
          + ", ".join(f"{n} {rel(a, b):.2e}" for n, a, b in zip("x Δ A B C D".split(), grads_fast, grads_ref)))
    assert rel(y_fast, y_ref) < TOL[dtype]
    for a, b in zip(grads_fast, grads_ref):
        assert rel(a, b) < TOL[dtype]


def test_fast_scan_passes_gradcheck():
    assert torch.autograd.gradcheck(selective_scan_fast, _scan_inputs(torch.float64, L=7, e=3, n=2))


def test_training_path_matches_hf_slow_path_in_forward_and_gradients():
    slow, fast = make_model("mamba_b"), make_model("mamba_b")
    with torch.no_grad():  # larger Δ than at init, so the scan carries weight in the output
        for m in (slow, fast):
            for blk in m.backbone.layers:
                blk.mixer.dt_proj.bias.add_(1.5)
    ids = torch.randint(0, 300, (3, 41), generator=torch.Generator().manual_seed(0))
    loss_slow = slow(input_ids=ids, labels=ids, use_cache=False).loss
    loss_slow.backward()
    with fast_scan_training(fast):
        out = fast(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    logits_slow = slow(input_ids=ids, use_cache=False).logits
    rel_logits = ((out.logits - logits_slow).abs().max() / logits_slow.abs().max()).item()
    worst = max(((p.grad - q.grad).abs().max() / p.grad.abs().max()).item()
                for p, q in zip(slow.parameters(), fast.parameters()))
    print(f"logits max rel diff {rel_logits:.2e}; worst parameter-gradient max rel diff {worst:.2e}")
    assert rel_logits < 1e-4 and worst < 1e-4
    assert all("forward" not in blk.mixer.__dict__ for blk in fast.backbone.layers)  # swapped back


@pytest.fixture(scope="module")
def tiny_corpus():
    from utils import OFFLINE_TEXTS_PATH

    train, heldout, _ = trm.load_corpus([str(OFFLINE_TEXTS_PATH)], 0.2)
    tok = trm.train_tokenizer(train, 400)
    return tok, trm.encode(tok, train), trm.encode(tok, heldout), train


def test_tokenizer_round_trips_text(tiny_corpus):
    tok, ids, _, train = tiny_corpus
    assert tok.decode(ids.tolist()) == train and len(tok) == 400


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_retraining_with_the_same_seed_gives_the_same_losses(tiny_corpus, kind):
    tok, ids, _, _ = tiny_corpus
    spec = trm.ModelSpec(d_model=32, mamba_layers=2, mamba_state=4, gpt2_layers=2, gpt2_heads=2, n_positions=64)

    def run(seed):
        model = trm.build_model(kind, len(tok), spec, seed)
        return trm.train_model(model, ids, steps=3, batch_size=2, seq_len=32, lr=3e-3, seed=seed,
                               progress=False).losses

    first, second, other = run(0), run(0), run(1)
    print(kind, first, other)
    assert first == second and first != other


def test_unigram_baseline_known_value():
    train = torch.tensor([0, 1, 1, 1])  # add-one counts (2, 4): p = (1/3, 2/3)
    heldout = torch.tensor([1, 0, 1, 1, 0, 0])  # windows of 3: scored tokens (0, 1) and (0, 0)
    expected = -(math.log(1 / 3) * 3 + math.log(2 / 3)) / 4
    assert trm.unigram_nll(train, heldout, 2, 3) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------
# The shipped pair
# --------------------------------------------------------------------------------------------------
REF = REPO / "reference_models"


@pytest.mark.parametrize("kind, cls", [("mamba", "MambaForCausalLM"), ("transformer", "GPT2LMHeadModel")])
def test_reference_models_load_with_plain_from_pretrained(kind, cls):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(REF / kind)
    tok = AutoTokenizer.from_pretrained(REF / kind)
    assert type(model).__name__ == cls and model.config.vocab_size == len(tok)
    info = json.loads((REF / kind / "training_info.json").read_text())
    r = info["results"][kind]
    assert sum(p.numel() for p in model.parameters()) == r["n_params"]
    assert r["heldout_ppl"] < info["unigram"]["ppl"] / 2  # far below the unigram baseline


def test_reference_pair_is_matched_and_small():
    from transformers import AutoTokenizer

    toks = [AutoTokenizer.from_pretrained(REF / k) for k in ("mamba", "transformer")]
    assert toks[0].get_vocab() == toks[1].get_vocab()
    n = [json.loads((REF / k / "training_info.json").read_text())["results"][k]["n_params"]
         for k in ("mamba", "transformer")]
    assert abs(n[0] - n[1]) / max(n) < 0.1
    size = sum(f.stat().st_size for f in REF.rglob("*") if f.is_file())
    assert size < 30e6, f"{size / 1e6:.1f} MB"


@pytest.mark.skipif(not trm.SHARED_DATA.is_dir(), reason="needs ../shared/data to rebuild the held-out split")
@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_reference_heldout_loss_reproduces(kind):
    """Recompute the held-out loss of the shipped model from the data and compare with the card's number."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((REF / kind / "training_info.json").read_text())
    _, heldout, _ = trm.load_corpus(None, info["args"]["eval_fraction"])
    tok = AutoTokenizer.from_pretrained(REF / kind)
    ids = trm.encode(tok, heldout)
    assert len(ids) == info["n_heldout_tokens"]
    model = AutoModelForCausalLM.from_pretrained(REF / kind).eval()
    ctx = fast_scan_training(model) if kind == "mamba" else torch.no_grad()
    with ctx:
        nll, _ = trm.heldout_nll(model, ids, info["args"]["seq_len"])
    print(f"{kind}: held-out loss {nll:.5f}, recorded {info['results'][kind]['heldout_loss']:.5f}")
    assert nll == pytest.approx(info["results"][kind]["heldout_loss"], rel=1e-4)
