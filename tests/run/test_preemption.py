"""Preemption: SIGTERM (how clusters stop a job) and SLURM's requeue signal (SIGUSR1) save
a checkpoint at the current step in the run's own checkpoints/, exit non-zero with one
line, write no metrics.json; rerunning the same command resumes and ends with the metrics
of an uninterrupted run. A requeue checkpoint never reaches another run sharing the cwd.

Signals need real processes: each run is a subprocess, slowed by a wrapper script so the
signal, sent once the first periodic checkpoint appears, lands mid-training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gsae_pl.fit import main
from tests.run.test_resume import assert_same_metrics
from tests.tiny_run import ROOT, args, metrics, wrapper_script

pytestmark = pytest.mark.slow

# 0.1 s per step: 40 steps take 4 s, so a signal sent at step 10 arrives mid-training.
SLOW_STEPS = """
import time
from gsae_pl.run import faults
_end = faults.NonFiniteMonitor.on_train_batch_end
def _slow_end(self, trainer, *rest):
    time.sleep(0.1)
    _end(self, trainer, *rest)
faults.NonFiniteMonitor.on_train_batch_end = _slow_end
"""
FAKE_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "gsae",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
              "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost"}


def fake_scontrol(bin_dir: Path) -> Path:
    """An `scontrol` that records its arguments, one call a line, in scontrol.log."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {bin_dir / "scontrol.log"}\n')
    script.chmod(0o755)
    return bin_dir / "scontrol.log"


