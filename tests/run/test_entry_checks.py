"""`fit` refuses bad trainer and batch settings before any work: one line, exit 2, nothing
written (the config and data cases live in test_fit.py, export's in test_export.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from gsae_pl.fit import main
from tests.tiny_run import ROOT, args

BAD = {
    "global batch not divisible": (["trainer.devices=2", "trainer.strategy=ddp",
                                    "data.batch_size=127"], "multiple of 2"),
    "unknown strategy": (["trainer.strategy=fsdp9"], "lightning refused the trainer settings"),
    "unknown precision": (["trainer.precision=13-bits"], "lightning refused the trainer"),
    "nan coefficient": (["loss.l1_coefficient=nan"], "must be a finite number"),
    "inf learning rate": (["optim.lr=inf"], "must be a finite number"),
    "several nodes but no launcher": (["trainer.num_nodes=2", "trainer.strategy=ddp"],
                                      "no launcher started this process"),
    "batch larger than the data": (["data.source=file", "data.path={rows}",
                                    "data.batch_size=1024"], "1024 to train on"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_refused_before_anything_is_written(case, tmp_path, capsys):
    extra, needle = BAD[case]
    np.save(tmp_path / "rows.npy", np.ones((1000, 8), np.float32))
    extra = [a.format(rows=tmp_path / "rows.npy") for a in extra]
    out_dir = tmp_path / "out"
    assert main(args(out_dir, "run", *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_asked_for_on_a_cpu_machine(tmp_path, capsys):
    assert main(args(tmp_path / "out", "run", "trainer.accelerator=gpu")) == 2
    assert "lightning refused the trainer settings" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_suite_given_to_fit_and_a_variant_given_to_ablate_say_so(capsys):
    from gsae_pl.fit import main as fit_main
    from gsae_pl.suite.launcher import main as ablate_main

    assert fit_main(["--config", str(ROOT / "ablations/quick.yaml")]) == 2
    assert "is a suite file" in capsys.readouterr().err
    assert ablate_main(["--suite", str(ROOT / "ablations/gated.yaml")]) == 2
    assert "is a run config (a variant), not a suite file" in capsys.readouterr().err


def test_tiny_lm_help_prints_help_and_builds_nothing():
    done = subprocess.run([sys.executable, "-m", "gsae_pl.data.tiny_lm", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "usage: python -m gsae_pl.data.tiny_lm" in done.stdout
    assert "building" not in done.stderr
