"""Weights & Biases beside TensorBoard, a switch: `log.wandb: off | offline | online`.

offline writes the W&B run under the run directory (`<run>/wandb/offline-run-*`) with no
network (upload it later with `wandb sync`); online streams it to the project
`log.wandb_project`. wandb is an optional dependency (`pip install wandb`, or
`pip install gsae_pl[wandb]`): imported only when the switch is on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from gsae_pl.errors import UserError


def wandb_logger(cfg, run_dir: Path):
    """Lightning's WandbLogger for this run, or None when `log.wandb` is off."""
    mode = cfg.log.wandb
    if mode == "off":
        return None
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"log.wandb={mode} needs the wandb package: pip install wandb "
                        "(or set log.wandb=off)")
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")  # its banner: fit prints where it went
    # Decision: no fixed W&B id, so a resumed or --force run is a new W&B run of the same
    # name (a reused id would append to an old history whose steps run past this one's).
    # Created lazily by Lightning at the fit's start, after config.yaml: nothing written now.
    return WandbLogger(name=run_dir.name, project=cfg.log.wandb_project,
                       save_dir=str(run_dir), mode=mode, group=cfg.output.variant)


def wandb_where(logger) -> str:
    """One line: where this W&B run went (offline: the folder to `wandb sync`)."""
    run = logger.experiment
    if getattr(run, "offline", False) or getattr(getattr(run, "settings", None), "mode",
                                                  None) == "offline":
        return f"wandb sync {Path(run.dir).parent}   # upload the offline W&B run"
    return f"W&B run: {run.url}"
