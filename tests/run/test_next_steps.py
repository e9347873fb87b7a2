"""What a finished run prints: the headline metrics first, and next steps that run as
printed in a fresh shell (no activated venv, another directory)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from gsae_pl.fit import main
from gsae_pl.run.train import summary_table
from tests.tiny_run import ROOT, args


def fresh_shell(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """`line` in bash with a system PATH and nothing else of this process's environment,
    like a new terminal. PYTHONPATH names the checkout under test only because the venv's
    editable install may be another checkout's; a fresh clone's `make setup` installs its own."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", line], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow  # ~7 s: a fresh shell runs the printed commands
def test_the_printed_next_steps_run_in_a_fresh_shell(tmp_path, capsys):
    assert main(args(tmp_path, "run")) == 0
    out = capsys.readouterr().out.splitlines()
    steps = out[out.index("next steps:") + 1:]
    watch = [line.removeprefix("watch it: ") for line in out if line.startswith("watch it: ")]
    commands = [line.split("   #")[0].strip() for line in steps + watch]
    assert len(commands) == 3
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in commands:
        words = shlex.split(command)
        assert Path(words[0]).is_absolute() and Path(words[0]).is_file(), command
        if Path(words[0]).name == "tensorboard":  # a server: its version, from the same line
            command = shlex.join([words[0], "--version_tb"])
            assert words[1:] == ["--logdir", str(tmp_path)]
        done = fresh_shell(command, elsewhere)
        assert done.returncode == 0, (command, done.stderr[-1000:])
    assert (tmp_path / "run_saelens" / "cfg.json").is_file()


def test_the_summary_shows_the_headline_numbers_first(tmp_path):
    metrics = {"bias_negative_fraction/b_gate": 1.0, "ce_clean": 3.6, "dead_fraction": 0.05,
               "fvu": 0.13, "l0": 3.3, "loss_recovered": 0.93, "loss_recovered_se": 0.02,
               "mse": 0.13, "steps": 4000}
    rows = [line.split()[0] for line in summary_table(tmp_path, metrics).splitlines()[2:]]
    assert rows[:5] == ["l0", "loss_recovered", "loss_recovered_se", "fvu", "dead_fraction"]
    assert rows[5:] == ["bias_negative_fraction/b_gate", "ce_clean", "mse", "steps"]
