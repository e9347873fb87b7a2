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
# Process `rank` gets a NaN in row 3 of its share of batch 15: global row 3 * 2 + rank of
# the global batch that every process makes (data/base.py), poisoned in that process alone.
POISON_ROWS = RECORD_PID + """
from gsae_pl.data.synthetic import SyntheticSource
_batches = SyntheticSource.global_batches
_rank = int(os.environ.get("LOCAL_RANK", "0"))
def _poisoned(self, batch_size, start):
    for k, batch in enumerate(_batches(self, batch_size, start), start):
        if k == 15 and _rank == __RANK__:
            batch[3 * 2 + __RANK__, 0] = float("nan")
        yield batch
SyntheticSource.global_batches = _poisoned
"""
CRASH = RECORD_PID + """
from gsae_pl.run import faults
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


# ---- the objective under real DDP, one step, without Lightning ------------------------
# Each process runs DistributedDataParallel over its half of one 64-row batch; DDP averages
# the gradients. Loss terms that are batch means follow the 1-process gradient by that
# averaging alone; a term over the batch's active features must see the global active set.
DDP_STEP = """
import os
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.run.test_ddp import objective_step

rank, world, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{case}.store", rank=rank,
                        world_size=world)
saved = torch.load(case, weights_only=False)
kernels = saved["kernels"]
step = objective_step(saved["overrides"] + [f"sae.kernel={kernels[rank % len(kernels)]}"],
                      saved["state"])
model = DistributedDataParallel(step)
rows = saved["x"].chunk(world)[rank]  # contiguous shares, as gsae_pl's data shards them
model(rows).backward()
if rank == 0:
    torch.save({n: p.grad for n, p in step.sae.named_parameters()}, case + ".grads")
dist.barrier()  # leave together: gloo can abort a process whose peer has already gone
dist.destroy_process_group()
os._exit(0)  # skip interpreter teardown, where gloo's threads still aborted a worker here
"""


class ObjectiveStep(torch.nn.Module):
    """The training loss of one batch as a module, so DDP can wrap it."""

    def __init__(self, sae, objective):
        super().__init__()
        self.sae, self.objective = sae, objective

    def forward(self, x):
        x_hat, enc = self.sae(x)
        return sum(self.objective(x, x_hat, enc, self.sae, step=10**6).values())


def objective_step(overrides, state) -> ObjectiveStep:
    from gsae_pl.losses.base import Objective
    from gsae_pl.saes.base import build_sae
    from tests.conftest import make_cfg

    cfg = make_cfg("sae.d_sae=64", *overrides)
    sae = build_sae(cfg.sae, 16).double()
    sae.load_state_dict(state)
    return ObjectiveStep(sae, Objective.from_config(cfg.loss))


def _sparse_state(overrides):
    """Off the symmetric init, gates mostly shut: the halves' active sets differ."""
    from gsae_pl.saes.base import build_sae
    from tests.conftest import make_cfg

    sae = build_sae(make_cfg("sae.d_sae=64", *overrides).sae, 16).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.b_gate.sub_(2.5)
        if not make_cfg(*overrides).sae.unit_norm_decoder:  # non-unit decoder rows
            sae.W_dec.mul_(torch.rand(64, 1, dtype=torch.float64) + 0.5)
    return sae.state_dict()


def ddp_gradients(tmp_path, overrides, kernels=("reference",), world=2, idle_rank=None):
    """DDP's gradients on rank 0, the 1-process gradients, the 1-process step and the batch.
    `idle_rank`'s rows are b_dec itself: pi_gate = b_gate < 0, no feature fires there."""
    import subprocess
    import sys

    from tests.tiny_run import ROOT

    state = _sparse_state(overrides)
    x = torch.randn(64, 16, dtype=torch.float64)
    if idle_rank is not None:
        x.chunk(world)[idle_rank].copy_(state["b_dec"])
    case = str(tmp_path / "case.pt")
    torch.save({"overrides": list(overrides), "state": state, "x": x,
                "kernels": list(kernels)}, case)
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), case], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    ddp = torch.load(case + ".grads", weights_only=False)
    one = objective_step(list(overrides) + ["sae.kernel=reference"], state)
    one(x).backward()
    return ddp, {n: p.grad for n, p in one.sae.named_parameters()}, one, x


def _active_sets_differ(one, x) -> bool:
    halves = [one.sae(h)[1].fired > 0 for h in x.chunk(2)]
    return not torch.equal(halves[0], halves[1])


@pytest.mark.parametrize("idle_rank", [None, 0, 1])
def test_ddp_gradient_with_orthogonality_is_the_one_process_gradient(tmp_path, idle_rank):
    """Each process penalises the globally active features, also one with none of its own
    (it still joins the all_reduce, or the other would wait forever)."""
    overrides = ["loss.orthogonality.enabled=true", "loss.orthogonality.coefficient=0.5"]
    ddp, one, step, x = ddp_gradients(tmp_path, overrides, idle_rank=idle_rank)
    assert _active_sets_differ(step, x)  # else a per-shard active set is the global one
    if idle_rank is not None:
        assert int(step.sae(x.chunk(2)[idle_rank])[1].fired.sum()) == 0
    assert set(ddp) == set(one)
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-6, atol=1e-9, msg=name)



