"""The suite's progress line: counts and the ETA from the mean time of finished runs
(gsae_pl/suite/progress.py), on hand-computed values."""

from __future__ import annotations

from gsae_pl.suite.progress import SuiteProgress, duration


def test_durations_read_as_a_wait():
    assert [duration(s) for s in (0, 44.6, 59.4, 90, 599, 720, 3599, 3900)] == [
        "0 s", "45 s", "59 s", "1 min 30 s", "9 min 59 s", "12 min", "1 h 00 min",
        "1 h 05 min"]


def test_eta_counts_running_and_waiting_runs_over_the_slots():
    progress = SuiteProgress(total=10, already_done=2, slots=2)
    progress.ended(100, ok=True)
    progress.ended(300, ok=True)   # mean 200 s
    progress.ended(5, ok=False)    # a failure's time is not a run's time
    # one run 50 s in: 150 s to go; 4 waiting: 800 s; over 2 slots: 475 s
    assert progress.eta([50.0], left=4) == 475.0
    assert progress.line([50.0], left=4) == (
        "suite: 4 of 10 runs done (1 failed), 1 running, 4 left; ETA 7 min 55 s "
        "(mean 3 min 20 s per run, 2 at a time)")
    # a run past the mean counts 0; the last run alone goes one at a time
    assert progress.eta([250.0], left=1) == 200.0 / 2
    assert progress.eta([], left=1) == 200.0


def test_no_eta_before_a_run_finishes_and_none_at_the_end():
    progress = SuiteProgress(total=3, already_done=0, slots=2)
    progress.ended(7, ok=False)
    assert progress.line([3.0], left=1) == (
        "suite: 0 of 3 runs done (1 failed), 1 running, 1 left; ETA once a run has finished")
    progress.ended(60, ok=True)
    progress.ended(60, ok=True)
    assert progress.line([], left=0) == "suite: 2 of 3 runs done (1 failed), 0 running, 0 left"
