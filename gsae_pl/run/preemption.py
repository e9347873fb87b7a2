"""Stop cleanly when the cluster or the user says so: SIGTERM (how schedulers preempt or
cancel a job), SIGINT (Ctrl-C) and, under SLURM, SIGUSR1 (the requeue signal, e.g.
`#SBATCH --signal=USR1@90`).

The handler only notes the signal. The stop comes once the step it landed in is wholly
done. At the step's end, after every other callback's hook (the resampler's counts, pool
and draw included: the checkpoint callback runs last), `last.ckpt` is saved
(StepCheckpoint.on_train_batch_end), the state a periodic checkpoint has, from which
Lightning resumes exactly; then the rest of the step runs (the module's logging, a
held-out evaluation due at that step), and `Preempted` is raised at the start of the next
step, before anything of it happens. A stop raised earlier in the step lost what the later
hooks do (issue 25: a signal at a resample step skipped that resample for good, one in
its window lost that step's firing counts, one at an eval step left a gap in the curves).
Lightning's `trainer.should_stop` would add an evaluation and a log point at the stop.
Lightning's own handling saves nothing: its SIGTERM path raises SystemExit with code 0,
its SIGINT path exits 1 with its own text, and its SLURM auto-requeue saves from inside
the signal handler (possibly half-way through an optimiser step) into `default_root_dir`,
where any later run under SLURM would load it. fit.py switches the latter off
(`SLURMEnvironment(auto_requeue=False)`).

At the stop: after SIGUSR1 `scontrol requeue` of the job, then `Preempted`: one line, exit
128 + signal (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1, what a shell reports for
a process that signal ended, so `fit && export` stops), no metrics.json. Rerunning the
same command (or the requeued job) resumes from that checkpoint, to the uninterrupted
run's weights and metrics bit for bit (tests/run/test_preemption_exact.py).

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
import threading
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
    """SIGTERM and SIGINT always; SIGUSR1 only under SLURM, where it asks for a requeue
    (elsewhere its default, ending the process, is kept)."""
    always = (signal.SIGTERM, signal.SIGINT)
    return (*always, signal.SIGUSR1) if SLURMEnvironment.detect() else always


class Preemption(L.Callback):
    def __init__(self, checkpoints, monitor, agree_every: int):
        self.checkpoints, self.monitor = checkpoints, monitor  # StepCheckpoint, NonFiniteMonitor
        self.agree_every = agree_every
        self.signum = 0  # the signal noted in this process, 0 for none
        self.stopping = 0  # the signal the processes agreed to stop on, 0 for none
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
        if self.stopping:
            return
        self.stopping = self._agreed_signal(trainer, pl_module)
        if self.stopping:
            self.monitor.check(trainer)  # a NaN stop wins: the last good checkpoint stays
            self.checkpoints.save_at_step_end = True  # after every other hook of the step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stopping:  # the previous step is wholly done, and saved
            raise_if_preempted(trainer)

    def _agreed_signal(self, trainer, pl_module) -> int:
        if trainer.world_size == 1:
            return self.signum
        step = trainer.global_step
        if step % self.agree_every and step < trainer.max_steps:
            return 0
        noted = torch.tensor(self.signum, device=pl_module.device)
        return int(all_gather_stack(noted).max())


def raise_if_preempted(trainer) -> None:
    """If a signal asked to stop, its checkpoint is saved: requeue the job after SIGUSR1 and
    say so (`Preempted`). Also after `trainer.fit`: a signal that landed in the last step
    stops there too (before the evaluation): the rerun only evaluates."""
    preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    if preemption is None:
        return
    # Under DDP only an agreed stop: one process's late signal must not end it alone.
    signum = preemption.stopping or (preemption.signum if trainer.world_size == 1 else 0)
    if not signum:
        return
    note = requeue() if signum == signal.SIGUSR1 and trainer.is_global_zero else ""
    raise Preempted(signum, trainer.global_step, saved=True, requeue_note=note)


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


class _Interrupted(BaseException):
    """Ctrl-C outside the training steps: Lightning turns a KeyboardInterrupt into exit 1
    and its own text; any other exception it lets through."""


def _interrupt(signum, frame) -> None:
    raise _Interrupted


@contextmanager
def sigterm_as_preempted(trainer):
    """Lightning's own SIGTERM handling, in force before training starts and during the
    final evaluation, ends in a SystemExit with code 0, and a Ctrl-C there in exit 1: make
    each a `Preempted` (exit 143, 130). Nothing new to save there: the newest checkpoint
    holds every finished step. (During the steps, Preemption's handler is in force.)"""
    main_thread = threading.current_thread() is threading.main_thread()  # signal's rule
    previous = signal.signal(signal.SIGINT, _interrupt) if main_thread else None
    try:
        yield
    except SIGTERMException:
        raise Preempted(signal.SIGTERM, trainer.global_step, saved=False) from None
    except _Interrupted:
        raise Preempted(signal.SIGINT, trainer.global_step, saved=False) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
