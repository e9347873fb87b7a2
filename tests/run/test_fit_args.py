"""fit's command line parses before the training stack loads: `--help` and a usage error
import neither torch nor Lightning (seconds of imports), and still exit as before."""

from __future__ import annotations

import subprocess
import sys

from tests.tiny_run import ROOT

PROBE = """
import sys
from gsae_pl.fit import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
heavy = sorted(m for m in ("torch", "lightning", "omegaconf") if m in sys.modules)
print("exit", code, "loaded", heavy, file=sys.stderr)
"""


def _probe(*argv):
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_help_loads_no_training_stack():
    done = _probe("--help")
    assert "usage: python -m gsae_pl.fit" in done.stdout and "--force" in done.stdout
    assert "exit 0 loaded []" in done.stderr


def test_a_usage_error_is_one_line_and_exit_2_without_the_training_stack():
    done = _probe("--config", "configs/base.yaml", "--frobnicate")
    lines = done.stderr.splitlines()
    assert lines[0].startswith("error: ") and "--frobnicate" in lines[0]
    assert lines[1] == "exit 2 loaded []"
