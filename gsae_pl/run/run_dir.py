"""A run's folder, `<output.dir>/<output.name>/`: its name, and what the run writes there.

The name becomes one path component, so it may not point anywhere else: `..` or `a/../..`
would put a run (and `--force`'s deletions) outside output.dir. And `--force` deletes only
what a run writes, never the folder wholesale, so a user's own file kept beside a run stays;
metrics.json (the mark of a finished run) goes first, so a --force stopped part-way leaves an
unfinished run, never a folder that reads as finished with half its files gone.
A folder that holds a run with another config is refused with a name to use instead
(`suggested_name`): the default name says architecture, lambda and seed, not d_sae.
"""

from __future__ import annotations

import re
from pathlib import Path

from gsae_pl.errors import UserError

# What fit writes in a run folder: the config it trained with, TensorBoard's event files and
# hparams.yaml, provenance.json, metrics.json (last); atomic writes' temporaries are
# `.<name>.tmp<pid>`; and gsae_pl.inspect's page (its TensorBoard texts are an event file),
# which would describe the SAE that --force replaces.
RUN_FILES = ("config.yaml", "metrics.json", "provenance.json", "hparams.yaml",
             "events.out.tfevents.*", ".config.yaml.tmp*", ".metrics.json.tmp*",
             ".provenance.json.tmp*", "inspect/latents.html", "inspect/.latents.html.tmp*")
CHECKPOINT_FILES = ("*.ckpt", ".*.ckpt.tmp*")  # in checkpoints/ (gsae_pl/run/checkpointing.py)
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


def suggested_name(run_dir: Path, changed: dict) -> str:
    """A free folder name beside `run_dir` for a run that differs from it in `changed`
    (dotted key -> new value): `<name>_<leaf>-<value>` for the first two keys, as suite run
    names show a swept value (`gated_l1-0.05_seed0_d_sae-2048`), `-2`, `-3`, ... if taken."""
    parts = [re.sub(r"[^A-Za-z0-9._+-]", "-", f"{key.rpartition('.')[2]}-{value}")
             for key, value in list(changed.items())[:2]]
    stem = "_".join([run_dir.name, *parts]).encode("utf-8", "surrogateescape")
    stem = stem[:MAX_NAME_BYTES - 8].decode("utf-8", "surrogateescape")  # room for -N
    name, n = stem, 1
    while (run_dir.parent / name).exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def remove_run_outputs(run_dir: Path) -> None:
    """`--force`: delete what an earlier run wrote here, and nothing else; then the
    checkpoints folder and the run folder themselves if that left them empty. metrics.json
    first: from then on the folder holds an unfinished run, whatever stops the deletion."""
    (run_dir / "metrics.json").unlink(missing_ok=True)
    checkpoints = run_dir / "checkpoints"
    for pattern in CHECKPOINT_FILES:
        for path in checkpoints.glob(pattern):
            path.unlink(missing_ok=True)
    for pattern in RUN_FILES:
        for path in run_dir.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
    for folder in (checkpoints, run_dir / "inspect", run_dir):
        try:
            folder.rmdir()
        except OSError:
            pass  # absent, or it holds something the run did not write (or the run lock)
