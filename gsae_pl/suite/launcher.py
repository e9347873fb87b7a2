"""Run an ablation suite: `python -m gsae_pl.ablate --suite FILE [--devices N]
[--runs-per-device K] [--strategy parallel|ddp] [--output-dir DIR] [--dry-run] [key=value
...]`, then write its report.

Every run is `python -m gsae_pl.fit` in its own process, its output in
`<output_dir>/logs/<run>.log`, its results in `<output_dir>/runs/<run>/` (gsae_pl/suite/spec.py):
- `parallel` runs one SAE per device at once (the right choice for small SAEs): on GPUs
  each process sees one device; on CPU each gets cores / N threads. On GPUs
  `--runs-per-device K` keeps K runs on each GPU at once (N x K processes): a small SAE
  leaves most of a large GPU idle, so several share it.
- `ddp` runs the SAEs one after another, each with Lightning DDP over all N devices
  (gloo on CPU). Multi-node: every node runs the same command with `trainer.num_nodes=K`
  under torchrun or SLURM, the output on a shared filesystem; each run meets on its own
  store (gsae_pl/suite/rendezvous.py, docs/scaling.md).
A run that fails is recorded in `<output_dir>/failed/<run>.json` and the suite goes on;
rerunning the command skips finished runs (those with metrics.json, trained with the config
the suite gives them today: a changed one is refused) and retries the rest, which resume
from their checkpoints; `--dry-run` lists what it would do. The report's wall time is the
sum over the invocations that trained runs (<output_dir>/wall_time.json). Before any run,
LM activations that runs read from the disk cache (`data.cache=true`) are written once, so
the LM runs once per token for the whole suite rather than once per run. Bad input is
refused before anything runs (exit 2); a suite with failed runs exits 3 after its report
is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from gsae_pl.cli import ArgumentParser, run_main
from gsae_pl.data.cache import rows_wanted
from gsae_pl.errors import RunFailed, UserError
from gsae_pl.io import atomic_write_json, atomic_write_text, sweep_stale_temporaries
from gsae_pl.names import fitting_name
from gsae_pl.processes import is_first_process, launcher_rank
from gsae_pl.run.checkpointing import finished_run_changes, shown_keys
from gsae_pl.run.lock import SUITE_LOCK, FolderLock
from gsae_pl.suite.children import die_with_parent, stop
from gsae_pl.suite.progress import SuiteProgress
from gsae_pl.suite.rendezvous import RunStores
from gsae_pl.suite.spec import Run, Suite, load_suite, sweep_label

STRATEGIES = ("parallel", "ddp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gsae_pl.ablate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, help="suite YAML (e.g. ablations/quick.yaml)")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices to use: GPUs, or CPU processes where there is no GPU")
    parser.add_argument("--runs-per-device", type=int, default=1, metavar="K",
                        help="parallel on GPUs: K runs share each GPU at once (default 1)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="parallel",
                        help="parallel: one SAE per device at once; ddp: each SAE over all")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="put the suite's runs, logs and report in DIR instead of the "
                             "suite file's output_dir (the file stays as it is)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs the suite would start (name, variant, swept "
                             "value, seed) and which are already finished, then exit 0 "
                             "without training or writing anything")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return parser.parse_intermixed_args(argv)


def available_devices(accelerator: str) -> tuple[str, int]:
    """The device kind runs will use, and how many of it this machine has."""
    import torch

    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0):
        return "gpu", gpus
    if accelerator not in ("cpu", "auto"):
        raise UserError(f"trainer.accelerator={accelerator}: the ablation driver knows cpu, "
                        "gpu and auto")
    return "cpu", len(os.sched_getaffinity(0))


def check_devices(suite: Suite, devices: int, per_device: int = 1,
                  strategy: str = "parallel") -> str:
    kinds = {run.cfg.trainer.accelerator for run in suite.runs}
    if len(kinds) > 1:
        raise UserError(f"the suite's runs ask for different accelerators ({sorted(kinds)}): "
                        "set trainer.accelerator once in the suite's overrides")
    kind, have = available_devices(kinds.pop())
    if not 1 <= devices <= have:
        raise UserError(f"--devices {devices} is not available: this machine has {have} "
                        f"{'GPU(s)' if kind == 'gpu' else 'CPU core(s)'}; pass 1 to {have}")
    if per_device < 1:
        raise UserError(f"--runs-per-device {per_device}: pass 1 or more runs per GPU")
    if per_device > 1 and (kind != "gpu" or strategy != "parallel"):
        raise UserError(f"--runs-per-device {per_device}: several runs share a device only "
                        "on GPUs with --strategy parallel (on CPU, --devices is the number of "
                        "processes); pass 1, or leave it out")
    return kind


def fit_command(run: Run, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "gsae_pl.fit", "--config", *map(str, run.config_paths),
            *run.overrides, *extra]


def worker_env(kind: str, slot: int | None, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if kind == "gpu" and slot is not None:  # parallel: each process sees one GPU as cuda:0
        env["CUDA_VISIBLE_DEVICES"] = str(slot)
    return env


def prepare_caches(runs: list[Run], log_dir: Path) -> None:
    """Write each distinct activation cache once, before any run reads it (in parallel,
    several runs would otherwise race to write the same cache)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.cfg.data.cache and run.cfg.data.source in ("tiny_lm", "transformer_lens"):
            key = json.dumps(OmegaConf.to_container(run.cfg.data), sort_keys=True)
            groups.setdefault(key, []).append(run)
    for k, group in enumerate(groups.values()):
        rows = max(rows_wanted(run.cfg) for run in group)
        command = [sys.executable, "-m", "gsae_pl.cache", "--config",
                   *map(str, group[0].config_paths),
                   *group[0].overrides, f"data.cache_rows={rows}"]
        print(f"activation cache {k + 1}/{len(groups)} for {len(group)} runs ({rows} rows)",
              flush=True)
        log = log_dir / f"cache{k}.log"
        with open(log, "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=die_with_parent())
        if done.returncode != 0:
            raise RunFailed(f"writing the activation cache failed (exit {done.returncode}): "
                            f"see {log}")


class Launcher:
    """Starts runs as processes and records how each ended."""

    def __init__(self, suite: Suite, kind: str, devices: int, strategy: str,
                 per_device: int = 1):
        self.suite, self.kind, self.devices, self.strategy = suite, kind, devices, strategy
        # parallel: slot s runs on GPU s % devices, so K slots share each GPU
        self.slots = devices * per_device if strategy == "parallel" else 1
        self.logs, self.failed_dir = suite.output_dir / "logs", suite.output_dir / "failed"
        cores = len(os.sched_getaffinity(0))
        self.threads = max(1, cores // max(devices, self.slots))
        self.failures: list[str] = []
        self.stores = RunStores() if strategy == "ddp" else None

    def log_of(self, run: Run) -> Path:
        """The run's log; on a multi-node suite's other processes `<run>.rank<r>.log`, so
        that copies on a shared filesystem do not overwrite each other's."""
        rank = launcher_rank()
        return self.logs / fitting_name(run.name, ".log" if rank == 0 else f".rank{rank}.log")

    def failed_record(self, run: Run) -> Path:
        """`failed/<run>.json`; like the log's, the name is shortened to fit if need be (a
        run name may take all 255 bytes a name can)."""
        return self.failed_dir / fitting_name(run.name, ".json")

    def start(self, run: Run, slot: int | None, index: int) -> subprocess.Popen:
        self.failed_record(run).unlink(missing_ok=True)  # a retry
        extra = ["trainer.devices=1"] if self.strategy == "parallel" else \
            [f"trainer.devices={self.devices}", "trainer.strategy=ddp"]
        if self.kind == "cpu":
            extra.append("trainer.accelerator=cpu")
        log = open(self.log_of(run), "w")
        # Only a parallel run is pinned to its slot's GPU: a DDP run spans every device.
        pinned = slot % self.devices if self.strategy == "parallel" else None
        env = worker_env(self.kind, pinned, self.threads)
        if self.stores is not None:
            env.update(self.stores.env(index))
        # A child dies with the suite, even one killed by SIGKILL (gsae_pl/suite/children.py).
        process = subprocess.Popen(fit_command(run, extra), stdout=log,
                                   stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=die_with_parent())
        log.close()  # the child holds its own copy of the descriptor
        return process

    def finish(self, run: Run, returncode: int, seconds: float, index: int) -> bool:
        """Print how the run ended (a failure is also recorded); True if it finished."""
        where = f"[{index}/{len(self.suite.runs)}] {run.name}"
        metrics_path = run.run_dir / "metrics.json"
        if returncode == 0 and metrics_path.is_file():
            m = json.loads(metrics_path.read_text())
            shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("l0", "loss_recovered", "fvu", "mmcs")
                              if k in m)
            print(f"{where}: done in {seconds:.0f} s ({shown})", flush=True)
            return True
        log = self.log_of(run)
        error = last_error_line(log)
        atomic_write_json(self.failed_record(run), {
            "run": run.name, "variant": run.variant, "sweep": run.sweep_key,
            "value": run.sweep_value,
            "seed": run.seed, "returncode": returncode, "log": str(log), "error": error})
        self.failures.append(run.name)
        print(f"{where}: FAILED (exit {returncode}): {error} (log: {log})", flush=True)
        return False


def last_error_line(log: Path) -> str:
    """The line that says why: the last `error:` line fit printed, else the log's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip()] if log.is_file() else []
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:500]


def run_all(launcher: Launcher, todo: list[tuple[int, Run]]) -> None:
    """Parallel: keep one run per device going. DDP: one run at a time over every device.
    After each run ends, a line with the suite's progress and ETA (gsae_pl/suite/progress.py)."""
    slots = launcher.slots
    free, busy = list(range(slots)), {}
    pending = list(todo)
    total = len(launcher.suite.runs)
    progress = SuiteProgress(total, total - len(todo), slots)
    try:
        while pending or busy:
            while pending and free:
                index, run = pending.pop(0)
                slot = free.pop(0)
                busy[slot] = (index, run, launcher.start(run, slot, index),
                              time.perf_counter())
            time.sleep(0.2)
            for slot, (index, run, process, began) in list(busy.items()):
                if process.poll() is not None:
                    del busy[slot]
                    free.append(slot)
                    seconds = time.perf_counter() - began
                    progress.ended(seconds, launcher.finish(run, process.returncode, seconds,
                                                            index))
                    now = time.perf_counter()
                    print(progress.line([now - b for *_, b in busy.values()], len(pending)),
                          flush=True)
    finally:  # Ctrl-C, SIGTERM or an error here: no orphaned training processes
        stop([process for _, _, process, _ in busy.values()])


def check_finished_match(runs: list[Run]) -> None:
    """A finished run is skipped only if the suite would train it the same way today:
    otherwise its stale results would be reported as this suite's."""
    for run in runs:
        changed = finished_run_changes(run.run_dir, run.cfg)
        if changed:
            raise UserError(f"{run.run_dir} finished with a different config "
                            f"({shown_keys(changed)}): "
                            "give the suite a new output_dir, or delete that run to retrain it")


def suite_lock(suite: Suite):
    """One ablate at a time per suite folder (gsae_pl/run/lock.py). On several nodes only the
    first process takes it: the others run the same suite with it."""
    if not is_first_process():
        return contextlib.nullcontext()
    return FolderLock(suite.output_dir, SUITE_LOCK, "output_dir",
                      "give the suite another output_dir")


def _on_sigterm(signum, frame) -> None:
    # Unwinds through run_all's `finally`, which stops the running fits. A second SIGTERM
    # ends the suite at once; its children still get theirs from the kernel.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stopped = RunFailed("the suite was stopped (SIGTERM), and its running runs with it: rerun "
                        "the same command to resume them from their checkpoints")
    stopped.exit_code = 128 + signum  # 143, as fit exits on SIGTERM (gsae_pl/run/preemption.py)
    raise stopped


