"""SynthSAEBench-16k's GPU suite (ablations/synthsaebench_gpu.yaml) inside a fixed lease:
`python benchmarks/synthsaebench_gpu.py --budget SECONDS --out DIR [key=value ...]` (the
overrides go to every run: the tests shrink it to a CPU run of seconds).

A lent GPU comes for minutes, not for the 200M samples per SAE of the published protocol
(hours at this framework's step rate). So this script spends the lease on one suite whose
length is measured rather than guessed:

1. one run of 20 steps alone: it builds the 16k dictionary once (the disk cache the suite's
   runs then read) and proves the path (GPU generation, bf16 autocast, evaluation);
2. every run of the suite at once for SMOKE_STEPS steps (--runs-per-device = all runs): the
   slowest run's step rate under that sharing, and the seconds each run spends outside its
   steps (start, evaluation);
3. the suite again, every run at once, with trainer.max_steps = what the rest of the lease
   holds at that rate (a multiple of 500 steps), milestones at 1/4 and 1/2 of it.

Then DIR gets `suite.tar.gz` (the suite folder without checkpoints: runs' configs, metrics,
milestones, provenance, TensorBoard events, logs, report) and `lease.json` (the device, the
rates and the lengths chosen). A run the deadline stops keeps its milestones, and the script
says so.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "ablations" / "synthsaebench_gpu.yaml"
SMOKE_STEPS = 300
EVAL_S = 15  # an evaluation's seconds, assumed: the smoke pass times start + one together
STEP_QUANTUM = 500
PROTOCOL_STEPS = 195_313  # 200M samples of 1024 (configs/recipes/synthsaebench_gpu.yaml)
RATE = re.compile(r"^step (\d+)/\d+ .*?\| ([\d.]+)([kMG]?) tok/s", re.M)
SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def last_rate(log: str) -> float | None:
    """Tokens per second of the last progress line of a fit log (the last 100 steps)."""
    found = RATE.findall(log)
    if not found:
        return None
    _, number, suffix = found[-1]
    return float(number) * SCALE[suffix]


def steps_for(seconds: float, rate: float, batch: int, evaluations: int,
              overhead: float) -> int:
    """Steps that fit `seconds` at `rate` tokens/s, after 1.5 times the `overhead` of a run
    outside its steps (start, final evaluation, report) and EVAL_S per milestone: a
    multiple of STEP_QUANTUM, at least one."""
    training = seconds - 1.5 * overhead - EVAL_S * evaluations
    steps = int(training * rate / batch) // STEP_QUANTUM * STEP_QUANTUM
    return min(max(steps, STEP_QUANTUM), PROTOCOL_STEPS)


def milestones(steps: int, batch: int) -> list[int]:
    return [steps // part * batch for part in (4, 2)]


def ablate(suite: Path, out: Path, runs: int, overrides: list[str],
           deadline: float | None) -> int:
    """The suite into `out`, every run at once: all on the one GPU, or a process per run on
    CPU (the tests)."""
    import torch

    share = ["--devices", "1", "--runs-per-device", str(runs)] if torch.cuda.is_available() \
        else ["--devices", "1"]
    command = [sys.executable, "-m", "gsae_pl.ablate", "--suite", str(suite),
               "--output-dir", str(out), *share, *overrides]
    print("$", " ".join(command), flush=True)
    timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # SIGTERM: the fits checkpoint and stop
        process.terminate()
        print("deadline: the suite was stopped; its runs keep their milestones", flush=True)
        return process.wait()


def start_mps() -> bool:
    """CUDA MPS lets the runs' small kernels share the GPU at once rather than in turns.
    On if its daemon starts and a CUDA process works under it; else off, and said."""
    import shutil

    if not shutil.which("nvidia-cuda-mps-control"):
        return False
    check = [sys.executable, "-c", "import torch; print((torch.ones(4, device='cuda') + 1).sum())"]
    try:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], timeout=20, check=True)
        subprocess.run(check, timeout=45, check=True, capture_output=True)
        return True
    except (OSError, subprocess.SubprocessError) as err:
        print(f"MPS off: {err}", flush=True)
        stop_mps()
        return False


def stop_mps() -> None:
    try:
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", timeout=20)
    except (OSError, subprocess.SubprocessError):
        pass


def device_facts() -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
    return facts


def pack(suite_dir: Path, out: Path) -> None:
    def keep(info: tarfile.TarInfo):
        return None if "/checkpoints" in info.name or info.name.endswith(".ckpt") else info

    with tarfile.open(out / "suite.tar.gz", "w:gz") as tar:
        tar.add(suite_dir, arcname=suite_dir.name, filter=keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, required=True,
                        help="seconds from now until everything must be in --out")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suite", type=Path, default=SUITE)
    parser.add_argument("--work", type=Path, default=Path("/tmp/synthsaebench_gpu"))
    parser.add_argument("--smoke-steps", type=int, default=SMOKE_STEPS)
    parser.add_argument("--mps", action="store_true", help="try CUDA MPS (see start_mps)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args(argv)
    smoke_steps, extra = args.smoke_steps, args.overrides
    start = time.monotonic()
    deadline = start + args.budget - 30  # 30 s to pack and return
    args.out.mkdir(parents=True, exist_ok=True)
    lease = {"facts": device_facts(), "budget_s": args.budget}
    runs = len(subprocess.run(
        [sys.executable, "-m", "gsae_pl.ablate", "--suite", str(args.suite), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()) - 1

    began = time.monotonic()
    warm = subprocess.run(
        [sys.executable, "-m", "gsae_pl.fit", "--config",
         str(ROOT / "configs/recipes/synthsaebench_gpu.yaml"), str(ROOT / "ablations/gated.yaml"),
         "trainer.max_steps=20", "eval.every_n_steps=20", "checkpoint.every_n_steps=20",
         f"output.dir={args.work}", "output.name=warm", *extra], cwd=ROOT)
    lease["warm_s"] = round(time.monotonic() - began, 1)
    if warm.returncode != 0:
        print(f"the 20-step run failed (exit {warm.returncode})", flush=True)
        return 1

    lease["mps"] = args.mps and start_mps()
    smoke_args = [f"trainer.max_steps={smoke_steps}", f"eval.every_n_steps={smoke_steps}",
                  f"checkpoint.every_n_steps={smoke_steps}", *extra]
    began = time.monotonic()
    smoke = args.work / "smoke"
    code = ablate(args.suite, smoke, runs, smoke_args, deadline)
    if code != 0 and lease["mps"]:  # once more without MPS, in a fresh folder
        print(f"the {smoke_steps}-step pass failed under MPS (exit {code}): again without",
              flush=True)
        stop_mps()
        lease["mps"], smoke = False, args.work / "smoke_no_mps"
        began = time.monotonic()
        code = ablate(args.suite, smoke, runs, smoke_args, deadline)
    wall = time.monotonic() - began
    rates = [last_rate(p.read_text()) for p in sorted((smoke / "logs").glob("*.log"))
             if not p.name.startswith("cache")]
    if code != 0 or not rates or None in rates:
        print(f"the {smoke_steps}-step pass failed (exit {code})", flush=True)
        pack(smoke, args.out)
        return 1
    rate = min(rates)
    batch = int(next((o.split("=")[1] for o in extra if o.startswith("data.batch_size=")),
                     1024))
    overhead = max(0.0, wall - smoke_steps * batch / rate)
    steps = steps_for(deadline - time.monotonic(), rate, batch, 2, overhead)
    at = milestones(steps, batch)
    lease.update(runs=runs, smoke_wall_s=round(wall, 1), smoke_rates_tok_s=rates,
                 overhead_s=round(overhead, 1), max_steps=steps, at_tokens=at)
    print(json.dumps(lease), flush=True)

    began = time.monotonic()
    suite_dir = args.work / "synthsaebench_gpu"
    code = ablate(args.suite, suite_dir, runs, [
        f"trainer.max_steps={steps}", f"eval.every_n_steps={steps}",
        f"checkpoint.every_n_steps={steps}", f"eval.at_tokens=[{','.join(map(str, at))}]",
        *extra], deadline)
    lease.update(suite_exit=code, suite_wall_s=round(time.monotonic() - began, 1))
    (args.out / "lease.json").write_text(json.dumps(lease, indent=1))
    pack(suite_dir, args.out)
    print(f"suite exit {code}; {time.monotonic() - start:.0f} s in all", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
