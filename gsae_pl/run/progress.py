"""What a run prints while it trains: a progress bar in a terminal, plain lines elsewhere.

- In a terminal (stderr is a TTY, where the bar is drawn) and with
  trainer.enable_progress_bar on: one bar over the GLOBAL step
  out of trainer.max_steps (a resumed run starts at its checkpoint's step), with the ETA,
  tokens/s, and the latest training loss, L0, FVU and dead fraction.
- Where stdout is not a terminal (`fit > log`, nohup, SLURM, the suite's per-run logs),
  or where there is no bar: one plain line every log.progress_every_n_steps steps with
  the same numbers.
- Either way one line per held-out evaluation and per resample (`announce`).
Process 0 prints. The bar replaces Lightning's, which `fit` turns off (its `Epoch 0/-2`
counts epochs of an endless one, and per process, from 0 after a resume).

The numbers are the ones TensorBoard gets (RunLogger.latest, gsae_pl/run/tensorboard.py):
reading them costs no device sync. A token is one SAE row (an LM source's token, a
synthetic source's row). Each dead fraction states its window (`dead_windows`).
"""

from __future__ import annotations

import sys
import time

import lightning as L
from tqdm import tqdm

# Held-out metrics in the order the eval line shows them; any other follows, by name.
EVAL_ORDER = ("l0", "fvu", "gamma", "norm_ratio", "dead_fraction", "loss_recovered",
              "delta_lm_loss", "mmcs", "fraction_recovered")
SHOWN_NAME = {"l0": "L0", "fvu": "FVU", "dead_fraction": "dead", "mse": "MSE"}


def dead_windows(cfg) -> dict[str, int]:
    """Tokens behind each dead fraction: held-out (val/), the training window (train/,
    every log.histogram_every_n_steps steps) and the resampler's window (resample/)."""
    batch = cfg.data.batch_size  # the global batch: every process's rows
    return {"val": cfg.eval.rows, "train": cfg.log.histogram_every_n_steps * batch,
            "resample": cfg.resample.window_steps * batch}


def tokens(n: float) -> str:
    """12345 -> '12.3k', 2.5e6 -> '2.50M': short counts for progress lines."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


def _number(value: float) -> str:
    return f"{value:.4g}"


def announce(trainer, line: str) -> None:
    """One event line (a resample, say) from process 0, through the progress callback so a
    terminal's bar is not broken; printed plainly by a trainer without one."""
    progress = next((c for c in trainer.callbacks if isinstance(c, Progress)), None)
    if progress is not None:
        progress.print(line)
    elif trainer.is_global_zero:
        print(line, flush=True)


class Progress(L.Callback):
    def __init__(self, cfg):
        self.cfg = cfg
        self.every = cfg.log.progress_every_n_steps
        self.windows = dead_windows(cfg)
        self.bar_allowed = cfg.trainer.enable_progress_bar
        self.enabled = True
        self.bar: tqdm | None = None
        self.mark: tuple[int, float] | None = None  # (step, time) of the last line or start
        self.reported = 0  # the last step reported

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.enabled = trainer.is_global_zero  # one process speaks

    def print(self, *args, **kwargs) -> None:
        if not self.enabled:
            return
        if self.bar is not None:  # above the bar, which redraws below
            self.bar.write(" ".join(map(str, args)), file=sys.stdout)
        else:
            print(*args, **kwargs, flush=True)

    # ---- training ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        self.mark = (trainer.global_step, time.perf_counter())
        self.reported = trainer.global_step  # a resumed run: its steps so far are done
        if self.bar_allowed and sys.stderr.isatty():
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="step",
                            file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                            # a short bar leaves the line to the numbers; tqdm puts
                            # ", " before the postfix
                            bar_format="{desc} {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar:20}| "
                                       "[{elapsed}<{remaining}{postfix}]")

    # Lightning runs callbacks' on_train_batch_end before the module's, which logs the
    # step's numbers: a step is reported at the next hook, once they are in.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.report(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.report(trainer)  # the step's line before its evaluation's

    def on_train_end(self, trainer, pl_module) -> None:
        self.report(trainer)
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def report(self, trainer) -> None:
        """The bar's numbers, and a line when one is due, for the step just trained."""
        step = trainer.global_step
        if not self.enabled or self.mark is None or step <= self.reported:
            return
        self.reported = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % self.cfg.log.every_n_steps == 0:  # when the numbers are new
                self.bar.set_postfix_str(self.fields(trainer, step, eta=False), refresh=False)
        lines = self.bar is None or not sys.stdout.isatty()  # no bar, or not where it draws
        if lines and (step % self.every == 0 or step == trainer.max_steps):
            print(self.line(trainer, step), flush=True)
        if step % self.every == 0:
            self.mark = (step, time.perf_counter())

    def line(self, trainer, step: int) -> str:
        done = 100 * step / trainer.max_steps
        return f"step {step}/{trainer.max_steps} ({done:.0f}%) | " + \
            self.fields(trainer, step, eta=True)

    def fields(self, trainer, step: int, eta: bool) -> str:
        """tokens/s [| ETA] | loss | L0 | FVU | dead, those the run has logged so far."""
        since, began = self.mark
        seconds = time.perf_counter() - began
        rate = (step - since) / seconds if seconds > 0 and step > since else None
        parts = [f"{tokens(rate * self.cfg.data.batch_size)} tok/s" if rate else "- tok/s"]
        if eta:
            left = trainer.max_steps - step
            parts.append(f"ETA {duration(left / rate)}" if rate else "ETA -")
        latest = getattr(trainer.logger, "latest", {})
        for tag, name in (("loss/total", "loss"), ("train/l0", "L0"), ("train/fvu", "FVU")):
            if tag in latest:
                parts.append(f"{name} {_number(latest[tag])}")
        if "train/dead_fraction" in latest:
            parts.append(f"dead {latest['train/dead_fraction']:.3f} "
                         f"(last {tokens(self.windows['train'])} tokens)")
        return " | ".join(parts)

    # ---- held-out evaluations ----------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        found = {key.removeprefix("val/"): float(value)
                 for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        if found:
            self.print(f"eval at step {trainer.global_step}: {self.eval_fields(found)}")

    def eval_fields(self, found: dict[str, float]) -> str:
        names = [n for n in EVAL_ORDER if n in found] + sorted(set(found) - set(EVAL_ORDER))
        parts = []
        for name in names:
            text = f"{SHOWN_NAME.get(name, name)} {_number(found[name])}"
            if name == "dead_fraction":
                text += f" (of {tokens(self.windows['val'])} held-out tokens)"
            parts.append(text)
        return " | ".join(parts)
