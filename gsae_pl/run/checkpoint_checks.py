"""What a checkpoint must hold before fit resumes from it or export reads it.

Lightning loads a checkpoint's weights into the module (a shape or key mismatch is a
traceback) and its Adam moments into the optimiser without looking at them: moments
smaller than their parameters make fused Adam read past their end (a segfault), larger
ones train on silently. Checkpoints are files researchers exchange, so each is checked
against the model its run's config builds, before anything is written: the same keys,
each tensor its parameter's shape, floating where the parameter is floating. The width
may differ (Lightning copies into the parameter's dtype; a run may resume under another
trainer.precision), an integer tensor may not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gsae_pl.errors import UserError
from gsae_pl.run.checkpointing import DamagedCheckpoint, load_checkpoint

# What Lightning's resume reads from a checkpoint, beyond the step and the config.
RESUME_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch")
_RESUME_ADVICE = ("delete it to resume from an older checkpoint, or pass --force to start "
                  "afresh")


def check_resumable(path: Path, module) -> None:
    """UserError naming `path` unless fit can resume `module` (an SAEModule) from it."""
    try:
        state = load_checkpoint(path)
    except DamagedCheckpoint as err:
        raise UserError(f"cannot resume from {path} ({err.reason}): {_RESUME_ADVICE}") from None
    optimizer = module.configure_optimizers()["optimizer"]  # holds no state until a step
    names = {id(p): name for name, p in module.named_parameters()}
    problem = (missing_keys(state, RESUME_KEYS)
               or weights_problem(state["state_dict"], module.state_dict())
               or optimizer_problem(state["optimizer_states"], [optimizer], names))
    if problem:
        raise UserError(f"cannot resume from {path} ({problem}): it was written for another "
                        f"model or is damaged; {_RESUME_ADVICE}")


def export_problem(state: dict) -> str | None:
    """Why a checkpoint's weights are not those of the SAE its own config builds, or None."""
    from gsae_pl.run.module import SAEModule  # the model: imported where it is needed

    missing = missing_keys(state, ("state_dict",))
    if missing:
        return missing
    hyper = state["hyper_parameters"]
    try:
        with torch.device("meta"):  # shapes and dtypes only: nothing allocated
            expected = SAEModule(hyper["cfg"], hyper["d_in"]).state_dict()
    except Exception as err:  # a config no gsae_pl version wrote: say so, no traceback
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"its config builds no SAE: {reason}"
    return weights_problem(state["state_dict"], expected)


def missing_keys(state: dict, keys: tuple[str, ...]) -> str | None:
    missing = [key for key in keys if key not in state]
    return f"it lacks {', '.join(missing)}" if missing else None


def weights_problem(found, expected: dict[str, Tensor]) -> str | None:
    """The first difference between a saved state dict and the model's, or None."""
    if not isinstance(found, dict) or not all(isinstance(v, Tensor) for v in found.values()):
        return "its state_dict is not a mapping of tensors"
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        return (f"its weights do not match the model (missing: {', '.join(missing) or 'none'}; "
                f"unexpected: {', '.join(extra) or 'none'})")
    for name, want in expected.items():
        problem = tensor_problem(name, found[name], want)
        if problem:
            return problem
    return None


def tensor_problem(name: str, found: Tensor, want: Tensor) -> str | None:
    if found.shape != want.shape:
        return f"{name} has shape {list(found.shape)}, the model's is {list(want.shape)}"
    if found.dtype.is_floating_point != want.dtype.is_floating_point or found.is_complex():
        return f"{name} is {str(found.dtype).removeprefix('torch.')}, the model's is " \
               f"{str(want.dtype).removeprefix('torch.')}"
    return None


def optimizer_problem(found, optimizers: list[torch.optim.Optimizer],
                      names: dict[int, str]) -> str | None:
    """The first way saved optimiser states do not fit `optimizers`' parameters, or None:
    the groups and their sizes (torch checks those too, with a traceback), and every
    per-parameter state tensor (moments) the shape of its parameter (torch does not)."""
    if not isinstance(found, list) or len(found) != len(optimizers):
        return f"optimizer_states holds no state for the model's {len(optimizers)} optimiser(s)"
    for saved, optimizer in zip(found, optimizers):
        groups, state = saved.get("param_groups"), saved.get("state")
        if not isinstance(groups, list) or not isinstance(state, dict) or \
                len(groups) != len(optimizer.param_groups):
            return "optimizer_states does not hold the model's parameter groups"
        params = {}
        for k, (group, ours) in enumerate(zip(groups, optimizer.param_groups)):
            ids = group.get("params") if isinstance(group, dict) else None
            if not isinstance(ids, list) or len(ids) != len(ours["params"]):
                return (f"optimizer_states holds {len(ids or [])} parameters in parameter "
                        f"group {k}, the model trains {len(ours['params'])}")
            params.update(zip(ids, ours["params"]))
        for index, values in state.items():
            if index not in params or not isinstance(values, dict):
                return f"optimizer_states holds state for an unknown parameter {index!r}"
            param = params[index]
            for key, value in values.items():
                if isinstance(value, Tensor) and value.dim() > 0:  # 0-dim: Adam's step
                    problem = tensor_problem(f"optimizer state {key} of "
                                             f"{names.get(id(param), index)}", value, param)
                    if problem:
                        return problem
    return None