def run_state(run: Run) -> str:
    """What ablate would do with `run`: train it, resume it, skip it as finished, or refuse."""
    if (run.run_dir / "metrics.json").is_file():
        changed = finished_run_changes(run.run_dir, run.cfg)
        return (f"finished with a different config ({shown_keys(changed)}): ablate would "
                "refuse" if changed else "finished: skipped")
    if list((run.run_dir / "checkpoints").glob("*.ckpt")):
        return "unfinished: resumes from its checkpoint"
    return "to train"


def print_plan(suite: Suite) -> None:
    """--dry-run: one line per run, nothing written."""
    states = [run_state(run) for run in suite.runs]
    finished = sum(state.startswith("finished: ") for state in states)
    print(f"suite {suite.name}: {len(suite.runs)} runs ({len(suite.variants)} variants), "
          f"{finished} already finished, {len(suite.runs) - finished} to run; output in "
          f"{suite.output_dir} (dry run: nothing started)")
    width = max(len(run.name) for run in suite.runs)
    for run, state in zip(suite.runs, states):
        swept = f"{sweep_label(run.sweep_key)}={run.sweep_value}"
        print(f"  {run.name:<{width}}  {run.variant}  {swept}  seed {run.seed}  {state}")


def _main(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite, args.overrides, args.output_dir)
    if args.dry_run:
        print_plan(suite)
        return 0
    kind = check_devices(suite, args.devices, args.runs_per_device, args.strategy)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with suite_lock(suite):  # before the first look inside, to exit
            return _run_suite(suite, kind, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_suite(suite: Suite, kind: str, args: argparse.Namespace) -> int:
    finished = [run for run in suite.runs if (run.run_dir / "metrics.json").is_file()]
    check_finished_match(finished)
    done = {run.name for run in finished}
    todo = [(i, run) for i, run in enumerate(suite.runs, 1) if run.name not in done]
    print(f"suite {suite.name}: {len(suite.runs)} runs ({len(suite.variants)} variants), "
          f"{len(suite.runs) - len(todo)} already finished; {args.strategy} on "
          f"{args.devices} {kind} device(s)"
          f"{f' x {args.runs_per_device} runs each' if args.runs_per_device > 1 else ''}; "
          f"output in {suite.output_dir}", flush=True)
    launcher = Launcher(suite, kind, args.devices, args.strategy, args.runs_per_device)
    for folder in (launcher.logs, launcher.failed_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for folder in (suite.output_dir, launcher.failed_dir, suite.output_dir / "plots"):
        if folder.is_dir():  # what a killed suite was writing (report, records), if any
            sweep_stale_temporaries(folder)
    # The report reads its `figures:` from this copy; it also records what was asked for.
    atomic_write_text(suite.output_dir / "suite.yaml", suite.path.read_text())
    start = time.perf_counter()
    if todo and is_first_process():
        prepare_caches([run for _, run in todo], launcher.logs)
    if todo:
        run_all(launcher, todo)
    wall = time.perf_counter() - start
    if is_first_process():  # multi-node: one process writes the report
        from gsae_pl.suite.report import add_wall_time, write_report

        if todo:  # the report sums the invocations that trained (a rerun keeps the figure)
            add_wall_time(suite.output_dir, wall)
        report = write_report(suite.output_dir)
        print(f"report: {report} ({wall:.0f} s for {len(todo)} runs)")
    if launcher.failures:
        raise RunFailed(f"{len(launcher.failures)} of {len(todo)} runs failed "
                        f"({', '.join(launcher.failures)}): see {launcher.failed_dir}; "
                        "rerun the same command to retry them")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
