"""Train one SAE: `python -m gsae_pl.fit --config FILE [FILE ...] [key=value ...]`.

Order matters for "nothing half-written": config, data and trainer settings are validated
before the run directory `<output.dir>/<output.name>/` is created; `metrics.json` is written
last, by process 0, atomically, so its presence means the run finished. Rerunning the same
command on a directory with checkpoints but no metrics.json resumes from the newest
checkpoint (gsae_pl/run/checkpointing.py); a NaN or Inf stops the run (gsae_pl/run/faults.py); a
SIGTERM, or SLURM's requeue signal, stops it with a checkpoint (gsae_pl/run/preemption.py).
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from gsae_pl.commands import python_m, run_tool
from gsae_pl.config import load_config, to_yaml
from gsae_pl.errors import UserError
from gsae_pl.eval import document_stats
from gsae_pl.io import atomic_write, atomic_write_json, atomic_write_text
from gsae_pl.names import check_name, fitting_name
from gsae_pl.run import provenance
from gsae_pl.run.checkpoint_checks import check_resumable
from gsae_pl.run.checkpointing import (
    AtomicCheckpointIO,
    RNGState,
    StepCheckpoint,
    check_same_run,
    checkpoint_step,
    finished_run_changes,
    latest_checkpoint,
    remove_stale_temporaries,
    shown_keys,
)
from gsae_pl.run.closed_stdout import quiet_when_stdout_closes
from gsae_pl.run.datamodule import SAEDataModule
from gsae_pl.run.faults import NonFiniteMonitor, check_final_metrics, ends_other_processes_on_error
from gsae_pl.run.inputs import check_inputs, record_inputs
from gsae_pl.run.lock import RUN_LOCK, FolderLock, takes_run_lock
from gsae_pl.run.memory import check_run_fits
from gsae_pl.run.milestones import MILESTONES_JSON, Milestones
from gsae_pl.run.module import SAEModule
from gsae_pl.run.preemption import Preemption, raise_if_preempted, sigterm_as_preempted
from gsae_pl.run.progress import Progress, dead_windows
from gsae_pl.run.quiet import silence_startup_noise
from gsae_pl.run.run_dir import (
    RUN_HEADER,
    check_own_folder,
    remove_run_outputs,
    suggested_name,
)
from gsae_pl.run.tensorboard import Coefficients, RunLogger, RunSummaries, write_end
from gsae_pl.run.wandb_logger import wandb_logger, wandb_where

# metrics.json keeps the names its readers (reports, plots, --verify, results.csv) know:
# the metric TensorBoard and the progress lines call gamma is stored under its long name.
METRICS_JSON_NAMES = {"gamma": "relative_reconstruction_bias"}
DEAD_WARNING = 0.5  # the summary warns when more than this share of features ended dead



def run_dir_of(cfg: DictConfig) -> Path:
    # load_config checks the name too; a config built another way must not escape output.dir
    check_name(cfg.output.name, "output.name=")
    return Path(cfg.output.dir) / cfg.output.name


class EvaluatedStep(L.Callback):
    """The step of the latest held-out evaluation in this process (-1: none yet), so that
    `fit` knows whether Lightning's logged metrics already score the final weights."""

    step = -1

    def on_validation_start(self, trainer, pl_module) -> None:
        # Lightning keeps every key ever logged in callback_metrics: drop the previous
        # evaluation's, so a metric this one does not yield cannot pass for its own.
        for key in [k for k in trainer.callback_metrics if k.startswith("val/")]:
            del trainer.callback_metrics[key]

    def on_validation_end(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def held_out(logged) -> dict[str, float]:
    """The held-out metrics among Lightning's logged ones, under their metrics.json names:
    `val/<name>` -> name (METRICS_JSON_NAMES.get(name, name))."""
    found = {key.removeprefix("val/"): float(value) for key, value in logged.items()
             if key.startswith("val/")}
    return {METRICS_JSON_NAMES.get(name, name): value for name, value in found.items()}


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    silence_startup_noise()  # before Lightning's constructor prints its device census
    logger = RunLogger(save_dir=str(run_dir.parent), name=run_dir.name, version="",
                       default_hp_metric=False)
    loggers = [logger, *filter(None, [wandb_logger(cfg, run_dir)])]
    # monitor="step", mode="max" keeps the newest `keep` checkpoints; "last.ckpt" as well.
    checkpoints = StepCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step}",
                                 auto_insert_metric_name=False, monitor="step", mode="max",
                                 save_top_k=cfg.checkpoint.keep, save_last=True,
                                 every_n_train_steps=cfg.checkpoint.every_n_steps)
    monitor = NonFiniteMonitor(cfg.log.every_n_steps, cfg.checkpoint.every_n_steps)
    preemption = Preemption(checkpoints, monitor, agree_every=cfg.log.every_n_steps)
    # eval.at_tokens: evaluations at those token counts, kept (gsae_pl/run/milestones.py)
    milestones = [Milestones(cfg, run_dir, held_out)] if cfg.eval.at_tokens else []
    # Lightning's SLURM auto-requeue would save hpc_ckpt_N.ckpt from its signal handler into
    # default_root_dir, which any later fit/validate under SLURM loads: Preemption requeues.
    slurm = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    try:
        return L.Trainer(
            # gsae_pl's progress bar and lines (gsae_pl/run/progress.py) replace Lightning's
            **{**OmegaConf.to_container(cfg.trainer), "enable_progress_bar": False},
            default_root_dir=run_dir,  # not the cwd, which a suite's runs share
            logger=loggers,
            callbacks=[checkpoints, monitor, RNGState(), preemption, EvaluatedStep(), Progress(cfg),
                       RunSummaries(cfg, to_yaml(cfg)), Coefficients(cfg.log.every_n_steps),
                       *milestones],
            plugins=[AtomicCheckpointIO(), *slurm],
            val_check_interval=min(cfg.eval.every_n_steps, cfg.trainer.max_steps),
            check_val_every_n_epoch=None,
            log_every_n_steps=cfg.log.every_n_steps,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,  # the DataModule shards rows itself (data/base.py)
            enable_model_summary=False,
        )
    except (ValueError, TypeError, MisconfigurationException, RuntimeError) as err:
        # e.g. an unknown strategy or precision, or accelerator=gpu on a machine without one
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"lightning refused the trainer settings: {reason}") from None


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a world the launcher cannot provide, before anything is written.

    Lightning itself checks torchrun's and SLURM's world against num_nodes x devices, but
    only at launch, after config.yaml exists; and a plain process with num_nodes > 1 (no
    launcher, no NODE_RANK) would wait for nodes nobody starts until the 30-minute
    process-group timeout. docs/scaling.md has the launch commands.
    """
    env = getattr(trainer.strategy, "cluster_environment", None)
    nodes, devices = trainer.num_nodes, trainer.num_devices
    if env is not None and env.creates_processes_externally:
        try:
            env.validate_settings(num_devices=devices, num_nodes=nodes)
        except ValueError as err:
            raise UserError(f"the launcher's world does not match the config: {err} Set "
                            "trainer.num_nodes and trainer.devices to its nodes and "
                            "processes per node") from None
    elif nodes > 1 and not {"NODE_RANK", "MASTER_ADDR"} <= os.environ.keys():
        raise UserError(f"trainer.num_nodes={nodes}, but no launcher started this process: "
                        "run the command on every node under torchrun or SLURM (or with "
                        "MASTER_ADDR, MASTER_PORT and NODE_RANK set), see docs/scaling.md")


def fit(cfg: DictConfig, fresh: bool = False, resume_from: Path | None = None) -> dict:
    """Train, evaluate on held-out rows, write metrics.json; returns the final metrics.

    `fresh` first deletes what an earlier run left in the run directory, so no stale
    metrics.json, checkpoint or event file can be mistaken for this run's. `resume_from`
    continues from that checkpoint instead of step 0.
    """
    run_dir = run_dir_of(cfg)
    datamodule = SAEDataModule(cfg)  # refuses bad data before anything is written
    if resume_from:
        check_inputs(run_dir, datamodule.source)  # the data the run started on (run/inputs.py)
    trainer = build_trainer(cfg, run_dir)  # refuses bad trainer settings, writes nothing
    check_launch(trainer)
    datamodule.check_world(trainer.world_size)
    check_run_fits(cfg, datamodule.d_in, trainer)  # before the SAE is built (gsae_pl/run/memory.py)
    if fresh and run_dir.exists() and trainer.is_global_zero:
        remove_run_outputs(run_dir)  # only what a run wrote: a user's own files stay
    L.seed_everything(cfg.seed, verbose=False)
    module = SAEModule(OmegaConf.to_container(cfg), datamodule.d_in, datamodule.source)
    # On resume the checkpoint overwrites norm_scale and b_dec with the run's own values.
    module.prepare_from_sample(datamodule.sample_rows(cfg.data.normalize_rows))
    if resume_from:  # Lightning would load any shapes into the model and Adam unchecked
        check_resumable(resume_from, module)
    if trainer.is_global_zero:
        remove_stale_temporaries(run_dir)  # what a killed process was writing, if any
        atomic_write_text(run_dir / "config.yaml", RUN_HEADER + to_yaml(cfg))
        if not resume_from:  # an earlier attempt's, killed before its first checkpoint
            (run_dir / MILESTONES_JSON).unlink(missing_ok=True)
        record_inputs(run_dir, datamodule.source, resuming=resume_from is not None)
        if resume_from:
            print(f"resuming {run_dir} from step {checkpoint_step(resume_from)} "
                  f"({resume_from.relative_to(run_dir)})", flush=True)
        else:
            print(f"run directory: {run_dir}", flush=True)
        print(f"watch it: {run_tool('tensorboard', '--logdir', run_dir.parent)}", flush=True)
    start = time.perf_counter()
    with sigterm_as_preempted(trainer), ends_other_processes_on_error(trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    raise_if_preempted(trainer)  # a signal in the last step: saved, no evaluation
    seconds = time.perf_counter() - start
    metrics = final_evaluation(trainer, module, datamodule, run_dir)
    metrics.update(steps=trainer.global_step, seconds=round(seconds, 2),
                   tokens=trainer.global_step * cfg.data.batch_size,  # the global batch
                   norm_scale=float(module.norm_scale),
                   median_norm=module.median_norm)  # data/outliers.py
    check_final_metrics(metrics)
    if trainer.is_global_zero:
        # What made these numbers (commit, versions, data, device), beside metrics.json and
        # before it, so a finished run always has one (gsae_pl/run/provenance.py).
        atomic_write_json(run_dir / "provenance.json",
                          provenance.collect(datamodule.source, trainer.strategy.root_device))
        write_document_stats(run_dir, module)
        for milestones in (c for c in trainer.callbacks if isinstance(c, Milestones)):
            milestones.write()  # complete before metrics.json marks the run finished
        atomic_write_json(run_dir / "metrics.json", metrics)
        write_end(trainer.logger, trainer.global_step)  # the HParams session: finished
        print(summary_table(run_dir, metrics))
        train_dead = getattr(trainer.logger, "latest", {}).get("train/dead_fraction")
        print(closing_lines(cfg, run_dir, metrics, trainer.loggers[1:], train_dead), flush=True)
    leave_process_group()
    return metrics


def final_evaluation(trainer: L.Trainer, module: SAEModule, datamodule: SAEDataModule,
                     run_dir: Path) -> dict[str, float]:
    """The held-out metrics of the final weights, as Lightning returns them: those training
    logged if its last evaluation was at the final step, else a validation run now."""
    evaluated = next(c for c in trainer.callbacks if isinstance(c, EvaluatedStep))
    if evaluated.step == trainer.global_step:
        return held_out(trainer.callback_metrics)
    # last.ckpt holds the final weights (StepCheckpoint); with no path, Lightning under
    # SLURM would load an hpc_ckpt_N.ckpt if one lay in default_root_dir.
    with sigterm_as_preempted(trainer):
        results = trainer.validate(module, datamodule=datamodule, verbose=False,
                                   ckpt_path=latest_checkpoint(run_dir))
    return held_out(results[0])


def write_document_stats(run_dir: Path, module: SAEModule) -> None:
    """heldout_documents.npz: the final evaluation's per-document sums, every evaluator's
    table merged by document id (gsae_pl/eval/document_stats.py), before metrics.json."""
    tables = [evaluator.document_table() for evaluator in module.evaluators.values()]
    if any(tables):
        table = document_stats.merge(*tables)
        atomic_write(run_dir / document_stats.FILE,
                     lambda fh: fh.write(document_stats.to_bytes(table)))


def leave_process_group() -> None:
    """DDP: every process leaves together, once rank 0 has written metrics.json. Left to
    interpreter exit, a process whose peer had already gone could abort in gloo's teardown
    ("terminate called without an active exception", exit -6; seen with two torchrun
    nodes on loopback, in about one multi-node suite in four)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def closing_lines(cfg: DictConfig, run_dir: Path, metrics: dict, others=(),
                  train_dead: float | None = None) -> str:
    """A warning when most features ended dead, then what to run next (commands that run
    as printed in a fresh shell: gsae_pl/commands.py)."""
    lines = []
    dead = metrics.get("dead_fraction")
    if dead is not None and dead > DEAD_WARNING:
        lines.append(dead_warning(cfg, dead, train_dead))
    export_to = run_dir.parent / fitting_name(run_dir.name, "_saelens")
    lines += ["next steps:",
              f"  {run_tool('tensorboard', '--logdir', run_dir.parent)}"
              "   # curves; HParams tab: compare runs",
              f"  {python_m('gsae_pl.export', run_dir, export_to)}   # SAELens format"]
    lines += [f"  {wandb_where(logger)}" for logger in others]
    return "\n".join(lines)


