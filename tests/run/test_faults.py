"""Numerical faults: a NaN or Inf in an incoming batch or a loss term stops the run with
the step and the row or term named, exit 3, the last good checkpoint kept, no metrics.json;
and the check reads the device only at log and checkpoint intervals."""

from __future__ import annotations

import math

import pytest
import torch

from gsae_pl.data.synthetic import SyntheticSource
from gsae_pl.errors import RunFailed
from gsae_pl.fit import main
from gsae_pl.losses.base import Objective
from gsae_pl.run.faults import NonFiniteMonitor, check_final_metrics
from tests.tiny_run import args


def poison_rows(monkeypatch, step: int, row: int, value: float) -> None:
    batches = SyntheticSource.global_batches

    def with_bad_row(self, batch_size, start):
        for k, batch in enumerate(batches(self, batch_size, start), start):
            if k == step:
                batch[row, 3] = value
            yield batch

    monkeypatch.setattr(SyntheticSource, "global_batches", with_bad_row)


def poison_term(monkeypatch, step: int, name: str) -> None:
    call = Objective.__call__

    def with_bad_term(self, x, x_hat, enc, sae, at_step):
        terms = call(self, x, x_hat, enc, sae, at_step)
        if at_step == step:
            terms[name] = terms[name] * float("nan")
        return terms

    monkeypatch.setattr(Objective, "__call__", with_bad_term)


def assert_stopped_cleanly(tmp_path, capsys, needle: str, last_good_step: int | None):
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1, err
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()
    ckpts = sorted((run / "checkpoints").glob("*.ckpt")) if last_good_step else []
    if last_good_step is None:
        assert not (run / "checkpoints").exists()
        return
    assert f"step{last_good_step + 10}.ckpt" not in [p.name for p in ckpts]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == last_good_step
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_incoming_row_named_with_its_step(tmp_path, capsys, monkeypatch, value):
    poison_rows(monkeypatch, step=25, row=5, value=value)
    assert main(args(tmp_path, "run")) == 3
    assert_stopped_cleanly(tmp_path, capsys, "incoming activations (batch row 5) at step 25",
                           last_good_step=20)


def test_bad_loss_term_named_with_its_step(tmp_path, capsys, monkeypatch):
    poison_term(monkeypatch, step=13, name="aux")
    assert main(args(tmp_path, "run")) == 3
    assert_stopped_cleanly(tmp_path, capsys, "loss term 'aux' at step 13", last_good_step=10)


def test_diverging_run_stops_before_any_checkpoint(tmp_path, capsys):
    # lr 1e30: the weights overflow float32 within two steps, no poisoning needed.
    assert main(args(tmp_path, "run", "optim.lr=1e30", "optim.warmup_steps=0")) == 3
    assert_stopped_cleanly(tmp_path, capsys, "loss term 'reconstruction' at step 1",
                           last_good_step=None)


def test_device_is_read_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    steps = []
    check = NonFiniteMonitor.check
    monkeypatch.setattr(NonFiniteMonitor, "check",
                        lambda self, trainer: steps.append(trainer.global_step) or
                        check(self, trainer))
    assert main(args(tmp_path, "run", "log.every_n_steps=15", "checkpoint.every_n_steps=20",
                     "trainer.max_steps=40")) == 0
    assert steps == [15, 20, 30, 40, 40]  # the last one from on_train_end


def test_non_finite_final_metric_writes_no_result():
    with pytest.raises(RunFailed, match="fvu are NaN"):
        check_final_metrics({"fvu": math.nan, "l0": 3.0, "steps": 40})
    check_final_metrics({"fvu": 0.1, "steps": 40})


class _FakeTrainer:
    """What NonFiniteMonitor reads from a Trainer, for one process."""

    def __init__(self):
        self.global_step, self.max_steps, self.world_size = 0, 100, 1
        self.strategy = type("S", (), {"all_gather": staticmethod(lambda t: t)})()


def _drive(monitor, trainer, device, steps, bad_term_at=None, bad_row_at=None):
    module = type("M", (), {"device": torch.device(device)})()
    monitor.on_train_start(trainer, module)
    for step in range(steps):
        batch = torch.ones(6, 4, device=device)
        if step == bad_row_at:
            batch[4, 1] = float("inf")
        monitor.on_train_batch_start(trainer, module, batch, step)
        value = float("nan") if step == bad_term_at else 1.0
        # torch.full, not torch.tensor: a fill kernel, no host-to-device copy to flag.
        terms = {"reconstruction": torch.full((), 1.0, device=device),
                 "sparsity": torch.full((), value, device=device)}
        trainer.global_step = step + 1
        monitor.on_train_batch_end(trainer, module, {"loss": None, "terms": terms}, batch, step)


def test_the_first_fault_is_the_one_reported():
    monitor = NonFiniteMonitor(check_every=10, checkpoint_every=10)
    with pytest.raises(RunFailed, match="loss term 'sparsity' at step 3"):
        _drive(monitor, _FakeTrainer(), "cpu", 10, bad_term_at=3, bad_row_at=5)
    monitor = NonFiniteMonitor(check_every=10, checkpoint_every=10)
    with pytest.raises(RunFailed, match=r"batch row 4\) at step 2"):
        _drive(monitor, _FakeTrainer(), "cpu", 10, bad_term_at=6, bad_row_at=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_between_checks_on_cuda():
    monitor = NonFiniteMonitor(check_every=10, checkpoint_every=10)
    torch.cuda.set_sync_debug_mode("error")  # any device->host read between checks raises
    try:
        _drive(monitor, _FakeTrainer(), "cuda", 9, bad_term_at=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(RunFailed, match="step 3"):
        monitor.check(_FakeTrainer())
