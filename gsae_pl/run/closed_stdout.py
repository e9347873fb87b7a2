"""`fit | head`: when the reader of stdout goes away, stop printing, keep training.

Python ignores SIGPIPE, so the next progress line raised BrokenPipeError inside a
Lightning hook: a traceback, and the run ended with no checkpoint of its last steps.
Decision: the printed lines are a view of the run, not its result (the run directory holds
that), so a closed stdout silences them and the run goes on to its end; errors still go to
stderr. The file descriptor is pointed at /dev/null, so Python's own flush at exit cannot
fail either (Python's documented recipe for SIGPIPE).
"""

from __future__ import annotations

import os
import sys


class QuietWhenClosed:
    """sys.stdout, whose writes and flushes after the reader left go to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


def quiet_when_stdout_closes() -> None:
    if not isinstance(sys.stdout, QuietWhenClosed) and sys.stdout is not None:
        sys.stdout = QuietWhenClosed(sys.stdout)
