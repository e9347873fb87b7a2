"""Files that other code reads as results are written whole or not at all."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = True) -> None:
    """`write(fh)` into a temporary name beside `path`, fsync, then rename over `path`:
    readers never see half a file, and a failed write leaves no temporary behind (a killed
    process can; checkpointing.remove_stale_temporaries sweeps those)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_npy(path: Path, array) -> None:
    """`np.save` atomically: a cache shard is whole or absent."""
    import numpy as np

    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))
