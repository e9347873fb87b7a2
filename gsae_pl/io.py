"""Files that other code reads as results are written whole or not at all."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

from gsae_pl.names import fitting_name


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = True,
                 temporary: Path | None = None) -> None:
    """`write(fh)` into a temporary name beside `path`, fsync, then rename over `path`:
    readers never see half a file, and a failed write leaves no temporary behind (a killed
    process can; `sweep_stale_temporaries` removes those). The temporary is made by a plain
    `open`, so the file gets the mode the user's umask gives (0644 under umask 022), as any
    other file the user writes; mkstemp's would be 0600. `temporary`: another name for the
    temporary, in the same folder (default `temporary_path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temporary) if temporary is not None else temporary_path(path)
    try:
        with open(tmp, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """`.<name>.tmp<pid>` beside `path`, the name shortened (names.fitting_name) when a
    long one would pass the file system's limit."""
    path = Path(path)
    return path.with_name(fitting_name(f".{path.name}", f".tmp{pid or os.getpid()}"))


_TEMPORARY = re.compile(r"\..+\.tmp(\d+)")  # `.<name>.tmp<pid>`, as atomic_write names them


def sweep_stale_temporaries(folder: Path, pattern: str = ".*.tmp*") -> None:
    """Remove the `.<name>.tmp<pid>` files (and folders: the tiny LM builds in one) that a
    killed writer left in `folder` (those `pattern` matches). Only those whose process is
    gone: another live process may be writing the same cache or building the same model."""
    for tmp in Path(folder).glob(pattern):
        match = _TEMPORARY.fullmatch(tmp.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's own writes are never stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive, someone else's (or not a pid at all: leave it)
    return True


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_npy(path: Path, array) -> None:
    """`np.save` atomically: a cache shard is whole or absent."""
    import numpy as np

    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def atomic_write_csv(path: Path, fieldnames: list[str], rows: list[dict]) -> Path:
    """A CSV of `rows` under the header `fieldnames` (None as an empty cell), written whole."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fieldnames})
    atomic_write_text(path, buffer.getvalue())
    return Path(path)
