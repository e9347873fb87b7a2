"""Issue 25: a stopped or killed run resumes to the uninterrupted run's weights and metrics
bit for bit, whatever step the signal lands in (resample windows, the resample step and
evaluation steps included); SIGINT stops like SIGTERM; `fit | head` is quiet.

Signals need real processes. The every-step sweep runs two driver processes, one that
signals itself (a real SIGTERM, from inside step N) once per run, and one that resumes
every run, so each resume is in a process that never trained that run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsae_pl.fit import main
from gsae_pl.saes.gated import SPARSE_CROSSOVER
from tests.run.test_preemption import SLOW_STEPS, environment, signal_after_first_checkpoint, start
from tests.tiny_run import ROOT, args, fit_process, metrics, run, wrapper_script

pytestmark = pytest.mark.slow

# 14 steps; features die fast (lr 0.1, lambda 2, 16 rows a step): a resample at step 10
# over a window of steps 8-10 finds dead features; evaluations at steps 7 and 14.
SWEEP = ["trainer.max_steps=14", "data.batch_size=16", "eval.rows=256", "eval.every_n_steps=7",
         "log.every_n_steps=3", "log.histogram_every_n_steps=6", "checkpoint.every_n_steps=4",
         "sae.d_sae=64", "optim.lr=0.1", "optim.warmup_steps=1",
         "loss.sparsity.coefficient=2", "resample.enabled=true", "resample.every_n_steps=10",
         "resample.window_steps=3", "resample.max_resamples=1", "resample.lr_return_steps=3"]
STEPS = list(range(1, 15))

# argv: JSON list of steps (0: no signal), then fit's arguments with {N} for the step.
DRIVER = """
import json, os, signal, sys
from gsae_pl.run.module import SAEModule
from gsae_pl.fit import main
AT = [0]
_step = SAEModule.training_step
def _signal_inside_step(self, batch, batch_idx):
    if self.global_step + 1 == AT[0]:  # step AT (1-based), before any of its hooks
        os.kill(os.getpid(), signal.SIGTERM)
    return _step(self, batch, batch_idx)
SAEModule.training_step = _signal_inside_step
codes = {}
for n, signal_at in json.loads(sys.argv[1]):
    AT[0] = signal_at
    codes[n] = main([a.replace("{N}", str(n)) for a in sys.argv[2:]])