def dead_warning(cfg: DictConfig, dead: float, train_dead: float | None) -> str:
    """What the held-out dead fraction measured, beside training's own window, and only
    advice that would help: a feature that fired in training's window but on none of the
    held-out tokens is rare, not dead (a longer eval window counts it); resampling is
    advised only where it is off."""
    windows = dead_windows(cfg)
    text = (f"warning: {dead:.0%} of the {cfg.sae.d_sae} features fired on none of the "
            f"{windows['val']:,} held-out tokens (eval.rows)")
    if train_dead is not None:
        text += (f"; over the last {windows['train']:,} training tokens {train_dead:.0%} "
                 "were dead")
    resampling = (f"resampling was on ({cfg.resample.max_resamples} resamples every "
                  f"{cfg.resample.every_n_steps} steps)" if cfg.resample.enabled
                  else "resampling was off")
    if train_dead is not None and train_dead <= DEAD_WARNING:
        return (f"{text}: most of them are rare, not dead; a larger eval.rows counts them "
                f"({resampling})")
    advice = ("a smaller loss.sparsity.coefficient or more trainer.max_steps"
              if cfg.resample.enabled else
              "resample.enabled=true, a smaller loss.sparsity.coefficient or more "
              "trainer.max_steps")
    return f"{text}; {resampling}: try {advice}"


