"""The `fit` entry point: outputs of a run, the finished-run guard, and bad input refused
with one line, exit 2 and nothing written under the run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gsae_pl.fit import main

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs/base.yaml")
TINY = ["data.source=synthetic", "trainer.max_steps=40", "data.batch_size=128", "eval.rows=256",
        "eval.every_n_steps=20",
        "log.every_n_steps=10", "log.histogram_every_n_steps=20", "checkpoint.every_n_steps=20",
        "data.normalize_rows=256", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "sae.d_sae=32", "data.synthetic.n_features=24",
        "data.synthetic.d_in=8"]
METRIC_KEYS = {"l0", "mse", "fvu", "relative_reconstruction_bias", "dead_fraction",
               "dense_fraction", "mmcs", "fraction_recovered", "steps", "tokens", "seconds",
               "norm_scale"}


def _fit(tmp_path, *extra, config=BASE):
    return main(["--config", config, f"output.dir={tmp_path}", "output.name=run", *TINY, *extra])


def test_print_config_exits_zero_and_shows_resolved_values(capsys, tmp_path):
    assert main(["--config", BASE, "--print-config", "sae.d_sae=77"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sae"]["d_sae"] == 77
    assert printed["output"]["name"] == "gated_l1-0.05_seed0"


def test_tiny_run_writes_everything_and_refuses_to_redo_it(tmp_path, capsys):
    assert _fit(tmp_path) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "fvu" in out and "mmcs" in out  # the summary table
    metrics = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["steps"] == 40 and metrics["tokens"] == 40 * 128
    assert 0 <= metrics["mmcs"] <= 1 and metrics["norm_scale"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["sae"]["d_sae"] == 32
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert not list(run.rglob(".*.tmp*"))  # no temporary files left behind
    before = (run / "metrics.json").stat().st_mtime_ns
    assert _fit(tmp_path) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    assert (run / "metrics.json").stat().st_mtime_ns == before
    # The same name with another recipe is another run: refused, not skipped as finished
    # (it would pass this run's results off as that one's). Devices and logging may differ.
    assert _fit(tmp_path, "sae.d_sae=48", "trainer.max_steps=30") == 2
    err = capsys.readouterr().err
    assert "holds a finished run with a different config (sae.d_sae, trainer.max_steps)" \
        in err and "output.name" in err and "--force" in err
    assert _fit(tmp_path, "log.every_n_steps=5", "trainer.devices=1") == 0
    assert (run / "metrics.json").stat().st_mtime_ns == before


def test_force_starts_a_fresh_run_and_keeps_the_users_files(tmp_path, capsys):
    assert _fit(tmp_path) == 0
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")  # a user's files beside and inside the run's own
    (run / "plots").mkdir()
    (run / "checkpoints" / "README").write_text("mine too")
    assert _fit(tmp_path, "--force", "trainer.max_steps=20") == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 20
    assert len(list(run.glob("events.out.tfevents.*"))) <= 3  # old ones gone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["README", "last.ckpt", "step20.ckpt"]  # the old run's step40.ckpt is gone
    assert (run / "notes.txt").read_text() == "mine" and (run / "plots").is_dir()
    assert (run / "checkpoints" / "README").read_text() == "mine too"


# Each would have put the run (and --force's deletions) elsewhere than one new folder in
# output.dir: "." deleted output.dir and every run in it, ".." its parent.
BAD_NAMES = [".", "..", "a/b/../../../escape", "../escape", "sub/run", "a\\b", "''", "-x",
             "tab\there", "x" * 256]


def _sibling(tmp_path) -> Path:
    (tmp_path / "out" / "sibling").mkdir(parents=True)
    (tmp_path / "out" / "sibling" / "metrics.json").write_text("{}")
    return tmp_path / "out"


def _untouched(tmp_path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sibling"]
    assert (tmp_path / "out" / "sibling" / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_run_name_that_is_not_one_folder_is_refused(name, tmp_path, capsys):
    out = _sibling(tmp_path)
    assert main(["--config", BASE, f"output.dir={out}", f"output.name={name}", "--force",
                 *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output.name=") and err.count("\n") == 1, err
    _untouched(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [".", "a/b/../../../escape"])
def test_a_bad_run_name_from_the_shell_deletes_nothing(name, tmp_path):
    out = _sibling(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gsae_pl.fit", "--config", BASE,
                           f"output.dir={out}", f"output.name={name}", "--force", *TINY],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: output.name=") and proc.stderr.count("\n") == 1
    _untouched(tmp_path)


def test_same_seed_same_metrics(tmp_path):
    results = []
    for name in ("a", "b"):
        main(["--config", BASE, f"output.dir={tmp_path}", f"output.name={name}", *TINY])
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        results.append({k: v for k, v in metrics.items() if k != "seconds"})
    assert results[0] == results[1]


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_file_source_run(tmp_path, suffix):
    import torch
    from safetensors.torch import save_file

    rows = torch.randn(1024, 8).abs()
    path = tmp_path / f"acts{suffix}"
    {".npy": lambda: np.save(path, rows.numpy()), ".pt": lambda: torch.save(rows, path),
     ".safetensors": lambda: save_file({"activations": rows}, path)}[suffix]()
    assert _fit(tmp_path, "data.source=file", f"data.path={path}") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "mmcs" not in metrics and metrics["steps"] == 40


def _bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.npy"
    array = {"shape": np.zeros((4, 4, 4), np.float32), "nan": np.ones((1024, 8), np.float32),
             "short": np.ones((100, 8), np.float32)}[kind]
    if kind == "nan":
        array[700, 3] = np.nan
    np.save(path, array)
    return path


BAD = {
    "missing config": (["--config", "nope.yaml"], "not found"),
    "unknown key": (["sae.dsae=4"], "did you mean sae.d_sae"),
    "key without its section": (["l1_coefficient=0.1"],
                                "did you mean loss.sparsity.coefficient (old name "
                                "loss.l1_coefficient)?"),
    "a suite file": (["--config", str(ROOT / "ablations/quick.yaml")],
                     "quick.yaml is a suite file (it lists variants), not a run config: run "
                     f"{sys.executable} -m gsae_pl.ablate --suite {ROOT}/ablations/"),
    "wrong type": (["sae.d_sae=wide"], "bad value for config key sae.d_sae"),
    "negative coefficient": (["loss.l1_coefficient=-1"], "must be >= 0"),
    "d_sae < 1": (["sae.d_sae=0"], "sae.d_sae=0 must be > 0"),
    "unknown architecture": (["sae.architecture=crosscoder"], "not one of"),
    "unknown source": (["data.source=web"], "not one of"),
    "wrong shape": (["data.source=file", "data.path={shape}"], "[N, d_in]"),
    "nan": (["data.source=file", "data.path={nan}"], "row 700"),
    "too short": (["data.source=file", "data.path={short}"], "rows"),
    "missing data file": (["data.source=file", "data.path={tmp}/none.npy"], "not found"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    args, needle = BAD[case]
    paths = {k: _bad_file(tmp_path, k) for k in ("shape", "nan", "short")}
    args = [a.format(tmp=tmp_path, **paths) for a in args]
    config = [] if args[0] == "--config" else ["--config", BASE]
    out_dir = tmp_path / "out"
    rc = main([*config, f"output.dir={out_dir}", *TINY, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1
    assert not out_dir.exists()


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gsae_pl.fit", "--config", BASE,
                           "sae.architecture=nope", f"output.dir={tmp_path}/out"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()
