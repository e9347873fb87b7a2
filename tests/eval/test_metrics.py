"""Metric definitions (docs/method.md sec. 5-6) against values computed by hand."""

from __future__ import annotations

import torch

from gsae_pl.eval.metrics import (
    FeatureDensity,
    ReconstructionMetrics,
    density_summary,
    log10_density,
)


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[0.5, 0.0], [0.0, 1.0]])  # pure shrinkage by one half
    f = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
    metric = ReconstructionMetrics(d_in=2)
    metric.update(x[:1], x_hat[:1], (f[:1] != 0).sum(0))  # two updates == one big one
    metric.update(x[1:], x_hat[1:], (f[1:] != 0).sum(0))
    out = metric.compute()
    # squared errors .25 and 1 -> mean over rows .625 -> per element / d_in = .3125
    assert torch.isclose(out["mse"], torch.tensor(0.3125, dtype=torch.float64))
    # mean x = [.5, 1]; E||x - mean||^2 = ((.25 + 1) + (.25 + 1)) / 2 = 1.25; FVU = .625/1.25
    assert torch.isclose(out["fvu"], torch.tensor(0.5, dtype=torch.float64))
    # gamma = E||x_hat||^2 / E[x_hat . x] = (.25 + 1) / (.5 + 2) = .5: shrinkage shows as < 1
    gamma = out["gamma"]
    assert torch.isclose(gamma, torch.tensor(0.5, dtype=torch.float64))
    # norm ratio = E||x_hat||^2 / E||x||^2 = (.25 + 1) / (1 + 4) = .25
    assert torch.isclose(out["norm_ratio"], torch.tensor(0.25, dtype=torch.float64))
    assert torch.isclose(out["l0"], torch.tensor(1.5, dtype=torch.float64))


def test_gamma_is_scale_of_best_rescaling_not_norm_ratio():
    """gamma = argmin_g E||x_hat/g - x||^2, which differs from ||x_hat|| / ||x||."""
    x = torch.tensor([[1.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0]])  # same direction error, larger norm
    metric = ReconstructionMetrics(d_in=2)
    metric.update(x, x_hat, torch.ones(1))
    gamma = metric.compute()["gamma"].item()
    assert abs(gamma - 2.0) < 1e-12  # ||x_hat||^2 / (x_hat . x) = 2 / 1
    grid = torch.linspace(0.5, 4, 3501, dtype=torch.float64)
    losses = [((x_hat.double() / g - x.double()) ** 2).sum() for g in grid]
    assert abs(grid[int(torch.stack(losses).argmin())].item() - gamma) < 1e-3


def test_norm_ratio_is_below_one_where_gamma_is_one():
    """x_hat = the projection of x on a line at 45 degrees: no shrinkage along x_hat
    (gamma = 1), yet ||x_hat||^2 = cos^2(45) ||x||^2, so the norm ratio is 1/2."""
    x = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    x_hat = torch.tensor([[0.5, 0.5], [-1.0, -1.0]])
    metric = ReconstructionMetrics(d_in=2)
    metric.update(x, x_hat, torch.ones(1))
    out = metric.compute()
    # gamma = (.5 + 2) / (.5 + 2) = 1; norm ratio = (.5 + 2) / (1 + 4) = .5
    assert out["gamma"].item() == 1.0
    assert out["norm_ratio"].item() == 0.5


def test_feature_density_dead_and_dense():
    f = torch.zeros(20, 4)
    f[:, 0] = 1.0  # fires on every row: dense
    f[:1, 1] = 1.0  # 1 in 20 = 5%: neither
    f[:3, 2] = 1.0  # 15%: dense at a 10% threshold
    metric = FeatureDensity(4)
    metric.update((f[:5] != 0).sum(0), 5)
    metric.update((f[5:] != 0).sum(0), 15)
    density = metric.compute()
    assert torch.allclose(density, torch.tensor([1.0, 0.05, 0.15, 0.0], dtype=torch.float64))
    summary = density_summary(density, dense_threshold=0.1)
    assert summary["dead_fraction"].item() == 0.25
    assert summary["dense_fraction"].item() == 0.5
    assert torch.allclose(log10_density(density), torch.tensor(
        [0.0, -1.30103, -0.823909, -10.0], dtype=torch.float64), atol=1e-5)
