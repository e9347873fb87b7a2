"""Progress of a long phase (building the tiny LM, converting a model, filling the shuffle
buffer, writing a cache) as plain lines on stderr, the same in a terminal and in a log
file: nothing for a phase that ends within `every` seconds, else a line every `every`
seconds with the count, the rate since the phase began and the ETA at that rate, and a
last line with the total. One process speaks (the first a launcher started).
$GSAE_PL_PROGRESS_EVERY sets `every` (seconds; 0: a line at every update, for tests)."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

from gsae_pl.processes import is_first_process

EVERY = 10.0  # seconds between lines: no phase stays silent much longer


def every_seconds() -> float:
    return float(os.environ.get("GSAE_PL_PROGRESS_EVERY", EVERY))


def count(n: float) -> str:
    """12345 -> '12.3k', 2.5e6 -> '2.5M', 1.43 -> '1.43'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"  # 1.4 steps/s, not 1


def clock_time(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


class ProgressLines:
    """`update(n)` as work is done; `close()` at the end. `total` None: no % and no ETA."""

    def __init__(self, label: str, total: float | None = None, unit: str = "",
                 every: float | None = None, stream=None, clock=time.monotonic,
                 speak: bool | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.every = every_seconds() if every is None else every
        self.stream, self.clock = stream, clock
        self.speak = is_first_process() if speak is None else speak
        self.done = 0.0
        self.began = self.last = clock()
        self.printed = False

    def _print(self, line: str) -> None:
        if self.speak:
            print(line, file=self.stream or sys.stderr, flush=True)
            self.printed = True

    def update(self, n: float = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._print(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.began
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.label}: {count(self.done)}"
        if self.total:
            text += f"/{count(self.total)}{unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += unit
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text += f" | {count(rate)}{unit}/s" if rate else f" | none yet after {elapsed:.0f} s"
        if self.total and rate:
            text += f" | ETA {clock_time((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        """The total, if a line was printed (a quick phase stays quiet)."""
        if self.printed:
            elapsed = self.clock() - self.began
            unit = f" {self.unit}" if self.unit else ""
            self._print(f"{self.label}: {count(self.done)}{unit} in {clock_time(elapsed)}")


@contextmanager
def phase(label: str, every: float | None = None, stream=None):
    """A phase whose work cannot be counted (training a tokenizer, say): a line every
    `every` seconds while it runs, from a background thread, and its duration at the end
    if it took longer than that."""
    every = every_seconds() if every is None else every
    stop = threading.Event()
    began = time.monotonic()
    speak = is_first_process()

    def beat() -> None:
        while not stop.wait(max(every, 0.5)):
            if speak:
                print(f"{label}: still running after {clock_time(time.monotonic() - began)}",
                      file=stream or sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        seconds = time.monotonic() - began
        if seconds >= every and speak:
            print(f"{label}: done in {clock_time(seconds)}", file=stream or sys.stderr,
                  flush=True)
