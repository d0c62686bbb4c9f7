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
    within = np.mean([d.var(0) for d in deltas], axis=0)
    eta = per_text_mean.var(0) / (per_text_mean.var(0) + within)
    np.testing.assert_allclose(stats.eta_squared, eta, rtol=1e-10)
    assert stats.ranked_by == "eta_squared"
    assert [v for _, v in stats.top(5)] == pytest.approx(sorted(eta, reverse=True)[:5], rel=1e-12)
    assert [v for _, v in stats.top(5, "text_variance")] == sorted(stats.text_variance, reverse=True)[:5]
    assert stats.max_reconstruction_error < 1e-4
    out = stats.to_dict(5, n_resamples=200, seed=1)
    assert out["ranked_by"] == "eta_squared" and [t["channel"] for t in out["top_neurons"]] == [c for c, _ in stats.top(5)]
    # the ranking's Spearman with mean Δ is recorded, for it and for the raw variance
    from stats import spearman
    assert out["spearman_with_mean_delta"]["eta_squared"] == spearman(eta, stats.mean_delta)
    assert out["spearman_with_mean_delta"]["text_variance"] == spearman(per_text_mean.var(0), stats.mean_delta)
    for t in out["top_neurons"]:  # each interval holds its point; the raw variance stays as a column
        assert t["low"] <= t["score"] <= t["high"] and 0 <= t["stability"] <= 1
        assert t["mean_delta"]["low"] <= t["mean_delta"]["value"] <= t["mean_delta"]["high"]
        assert t["variance"] == stats.text_variance[t["channel"]]
    assert out["interval_method"].startswith("percentile bootstrap over texts: 200 resamples")
    assert set(out["definitions"]) >= {"eta_squared", "text_variance", "token_variance", "mean_delta", "intervals"}


def test_the_intervals_are_the_statistic_on_resampled_texts():
    """The resampled η² and mean Δ of a draw are the statistics of the texts of that draw, recomputed from
    their Δ (mean Δ weighted by tokens, η² with texts weighted once)."""
    from delta_extraction import stats_from_deltas
    from stats import Resamples

    rng = np.random.default_rng(0)
    deltas = [rng.gamma(2.0, 0.1, size=(int(rng.integers(2, 30)), 6)) for _ in range(9)]
    st = stats_from_deltas(deltas)
    res = Resamples.draw(9, 50, seed=4)
    draws = st.resampled(res)
    for r in (0, 17, 49):
        picked = [deltas[i] for i, c in enumerate(res.counts[r]) for _ in range(int(c))]
        again = stats_from_deltas(picked)
        np.testing.assert_allclose(draws["eta_squared"][r], again.eta_squared, rtol=1e-9)
        np.testing.assert_allclose(draws["mean_delta"][r], again.mean_delta, rtol=1e-9)
        np.testing.assert_allclose(draws["text_variance"][r], again.text_variance, rtol=1e-9, atol=1e-15)


def test_a_small_scale_text_dependent_channel_ranks_first_by_eta_squared_not_by_raw_variance():
    """Planted: channel 3's Δ is small (about 0.01) but its level is set by the text (between-text spread 20
    times its within-text spread); the other channels are large (about 1) with a weak text effect. The
    scale-free η² ranks channel 3 first; the raw between-text variance, which follows Δ's scale, does not."""
    from delta_extraction import stats_from_deltas

    rng = np.random.default_rng(1)
    deltas = []
    for _ in range(12):
        L = 40
        d = 1.0 + 0.05 * rng.normal(size=6) + 0.3 * rng.normal(size=(L, 6))  # weak text effect, scale 1
        d[:, 3] = 0.01 + 0.002 * rng.normal() + 0.0001 * rng.normal(size=L)  # strong text effect, scale 0.01
        deltas.append(np.abs(d))
    st = stats_from_deltas(deltas)
    assert st.top(1)[0][0] == 3 and st.eta_squared[3] > 0.9
    assert st.top(6, "text_variance")[-1][0] == 3  # last by raw variance
    out = st.to_dict(3, n_resamples=200)
    assert out["top_neurons"][0]["channel"] == 3 and out["top_neurons"][0]["stability"] == 1.0
    assert out["expected_above_by_chance"] == pytest.approx(0.025 * out["n_channels"])
    assert out["n_above_noise_floor"] >= 1 and out["per_channel"]["eta_squared_noise_floor"][3] < 0.05