# The closing summary's first rows: the numbers a researcher reads first (sparsity, then
# fidelity: loss recovered on LM data, FVU, true-feature recovery on synthetic data); the
# rest follow by name.
SUMMARY_FIRST = ("l0", "loss_recovered", "loss_recovered_se", "fvu", "mmcs",
                 "fraction_recovered", "delta_lm_loss", "delta_lm_loss_se", "dead_fraction",
                 "relative_reconstruction_bias")


def summary_table(run_dir: Path, metrics: dict) -> str:
    lines = [f"run: {run_dir}", f"{'metric':<30}{'value':>14}"]
    first = [key for key in SUMMARY_FIRST if key in metrics]
    for key in first + sorted(set(metrics) - set(first)):
        value = metrics[key]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<30}{shown:>14}")
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    """`python -m gsae_pl.fit`'s work, its arguments parsed (gsae_pl/fit.py)."""
    quiet_when_stdout_closes()  # `fit | head`: no BrokenPipe traceback, the run goes on
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    run_dir = run_dir_of(cfg)
    with run_lock(run_dir):  # before the first look inside: what it finds stays true
        return _train(cfg, run_dir, args.force)


def run_lock(run_dir: Path):
    """One command at a time per run directory, until it exits (gsae_pl/run/lock.py). Only the
    process a launcher started first takes it: the other DDP ranks are the same run."""
    if not takes_run_lock():
        return nullcontext()
    return FolderLock(run_dir, RUN_LOCK, "output.dir", "set output.name to start another run")


def _train(cfg: DictConfig, run_dir: Path, force: bool) -> int:
    check_own_folder(run_dir)  # fit replaces (--force: deletes) only what fit wrote
    if (run_dir / "metrics.json").exists() and not force:
        changed = finished_run_changes(run_dir, cfg)
        if changed:  # not this run: skipping it would pass another run's results off as its
            other = suggested_name(run_dir, {k: OmegaConf.select(cfg, k) for k in changed})
            raise UserError(f"{run_dir} holds a finished run with a different config "
                            f"({shown_keys(changed)}): set output.name={other} to train this "
                            "one beside it, or pass --force to replace it (its results are "
                            "deleted)")
        print(f"{run_dir} already holds a finished run (metrics.json); "
              "pass --force to train it again, or set output.name to start another")
        return 0
    resume_from = None if force else latest_checkpoint(run_dir)
    if resume_from:
        check_same_run(resume_from, cfg)
    fit(cfg, fresh=force, resume_from=resume_from)
    return 0

