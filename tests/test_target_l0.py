"""`python -m gsae_pl.target_l0`: the log-lambda search on hand-computed fakes, the grids,
bad input (one line, exit 2), the selection SAEs (k is the L0: nothing trained), and a
real search on the tiny synthetic config that brackets its target."""

from __future__ import annotations

import re

import pytest

from gsae_pl import target_l0
from tests.tiny_run import BASE, ROOT, TINY


def test_search_brackets_then_bisects_in_log_space():
    # L0 = 0.5 / lambda: 10 at the start (below 20), so lambda / 4 = 0.0125 gives 40 (above);
    # the geometric mean of the bracket, 0.025, gives 20: within tolerance, stop.
    tried = target_l0.search(lambda lam: 0.5 / lam, start=0.05, target=20, tries=6)
    assert tried == [(0.05, 10.0), (0.0125, 40.0), (0.025, 20.0)]


def test_search_stops_after_its_tries():
    # L0 = 1 / lambda^2, target 80: 0.05 -> 400 (dense), x4 = 0.2 -> 25 (sparse); the third
    # try would bisect, but 2 tries end it. 25 is nearer 80 in ratio (3.2) than 400 (5).
    tried = target_l0.search(lambda lam: 1 / lam ** 2, start=0.05, target=80, tries=2)
    assert tried == [(0.05, pytest.approx(400.0)), (0.2, pytest.approx(25.0))]
    assert target_l0.closest(tried, 80) == tried[1]
    assert target_l0.bracket(tried, 80) == (tried[0], tried[1])


def test_closest_in_ratio_and_no_bracket_on_one_side():
    tried = [(0.05, 3.0), (0.0125, 12.0), (0.003, 30.0)]
    assert target_l0.closest(tried, 20) == (0.003, 30.0)  # 30/20 = 1.5 < 20/12 = 1.67
    assert target_l0.bracket([(0.05, 3.0), (0.0125, 12.0)], 20) is None


def test_grids_are_centred_in_log_space():
    # 0.02 x 2.5^(1.5, 0.5, -0.5, -1.5) = 0.0791, 0.0316, 0.01265, 0.00506
    assert target_l0.grid(0.02) == [0.079, 0.032, 0.013, 0.0051]
    # 20 x 2.5^(-1.5, -0.5, 0.5, 1.5) = 5.06, 12.6, 31.6, 79.1; capped at d_sae
    assert target_l0.k_grid(20, 512) == [5, 13, 32, 79]
    assert target_l0.k_grid(20, 40) == [5, 13, 32, 40]


@pytest.mark.parametrize("argv, says", [
    (["--config", BASE], "the following arguments are required: --target"),
    (["--config", BASE, "--target", "0"], "--target 0 must be a positive L0"),
    (["--config", BASE, "--target", "-3"], "--target -3 must be a positive L0"),
    (["--config", BASE, "--target", "512"], "is not below sae.d_sae=512"),
    (["--config", str(ROOT / "ablations/quick.yaml"), "--target", "20"], "is a suite file"),
    (["--config", BASE, "sae.d_sea=3", "--target", "20"], "unknown config key sae.d_sea"),
])
def test_bad_input_is_one_line_and_exit_2(argv, says, capsys):
    assert target_l0.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and says in err and len(err.strip().splitlines()) == 1


def test_selection_saes_print_k_without_training(capsys, tmp_path):
    argv = ["--config", str(ROOT / "ablations/topk.yaml"), f"output.dir={tmp_path}",
            "--target", "20"]
    assert target_l0.main(argv) == 0
    out = capsys.readouterr().out
    assert "k IS the L0" in out and "sae.k=20" in out and "[5, 13, 32, 79]" in out
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.slow
def test_real_search_on_tiny_synthetic_brackets_the_target(capsys, tmp_path):
    # Measured: 100 steps of the tiny config (lr warm-up 10 steps) ended at held-out L0 11.85
    # at lambda 0.05 and 10.12 at 0.2. Target 11: the first fit lands above it, so lambda
    # x4, which lands below: bracketed, then a bisection at sqrt(0.05 * 0.2) = 0.1.
    argv = ["--config", BASE, *TINY, "optim.warmup_steps=10", f"output.dir={tmp_path}",
            "--target", "11", "--steps", "100", "--tries", "3"]
    assert target_l0.main(argv) == 0
    out = capsys.readouterr().out
    tried = [(float(lam), float(l0)) for lam, l0 in
             re.findall(r"lambda ([\d.e-]+): held-out L0 ([\d.]+) \(", out)]
    assert [lam for lam, _ in tried] == [0.05, 0.2, 0.1]
    assert tried[0][1] > 11 >= tried[1][1]  # the search bracketed the target
    lam, l0 = target_l0.closest(tried, 11)
    assert f"lambda {lam:g}: held-out L0 {l0:.4g} after 100 steps (target 11)" in out
    assert "bracket: lambda" in out
    assert f"for a suite: grids: {{my_grid: {target_l0.grid(lam)}}}" in out
    assert "caveat: L0 drifts with training length" in out
    assert not list(tmp_path.iterdir())  # the fits went to a temporary folder, now gone
