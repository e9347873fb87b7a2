"""The paired comparison: the two-level bootstrap against hand-computed replicates, the
shared document draw, the metrics from per-document sums, the verdict rules, the sparse-grid
flag and the second interpolant (docs/method.md sec. 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gsae_pl.suite import paired, uncertainty
from gsae_pl.suite.curves import (
    bracket_at_l0,
    bracket_needed,
    interpolate_at_l0,
    is_sparse,
    l0_needed,
    pchip_at_l0,
    pchip_l0_needed,
)
from gsae_pl.suite.document_stats import metric_from_sums

# Two documents; every run's centred norm sum is 10 per document, so FVU under document
# counts w is (w . sq_err) / 20; L0 is 10 at swept value 1 and 40 at 2 under any w.
SQ_ERR = {("A", 0, 1): [1, 3], ("A", 0, 2): [1, 1], ("A", 1, 1): [3, 3], ("A", 1, 2): [1, 3],
          ("B", 0, 1): [4, 4], ("B", 0, 2): [2, 2], ("B", 1, 1): [6, 4], ("B", 1, 2): [2, 4]}


def _arms(sq_err=SQ_ERR):
    rows, stats = {"A": [], "B": []}, {}
    for (arm, seed, value), sq in sq_err.items():
        run = f"{arm}_{value}_seed{seed}"
        l0 = 10.0 if value == 1 else 40.0
        rows[arm].append({"run": run, "seed": seed, "value": value, "l0": l0,
                          "fvu": sum(sq) / 20})
        stats[run] = {"rows": np.array([100.0, 100.0]), "active": np.array([l0 * 100] * 2),
                      "sq_err": np.array(sq, float), "centred_sq_norm": np.array([10.0, 10.0])}
    return (rows["A"], rows["B"]), stats


def _at20(curve):
    return interpolate_at_l0(curve, 20.0)  # half way in log L0: the mean of the two points


def test_the_bootstrap_replicates_match_hand_computed_values():
    arms, stats = _arms()
    draws = paired.Draws(
        seeds=(np.array([[1, 1], [2, 0], [0, 2]]), np.array([[1, 1], [0, 2], [2, 0]])),
        documents=np.array([[1, 1], [2, 0], [0, 2]]))
    diffs = paired.differences(arms, "fvu", _at20, draws, stats, few_seeds=False)
    # 1. everything once: A reads (0.25 + 0.15) / 2 = 0.2, B (0.45 + 0.25) / 2 = 0.35.
    # 2. document 0 twice, A's seed 0 twice, B's seed 1 twice: A (2/20 + 2/20) / 2 = 0.1,
    #    B (12/20 + 4/20) / 2 = 0.4.
    # 3. document 1 twice, A's seed 1, B's seed 0: A (6/20 + 6/20) / 2 = 0.3, B (8 + 4)/40.
    assert diffs == pytest.approx([-0.15, -0.3, 0.0])
    low, high, undefined = paired.interval(diffs)
    # numpy's linear percentile of [-0.3, -0.15, 0]: positions 0.05 and 1.95
    assert (low, high, undefined) == pytest.approx((-0.3 + 0.05 * 0.15, -0.15 + 0.95 * 0.15, 0))


def test_without_documents_each_run_keeps_its_own_values():
    arms, _ = _arms()
    draws = paired.Draws(seeds=(np.array([[2, 0]]), np.array([[0, 2]])), documents=None)
    # A's seed 0: (0.2 + 0.1) / 2; B's seed 1: (0.5 + 0.3) / 2
    assert paired.differences(arms, "fvu", _at20, draws, few_seeds=False) == \
        pytest.approx([0.15 - 0.4])


def test_few_seeds_stretch_each_seed_shift_from_the_all_seeds_mean():
    """2 + 2 seeds: df 2, scale sqrt(2) * t(0.975, 2) / z(0.975); the shift of the drawn
    seeds' read-off from the all-seeds one under the same document draw is stretched by it
    (the read-off at L0 20 is linear in the curve's points here, so the shifts carry over)."""
    arms, stats = _arms()
    scale = 2 ** 0.5 * 4.303 / 1.96
    assert paired.seed_scale(2, 2) == pytest.approx(scale)
    assert paired.seed_scale(1, 2) == 1.0 and paired.seed_scale(3, 4) == pytest.approx(
        1.5 ** 0.5 * 2.776 / 1.96)
    draws = paired.Draws(seeds=(np.array([[2, 0]]), np.array([[0, 2]])),
                         documents=np.array([[2, 0]]))
    # under document 0 twice: A's seeds read 0.1 (seed 0) and (6/20 + 2/20) / 2 = 0.2 (seed 1),
    # all seeds 0.15; B's 0.3 (seed 0: 8/20, 4/20) and 0.4 (seed 1: 12/20, 4/20), all 0.35.
    want = (0.15 + scale * (0.1 - 0.15)) - (0.35 + scale * (0.4 - 0.35))
    assert paired.differences(arms, "fvu", _at20, draws, stats) == pytest.approx([want])


def test_the_seeds_only_interval_keeps_its_level_with_three_seeds():
    """Two arms with the same mean and normal seed noise: the widened interval excludes 0
    in about 5% of comparisons (a plain percentile bootstrap: about 21%)."""
    rng = np.random.default_rng(7)
    excluded = 0
    for trial in range(300):
        arms = tuple([{"run": f"{arm}{s}", "seed": s, "value": 1, "l0": 10.0, "fvu": v}
                      for s, v in enumerate(rng.normal(size=3))] for arm in "AB")
        draws = paired.draw((3, 3), None, replicates=400, seed=trial)
        low, high, _ = paired.interval(paired.differences(arms, "fvu", lambda c: c[0][1],
                                                          draws))
        excluded += low > 0 or high < 0
    assert excluded / 300 < 0.10


def test_one_document_draw_serves_both_arms():
    """A document effect both arms share cancels from every replicate: B = A + 1 on each
    document, so A - B is -2/20 whatever the draw; independent draws would scatter it."""
    one_seed = {(arm, 0, v): [1 + (arm == "B"), 7 + (arm == "B")] for arm in "AB" for v in (1, 2)}
    arms, stats = _arms(one_seed)
    draws = paired.draw((1, 1), 2, replicates=200)
    assert {tuple(row) for row in draws.documents} == {(2, 0), (1, 1), (0, 2)}
    assert paired.differences(arms, "fvu", _at20, draws, stats) == pytest.approx([-0.1] * 200)


def test_draws_are_fixed_multinomial_counts():
    draws = paired.draw((3, 2), 5, replicates=50)
    again = paired.draw((3, 2), 5, replicates=50)
    assert draws.documents.shape == (50, 5) and (draws.documents.sum(1) == 5).all()
    assert [c.shape for c in draws.seeds] == [(50, 3), (50, 2)]
    assert all((c.sum(1) == c.shape[1]).all() for c in draws.seeds)
    assert (draws.documents == again.documents).all()  # a rerun prints the same intervals
    # every comparison of a report shares the document draw, whatever its arms' seeds
    assert (paired.draw((1, 1), 5, replicates=50).documents == draws.documents).all()


def test_all_ones_reproduce_the_seed_mean_curve():
    from gsae_pl.suite.plots import variant_curve

    arms, stats = _arms()
    [curve] = paired.arm_curves(arms[0], "fvu", np.array([[1, 1]]), np.array([[1, 1]]), stats)
    assert np.allclose(curve, variant_curve(arms[0], "fvu"))


def test_metrics_from_per_document_sums_are_ratios_of_sums():
    stats = {"rows": np.array([2.0, 6.0]), "active": np.array([10.0, 6.0]),
             "sq_err": np.array([1.0, 3.0]), "centred_sq_norm": np.array([4.0, 4.0]),
             "x_hat_sq": np.array([2.0, 2.0]), "x_hat_dot_x": np.array([1.0, 3.0]),
             "ce_tokens": np.array([10.0, 30.0]), "ce_clean_sum": np.array([20.0, 60.0]),
             "ce_spliced_sum": np.array([25.0, 90.0]), "ce_zero_sum": np.array([40.0, 120.0])}
    w = np.array([[1, 1], [2, 0]])
    assert metric_from_sums(stats, "l0", w) == pytest.approx([16 / 8, 20 / 4])
    assert metric_from_sums(stats, "fvu", w) == pytest.approx([4 / 8, 2 / 8])
    assert metric_from_sums(stats, "relative_reconstruction_bias", w) == pytest.approx([1, 2])
    # (Z - S) / (Z - C) of the summed CEs, not a mean of per-document ratios
    assert metric_from_sums(stats, "loss_recovered", w) == pytest.approx(
        [(160 - 115) / (160 - 80), (80 - 50) / (80 - 40)])
    assert metric_from_sums(stats, "delta_lm_loss", w) == pytest.approx([35 / 40, 10 / 20])


# ---------------------------------------------------------------- verdicts

NAMES = ("gated", "baseline")


@pytest.mark.parametrize("quantity, found, reference, want", [
    ("loss_recovered", (0.01, 0.03, 0.0), 0.9, "gated better"),
    ("loss_recovered", (-0.03, -0.01, 0.0), 0.9, "gated worse"),
    ("loss_recovered", (-0.004, 0.005, 0.0), 0.9, "level (within ±0.005)"),
    ("loss_recovered", (0.001, 0.004, 0.0), 0.9, "level (within ±0.005)"),  # level wins
    ("loss_recovered", (-0.004, 0.006, 0.0), 0.9, "unresolved"),
    ("fvu", (-0.03, -0.01, 0.0), 0.1, "gated better"),  # lower FVU is better
    ("fvu", (-0.004, 0.004, 0.0), 0.1, "level (within ±0.005)"),  # 5% of baseline's 0.1
    ("fvu", (-0.004, 0.004, 0.0), 0.01, "unresolved"),
    ("l0_needed", (-8.0, -2.0, 0.0), 20.0, "gated better"),
    ("relative_reconstruction_bias", (0.05, 0.1, 0.0), 0.9, "gated higher"),
    ("relative_reconstruction_bias", (-0.1, -0.05, 0.0), 0.9, "gated lower"),
    ("loss_recovered", (0.01, 0.03, 0.2), 0.9, "unresolved (read-off undefined in 20% of "
                                                "resamples)"),
    ("loss_recovered", None, 0.9, "unresolved (no resample gives this read-off)"),
])
def test_the_verdict_follows_the_interval(quantity, found, reference, want):
    assert uncertainty.verdict(quantity, "gated", found, reference, (3, 3), NAMES) == want


def test_one_seed_is_never_better_and_few_seeds_are_named():
    clear = (0.05, 0.1, 0.0)
    assert uncertainty.verdict("loss_recovered", "gated", clear, 0.9, (1, 3), NAMES) == \
        "unresolved (one seed of gated: its seed noise is unmeasured)"
    assert uncertainty.verdict("loss_recovered", "gated", clear, 0.9, (1, 1), NAMES) == \
        "unresolved (one seed of gated and baseline: its seed noise is unmeasured)"
    assert uncertainty.verdict("loss_recovered", "gated", clear, 0.9, (2, 3), NAMES) == \
        "gated better"
    assert uncertainty.caveats((2, 3), NAMES, None, None) == ["2 and 3 seeds: fewer than 3 per arm"]
    assert uncertainty.caveats((3, 3), NAMES, "no per-document statistics", 4.0) == [
        "documents not resampled: no per-document statistics",
        "sparse grid (bracketing L0s 4x apart)"]
    assert uncertainty.caveats((1, 1), NAMES, None, None) == []  # the verdict says it


# ---------------------------------------------------------------- read-offs

def test_the_sparse_grid_flag_is_a_bracket_more_than_2x_wide():
    points = [(5.0, 0.8), (10.0, 0.9), (40.0, 0.95)]
    assert bracket_at_l0(points, 8.0) == (5.0, 10.0) and not is_sparse((5.0, 10.0))
    assert bracket_at_l0(points, 20.0) == (10.0, 40.0) and is_sparse((10.0, 40.0))
    assert bracket_at_l0(points, 80.0) is None and not is_sparse(None)
    assert bracket_needed(points, 0.92) == (10.0, 40.0)
    assert bracket_needed(points, 0.99) is None
    assert not is_sparse((10.0, 20.0))  # exactly 2x: not sparse


def test_the_monotone_cubic_matches_hand_computed_values():
    # knots at log L0 = 0, 1, 2 with y = 0, 1, 4: secants 1 and 3; inner slope the weighted
    # harmonic mean 6 / (3 / 1 + 3 / 3) = 1.5, left end slope (3 * 1 - 3) / 2 = 0. At t = 1/2
    # of the first segment: h01 = 1/2, h11 = -1/8 -> 1/2 - 1.5 / 8 = 0.3125.
    points = [(1.0, 0.0), (math.e, 1.0), (math.e ** 2, 4.0)]
    assert pchip_at_l0(points, math.exp(0.5)) == pytest.approx(0.3125)
    assert interpolate_at_l0(points, math.exp(0.5)) == pytest.approx(0.5)
    assert pchip_at_l0(points, math.e) == pytest.approx(1.0)
    assert pchip_at_l0(points, 0.5) is None and pchip_at_l0(points, 10.0) is None
    # it inverts: the L0 needed to reach 0.3125 is e^0.5
    assert pchip_l0_needed(points, 0.3125) == pytest.approx(math.exp(0.5))
    assert pchip_l0_needed(points, 5.0) is None


def test_the_monotone_cubic_agrees_with_linear_on_a_line_and_stays_monotone():
    line = [(1.0, 0.5), (10.0, 0.8), (100.0, 1.1)]  # straight in log L0
    for l0 in (2.0, 5.0, 30.0):
        assert pchip_at_l0(line, l0) == pytest.approx(interpolate_at_l0(line, l0))
    assert pchip_l0_needed(line, 0.95) == pytest.approx(l0_needed(line, 0.95))
    bent = [(2.0, 0.5), (4.0, 0.9), (40.0, 0.95), (80.0, 0.99)]
    values = [pchip_at_l0(bent, 2.0 * 1.05 ** k) for k in range(76)]  # 2 to 78
    assert all(b >= a for a, b in zip(values, values[1:]))  # no overshoot between knots
    assert pchip_at_l0([(3.0, 0.7)], 3.0) == 0.7


def test_a_runs_document_file_gives_the_metrics_of_its_rows(tmp_path):
    """from_run turns a run's heldout_documents.npz (gsae_pl/eval/document_stats.py) into
    the bootstrap's sums: at unit weights they give the FVU, L0 and gamma of the rows."""
    import numpy as np
    import torch

    from gsae_pl.eval.document_stats import FILE, merge, to_bytes
    from gsae_pl.suite.document_stats import from_run, metric_from_sums

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    x_hat = 0.8 * x + 0.1 * torch.randn(12, 3, generator=gen, dtype=torch.float64)
    active = torch.randint(0, 5, (12,), generator=gen).double()
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    per = lambda v: np.array([float(v[doc == g].sum()) for g in range(4)])
    table = merge({"document": np.arange(4), "rows": per(torch.ones(12)),
                   "sq_err": per((x - x_hat).pow(2).sum(1)), "x_sq": per(x.pow(2).sum(1)),
                   "x_hat_sq": per(x_hat.pow(2).sum(1)),
                   "x_hat_dot_x": per((x_hat * x).sum(1)), "l0_sum": per(active),
                   "x_sum": np.stack([x[doc == g].sum(0).numpy() for g in range(4)])})
    (tmp_path / FILE).write_bytes(to_bytes(table))
    stats = from_run(tmp_path)
    ones = np.ones((1, 4))
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    gamma = float(x_hat.pow(2).sum() / (x_hat * x).sum())
    assert metric_from_sums(stats, "fvu", ones)[0] == pytest.approx(fvu, rel=1e-12)
    assert metric_from_sums(stats, "l0", ones)[0] == pytest.approx(float(active.mean()))
    got = metric_from_sums(stats, "relative_reconstruction_bias", ones)[0]
    assert got == pytest.approx(gamma, rel=1e-12)
    assert from_run(tmp_path / "elsewhere") is None  # a run made before the file existed
