"""SyntheticSource: reproducible by step, the configured statistics, and the recovery metrics."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from gsae_pl.data.base import train_stream
from gsae_pl.data.synthetic import (
    SyntheticConfig,
    SyntheticSource,
    fraction_recovered,
    mmcs,
    power_law_frequencies,
)
from gsae_pl.errors import UserError
from gsae_pl.seeds import stream_seed


def make(**overrides) -> SyntheticSource:
    cfg = OmegaConf.merge(OmegaConf.structured(SyntheticConfig), overrides)
    return SyntheticSource(cfg)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_shapes_and_unit_features():
    src = make(d_in=16, n_features=40)
    assert src.true_features.shape == (40, 16) and src.true_features.dtype == torch.float32
    assert torch.allclose(src.true_features.norm(dim=1), torch.ones(40), atol=1e-5)
    assert src.frequencies.shape == (40,) and src.frequencies.dtype == torch.float32
    batch = next(train_stream(src, 8, 0, 1))
    assert batch.shape == (8, 16) and batch.dtype == torch.float32
    assert src.describe() == {"source": "synthetic", **OmegaConf.to_container(
        OmegaConf.merge(OmegaConf.structured(SyntheticConfig), {"d_in": 16, "n_features": 40}))}


def test_same_step_same_batch_from_fresh_sources():
    a = take(train_stream(make(seed=3), 32, 1, 2), 3)
    b = take(train_stream(make(seed=3), 32, 1, 2), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], take(train_stream(make(seed=4), 32, 1, 2), 1)[0])


def test_start_step_resumes_at_that_batch():
    src = make()
    full = take(train_stream(src, 32, 0, 2), 5)
    resumed = take(train_stream(src, 32, 0, 2, start_step=3), 2)
    assert torch.equal(resumed[0], full[3]) and torch.equal(resumed[1], full[4])


def test_steps_never_share_a_batch():
    batches = take(train_stream(make(), 16, 0, 1), 6)
    for i, x in enumerate(batches):
        assert not any(torch.equal(x, y) for y in batches[i + 1:])


def test_ranks_split_the_one_process_batch_row_by_row():
    src = make()
    whole = take(train_stream(src, 12, 0, 1, start_step=2), 2)
    shares = [take(train_stream(src, 12, rank, 3, start_step=2), 2) for rank in range(3)]
    for k in range(2):
        assert all(shares[r][k].shape == (4, src.d_in) for r in range(3))
        for r in range(3):
            assert torch.equal(shares[r][k], whole[k][r::3])


def test_global_batch_must_split_evenly():
    with pytest.raises(UserError, match="multiple of 3"):
        train_stream(make(), 16, 0, 3)


def test_seeds_distinct_across_steps_ranks_and_streams():
    seeds = {stream_seed(0, "train", g) for g in range(10_000)}
    seeds |= {stream_seed(0, "eval", j) for j in range(100)}
    seeds |= {stream_seed(1, "train", g) for g in range(10_000)}
    assert len(seeds) == 20_100


def test_eval_rows_stable_and_not_training_rows():
    src = make()
    first = src.eval_rows(5000)
    first[:] = 0  # a caller editing its copy must not change the held-out set
    again = make().eval_rows(5000)
    assert torch.equal(src.eval_rows(5000), again)
    assert torch.equal(src.eval_rows(100), again[:100])  # a prefix of a longer request
    train = torch.cat(take(train_stream(src, 256, 0, 1), 4))
    nonzero = again[again.norm(dim=1) > 0][:200]
    assert not (torch.cdist(nonzero, train) < 1e-6).any()


def test_frequencies_power_law_floor_and_budget():
    p = power_law_frequencies(100, 1.0, 0.05, 4.0)
    assert p.sum().item() == pytest.approx(4.0, rel=1e-5)
    assert (p[:-1] >= p[1:]).all()
    assert (p.min() / p.max()).item() >= 0.05 - 1e-6
    # Unfloored head follows the law: p_0 / p_1 = 2^exponent.
    assert (p[0] / p[1]).item() == pytest.approx(2.0, rel=1e-5)
    # So many active that the head would exceed 1: it is clipped, the budget still met.
    q = power_law_frequencies(10, 2.0, 0.0, 5.0)
    assert q.max().item() == 1.0 and q.sum().item() == pytest.approx(5.0, rel=1e-5)
    with pytest.raises(UserError, match="avg_active"):
        power_law_frequencies(10, 1.0, 0.1, 11.0)


def test_empirical_rates_match_frequencies():
    src = make(d_in=8, n_features=64, avg_active=4.0, min_frequency_ratio=0.1)
    gen = torch.Generator().manual_seed(0)
    _, coeff = src.sample(40_000, gen)
    active = coeff > 0
    rate = active.float().mean(0)
    # Binomial standard error per feature, 5 sigma.
    tol = 5 * (src.frequencies * (1 - src.frequencies) / 40_000).sqrt() + 1e-4
    assert ((rate - src.frequencies).abs() <= tol).all()
    assert active.sum(1).float().mean().item() == pytest.approx(4.0, rel=0.02)


def test_correlated_groups_co_fire():
    src = make(d_in=8, n_features=64, avg_active=3.0, frequency_exponent=0.0,
               correlated_groups=2, group_size=4, co_fire_prob=0.8)
    _, coeff = src.sample(20_000, torch.Generator().manual_seed(0))
    on = (coeff > 0).float()

    def p_given(j, i):  # P(j fires | i fires)
        return (on[:, j] * on[:, i]).sum() / on[:, i].sum()

    assert p_given(1, 0) > 0.75  # same group: joins with prob 0.8 (or fired on its own)
    assert p_given(20, 0) < 0.15  # independent: its base rate, 3/64
    assert p_given(5, 4) > 0.75 and p_given(4, 3) < 0.15  # groups are disjoint


def test_rows_are_coefficients_times_features():
    src = make(d_in=8, n_features=32, avg_active=1.0, magnitude_noise=0.0,
               frequency_exponent=0.0)
    x, coeff = src.sample(2000, torch.Generator().manual_seed(1))
    assert set(coeff.unique().tolist()) <= {0.0, 1.0}  # no noise: magnitude exactly 1
    assert torch.allclose(x, coeff @ src.true_features, atol=1e-6)
    single = (coeff > 0).sum(1) == 1
    assert single.sum() > 100
    which = coeff[single].argmax(1)
    assert torch.allclose(x[single], src.true_features[which], atol=1e-6)


def test_magnitudes_non_negative_with_noise():
    _, coeff = make(magnitude_noise=2.0).sample(1000, torch.Generator().manual_seed(0))
    assert (coeff >= 0).all() and coeff.max() > 2


def test_mmcs_identity_and_scaled_permuted_rows():
    true = torch.eye(4)
    dec = torch.eye(4)[[2, 0, 3, 1]] * torch.tensor([[3.0], [0.5], [1.0], [7.0]])
    assert mmcs(true, dec) == pytest.approx(1.0)
    assert fraction_recovered(true, dec) == 1.0


def test_mmcs_rotation_and_partial_recovery():
    c = math.cos(math.pi / 4)
    true = torch.eye(2)
    rotated = torch.tensor([[c, c], [-c, c]])  # 45 degrees: every best match has cos 0.7071
    assert mmcs(true, rotated) == pytest.approx(0.70710678, abs=1e-6)
    assert fraction_recovered(true, rotated) == 0.0
    assert fraction_recovered(true, rotated, threshold=0.7) == 1.0
    # One feature found exactly, one at 45 degrees: mean (1 + 0.7071) / 2, half recovered.
    dec = torch.tensor([[2.0, 0.0], [-1.0, 1.0]])
    assert mmcs(true, dec) == pytest.approx((1 + c) / 2, abs=1e-6)
    assert fraction_recovered(true, dec) == 0.5


def test_bad_group_layout_is_a_user_error():
    with pytest.raises(UserError, match="correlated_groups"):
        make(n_features=8, correlated_groups=3, group_size=4)
