"""Names that become one path component: a run's folder, a suite's, an export's.

A name may not point anywhere else: `..` or `a/../..` would put a run (and `--force`'s
deletions) outside output.dir.
"""

from __future__ import annotations

import hashlib

from gsae_pl.errors import UserError

MAX_NAME_BYTES = 255  # the longest file name Linux file systems take


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder's name, or None if it can."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "would be output.dir itself or its parent, not a folder of its own"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if name.startswith("-"):
        return "starts with '-' (shell tools would read it as an option)"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_name(name: str, what: str, advice: str = "e.g. gated_l1-0.05_seed0") -> None:
    """Refuse a name that is not one plain folder name; `what` says whose name it is."""
    problem = name_problem(name)
    if problem:
        raise UserError(f"{what}{name!r} {problem}: it names one folder, so use one plain "
                        "name (no '/', '\\' or control characters; not '.', '..' or a "
                        f"leading '-'), {advice}")


def fitting_name(stem: str, suffix: str = "") -> str:
    """`stem + suffix` if that fits in one file name, else `stem` cut short and marked with
    a hash of the whole of it (so two long stems stay apart) before `suffix`."""
    name = stem + suffix
    if len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES:
        return name
    digest = "~" + hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    room = MAX_NAME_BYTES - len((digest + suffix).encode("utf-8", "surrogateescape"))
    cut = stem.encode("utf-8", "surrogateescape")[:max(room, 0)]
    return cut.decode("utf-8", "ignore") + digest + suffix  # "ignore": a split character