@pytest.mark.parametrize("overrides", [
    ["loss.orthogonality.enabled=true"],
    ["loss.orthogonality.enabled=true", "sae.unit_norm_decoder=false",
     "loss.sparsity.kind=decoder_norm_l1", "loss.aux.decoder=unfrozen"],
], ids=["orthogonality", "orthogonality+decoder_norm_l1"])
def test_ddp_gradient_with_ranks_on_different_kernel_paths(tmp_path, overrides):
    """Process 0 dense, process 1 sparse: the same gradient as one reference process."""
    ddp, one, step, x = ddp_gradients(tmp_path, overrides, kernels=("dense", "sparse"))
    assert _active_sets_differ(step, x)
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-6, atol=1e-9, msg=name)

# ---- whole runs with the switches whose gradients cross processes ------------------------
# Few rows per process and gates mostly shut from the start (b_gate = -2: ~2% density), so
# the processes' active sets differ (checked by test_the_cross_process_runs_can_tell).
SPARSE_RUN = ["sae.d_sae=96", "data.batch_size=32"]
SHUT_GATES = """
import torch
from gsae_pl.saes import gated
_init = gated.GatedSAE.__init__
def _shut(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    with torch.no_grad():
        self.b_gate.fill_(-2.0)
gated.GatedSAE.__init__ = _shut
"""
ORTH = ["loss.orthogonality.enabled=true", "loss.orthogonality.coefficient=0.5"]
DECODER_NORM_L1 = ["sae.unit_norm_decoder=false", "loss.sparsity.kind=decoder_norm_l1",
                   "loss.aux.decoder=unfrozen"]  # as ablations/decoder_norm_l1.yaml
# Process 0 always takes the dense path, process 1 the sparse one (sae.kernel=auto), and
# each records the paths it took, so the test sees that they really differed.
SPLIT_KERNELS = SHUT_GATES + """
_rank = os.environ.get("LOCAL_RANK", "0")
gated.SPARSE_CROSSOVER = 0.0 if _rank == "0" else 2.0
_path_for, _paths = gated.GatedSAE.path_for, set()
def _recorded(self, x):
    path = _path_for(self, x)
    _paths.add(path)
    return path
gated.GatedSAE.path_for = _recorded
import atexit
atexit.register(lambda: open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          f"paths{_rank}"), "w").write(",".join(sorted(_paths))))
"""
# The defect this guards against: each process averaging over its own active features.
LOCAL_ACTIVE_SET = SHUT_GATES + """
from gsae_pl.losses import orthogonality
orthogonality.global_fired = lambda fired: fired
"""


def _one_and_two(tmp_path, run, two_setup=SHUT_GATES):
    one = fit_process(tmp_path, "one", *DDP[2:], *run,
                      script=wrapper_script(tmp_path / "one.py", SHUT_GATES))
    assert one.returncode == 0, one.stderr[-2000:]
    two = fit_process(tmp_path, "two", *DDP, *run,
                      script=wrapper_script(tmp_path / "two.py", two_setup))
    assert two.returncode == 0, two.stderr[-2000:]


@pytest.mark.parametrize("switches", [ORTH, DECODER_NORM_L1, ORTH + DECODER_NORM_L1],
                         ids=["orthogonality", "decoder_norm_l1", "both"])
def test_two_processes_follow_one_with_cross_process_switches(tmp_path, switches):
    _one_and_two(tmp_path, [*SPARSE_RUN, *switches])
    assert_same_run(tmp_path, "one", "two", steps=30, batch=32)


def test_the_cross_process_runs_can_tell(tmp_path):
    """With per-process active sets the same runs part: the comparison above has teeth."""
    _one_and_two(tmp_path, [*SPARSE_RUN, *ORTH], two_setup=LOCAL_ACTIVE_SET)
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path, "one", "two", steps=30, batch=32)


def test_two_processes_on_different_kernel_paths_follow_one(tmp_path):
    _one_and_two(tmp_path, [*SPARSE_RUN, *ORTH], two_setup=SPLIT_KERNELS)
    assert [(tmp_path / f"paths{r}").read_text() for r in (0, 1)] == ["dense", "sparse"]
    assert_same_run(tmp_path, "one", "two", steps=30, batch=32)


# Lightning's advice to log val/* with sync_dist=True (the evaluators reduce themselves),
# torch's deprecation of the gather Lightning's strategy.all_gather uses, and the note that
# the final validate replaces the callbacks configure_callbacks returned.
AVOIDABLE = ("sync_dist=True", "is deprecated", "configure_callbacks", "Warning")


def test_a_two_process_run_prints_no_avoidable_warning(tmp_path):
    # A resample (its pool gathers rows), fault checks (gathered records) and a final
    # validate after the last step (30 is no multiple of eval.every_n_steps=20).
    resample = ["resample.every_n_steps=10", "resample.window_steps=5",
                "resample.max_resamples=1", "resample.lr_return_steps=10"]
    two = fit_process(tmp_path, "two", *DDP, *resample)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "resampled" in two.stdout or "resample" in two.stdout
    warned = [line for line in two.stderr.splitlines()
              if re.search(r"\.py:\d+: ", line) or any(a in line for a in AVOIDABLE)]
    assert warned == []
