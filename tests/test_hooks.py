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
