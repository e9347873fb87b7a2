"""The one exception type that means "the user gave us something we cannot use".

Entry points catch it, print its message as one line on stderr and exit 2
(no traceback): see `gsae_pl.cli.run_main`.
"""


class UserError(Exception):
    """Bad input: the message says what was wrong and what to do about it."""