print("CODES " + json.dumps(codes))
"""


def drive(tmp_path: Path, plan: list[tuple[int, int]]) -> dict:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    done = run([sys.executable, str(script), json.dumps(plan), *args(tmp_path, "s{N}", *SWEEP)],
               timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("CODES "))
    return {int(k): v for k, v in json.loads(line[6:]).items()}


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    want, got = final_state(a), final_state(b)
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{b.name}: {differ}"


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the run's event files, tag -> {step: value} (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                found.setdefault(tag, {})[event.step] = event.value
    return found


def test_a_sigterm_at_every_step_resumes_bit_for_bit(tmp_path, capsys):
    assert main(args(tmp_path, "whole", *SWEEP)) == 0
    out = capsys.readouterr().out
    assert "resample at step 10: 0 of" not in out and "resample at step 10:" in out  # some dead
    codes = drive(tmp_path, [(n, n) for n in STEPS])
    assert codes == {n: 128 + signal.SIGTERM for n in STEPS}
    for n in STEPS:  # the signal's step is the checkpoint's step
        ckpt = torch.load(tmp_path / f"s{n}" / "checkpoints" / "last.ckpt", weights_only=False)
        assert ckpt["global_step"] == n and not (tmp_path / f"s{n}" / "metrics.json").exists()
    assert drive(tmp_path, [(n, 0) for n in STEPS]) == {n: 0 for n in STEPS}
    whole, whole_curves = metrics(tmp_path, "whole"), scalars(tmp_path / "whole")
    for n in STEPS:
        assert_same_weights(tmp_path / "whole", tmp_path / f"s{n}")
        assert metrics(tmp_path, f"s{n}") == whole, n
        curves = scalars(tmp_path / f"s{n}")
        # No gap: every scalar at every step (a held-out evaluation at the signal's step
        # included); the held-out and resample values are the uninterrupted run's. The
        # coefficients (logged when they change) are restated once after a resume.
        assert curves.keys() == whole_curves.keys(), n
        for tag, points in whole_curves.items():
            extra = set(curves[tag]) - set(points)
            assert set(points) <= set(curves[tag]) and (tag.startswith("schedule/")
                                                        or not extra), (n, tag)
            if tag.startswith(("val/", "resample/", "schedule/")):
                assert {s: curves[tag][s] for s in points} == points, (n, tag)


def test_sigint_saves_exits_130_with_one_line_and_resumes(tmp_path):
    script = wrapper_script(tmp_path / "slow.py", SLOW_STEPS)
    env, run_dir = environment(slurm=False), tmp_path / "run"
    proc = start(tmp_path, "run", script=script, env=env, cwd=tmp_path)
    code, _, err = signal_after_first_checkpoint(proc, run_dir, signal.SIGINT)
    assert code == 128 + signal.SIGINT, err[-2000:]
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 10 <= step < 40 and not (run_dir / "metrics.json").exists()
    assert f"error: stopped by SIGINT at step {step}: checkpoint saved, rerun the same " \
           "command to resume" in err.splitlines(), err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    resumed = fit_process(tmp_path, "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run_dir} from step {step}" in resumed.stdout
    assert main(args(tmp_path, "whole")) == 0
    assert_same_weights(tmp_path / "whole", run_dir)
    assert metrics(tmp_path, "run") == metrics(tmp_path, "whole")


def test_fit_into_a_pipe_closed_early_is_quiet_and_finishes(tmp_path):
    command = " ".join([sys.executable, "-m", "gsae_pl.fit",
                        *args(tmp_path, "run", "trainer.max_steps=20")])
    done = subprocess.run(["bash", "-o", "pipefail", "-c", f"{command} | head -1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("run directory:") and done.stdout.count("\n") == 1
    assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert metrics(tmp_path, "run")["steps"] == 20


# Item 2 of the issue, scaled down: a gated SAE on a tiny LM's streamed activations,
# sparse enough by step 40 that sae.kernel=auto takes the CPU's sparse path; SIGKILLed
# after step 45, resumed from step 40.
KILL_AFTER_STEP_45 = """
from gsae_pl.run import faults
_end = faults.NonFiniteMonitor.on_train_batch_end
def _end_then_die(self, trainer, *rest):
    _end(self, trainer, *rest)
    if trainer.global_step == 45:
        os.kill(os.getpid(), signal.SIGKILL)
faults.NonFiniteMonitor.on_train_batch_end = _end_then_die
"""


def test_sigkilled_lm_stream_run_on_the_sparse_path_resumes_bit_for_bit(tmp_path):
    from tests.data.lm_fixtures import write_text, write_tiny_gpt2

    model, corpus = write_tiny_gpt2(tmp_path / "model"), write_text(tmp_path / "corpus",
                                                                    n_docs=300)
    extra = ["data.source=transformer_lens", f"data.model={model}", f"data.dataset={corpus}",
             "data.context_size=16", "data.buffer_size=512", "data.lm_batch_size=8",
             "data.normalize_rows=256", "eval.rows=128", "eval.loss_recovered.contexts=4",
             "trainer.max_steps=60", "sae.d_sae=128", "optim.warmup_steps=1",
             "loss.sparsity.coefficient=0.5"]
    assert main(args(tmp_path, "whole", *extra)) == 0
    killed = fit_process(tmp_path, "run", *extra, timeout=600,
                         script=wrapper_script(tmp_path / "die.py", KILL_AFTER_STEP_45))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = fit_process(tmp_path, "run", *extra, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {tmp_path / 'run'} from step 40" in resumed.stdout
    assert_same_weights(tmp_path / "whole", tmp_path / "run")
    assert metrics(tmp_path, "run") == metrics(tmp_path, "whole")
    # The case this covers: the resumed step took the sparse path (the kernel's choice
    # travels in the checkpoint).
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step40.ckpt", weights_only=False)
    assert ckpt["kernel_density"][0] < SPARSE_CROSSOVER
