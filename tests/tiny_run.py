"""A tiny synthetic `fit` run, in-process or as a subprocess, for the reliability tests.

Killing, crashing and DDP need real processes; `wrapper_script` writes a script that
patches gsae_pl (from its `setup` code) and then runs `fit`, so Lightning's DDP launcher,
which reruns the command line, patches every process the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs/base.yaml")
TINY = ["data.source=synthetic", "trainer.max_steps=40", "data.batch_size=128",
        "eval.rows=512", "eval.every_n_steps=20", "log.every_n_steps=10",
        "log.histogram_every_n_steps=20", "checkpoint.every_n_steps=10",
        "data.normalize_rows=256", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "sae.d_sae=32", "data.synthetic.n_features=24",
        "data.synthetic.d_in=8"]


def args(out_dir: Path, name: str, *extra: str) -> list[str]:
    return ["--config", BASE, f"output.dir={out_dir}", f"output.name={name}", *TINY, *extra]


def metrics(out_dir: Path, name: str) -> dict:
    found = json.loads((Path(out_dir) / name / "metrics.json").read_text())
    return {k: v for k, v in found.items() if k != "seconds"}


def wrapper_script(path: Path, setup: str) -> Path:
    """A script that runs `setup` (Python source) and then `gsae_pl.run.train.main`."""
    path.write_text("import os, signal, sys\n" + setup +
                    "\nfrom gsae_pl.fit import main\nsys.exit(main(sys.argv[1:]))\n")
    return path


def run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def fit_in_process(out_dir: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """`python -m gsae_pl.fit` as `fit_process` runs it, but in this process (its main,
    stdout and stderr captured): for refusals up front, which need no process of their
    own and would each spend seconds importing torch and Lightning. The exit status a
    shell sees and anything only the interpreter prints are `fit_process`'s to check."""
    from gsae_pl.fit import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args(out_dir, name, *extra))
    return subprocess.CompletedProcess(["gsae_pl.fit"], code, out.getvalue(), err.getvalue())


def fit_process(out_dir: Path, name: str, *extra: str, script: Path | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
    entry = [str(script)] if script else ["-m", "gsae_pl.fit"]
    return run([sys.executable, *entry, *args(out_dir, name, *extra)], timeout=timeout)
