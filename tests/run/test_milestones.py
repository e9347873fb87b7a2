"""eval.at_tokens (gsae_pl/run/milestones.py): the whole held-out evaluation at those token
counts, each kept in milestones.json with the values a run of that length ends with and
TensorBoard shows; the final metrics unchanged; milestones kept through a SIGKILL or a
SIGTERM and a resume; bad lists refused before anything is written."""

from __future__ import annotations

import json
import math
import signal

import pytest

from gsae_pl.config import load_config
from gsae_pl.eval.base import milestone_steps
from gsae_pl.fit import main
from tests.run.test_preemption_exact import scalars
from tests.run.test_resume import KILL_AFTER_STEP_25
from tests.tiny_run import BASE, TINY, args, fit_process, metrics, wrapper_script

# TINY: 40 steps of 128 rows (5120 tokens), evaluations every 20 steps, checkpoints every 10.
# Steps 10, 20 (an evaluation's and a checkpoint's step), 30 (3800 rounds up to 3840), 40.
AT = "eval.at_tokens=[1280,2560,3800,5120]"
SIGTERM_INSIDE_STEP_40 = """
from gsae_pl.run.module import SAEModule
_step = SAEModule.training_step
def _signal_inside_step(self, batch, batch_idx):
    if self.global_step + 1 == 40:
        os.kill(os.getpid(), signal.SIGTERM)
    return _step(self, batch, batch_idx)
SAEModule.training_step = _signal_inside_step
"""
# name -> (setup, exit code, the step it resumes from, the milestones on disk when it died)
STOPS = {"sigkill_after_step_25": (KILL_AFTER_STEP_25, -signal.SIGKILL, 20, [10, 20]),
         "sigterm_inside_step_40": (SIGTERM_INSIDE_STEP_40, 128 + signal.SIGTERM, 40,
                                    [10, 20, 30, 40])}
PLACE = ("step", "tokens", "tokens_asked")


def milestones(run_dir) -> list[dict]:
    return json.loads((run_dir / "milestones.json").read_text())["milestones"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("milestones")
    assert main(args(out, "run", AT)) == 0
    return out / "run"


def test_tokens_round_up_to_whole_steps():
    cfg = load_config(BASE, [*TINY, "eval.at_tokens=[1,1280,1281,5120]"])
    assert milestone_steps(cfg) == {1: 1, 10: 1280, 11: 1281, 40: 5120}
    assert milestone_steps(load_config(BASE, TINY)) == {}  # off by default


@pytest.mark.parametrize("at, said", [
    ("[2560,1280]", "1280 after 2560: list the token counts in increasing order"),
    ("[5121]", "5121 is beyond the run's 5120 tokens (trainer.max_steps=40 x "
               "data.batch_size=128)"),
    ("[1200,1280]", "1200 and 1280 both fall on step 10"),
    ("[0]", "0 must be a positive number of tokens"),
])
def test_bad_lists_are_refused_before_anything_is_written(tmp_path, capsys, at, said):
    assert main(args(tmp_path, "run", f"eval.at_tokens={at}")) == 2
    err = capsys.readouterr().err
    assert f"error: eval.at_tokens: {said}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_each_milestone_is_the_evaluation_a_run_of_that_length_ends_with(tmp_path, whole):
    found = milestones(whole)
    assert [tuple(m[k] for k in PLACE) for m in found] == [
        (10, 1280, 1280), (20, 2560, 2560), (30, 3840, 3800), (40, 5120, 5120)]
    # The final evaluation stays metrics.json's, flat, as without milestones.
    assert main(args(tmp_path, "plain")) == 0
    assert metrics(whole.parent, "run") == metrics(tmp_path, "plain")
    assert found[-1] == {**{k: found[-1][k] for k in PLACE},
                         **{k: v for k, v in metrics(tmp_path, "plain").items()
                            if k not in ("steps", "tokens", "norm_scale", "median_norm")}}
    curves = scalars(whole)  # TensorBoard: val/<metric> at each milestone (x: step - 1)
    for milestone in found:
        step = milestone["step"]
        if step in (10, 30):  # steps no eval.every_n_steps reaches: a run stopped there
            assert main(args(tmp_path, f"s{step}", f"trainer.max_steps={step}")) == 0
            short = metrics(tmp_path, f"s{step}")
            run_level = ("steps", "tokens", "norm_scale", "median_norm")  # not evaluated
            assert {k: milestone[k] for k in short if k not in run_level} == \
                {k: v for k, v in short.items() if k not in run_level}
        for name in ("l0", "fvu"):  # float32 in the event file
            assert math.isclose(curves[f"val/{name}"][step - 1], milestone[name],
                                rel_tol=1e-6), (step, name)


@pytest.mark.slow
@pytest.mark.parametrize("stop", list(STOPS))
def test_milestones_survive_a_stop_and_resume(tmp_path, whole, stop):
    setup, code, resume_step, on_disk = STOPS[stop]
    script = wrapper_script(tmp_path / "stop.py", setup)
    stopped = fit_process(tmp_path, "run", AT, script=script)
    assert stopped.returncode == code, stopped.stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()
    assert [m["step"] for m in milestones(run)] == on_disk
    resumed = fit_process(tmp_path, "run", AT)  # the same command, rerun
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run} from step {resume_step}" in resumed.stdout
    # The resumed run's checkpoint lacked the milestone at its own step (saved before that
    # step's evaluation): measured again, on the same weights, to the same values.
    assert milestones(run) == milestones(whole)
    assert metrics(tmp_path, "run") == metrics(whole.parent, "run")
    assert scalars(run)["val/l0"] == scalars(whole)["val/l0"]  # each at its step, no other


@pytest.mark.slow
def test_a_fresh_run_leaves_no_earlier_milestones(tmp_path):
    short = ["trainer.max_steps=10", "eval.at_tokens=[640]"]
    assert main(args(tmp_path, "run", *short)) == 0
    assert [m["step"] for m in milestones(tmp_path / "run")] == [5]
    assert main(args(tmp_path, "run", "trainer.max_steps=10", "--force")) == 0
    assert not (tmp_path / "run" / "milestones.json").exists()