def test_planted_delta_sensitive_channel_ranks_first(tokenizer):
    model = make_model("mamba_b")
    planted = 17
    with torch.no_grad():
        model.backbone.layers[0].mixer.dt_proj.weight[planted] *= 40.0  # Δ of this channel follows the input
    top = find_delta_sensitive_neurons(model, tokenizer, TEXTS, layer_idx=0, top_k=3, key="text_variance")
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


@pytest.mark.parametrize("kind", ["mamba_b", "falcon_mamba", "mamba2"])
@pytest.mark.parametrize("captured", [(2,), (0, 2)])
def test_capture_runs_the_captured_mixers_themselves_and_the_others_below_blocked(kind, captured, monkeypatch):
    """A capture at deep layers: on Mamba-1 / FalconMamba the mixers below that are not captured run
    ssm.mixer_forward_blocked, the captured mixers their own forward (Mamba-2: every mixer its own); the
    captured (input, output) pairs equal those of a forward in which every mixer runs its own, to float32
    rounding (printed)."""
    import ssm
    from delta_extraction import capture_mixer_ios
    from models import get_adapter
    from utils import trace

    model = make_model(kind)
    adapter = get_adapter(model)
    captured = tuple(la for la in captured if la < adapter.n_layers) or (adapter.n_layers - 1,)
    ids = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(3))
    paths = [adapter.mixer_path(la) for la in captured]
    with torch.no_grad(), trace(model, paths, retain_input=True) as own:  # every mixer its own forward
        model(input_ids=ids, use_cache=False)
    calls = []
    real = ssm.mixer_forward_blocked
    monkeypatch.setattr(ssm, "mixer_forward_blocked", lambda mixer, *a, **k: calls.append(mixer) or real(mixer, *a, **k))
    got = capture_mixer_ios(model, list(captured), ids)
    blocked = [] if kind == "mamba2" else [la for la in range(max(captured)) if la not in captured]
    assert [id(m) for m in calls] == [id(adapter.mixer(la)) for la in blocked]
    for la, p in zip(captured, paths):
        for mine, theirs in zip(got[la], (own[p].input, own[p].output)):
            diff = ((mine - theirs).abs().max() / theirs.abs().max()).item()
            print(f"{kind} layer {la}: max relative difference to the model's own forward {diff:.2e}")
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not any("forward" in adapter.mixer(la).__dict__ for la in range(adapter.n_layers))  # nothing left swapped


def test_one_token_texts_have_no_within_text_variance(tokenizer, tmp_path):
    """A one-token text has no within-text variation: token_variance is averaged over the texts of at least
    2 tokens (beside a longer text it is that text's own variance), and with none it is None with the
    reason, in the dict too, never a list of zeros. The across-text variance stays defined."""
    from delta_extraction import ETA_SQUARED_UNDEFINED, TOKEN_VARIANCE_UNDEFINED, plot_delta_variance

    model = make_model("mamba_b")
    one = [torch.tensor([[17]]), torch.tensor([[230]])]
    stats = delta_channel_statistics(model, tokenizer, one, 1, progress=False)
    assert stats.token_variance is None and stats.token_variance_undefined == TOKEN_VARIANCE_UNDEFINED
    d = [extract_deltas(model, 1, x)[0, 0].double().numpy() for x in one]  # (e,) each
    np.testing.assert_allclose(stats.text_variance, np.var(d, axis=0), rtol=1e-10)
    out = stats.to_dict(3, n_resamples=100)
    assert out["per_channel"]["token_variance"] is None and out["n_token_variance_texts"] == 0
    assert out["undefined"] == {"token_variance": TOKEN_VARIANCE_UNDEFINED, "eta_squared": ETA_SQUARED_UNDEFINED}
    # η² is undefined: the list is ranked by the raw between-text variance, and says so
    assert out["ranked_by"] == "text_variance" and out["per_channel"]["eta_squared"] is None
    assert [t["score"] for t in out["top_neurons"]] == sorted(stats.text_variance, reverse=True)[:3]
    assert len(out["top_neurons"]) == 3 and all(t["token_variance"] is None for t in out["top_neurons"])
    assert open(plot_delta_variance(stats, 3, tmp_path, "one"), "rb").read(4) == b"\x89PNG"

    longer = tokenize_texts(tokenizer, TEXTS[:1], 32).input_ids[0]
    mixed = delta_channel_statistics(model, tokenizer, [one[0], longer], 1, progress=False)
    own = extract_deltas(model, 1, longer)[0].double().numpy()  # (L, e)
    np.testing.assert_allclose(mixed.token_variance, own.var(0), rtol=1e-10)
    assert mixed.to_dict(3, n_resamples=100)["n_token_variance_texts"] == 1
    assert mixed.to_dict(3, n_resamples=100)["undefined"] == {}