def environment(slurm: bool, bin_dir: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    if slurm:
        env.update(FAKE_SLURM)
    if bin_dir:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def start(out: Path, name: str, *extra: str, script: Path | None = None, env: dict,
          cwd: Path) -> subprocess.Popen:
    entry = [str(script)] if script else ["-m", "gsae_pl.fit"]
    return subprocess.Popen([sys.executable, *entry, *args(out, name, *extra)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_after_first_checkpoint(proc: subprocess.Popen, run: Path, signum: int):
    """Wait for the first checkpoint (last.ckpt, written whole, then renamed, and never
    deleted as step10.ckpt is once newer ones exist), send `signum`, collect."""
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def finish(out: Path, name: str, *extra: str, env: dict, cwd: Path):
    proc = start(out, name, *extra, env=env, cwd=cwd)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-2000:]
    return stdout


def assert_saved_at_the_signal(run: Path) -> int:
    """last.ckpt holds a step after the newest periodic checkpoint, before the end."""
    ckpts = run / "checkpoints"
    periodic = [int(p.stem[4:]) for p in ckpts.glob("step*.ckpt")]
    step = torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    assert max(periodic) < step < 40, (periodic, step)
    assert not (run / "metrics.json").exists()
    return step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(args(out, "run")) == 0
    return metrics(out, "run")


def test_sigterm_saves_at_the_signal_exits_143_and_resumes(tmp_path, uninterrupted):
    script = wrapper_script(tmp_path / "slow.py", SLOW_STEPS)
    env, run = environment(slurm=False), tmp_path / "run"
    proc = start(tmp_path, "run", script=script, env=env, cwd=tmp_path)
    code, _, err = signal_after_first_checkpoint(proc, run, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    step = assert_saved_at_the_signal(run)
    line = (f"error: stopped by SIGTERM at step {step}: checkpoint saved, rerun the same "
            "command to resume")
    assert line in err.splitlines(), err[-2000:]
    resumed = finish(tmp_path, "run", env=env, cwd=tmp_path)
    assert f"resuming {run} from step {step}" in resumed
    assert_same_metrics(metrics(tmp_path, "run"), uninterrupted)


def test_slurm_requeue_checkpoints_in_the_run_and_resumes(tmp_path, uninterrupted):
    log = fake_scontrol(tmp_path / "bin")
    env, run = environment(slurm=True, bin_dir=tmp_path / "bin"), tmp_path / "run"
    script = wrapper_script(tmp_path / "slow.py", SLOW_STEPS)
    proc = start(tmp_path, "run", script=script, env=env, cwd=tmp_path)
    code, _, err = signal_after_first_checkpoint(proc, run, signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1, err[-2000:]
    step = assert_saved_at_the_signal(run)
    assert f"stopped by SIGUSR1 at step {step}: checkpoint saved, SLURM job 4242 requeued" \
        in err, err[-2000:]
    assert log.read_text().splitlines() == ["requeue 4242"]
    assert not list(tmp_path.glob("hpc_ckpt_*")) and not list(run.glob("hpc_ckpt_*"))
    resumed = finish(tmp_path, "run", env=env, cwd=tmp_path)  # the requeued job's rerun
    assert f"resuming {run} from step {step}" in resumed
    assert_same_metrics(metrics(tmp_path, "run"), uninterrupted)


def test_a_requeued_run_never_reaches_another_run_in_the_same_cwd(tmp_path):
    fake_scontrol(tmp_path / "bin")
    env = environment(slurm=True, bin_dir=tmp_path / "bin")
    script = wrapper_script(tmp_path / "slow.py", SLOW_STEPS)
    proc = start(tmp_path, "a", script=script, env=env, cwd=tmp_path)
    signal_after_first_checkpoint(proc, tmp_path / "a", signal.SIGUSR1)
    # B: another seed, another name, the same cwd and job; then B alone elsewhere.
    out_b = finish(tmp_path, "b", "seed=7", env=env, cwd=tmp_path)
    assert "resuming" not in out_b
    alone = tmp_path / "alone"
    alone.mkdir()
    finish(alone, "b", "seed=7", env=environment(slurm=False), cwd=alone)
    assert_same_metrics(metrics(tmp_path, "b"), metrics(alone, "b"))


def test_stale_temporaries_in_the_run_dir_are_swept(tmp_path):
    run = tmp_path / "run"
    assert main(args(tmp_path, "run", "trainer.max_steps=20")) == 0
    (run / "metrics.json").unlink()  # as if killed while writing it
    stale = [run / ".metrics.json.tmp999999", run / ".config.yaml.tmp999999",
             run / "checkpoints" / ".last.ckpt.tmp999999"]
    for path in stale:
        path.write_text("half a file")
    assert main(args(tmp_path, "run")) == 0  # resumes
    assert not [p for p in stale if p.exists()]
    # A kill while writing config.yaml at the very start leaves no checkpoint to resume.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".config.yaml.tmp999999").write_text("half a file")
    assert main(args(tmp_path, "fresh", "trainer.max_steps=10")) == 0
    assert not list(fresh.glob(".*.tmp*"))


def test_sigterm_under_ddp_saves_once_and_ends_every_process(tmp_path):
    # Lightning's launcher: process 0 gets the signal and forwards it; the processes agree
    # to stop at the next log step (5 here), where process 0 saves.
    script = wrapper_script(tmp_path / "slow.py", SLOW_STEPS + """
open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                  f"pid{os.environ.get('LOCAL_RANK', '0')}"), "w").write(str(os.getpid()))
""")
    run = tmp_path / "run"
    proc = start(tmp_path, "run", "trainer.devices=2", "trainer.strategy=ddp",
                 "log.every_n_steps=5", script=script, env=environment(slurm=False),
                 cwd=tmp_path)
    code, _, err = signal_after_first_checkpoint(proc, run, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    step = assert_saved_at_the_signal(run)
    assert step % 5 == 0 and f"stopped by SIGTERM at step {step}: checkpoint saved" in err
    child = int((tmp_path / "pid1").read_text())
    deadline = time.monotonic() + 15
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or \
        "zombie" in Path(f"/proc/{child}/status").read_text().lower()


# SIGTERM during the final evaluation (45 steps: the last periodic one was at step 40).
SIGTERM_IN_FINAL_EVAL = """
from gsae_pl.run.module import SAEModule
_val = SAEModule.validation_step
def _term_then_val(self, *rest, **kw):
    if self.trainer.state.fn == "validate":
        os.kill(os.getpid(), signal.SIGTERM)
    return _val(self, *rest, **kw)
SAEModule.validation_step = _term_then_val
"""


def test_sigterm_in_the_final_evaluation_exits_143_and_the_rerun_evaluates(tmp_path):
    script = wrapper_script(tmp_path / "term.py", SIGTERM_IN_FINAL_EVAL)
    env, run = environment(slurm=False), tmp_path / "run"
    proc = start(tmp_path, "run", "trainer.max_steps=45", script=script, env=env,
                 cwd=tmp_path)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "error: stopped by SIGTERM at step 45: rerun the same command to resume" in err
    assert not (run / "metrics.json").exists()
    resumed = finish(tmp_path, "run", "trainer.max_steps=45", env=env, cwd=tmp_path)
    assert f"resuming {run} from step 45" in resumed
    assert metrics(tmp_path, "run")["steps"] == 45
