"""Stop a run at the first NaN or Inf, in an incoming batch or in a loss term.

Finiteness is recorded ON DEVICE every step (a few elementwise ops, no `.item()`), and
read on the host only at log intervals, before every checkpoint save and at the end of
training. A per-step read would stall the GPU's queue once per step; at these intervals
the read is one small copy. On CPU a per-step read would be cheap, but one code path is
simpler to trust and to test. The cost of waiting: the steps between the fault and the
check run on NaN weights, which are thrown away: the check runs before `ModelCheckpoint`
(Lightning runs checkpoint callbacks last), so no checkpoint ever holds them and the last
good one is kept. The message names the FIRST bad step, so nothing is lost by waiting.

Under DDP each process records its own rows and terms; at a check the processes gather
their records (one small all-gather, only at check steps) so all of them stop together
with the same message, instead of the healthy ones hanging in the next gradient sync.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import lightning as L
import torch
from torch import Tensor

from gsae_pl.collectives import all_gather_stack
from gsae_pl.errors import RunFailed

_NONE = -1  # no fault recorded yet
_INPUT = -1  # `what` code for "an input row"; terms are 0, 1, ... in objective order


class NumericalFault(RunFailed):
    """A NaN or Inf stopped training; the message names the step and the term or row."""


class NonFiniteMonitor(L.Callback):
    def __init__(self, check_every: int, checkpoint_every: int):
        self.check_every, self.checkpoint_every = check_every, checkpoint_every
        self.record: Tensor | None = None  # [first bad step, what, row] on the device
        self.term_names: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.record = torch.full((3,), _NONE, dtype=torch.long, device=pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        bad_rows = ~torch.isfinite(batch).all(dim=1)
        first_row = bad_rows.int().argmax()  # 0 when none; only read when some row is bad
        self._note(bad_rows.any(), trainer.global_step, torch.full_like(first_row, _INPUT),
                   first_row)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        terms = outputs.get("terms", {}) if isinstance(outputs, dict) else {}
        if terms:
            self.term_names = list(terms)
            bad = ~torch.isfinite(torch.stack([t.detach().float() for t in terms.values()]))
            # global_step already counts this batch: its index is one less.
            self._note(bad.any(), trainer.global_step - 1, bad.int().argmax(),
                       torch.zeros_like(bad, dtype=torch.long)[0])
        step = trainer.global_step
        if (step % self.check_every == 0 or step % self.checkpoint_every == 0
                or step >= (trainer.max_steps if trainer.max_steps > 0 else step)):
            self.check(trainer)

    def _note(self, bad: Tensor, step: int, what: Tensor, row: Tensor) -> None:
        """Keep the first fault: write only while nothing has been recorded."""
        new = bad & (self.record[0] == _NONE)
        entry = torch.stack([torch.full_like(what, step), what, row]).to(self.record)
        self.record = torch.where(new, entry, self.record)

    def check(self, trainer) -> None:
        """Host read (and, under DDP, one all-gather): raise if any process saw a fault."""
        records = all_gather_stack(self.record).reshape(-1, 3).cpu()
        world = len(records)
        # Process `rank` holds rows rank::world of the global batch (data/base.py), so its
        # local row r is global row r * world + rank. Input faults sort before term faults
        # of the same step (the input came first), then by global row.
        faulty = [(int(s), int(w), int(r) * world + rank) for rank, (s, w, r)
                  in enumerate(records) if s != _NONE]
        if not faulty:
            return
        step, what, row = min(faulty)
        if what == _INPUT:
            where = f"incoming activations (batch row {row})"
        else:
            name = self.term_names[what] if what < len(self.term_names) else f"#{what}"
            where = f"loss term {name!r}"
        raise NumericalFault(
            f"NaN or Inf in {where} at step {step}: training stopped and the last good "
            "checkpoint kept; check the data, lower optim.lr or set trainer.gradient_clip_val, "
            "then rerun (it resumes from that checkpoint) or pass --force")

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer)


def check_final_metrics(metrics: dict) -> None:
    """A metric that came out NaN or Inf is not a result: refuse to write metrics.json."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise RunFailed(f"final metrics {', '.join(bad)} are NaN or Inf: no metrics.json was "
                        "written; inspect the last checkpoint, or rerun with --force")


@contextmanager
def ends_other_processes_on_error(trainer):
    """If process 0 fails, kill the processes it launched, which would otherwise wait in a
    collective until gloo's 30-minute timeout. (A failing child is Lightning's business:
    its process observer then kills every process within about 5 s.)"""
    try:
        yield
    except BaseException:
        for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
            if proc.poll() is None:
                proc.kill()
        raise
