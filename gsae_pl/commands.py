"""Commands the project prints for a user to run next, as they run in a fresh shell: the
interpreter and tools of the environment this process runs in, by absolute path (a plain
`python` or `tensorboard` is the system's, or none, unless that environment is activated),
and absolute paths to the files they take, so the line works from any directory."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def python() -> str:
    # abspath, not resolve: a venv's bin/python is a link to the base interpreter, which
    # would not see the venv's packages.
    return os.path.abspath(sys.executable)


def tool(name: str) -> str:
    """The console script `name` installed beside this interpreter, else the bare name."""
    beside = Path(python()).parent / name
    return str(beside) if beside.is_file() else name


def _arg(value) -> str:
    return os.path.abspath(value) if isinstance(value, Path) else str(value)


def python_m(module: str, *args) -> str:
    """`<interpreter> -m module args...`, Path arguments made absolute, quoted for a shell."""
    return shlex.join([python(), "-m", module, *map(_arg, args)])


def run_tool(name: str, *args) -> str:
    return shlex.join([tool(name), *map(_arg, args)])
