"""What a run reads from files, recorded at its start (`<run dir>/inputs.json`) and
checked when it resumes.

A resumed run keeps the normalisation scalar and b_dec that its checkpoint holds, estimated
from the data at the run's start, and continues that data's stream at its step. Data that
changed since (the same shape, other rows: a regenerated file, a rebuilt cache) would train
on under the old scale without a word. So fit records the fingerprint of a source read from
files before it trains: a data file's path, rows, width, dtype and the digest of all its
rows (gsae_pl/data/file.py), an activation cache's rows, dtype and the digest of its shards'
digests (gsae_pl/data/cache.py). A resume compares, before anything is written, and refuses
a difference with one line. Sources with no file behind them (synthetic data, the LM
streams) are functions of the config, which `checkpointing.check_same_run` compares.

Decisions: a run folder made before this record existed resumes unchecked and records
what it reads then; an unreadable inputs.json is refused like a damaged checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from gsae_pl.errors import UserError
from gsae_pl.io import atomic_write_json

INPUTS = "inputs.json"


def fingerprint(source) -> dict | None:
    """The source's `fingerprint()` (file-backed sources have one), else None."""
    return source.fingerprint() if hasattr(source, "fingerprint") else None


def _recorded(run_dir: Path) -> dict | None:
    path = Path(run_dir) / INPUTS
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
        if not isinstance(found, dict):
            raise ValueError(f"holds a {type(found).__name__}")
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read {path} ({reason}), the record of the data this run "
                        "started on: pass --force to start afresh, or delete that file to "
                        "resume unchecked") from None
    return found


def check_inputs(run_dir: Path, source) -> None:
    """Refuse to resume the run in `run_dir` on data other than it recorded at its start."""
    recorded = _recorded(run_dir)
    now = fingerprint(source)
    if recorded is None or now is None or recorded.get("data") is None:
        return
    before = recorded["data"]
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if not changed:
        return
    what = f"data file {now['file']}" if "file" in now else \
        f"the activation cache in {now.get('cache')}"
    shown = "; ".join(f"{k} {_short(before.get(k))} -> {_short(now.get(k))}" for k in changed)
    raise UserError(f"{what} changed since the run in {run_dir} started ({shown}; recorded in "
                    f"{Path(run_dir) / INPUTS}): put back the data it started on to resume, "
                    "or pass --force to train afresh on this data")


def _short(value) -> str:
    text = str(value)
    return text[:12] if len(text) == 32 and text.isalnum() else text  # a digest: its head


def record_inputs(run_dir: Path, source, resuming: bool) -> None:
    """Write inputs.json at a run's start; a resume keeps the record it was checked
    against (or, in a folder made before records existed, writes one)."""
    if resuming and (Path(run_dir) / INPUTS).is_file():
        return
    atomic_write_json(Path(run_dir) / INPUTS, {"data": fingerprint(source)})
