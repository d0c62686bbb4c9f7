"""Delta-sensitive neurons: statistics equal their definitions; a planted channel ranks first."""
import numpy as np
import pytest
import torch

from conftest import make_model
from delta_extraction import delta_channel_statistics, extract_deltas, find_delta_sensitive_neurons
from models import NotApplicable
from utils import read_texts_file, tokenize_texts, OFFLINE_TEXTS_PATH

TEXTS = read_texts_file(OFFLINE_TEXTS_PATH)[:8]


def test_statistics_equal_the_definitions(mamba, tokenizer):
    ids = tokenize_texts(tokenizer, TEXTS, 64).input_ids
    stats = delta_channel_statistics(mamba, tokenizer, ids, layer_idx=1, progress=False)
    deltas = [extract_deltas(mamba, 1, x.to(mamba.device))[0].double().cpu().numpy() for x in ids]  # each (L, e)
    per_text_mean = np.stack([d.mean(0) for d in deltas])  # (n_texts, e)
    np.testing.assert_allclose(stats.text_variance, per_text_mean.var(0), rtol=1e-10)
    np.testing.assert_allclose(stats.token_variance, np.mean([d.var(0) for d in deltas], axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.mean_delta, np.concatenate(deltas).mean(0), rtol=1e-10)
    assert stats.n_tokens == sum(d.shape[0] for d in deltas) and stats.n_texts == len(TEXTS)
    top = stats.top(5)
    assert [v for _, v in top] == sorted(stats.text_variance, reverse=True)[:5]
    assert stats.max_reconstruction_error < 1e-4


def test_planted_delta_sensitive_channel_ranks_first(tokenizer):
    model = make_model("mamba_b")
    planted = 17
    with torch.no_grad():
        model.backbone.layers[0].mixer.dt_proj.weight[planted] *= 40.0  # Δ of this channel follows the input
    top = find_delta_sensitive_neurons(model, tokenizer, TEXTS, layer_idx=0, top_k=3)
    assert top[0][0] == planted and top[0][1] > 10 * top[1][1]
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]


def test_not_applicable_to_transformers_and_needs_two_texts(tokenizer):
    ids = tokenize_texts(tokenizer, TEXTS[:2], 16).input_ids
    with pytest.raises(NotApplicable, match="not applicable to gpt2"):
        delta_channel_statistics(make_model("gpt2"), tokenizer, ids)
    with pytest.raises(ValueError, match="at least 2 texts"):
        delta_channel_statistics(make_model("mamba_a"), tokenizer, ids[:1])


def test_the_pipeline_refuses_unusable_texts_before_any_stage(tokenizer, tmp_path):
    from main import run_comprehensive_analysis
    from utils import UserInputError

    model = make_model("mamba_a")
    with pytest.raises(ValueError, match="not a single string"):
        run_comprehensive_analysis(model, tokenizer, "one text passed bare", stages=["delta"], plots_dir=tmp_path)
    with pytest.raises(UserInputError, match="the delta stage needs at least 2 texts; got 1"):
        run_comprehensive_analysis(model, tokenizer, ["only one"], stages=["delta"], plots_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before the stage wrote its plots
    small = make_model("mamba_a")
    small.resize_token_embeddings(50)  # the tokenizer's ids reach 299
    with pytest.raises(UserInputError, match="beyond the model's 50 embeddings"):
        run_comprehensive_analysis(small, tokenizer, ["one text", "another text"], stages=["delta"], plots_dir=tmp_path)
