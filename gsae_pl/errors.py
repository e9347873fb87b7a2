"""The one exception type that means "the user gave us something we cannot use".

Entry points catch it, print its message as one line on stderr and exit 2
(no traceback): see `gsae_pl.cli.run_main`. `RunFailed` is its counterpart for a run
that started and then could not go on (e.g. a NaN loss): one line, exit 3.
"""


class UserError(Exception):
    """Bad input: the message says what was wrong and what to do about it."""


class RunFailed(Exception):
    """A run stopped part-way; the message says where and what to do. No metrics.json."""
