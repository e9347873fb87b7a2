"""A suite's progress as its runs end: runs done, running and left, and an ETA.

The ETA (decision): the mean wall time of the runs that finished in this invocation is the
guess for every other run; the runs still going need that mean less the time they have
already run (at least 0), the runs not started the whole mean, and `slots` runs go at
once (parallel: one per device; ddp: one), or as many as remain when fewer do. A failed
run's time is left out of the mean (it may have stopped at its first step); before any run
has finished there is no ETA.
"""

from __future__ import annotations


def duration(seconds: float) -> str:
    """`45 s`, `1 min 40 s`, `12 min`, `1 h 05 min`: precise enough for a wait."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class SuiteProgress:
    """Counts the suite's runs as they end; `line` says where the suite stands."""

    def __init__(self, total: int, already_done: int, slots: int):
        self.total, self.done, self.slots = total, already_done, slots
        self.failed, self.seconds = 0, []

    def ended(self, seconds: float, ok: bool) -> None:
        if ok:
            self.done += 1
            self.seconds.append(seconds)
        else:
            self.failed += 1

    def eta(self, running_for: list[float], left: int) -> float | None:
        """Seconds until the last run ends; None before a run has finished."""
        if not self.seconds:
            return None
        mean = sum(self.seconds) / len(self.seconds)
        work = sum(max(mean - elapsed, 0.0) for elapsed in running_for) + left * mean
        return work / self.at_once(running_for, left)

    def at_once(self, running_for: list[float], left: int) -> int:
        """Runs going at the same time from now on: the slots, or fewer near the end."""
        return max(1, min(self.slots, len(running_for) + left))

    def line(self, running_for: list[float], left: int) -> str:
        """`running_for`: how long each run still going has run; `left`: runs not started."""
        failed = f" ({self.failed} failed)" if self.failed else ""
        text = (f"suite: {self.done} of {self.total} runs done{failed}, {len(running_for)} "
                f"running, {left} left")
        eta = self.eta(running_for, left)
        if not running_for and not left:
            return text
        if eta is None:
            return text + "; ETA once a run has finished"
        mean = sum(self.seconds) / len(self.seconds)
        return (text + f"; ETA {duration(eta)} (mean {duration(mean)} per run, "
                f"{self.at_once(running_for, left)} at a time)")
