"""Stop cleanly when the cluster says so: SIGTERM (how schedulers preempt or cancel a job)
and, under SLURM, SIGUSR1 (the requeue signal, e.g. `#SBATCH --signal=USR1@90`).

The handler only notes the signal. The stop happens at the end of the next training step
(`on_train_batch_end`), where the state is exactly that of a periodic checkpoint, so the
rerun is the exact resume gsae_pl promises. Lightning's own handling does neither: its
SIGTERM path raises SystemExit with code 0 and saves nothing, and its SLURM auto-requeue
saves from inside the signal handler (possibly half-way through an optimiser step) into
`default_root_dir`, where any later run under SLURM would load it. fit.py switches the
latter off (`SLURMEnvironment(auto_requeue=False)`).

At the stop: the finiteness check (no checkpoint holds NaN weights), `last.ckpt` saved in
the run's checkpoints/ (atomic, like the others), after SIGUSR1 `scontrol requeue` of the
job, then `Preempted`: one line, exit 128 + signal (143 for SIGTERM, 138 for SIGUSR1, what
a shell reports for a process that signal ended, so `fit && export` stops), no metrics.json.
Rerunning the same command (or the requeued job) resumes from that checkpoint.

DDP: every process must stop at the same step (the save is collective; one process that
stops while the others step would leave them waiting in a gradient sync). Each process
notes its own signal (Lightning's launcher gets the signal forwarded by process 0 below;
torchrun and srun signal every process); they agree by one small all-gather at log steps
and at the last step, not per step, which would be a host sync per step (faults.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gsae_pl.collectives import all_gather_stack
from gsae_pl.errors import RunFailed


class Preempted(RunFailed):
    """A signal stopped training; the message says where and how to resume."""

    def __init__(self, signum: int, step: int, saved: bool, requeue_note: str = ""):
        name = signal.Signals(signum).name
        if saved:
            what = "checkpoint saved, " + (requeue_note or "rerun the same command to resume")
        else:
            what = "rerun the same command to resume from the newest checkpoint"
        super().__init__(f"stopped by {name} at step {step}: {what}")
        self.exit_code = 128 + signum  # cli.run_main exits with it


def stop_signals() -> tuple[int, ...]:
    """SIGTERM always; SIGUSR1 only under SLURM, where it asks for a requeue (elsewhere its
    default, ending the process, is kept)."""
    return (signal.SIGTERM, signal.SIGUSR1) if SLURMEnvironment.detect() else (signal.SIGTERM,)


class Preemption(L.Callback):
    def __init__(self, checkpoints, monitor, agree_every: int):
        self.checkpoints, self.monitor = checkpoints, monitor  # StepCheckpoint, NonFiniteMonitor
        self.agree_every = agree_every
        self.signum = 0  # the signal noted in this process, 0 for none
        self.launcher = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Here, after Lightning registered its handlers for this fit (Trainer._run), so ours
        # replace them; Lightning's teardown restores the ones from before the fit.
        self.launcher = trainer.strategy.launcher
        for signum in stop_signals():
            signal.signal(signum, self._note)

    def _note(self, signum, frame) -> None:
        self.signum = max(self.signum, int(signum))
        procs = getattr(self.launcher, "procs", None) or []
        for proc in procs:  # the processes Lightning's DDP launcher started from this one
            if proc.poll() is None:
                proc.send_signal(signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer, pl_module)
        if not signum:
            return
        self.monitor.check(trainer)  # a NaN stop wins: the last good checkpoint stays
        self.checkpoints.save_now(trainer)
        note = ""
        if signum == signal.SIGUSR1 and trainer.is_global_zero:
            note = requeue()
        raise Preempted(signum, trainer.global_step, saved=True, requeue_note=note)

    def _agreed_signal(self, trainer, pl_module) -> int:
        if trainer.world_size == 1:
            return self.signum
        step = trainer.global_step
        if step % self.agree_every and step < trainer.max_steps:
            return 0
        noted = torch.tensor(self.signum, device=pl_module.device)
        return int(all_gather_stack(noted).max())


def requeue() -> str:
    """`scontrol requeue` this job (an array task by its array id, as SLURM names it)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job
           else os.environ.get("SLURM_JOB_ID", ""))
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=60)
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
        ok = done.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as err:
        ok, reason = False, str(err)
    if ok:
        return f"SLURM job {job} requeued; it resumes from this checkpoint"
    return f"but `scontrol requeue {job}` failed ({reason}): resubmit the job to resume"


@contextmanager
def sigterm_as_preempted(trainer):
    """Lightning's own SIGTERM handling, in force before training starts and during the
    final evaluation, ends in a SystemExit with code 0: make it a `Preempted` (exit 143).
    Nothing new to save there: the newest checkpoint holds every finished step."""
    try:
        yield
    except SIGTERMException:
        raise Preempted(signal.SIGTERM, trainer.global_step, saved=False) from None
