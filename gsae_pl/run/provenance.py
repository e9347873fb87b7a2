"""What made a run's numbers: code commit, library versions, data key, device, threads.

fit writes it to `<run dir>/provenance.json` (atomically, just before metrics.json) rather
than nesting it in metrics.json: several readers (report, ablate, faults, TensorBoard's
hparams) treat metrics.json as flat numbers, and a separate file keeps them all as they
are. The suite report shows a header summarising its runs' records (`suite_header`).
Nothing here may fail a run: what cannot be found is recorded as "unknown" or "absent".
"""

from __future__ import annotations

import json
import subprocess
from hashlib import blake2b
from importlib import metadata
from pathlib import Path

import torch

from gsae_pl.data.local_models import MODELS
from gsae_pl.data.model_identity import model_identity

PACKAGES = ("torch", "lightning", "transformer-lens", "transformers")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# (path, mtime_ns, size) -> hex digest: a model's weights are hashed once per process.
_HASHES: dict[tuple[str, int, int], str] = {}


# Results, not inputs: a suite rewrites its committed report, results.csv, suite.yaml and
# plots there while its runs start, which must not mark those runs' code as changed.
OUTPUTS = "tensorboard_logs"


def code_state(where: Path | None = None) -> dict:
    """{"commit": HEAD or "unknown", "dirty": tracked files changed outside OUTPUTS, or
    "unknown"} of the git checkout holding gsae_pl (outside a checkout, or without git:
    "unknown")."""
    where = where or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                         f":(top,exclude){OUTPUTS}"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit, "dirty": dirty}


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def file_hash(path: Path) -> str:
    """blake2b of the file's bytes, cached by path, mtime and size."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        digest = blake2b(digest_size=16)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def weights_hash(model_dir: Path) -> str | None:
    """One blake2b over the directory's weight files (names and their hashes), or None
    when it holds none."""
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    digest = blake2b(digest_size=16)
    for path in files:
        digest.update(f"{path.name}:{file_hash(path)}\n".encode())
    return digest.hexdigest()


def data_key(source) -> dict:
    """The source's own description (for the cache source its cache key, which is the LM
    source's), plus what names the bytes behind it: a local model's weight hash, or a data
    file's size and mtime."""
    key = dict(source.describe())
    lm = source.lm  # every source has one, None for rows with no LM behind them
    model_dir = Path(lm.model_name if lm is not None else "")
    if lm is not None and model_dir.is_dir():
        key["weights_blake2b"] = weights_hash(model_dir)
    path = Path(str(key.get("path", "")))
    if key.get("source") == "file" and path.is_file():
        key.update(bytes=path.stat().st_size, mtime_ns=path.stat().st_mtime_ns)
    return key


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def collect(source, device: torch.device) -> dict:
    """The provenance record of a run on `device` reading `source`."""
    return {**code_state(), "versions": versions(), "data": data_key(source),
            "device": device_name(torch.device(device)), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- the suite report's header

def read_records(suite_dir: Path, runs: list[str]) -> dict[str, dict | None]:
    """run -> its provenance.json (None where absent or unreadable: the header says so)."""
    out = {}
    for run in runs:
        path = Path(suite_dir) / "runs" / run / "provenance.json"
        try:
            out[run] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[run] = None
    return out


def _distinct(records: list[dict], field: str) -> dict[str, int]:
    """Each distinct value of `field` (as compact JSON where not a string) -> its run count."""
    counts: dict[str, int] = {}
    for record in records:
        value = record.get(field, "unknown")
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        counts[text] = counts.get(text, 0) + 1
    return counts


def model_of(data) -> str | None:
    """The exact model behind a provenance record's data key (data/model_identity.py)."""
    if not isinstance(data, dict) or not data.get("model"):
        return None
    model, source = str(data["model"]), data.get("source")
    if source == "tiny_lm":
        return model_identity(source, None, model)
    named = Path(model).name.rsplit("-", 1)[0]  # a converted local model: <name>-<digest>
    return model_identity(source, named, model) if named in MODELS else model


def suite_header(records: dict[str, dict | None]) -> list[str]:
    """report.md lines: commit(s) and dirty flag, versions, device, threads and data key(s),
    each with its run count where runs differ; a warning when commits differ."""
    known = [r for r in records.values() if isinstance(r, dict)]
    missing = len(records) - len(known)
    if not known:
        return [f"no run has a provenance.json ({missing} made before it was recorded, or "
                "not by `gsae_pl.fit`)"]
    lines = []
    commits = _distinct(known, "commit")
    if len(commits) > 1:
        lines += [f"**Warning: the runs come from {len(commits)} different commits** "
                  "(compare like with like, or rerun the older ones).", ""]
    names = {"commit": "commit", "dirty": "tracked files changed (dirty)",
             "versions": "versions", "device": "device", "threads": "threads",
             "data": "data key"}
    for field, label in names.items():
        counts = _distinct(known, field)
        shown = "; ".join(f"`{v}`" + (f" ({n} runs)" if len(counts) > 1 else "")
                          for v, n in counts.items())
        lines.append(f"- {label}: {shown or 'unknown'}")
    models = _distinct([{"model": m} for m in map(model_of, (r.get("data") for r in known))
                        if m], "model")
    if models:  # the data key names a directory; this, the model a reader can find
        lines.append("- model: " + "; ".join(
            str(m) + (f" ({n} runs)" if len(models) > 1 else "") for m, n in models.items()))
    if missing:
        lines.append(f"- {missing} run(s) have no provenance.json (made before it was "
                     "recorded, or not by `gsae_pl.fit`)")
    return lines
