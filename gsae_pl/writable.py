"""Is a directory writable? Asked before any work, so a bad output place is one line
(exit 2) instead of a traceback after minutes of training or LM passes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gsae_pl.errors import UserError


def check_writable_dir(directory: str | Path, what: str) -> None:
    """Refuse `directory` (named `what` in the message, e.g. "output.dir") unless it exists
    as a directory we can create files in, or could be created. Leaves nothing behind."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing.parent != existing:  # nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {directory}: {existing} is a file, not a folder; choose "
                        "another path")
    try:
        # A real file, not os.access: root passes os.access on a read-only file system.
        fd, probe = tempfile.mkstemp(prefix=".gsae_pl-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{what} {directory} is not writable ({err.strerror} in {existing}): "
                        "choose another path or fix its permissions") from None
