"""Milestones: the whole held-out evaluation at the token counts `eval.at_tokens` names, each
kept, so that one run is its own learning curve (docs/method.md sec. 6).

A milestone is an ordinary held-out evaluation (Lightning's validation loop, so TensorBoard
gets `val/<metric>` at its step like any other) at a step Lightning's fixed interval
(`eval.every_n_steps`) may not reach: `Milestones` adds its steps to Lightning's decision
when to validate. After each, process 0 rewrites `milestones.json` in the run folder whole
(gsae_pl/io.py), sorted by step: `{"milestones": [{"step", "tokens", "tokens_asked",
<metric>: value, ...}, ...]}`, metrics under their metrics.json names. metrics.json stays
the final evaluation alone, flat numbers, as its readers expect; fit rewrites
milestones.json just before it, so a finished run's file is complete.

Resume. The milestones measured so far travel in every checkpoint (this callback's state),
so a run killed after a milestone and resumed keeps it; what the killed process measured
after its last checkpoint is measured again, on the same weights. One case needs more: a
checkpoint taken at a milestone's own step is saved before that step's evaluation
(Lightning saves at the step's end, then validates), and Lightning does not validate again
at the step it resumes from. So a run resumed at a milestone step it has no record of
evaluates first, before its next training step, where the uninterrupted run did.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L

from gsae_pl.eval.base import milestone_steps
from gsae_pl.io import atomic_write_json

MILESTONES_JSON = "milestones.json"


class Milestones(L.Callback):
    def __init__(self, cfg, run_dir: Path, read: Callable[[dict], dict[str, float]]):
        """`read`: Lightning's logged metrics -> the held-out metrics under their
        metrics.json names (run/train.py's `held_out`)."""
        self.asked = milestone_steps(cfg)  # step -> tokens asked for
        self.batch_size = cfg.data.batch_size
        self.path = Path(run_dir) / MILESTONES_JSON
        self.read = read
        self.done: dict[int, dict] = {}  # step -> its record

    # ---- when to evaluate --------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning validates every val_check_interval steps and offers no hook for other
        # steps: its own decision (called after each optimiser step, global_step already
        # counting it) is widened by the milestone steps. Not on the call that resumes a
        # run (loop.restarting), made before any step: on_train_batch_start handles that.
        loop = trainer.fit_loop.epoch_loop
        due = loop._should_check_val_fx

        def due_or_milestone(data_fetcher) -> bool:
            return due(data_fetcher) or (not loop.restarting and self.missing(trainer))

        loop._should_check_val_fx = due_or_milestone

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Resumed at a milestone step without its record (the module docstring): evaluate
        # now, before the next step trains, as Lightning does after a step (the loop's
        # on_advance_end). Lightning's restart bookkeeping ran already, in this advance.
        if self.missing(trainer):
            loop, connector = trainer.fit_loop.epoch_loop, trainer._logger_connector
            first, counted = connector._first_loop_iter, loop._batches_that_stepped
            # Logged at the x of the uninterrupted run's evaluation, which comes before the
            # loop counts the step for its loggers (restarting, Lightning counted it).
            loop._batches_that_stepped = trainer.global_step - 1
            trainer.validating = True
            loop.val_loop.run()
            trainer.training = True
            connector._first_loop_iter, loop._batches_that_stepped = first, counted

    def missing(self, trainer) -> bool:
        return trainer.global_step in self.asked and trainer.global_step not in self.done

    # ---- what to keep ------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        # Every evaluation at a milestone step counts, the final validation fit runs after
        # training included (a signal in the last step stops before its in-loop one).
        if trainer.sanity_checking or not self.missing(trainer):
            return
        step = trainer.global_step
        self.done[step] = {"step": step, "tokens": step * self.batch_size,
                           "tokens_asked": self.asked[step],
                           **self.read(trainer.callback_metrics)}
        if trainer.is_global_zero:
            self.write()

    def write(self) -> None:
        """milestones.json, whole, with every milestone measured so far (process 0 only)."""
        atomic_write_json(self.path, {"milestones": self.records()})

    def records(self) -> list[dict]:
        return [self.done[step] for step in sorted(self.done)]

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"milestones": self.records()}

    def load_state_dict(self, state: dict) -> None:
        self.done = {int(r["step"]): dict(r) for r in state.get("milestones", [])}
