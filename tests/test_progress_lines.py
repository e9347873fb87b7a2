"""Progress lines of long phases: quiet when quick, else the count, an honest rate (over
the phase so far) and the ETA at that rate; a phase that cannot count says it still runs."""

from __future__ import annotations

import io
import threading

from gsae_pl.progress_lines import ProgressLines, phase


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_quick_phase_prints_nothing():
    out, clock = io.StringIO(), Clock()
    lines = ProgressLines("filling", total=100, unit="rows", every=10, stream=out, clock=clock,
                          speak=True)
    clock.now = 9.0
    lines.update(100)
    lines.close()
    assert out.getvalue() == ""


def test_a_slow_phase_prints_count_rate_and_eta_then_its_total():
    out, clock = io.StringIO(), Clock()
    lines = ProgressLines("caching", total=102_400, unit="rows", every=10, stream=out,
                          clock=clock, speak=True)
    clock.now = 5.0
    lines.update(0)  # nothing yet, not due
    clock.now = 12.0
    lines.update(0)  # due, still none: it says so rather than 0 rows/s and no ETA
    clock.now = 24.0
    lines.update(30_720)  # 30% in 24 s: 1.28k rows/s, 56 s left at that rate
    clock.now = 80.0
    lines.update(71_680)
    lines.close()
    assert out.getvalue().splitlines() == [
        "caching: 0/102k rows (0%) | none yet after 12 s",
        "caching: 30.7k/102k rows (30%) | 1.28k rows/s | ETA 0:56",
        "caching: 102k/102k rows (100%) | 1.28k rows/s | ETA 0:00",
        "caching: 102k rows in 1:20"]


def test_another_process_stays_quiet():
    out, clock = io.StringIO(), Clock()
    lines = ProgressLines("x", total=1, every=0, stream=out, clock=clock, speak=False)
    clock.now = 1.0
    lines.update(1)
    assert out.getvalue() == ""


def test_an_uncounted_phase_says_it_still_runs():
    out, seen = io.StringIO(), threading.Event()
    with phase("training the tokenizer", every=0.5, stream=out):
        for _ in range(200):  # until the first heartbeat, however slow the machine
            if seen.wait(0.05) or "still running" in out.getvalue():
                break
    text = out.getvalue().splitlines()
    assert text[0].startswith("training the tokenizer: still running after 0:0")
    assert text[-1].startswith("training the tokenizer: done in 0:0")
