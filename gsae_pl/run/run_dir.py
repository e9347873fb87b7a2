"""A run's folder, `<output.dir>/<output.name>/`: its name, and what the run writes there.

The name becomes one path component, so it may not point anywhere else: `..` or `a/../..`
would put a run (and `--force`'s deletions) outside output.dir. And `--force` deletes only
what a run writes, never the folder wholesale, so a user's own file kept beside a run stays;
metrics.json (the mark of a finished run) goes first, so a --force stopped part-way leaves an
unfinished run, never a folder that reads as finished with half its files gone.
A folder that holds a run with another config is refused with a name to use instead
(`suggested_name`): the default name says architecture, lambda and seed, not d_sae.

What fit may replace or delete there: the files named in RUN_FILES and CHECKPOINT_FILES, and
only in a folder that holds a gsae_pl run, one whose config.yaml fit wrote (its first line is
RUN_HEADER; a run made before the header existed is known by a resolved config naming this
folder). A folder holding any of those names that fit did not write is refused
(`check_own_folder`); other files beside a run are never touched.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gsae_pl.errors import UserError
from gsae_pl.names import MAX_NAME_BYTES

# What fit writes in a run folder: the config it trained with, TensorBoard's event files and
# hparams.yaml, inputs.json (run/inputs.py), milestones.json (run/milestones.py),
# provenance.json, heldout_documents.npz (eval/document_stats.py), metrics.json (last);
# atomic writes' temporaries are `.<name>.tmp<pid>`; and gsae_pl.inspect's page (its
# TensorBoard texts are an event file), which would describe the SAE that --force replaces.
RUN_FILES = ("config.yaml", "metrics.json", "provenance.json", "hparams.yaml",
             "events.out.tfevents.*", ".config.yaml.tmp*", ".metrics.json.tmp*",
             ".provenance.json.tmp*", "inputs.json", ".inputs.json.tmp*",
             "milestones.json", ".milestones.json.tmp*",
             "heldout_documents.npz", ".heldout_documents.npz.tmp*",
             "inspect/latents.html", "inspect/.latents.html.tmp*")
CHECKPOINT_FILES = ("*.ckpt", ".*.ckpt.tmp*")  # in checkpoints/ (gsae_pl/run/checkpointing.py)
# config.yaml's first line: the mark of a folder fit wrote (a YAML comment: readers skip it).
RUN_HEADER = "# gsae_pl.fit wrote this run folder: the config it trained with\n"
# Sections every config fit ever wrote has, and a hand-written one rarely has all of.
_RESOLVED = ("sae", "loss", "data", "trainer", "output", "seed")


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


def is_fit_config(run_dir: Path) -> bool:
    """Whether `run_dir/config.yaml` is one fit wrote: RUN_HEADER, or (a run made before the
    header) a resolved config whose output.name is this folder's."""
    try:
        text = (Path(run_dir) / "config.yaml").read_text()
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith(RUN_HEADER):
        return True
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return (isinstance(cfg, dict) and all(key in cfg for key in _RESOLVED)
            and isinstance(cfg["output"], dict) and cfg["output"].get("name") == run_dir.name)


def foreign_run_files(run_dir: Path) -> list[Path]:
    """The files fit would replace or delete in `run_dir` although fit did not write them:
    none in a gsae_pl run's folder, else every file with a name fit uses."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or is_fit_config(run_dir):
        return []
    names = [p for pattern in RUN_FILES if not pattern.startswith(".")
             for p in run_dir.glob(pattern)]
    names += [p for p in (run_dir / "checkpoints").glob("*.ckpt")]
    return sorted(names)


def check_own_folder(run_dir: Path) -> None:
    """Refuse a run folder where fit would replace or delete a file it did not write."""
    foreign = foreign_run_files(run_dir)
    config = Path(run_dir) / "config.yaml"
    if foreign and config in foreign:  # damaged, or not fit's: either way not fit's to replace
        raise UserError(f"{config} is not a config gsae_pl.fit wrote (damaged, or a file of "
                        "yours), so fit leaves this folder alone, --force included: restore "
                        "the file, delete the folder yourself, or set output.name to a new "
                        "folder")
    if foreign:
        raise UserError(f"{foreign[0]} was not written by gsae_pl.fit (its folder holds no "
                        "config.yaml of fit's), and fit would replace it: set output.name to "
                        "a new folder, or move the file away")


def remove_run_outputs(run_dir: Path) -> None:
    """`--force`: delete what an earlier run wrote here, and nothing else; then the
    checkpoints folder and the run folder themselves if that left them empty. metrics.json
    first: from then on the folder holds an unfinished run, whatever stops the deletion."""
    (run_dir / "metrics.json").unlink(missing_ok=True)
    checkpoints = run_dir / "checkpoints"
    for pattern in CHECKPOINT_FILES:
        for path in checkpoints.glob(pattern):
            path.unlink(missing_ok=True)
    # config.yaml last: it marks the folder as fit's (is_fit_config), so a deletion
    # stopped part-way leaves a folder the rerun still recognises.
    for pattern in (*RUN_FILES[1:], RUN_FILES[0]):
        for path in run_dir.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
    for folder in (checkpoints, run_dir / "inspect", run_dir):
        try:
            folder.rmdir()
        except OSError:
            pass  # absent, or it holds something the run did not write (or the run lock)
