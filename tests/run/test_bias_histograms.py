"""The learned biases' distributions: which vectors each architecture declares, the negative
fraction by hand, and a real fit's histograms, scalars and metrics.json entries."""

from __future__ import annotations

import pytest
import torch

from gsae_pl.fit import main
from gsae_pl.run.bias_histograms import bias_parameters, negative_fractions
from gsae_pl.saes.base import ARCHITECTURES
from tests.tiny_run import args, metrics


@pytest.mark.parametrize("architecture,names", [
    ("gated", ["b_gate", "b_mag"]),  # declared: r_mag, also zeroed on resample, is no bias
    ("rescale_shift", ["b_gate", "b_mag"]),
    ("relu", ["b_enc"]),  # the default: resample_roles' "zero" entries
    ("prolu", ["b_enc"]),
])
def test_each_architecture_names_its_per_feature_biases(architecture, names):
    sae = ARCHITECTURES[architecture](d_in=4, d_sae=6)
    found = bias_parameters(sae)
    assert list(found) == names
    assert all(value.shape == (6,) for value in found.values())


def test_the_negative_fraction_counts_entries_below_zero():
    sae = ARCHITECTURES["gated"](d_in=4, d_sae=4)
    with torch.no_grad():
        sae.b_gate.copy_(torch.tensor([-1.0, 0.0, -0.5, 2.0]))  # 0 is not negative
        sae.b_mag.copy_(torch.tensor([-1.0, -2.0, -3.0, 4.0]))
    fractions = negative_fractions(sae)
    assert fractions["bias_negative_fraction/b_gate"].item() == 0.5
    assert fractions["bias_negative_fraction/b_mag"].item() == 0.75


@pytest.mark.slow
def test_a_fit_logs_histograms_and_writes_the_final_fraction(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(args(tmp_path, "run")) == 0  # 40 steps, histograms every 20
    run = tmp_path / "run"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    for name in ("b_gate", "b_mag"):
        histogram = events.Histograms(f"bias/{name}")
        assert [event.step for event in histogram] == [19, 39]
        assert all(event.histogram_value.num == 32 for event in histogram)  # sae.d_sae
        assert len(events.Scalars(f"bias_negative_fraction/{name}")) == 2
        assert events.Scalars(f"val/bias_negative_fraction/{name}")
    # metrics.json holds the final weights' fraction (last.ckpt: the final step's weights).
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    written = metrics(tmp_path, "run")
    for name in ("b_gate", "b_mag"):
        want = (state[f"sae.{name}"] < 0).double().mean().item()
        assert written[f"bias_negative_fraction/{name}"] == pytest.approx(want)
    # 40 steps are enough to push some gates below zero: the fraction is no constant 0.
    assert written["bias_negative_fraction/b_gate"] > 0
