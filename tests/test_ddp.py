"""DDP on CPU (gloo, 2 processes): the global batch makes a 2-process run follow the
1-process one; only process 0 writes; a fault or crash in one process ends them all.

Lightning's DDP launcher reruns the command line for each extra process, so these runs
are subprocesses; patches go in a wrapper script that every process runs."""

from __future__ import annotations

import math
import os
import re
import time

import pytest
import torch

from tests.tiny_run import fit_process, metrics, wrapper_script

DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=30"]
pytestmark = pytest.mark.slow

RECORD_PID = """
open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                  f"pid{os.environ.get('LOCAL_RANK', '0')}"), "w").write(str(os.getpid()))
"""
# Process `rank` gets a NaN in row 3 of its share of batch 15 (global row 3 * 2 + rank).
POISON_ROWS = RECORD_PID + """
from gsae_pl.data.synthetic import SyntheticSource
_batches = SyntheticSource._batches
def _poisoned(self, batch_size, rank, world_size, start):
    for k, batch in enumerate(_batches(self, batch_size, rank, world_size, start), start):
        if k == 15 and rank == __RANK__:
            batch[3, 0] = float("nan")
        yield batch
SyntheticSource._batches = _poisoned
"""
CRASH = RECORD_PID + """
from gsae_pl import faults
_end = faults.NonFiniteMonitor.on_train_batch_end
def _end_or_crash(self, trainer, *rest):
    _end(self, trainer, *rest)
    if trainer.global_step == 15 and trainer.global_rank == __RANK__:
        raise RuntimeError("injected crash")
faults.NonFiniteMonitor.on_train_batch_end = _end_or_crash
"""


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def assert_same_run(out_dir, one: str, two: str, steps: int, batch: int) -> None:
    """Runs `one` and `two` followed one trajectory: final metrics, the training-window MSE
    at every log step (reduced over processes) and the last checkpoint's weights."""
    a, b = metrics(out_dir, one), metrics(out_dir, two)
    assert a.keys() == b.keys() and a["tokens"] == b["tokens"] == steps * batch
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), key
    mse_one, mse_two = (scalars(out_dir / n, "train/mse") for n in (one, two))
    assert [s for s, _ in mse_one] == [s for s, _ in mse_two] and len(mse_one) == 3
    assert all(math.isclose(x, y, rel_tol=1e-5) for (_, x), (_, y) in zip(mse_one, mse_two))
    weights = [torch.load(out_dir / n / "checkpoints" / "last.ckpt", weights_only=False)
               ["state_dict"] for n in (one, two)]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6)


def test_two_processes_follow_one_with_the_same_global_batch(tmp_path):
    assert fit_process(tmp_path, "one", *DDP[2:]).returncode == 0
    two = fit_process(tmp_path, "two", *DDP)
    assert two.returncode == 0, two.stderr[-2000:]
    assert_same_run(tmp_path, "one", "two", steps=30, batch=128)
    # Only process 0 wrote: every event file carries one pid; no stray temporaries.
    pids = {re.search(r"\.(\d+)\.\d+$", p.name).group(1)
            for p in (tmp_path / "two").glob("events.out.tfevents.*")}
    assert len(pids) == 1 and not list((tmp_path / "two").rglob(".*.tmp*"))


@pytest.mark.parametrize("rank", [1])
def test_nan_in_one_process_stops_all_with_the_global_row(tmp_path, rank):
    script = wrapper_script(tmp_path / "poison.py", POISON_ROWS.replace("__RANK__", str(rank)))
    proc = fit_process(tmp_path, "run", *DDP, script=script)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"incoming activations (batch row {3 * 2 + rank}) at step 15" in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10


def _gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("rank", [0, 1])
def test_a_crash_in_one_process_ends_the_others(tmp_path, rank):
    script = wrapper_script(tmp_path / "crash.py", CRASH.replace("__RANK__", str(rank)))
    start = time.monotonic()
    proc = fit_process(tmp_path, "run", *DDP, script=script, timeout=150)
    assert proc.returncode != 0 and time.monotonic() - start < 120
    assert "injected crash" in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    for pid_file in tmp_path.glob("pid*"):  # no process left waiting in a collective
        assert _gone(int(pid_file.read_text())), pid_file.name
