"""The one hook context manager: captures, cleanup, wrong names, early stop, interventions."""
import pytest
import torch

from conftest import make_model
from utils import trace


def _n_hooks(model):
    """Hooks registered by utils.trace (transformers installs persistent hooks of its own)."""
    return sum(h.__qualname__.startswith("trace.") for m in model.modules() for h in m._forward_hooks.values())


@pytest.fixture
def gpt2():
    return make_model("gpt2")


def test_captures_match_hidden_states_and_hooks_are_removed(gpt2):
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad(), trace(gpt2, ["transformer.h.0", "transformer.h.0.mlp.act"], retain_input=True) as tr:
        assert _n_hooks(gpt2) == 2
        out = gpt2(ids, output_hidden_states=True)
    assert _n_hooks(gpt2) == 0
    torch.testing.assert_close(tr["transformer.h.0"].output, out.hidden_states[1])  # (b, L, d)
    assert tr["transformer.h.0.mlp.act"].output.shape == (1, 4, 4 * 32)  # (b, L, 4d)
    assert tr["transformer.h.0"].calls == 1


def test_hooks_removed_when_forward_raises(gpt2):
    with pytest.raises(IndexError):
        with trace(gpt2, ["transformer.h.0", "transformer.h.1"]):
            assert _n_hooks(gpt2) == 2
            gpt2(torch.tensor([[10_000]]))  # out of vocabulary: the embedding raises
    assert _n_hooks(gpt2) == 0


def test_unknown_path_raises_lookup_error_and_registers_nothing(gpt2):
    with pytest.raises(LookupError, match="transformer.h.7"):
        with trace(gpt2, ["transformer.h.0", "transformer.h.7"]):
            pass
    assert _n_hooks(gpt2) == 0


def test_hook_that_never_fires_is_an_error(gpt2):
    with pytest.raises(RuntimeError, match="never fired"):
        with trace(gpt2, ["transformer.h.1"]):
            pass
    assert _n_hooks(gpt2) == 0


def test_stop_skips_later_layers(gpt2):
    ids = torch.tensor([[1, 2, 3]])
    with trace(gpt2, ["transformer.h.1"], check_fired=False) as outer:
        with trace(gpt2, ["transformer.h.0"], stop=True) as inner:
            gpt2(ids)
    assert inner["transformer.h.0"].calls == 1 and outer["transformer.h.1"].calls == 0
    assert _n_hooks(gpt2) == 0


def test_edit_output_changes_downstream_and_captures_are_clones(gpt2):
    ids = torch.tensor([[4, 8, 15, 16]])
    with torch.no_grad():
        clean = gpt2(ids).logits
        with trace(gpt2, ["transformer.h.1.mlp"], edit_output=lambda name, out: torch.zeros_like(out)) as tr:
            edited = gpt2(ids).logits
    assert tr["transformer.h.1.mlp"].output.abs().max() == 0  # the capture is the edited output
    assert not torch.allclose(clean, edited)
    with torch.no_grad(), trace(gpt2, ["transformer.h.0"]) as tr:
        gpt2(ids)
    saved = tr["transformer.h.0"].output.clone()
    with torch.no_grad():
        gpt2(ids)  # a second forward must not overwrite the captured tensor in place
    torch.testing.assert_close(tr["transformer.h.0"].output, saved)
    assert not tr["transformer.h.0"].output.requires_grad


def test_a_write_path_sees_output_minus_input_and_its_edit_is_added_back(gpt2):
    """`P#write`: the trace's output is what block P adds to its input; an edit scaling dim k by 0 gives the
    block output input[k] there (out'[k] = in[k] + 0·(out[k] − in[k])) and the block's own output, bit for
    bit, everywhere else; the logits equal an independent hook that sets out[..., k] = in[..., k]."""
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    k = 5
    with torch.no_grad(), trace(gpt2, ["transformer.h.0", "transformer.h.0#write"], retain_input=True) as tr:
        gpt2(ids)
    plain, write = tr["transformer.h.0"], tr["transformer.h.0#write"]
    torch.testing.assert_close(write.output, plain.output - plain.input, rtol=0, atol=0)
    torch.testing.assert_close(write.input, plain.input, rtol=0, atol=0)

    def zero_k(name, w):
        w = w.clone()
        w[..., k] = 0
        return w

    seen = {}

    def independent(module, args, kwargs, output):
        out = output.clone()
        out[..., k] = args[0][..., k]
        return out

    with torch.no_grad():
        with trace(gpt2, ["transformer.h.0#write"], edit_output=zero_k) as edited, \
                trace(gpt2, ["transformer.h.0"]) as after:  # registered later: sees the edited block output
            got = gpt2(ids).logits
        seen["block"] = after["transformer.h.0"].output
        handle = gpt2.transformer.h[0].register_forward_hook(independent, with_kwargs=True)
        try:
            want = gpt2(ids).logits
        finally:
            handle.remove()
    assert edited["transformer.h.0#write"].output[..., k].abs().max() == 0  # the trace records the edited write
    block = seen["block"]
    assert torch.equal(block[..., k], plain.input[..., k])  # exactly the input there
    others = [j for j in range(block.shape[-1]) if j != k]
    assert torch.equal(block[..., others], plain.output[..., others])  # the block's own output elsewhere
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="edit_input on a #write path"):
        with trace(gpt2, ["transformer.h.0#write"], edit_input=lambda n, v: v):
            pass
    with pytest.raises(LookupError, match="transformer.h.9#write"):
        with trace(gpt2, ["transformer.h.9#write"]):
            pass
    assert _n_hooks(gpt2) == 0
