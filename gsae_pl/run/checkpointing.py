"""Checkpoints that survive a SIGKILL, and resuming from them.

A checkpoint is written whole to a temporary name, flushed to disk and renamed, so a kill
mid-save leaves the previous checkpoint intact and never a truncated one. Lightning's
checkpoint restores the SAE (with its `norm_scale` buffer), Adam, the lr schedule and the
step counter; the data position follows from the step (sources are pure functions of
(seed, step), data/base.py); `RNGState` adds the host random generators, which Lightning
does not save. Only process 0 writes (Lightning's `strategy.save_checkpoint`).

Checkpoints are files researchers exchange, so every read is `weights_only`: tensors and
plain values, never a pickled object that could run code (a checkpoint gsae_pl writes
holds none). gsae_pl/run/checkpoint_checks.py checks what one holds against the run.
"""

from __future__ import annotations

import copy
import os
import pickle
import random
import re
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from gsae_pl.config import migrate
from gsae_pl.errors import UserError
from gsae_pl.io import atomic_write, sweep_stale_temporaries
from gsae_pl.run.run_dir import suggested_name

# Resuming reuses the checkpoint directory on purpose; Lightning would warn about it.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

# Sections that define what a run computes: a rerun that changes one of them is another
# run, not a resume. Trainer, logging, checkpoint and output settings may change.
RUN_DEFINING = ("seed", "sae", "loss", "data", "optim", "resample", "eval")
# Of the trainer settings, those that change what a run learns.
TRAINING_KEYS = ("trainer.max_steps", "trainer.precision", "trainer.gradient_clip_val")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.<name>.tmp<pid>` beside the target, fsync, then rename over it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))
        _fsync_dir(path.parent)  # make the rename itself durable

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Lightning's reads (resume, the final validation) never unpickle code, whatever
        its default: fit has checked the file already (checkpoint_checks.check_resumable)."""
        return super().load_checkpoint(path, map_location=lambda storage, loc: storage,
                                       weights_only=True)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves `last.ckpt` when training ends between intervals
    (Lightning's own end-of-training save is skipped once any checkpoint was written) and
    when a signal stops it (gsae_pl/run/preemption.py)."""

    save_at_step_end = False  # set by Preemption: a signal asked to stop after this step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.save_at_step_end:  # Lightning runs checkpoint callbacks' hooks last
            self.save_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_now(trainer)

    def save_now(self, trainer) -> None:
        """`last.ckpt` at the current step, unless one was saved at this step already.
        Every process calls it (the save is collective under DDP); process 0 writes."""
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RNGState(L.Callback):
    """Saves and restores the host generators (torch CPU, CUDA, Python, NumPy) of process 0.

    Training draws no random numbers today (data streams carry their own generators), so
    this is insurance for terms and sources that will: a resumed run then continues the
    same random sequence. Under DDP every process restores process 0's state.
    """

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                           cached)}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step, `last.ckpt` on a tie; None if there is none.

    `last.ckpt` is rewritten right after each `step<N>.ckpt`, so a kill between the two
    leaves `step<N>.ckpt` the newer one.
    """
    ckpts = checkpoint_dir(run_dir)
    found = [(int(m.group(1)), 0, p) for p in ckpts.glob("step*.ckpt")
             if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name))]
    if (ckpts / "last.ckpt").is_file():
        found.append((checkpoint_step(ckpts / "last.ckpt"), 1, ckpts / "last.ckpt"))
    return max(found)[2] if found else None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the half-written `.<name>.tmp<pid>` files of a killed save (never read):
    checkpoints, and metrics.json or config.yaml (io.atomic_write) in the run directory."""
    for folder in (Path(run_dir), checkpoint_dir(run_dir)):
        sweep_stale_temporaries(folder)


class DamagedCheckpoint(Exception):
    """A checkpoint file that cannot be read; `reason` is the first line of why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


NOT_WEIGHTS = ("it holds Python objects other than tensors and plain values, which a "
               "checkpoint gsae_pl writes never does, so it was not loaded (unpickling it "
               "could run code)")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, weights_only: tensors and plain values, no code run.
    Raises DamagedCheckpoint for a file that is unreadable, not weights-only, or lacks the
    step or the config that trained it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise DamagedCheckpoint(NOT_WEIGHTS) from None
    except Exception as err:
        raise DamagedCheckpoint((str(err).strip().splitlines() or [type(err).__name__])[0]) \
            from None
    hyper = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not isinstance(hyper, dict) or not isinstance(state.get("global_step"), int) or \
            not isinstance(hyper.get("cfg"), dict) or not isinstance(hyper.get("d_in"), int):
        raise DamagedCheckpoint("it lacks the step (global_step) or the config that trained "
                                "it (hyper_parameters)")
    return state


def read_checkpoint(path: Path) -> tuple[int, dict, dict | None]:
    """(optimiser step, the config that trained it, the module's state dict): the one
    reader of checkpoints (fit's resume, export). The config is as saved: `changed_keys`
    and `config.from_saved` bring an older one's keys up to date.

    A damaged file raises DamagedCheckpoint (atomic saves make one unlikely, not impossible:
    disks fail; nor is every checkpoint one gsae_pl wrote); each caller words its own advice.
    """
    state = load_checkpoint(path)
    return state["global_step"], dict(state["hyper_parameters"]["cfg"]), state.get("state_dict")


def checkpoint_meta(path: Path) -> tuple[int, dict]:
    """The optimiser step a checkpoint was taken at and the config that trained it.

    A damaged file is a UserError with fit's advice.
    """
    try:
        step, cfg, _ = read_checkpoint(path)
    except DamagedCheckpoint as err:
        raise UserError(f"cannot resume from {path} ({err.reason}): delete it to resume from an "
                        "older checkpoint, or pass --force to start afresh") from None
    return step, cfg


def checkpoint_step(path: Path) -> int:
    return checkpoint_meta(path)[0]


def check_same_run(checkpoint: Path, cfg: DictConfig) -> None:
    """Refuse to resume from a checkpoint that a different config trained."""
    changed = changed_keys(checkpoint_meta(checkpoint)[1], cfg)
    if changed:
        shown = shown_keys(changed)
        run_dir = checkpoint.parent.parent
        other = suggested_name(run_dir, {k: OmegaConf.select(cfg, k) for k in changed})
        raise UserError(f"{run_dir} holds an unfinished run with a different config ({shown}): "
                        "rerun with its config to resume, pass --force to start afresh, or "
                        f"set output.name={other} to start another run")


def finished_run_changes(run_dir: Path, cfg: DictConfig) -> list[str]:
    """The keys in which `cfg` would train differently from the finished run in `run_dir`
    (its config.yaml): the run-defining sections and the trainer settings that change what
    a run learns. Devices and strategy do not: DDP follows the 1-process trajectory."""
    path = Path(run_dir) / "config.yaml"
    saved = saved_run_config(path) if path.is_file() else {}
    changed = changed_keys(saved, cfg, RUN_DEFINING + ("trainer",))
    return [k for k in changed if not k.startswith("trainer.") or k in TRAINING_KEYS]


def saved_run_config(path: Path) -> dict:
    """A finished run's config.yaml; one that does not parse to a mapping is a UserError:
    without it nobody can tell whether the run is the one asked for."""
    try:
        saved = yaml.safe_load(path.read_text())
        reason = None if isinstance(saved, dict) or saved is None else "not a mapping"
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if reason:
        raise UserError(f"{path} is damaged ({reason}): it records the finished run's config; "
                        "restore it, or delete the run to train it again (fit: pass --force)")
    return saved or {}


def shown_keys(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


def changed_keys(saved: dict, cfg: DictConfig, sections=RUN_DEFINING) -> list[str]:
    """Dotted keys under `sections` whose value in `cfg` differs from the `saved` config
    (whose renamed keys are read at their new place: config.ALIASES)."""
    saved = migrate(copy.deepcopy(saved), "the saved run config")
    now = OmegaConf.to_container(cfg, resolve=True)
    return [key for section in sections
            for key in _diff(saved.get(section, _ABSENT), now.get(section), section)]


_ABSENT = object()  # a key the older config did not have yet: not a change


def _diff(old, new, prefix: str) -> list[str]:
    if old is _ABSENT:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        if old.get("enabled") is False and new.get("enabled") is False:
            return []  # a switched-off block's settings do not change the run
        keys = sorted(set(old) | set(new))
        return [k for key in keys
                for k in _diff(old.get(key, _ABSENT), new.get(key), f"{prefix}.{key}")]
    return [] if old == new else [prefix]
