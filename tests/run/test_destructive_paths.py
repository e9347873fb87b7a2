"""No command deletes or overwrites what it did not write (docs/faults.md, section 2).

export replaces only an earlier export of gsae_pl's (never a run, a folder of runs, a user's
file or a symbolic link), and concurrent exports into one folder take turns; report writes
only in a suite (the suite.yaml ablate writes) and deletes only plots it made; fit replaces
only files of a run it wrote; names of up to 255 bytes give temporaries, logs and the printed
export command that fit in a file name; written files get the mode the umask gives.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from gsae_pl import load_sae
from gsae_pl.fit import main as fit_main
from gsae_pl.saelens import main as export_main
from tests.tiny_run import ROOT, TINY, args, fit_process, run


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` (links as their target), with the bytes of each file."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "dir"
    return found


def assert_one_line_refusal(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr


def export_process(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "gsae_pl.export", *map(str, argv)], timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """`tb/`, a folder of runs as TensorBoard reads it: two tiny finished runs."""
    tb = tmp_path_factory.mktemp("destructive") / "tb"
    for name in ("runA", "runB"):
        assert fit_main(args(tb, name, "trainer.max_steps=10")) == 0
    return tb


# ---------------------------------------------------------------- export

@pytest.mark.slow
def test_export_never_replaces_a_run_or_a_folder_of_runs(runs):
    before = tree(runs)
    # the two commands: the run by its own export, and every run in tb
    assert_one_line_refusal(export_process(runs / "runA", runs / "runA", "--force"),
                            "is the run directory")
    assert_one_line_refusal(export_process(runs / "runA", runs, "--force"),
                            "is the run directory")
    assert_one_line_refusal(export_process(runs / "runA", runs / "runB", "--force"),
                            "is a run directory")
    assert tree(runs) == before


@pytest.mark.parametrize("case", ["user_file", "saelens_sae", "a_file", "folder_above"])
def test_export_refuses_what_it_did_not_write_even_with_force(runs, tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "user_file":  # an export, plus a file of the user's
        assert export_main([str(runs / "runA"), str(out)]) == 0
        (out / "notes.txt").write_text("mine")
    elif case == "saelens_sae":  # the layout, written by someone else (no gsae_pl record)
        out.mkdir()
        (out / "cfg.json").write_text(json.dumps({"architecture": "standard"}))
        (out / "sae_weights.safetensors").write_bytes(b"weights")
    elif case == "a_file":
        out.write_text("a file")
    else:  # a folder that holds an export and something else
        assert export_main([str(runs / "runA"), str(out / "sae")]) == 0
    before = tree(tmp_path)
    assert export_main([str(runs / "runA"), str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "not an export" in err, err
    assert tree(tmp_path) == before


def test_export_force_replaces_its_own_export_and_leaves_no_temporary(runs, tmp_path, capsys):
    out = tmp_path / "sae"
    assert export_main([str(runs / "runA"), str(out)]) == 0
    assert export_main([str(runs / "runB"), str(out)]) == 2  # without --force: refused
    assert "pass --force" in capsys.readouterr().err
    assert export_main([str(runs / "runB"), str(out), "--force"]) == 0
    assert json.loads((out / "cfg.json").read_text())["gsae_pl"]["config"]["output"][
        "name"] == "runB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


@pytest.mark.parametrize("target", ["an_export", "an_empty_folder", "nothing"])
def test_export_onto_a_symlink_is_refused_and_leaves_no_temporary(runs, tmp_path, capsys,
                                                                  target):
    real = tmp_path / "real"
    if target == "an_export":
        assert export_main([str(runs / "runA"), str(real)]) == 0
    elif target == "an_empty_folder":
        real.mkdir()
    (tmp_path / "link").symlink_to(real)
    before = tree(tmp_path)
    assert export_main([str(runs / "runB"), str(tmp_path / "link"), "--force"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and err.count("\n") == 1
    assert tree(tmp_path) == before  # link, target and no `.link.tmp`


@pytest.mark.slow
def test_ten_concurrent_exports_into_one_folder_all_succeed(runs, tmp_path):
    out = tmp_path / "sae"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "gsae_pl.export",
                               str(runs / ("runA", "runB")[k % 2]), str(out), "--force"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(10)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in results] == [0] * 10, results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary left
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    load_sae(out)  # whole: one export's two files, not a mix


# ---------------------------------------------------------------- names near 255 bytes

LONG = "r" * 250  # one name; `<name>_saelens`, `.<name>.tmp` and `<name>.rank1.log` are not


@pytest.mark.slow
def test_a_250_byte_run_name_exports_by_the_printed_command(tmp_path, capsys):
    assert fit_main(args(tmp_path, LONG, "trainer.max_steps=10")) == 0
    [command] = [shlex.split(line.split("#")[0]) for line in capsys.readouterr().out.splitlines()
                 if "gsae_pl.export" in line]
    out = Path(command[-1])
    assert len(out.name.encode()) <= 255 and out.parent == tmp_path
    done = run([sys.executable, *command[1:]])  # as printed, after `python`
    assert done.returncode == 0, done.stderr
    load_sae(out)
    # and into an OUT_DIR whose own name takes 250 bytes, replaced once with --force
    for extra in ([], ["--force"]):
        assert export_main([str(tmp_path / LONG), str(tmp_path / "x" / LONG), *extra]) == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [LONG]


@pytest.mark.slow
def test_a_suite_run_named_with_250_bytes_gets_its_log_and_failed_record(tmp_path):
    variant = "v" * (250 - len("_l1-0.1_seed0"))
    shared = {item.split("=")[0]: item.split("=")[1] for item in TINY}
    shared.update({"trainer.max_steps": 10, "optim.lr": 1e30})  # fails: a failed record
    spec = {"name": "t", "output_dir": str(tmp_path / "out"), "seeds": [0],
            "overrides": shared, "variants": {variant: {
                "config": str(ROOT / "ablations" / "gated.yaml"), "l1_coefficient": [0.1]}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(spec))
    done = run([sys.executable, "-m", "gsae_pl.ablate", "--suite", str(tmp_path / "suite.yaml")],
               timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr  # the run failed, as meant
    assert "Traceback" not in done.stderr, done.stderr
    name = f"{variant}_l1-0.1_seed0"
    [record] = (tmp_path / "out" / "failed").glob("*.json")
    failure = json.loads(record.read_text())
    assert failure["run"] == name and failure["error"].startswith("error:")
    assert Path(failure["log"]).is_file() and Path(failure["log"]).parent.name == "logs"
    assert name in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------- report

def _not_a_suite(root: Path) -> Path:
    """A user's folder that happens to hold runs/, with their own plots and notes."""
    (root / "runs" / "a").mkdir(parents=True)
    (root / "runs" / "a" / "metrics.json").write_text('{"l0": 5.0, "fvu": 0.2}')
    (root / "plots").mkdir()
    (root / "plots" / "mine.png").write_bytes(b"\x89PNG my own figure")
    (root / "report.md").write_text("my report")
    (root / "results.csv").write_text("my,results\n")
    return root


@pytest.mark.slow  # a real process: seconds of imports
def test_report_refuses_a_folder_that_is_not_a_suite(tmp_path):
    folder = _not_a_suite(tmp_path / "mine")
    before = tree(folder)
    proc = run([sys.executable, "-m", "gsae_pl.report", str(folder)])
    assert_one_line_refusal(proc, "not an ablation suite")
    assert tree(folder) == before


def test_report_deletes_only_the_plots_it_made(tmp_path):
    from gsae_pl.suite.report import write_report

    suite = _not_a_suite(tmp_path / "suite")
    (suite / "suite.yaml").write_text("variants: {v: {}}\n")  # now a suite
    write_report(suite)
    made = sorted(p.name for p in (suite / "plots").iterdir())
    assert "mine.png" in made and "l0_vs_fvu.png" in made
    (suite / "runs" / "a" / "metrics.json").write_text('{"l0": 5.0, "mse": 0.2}')  # no fvu
    write_report(suite)
    assert sorted(p.name for p in (suite / "plots").iterdir()) == ["mine.png"]
    assert (suite / "plots" / "mine.png").read_bytes() == b"\x89PNG my own figure"


# Dies by SIGKILL just before the report's event file is renamed into place.
KILL_AT_THE_EVENT_FILE = """
import os, signal, sys
_replace = os.replace
def _replace_or_die(src, dst):
    if "tfevents" in os.path.basename(str(dst)):
        os.kill(os.getpid(), signal.SIGKILL)
    _replace(src, dst)
os.replace = _replace_or_die
from gsae_pl.suite.report import main
sys.exit(main(sys.argv[1:]))
"""


def tensorboard_runs(logdir: Path) -> list[str]:
    """The runs TensorBoard lists under `logdir`: every folder holding an event file."""
    from tensorboard.backend.event_processing import io_wrapper

    return sorted(str(Path(d).relative_to(logdir))
                  for d in io_wrapper.GetLogdirSubdirectories(str(logdir)))


@pytest.mark.slow  # a real process: seconds of imports
def test_a_killed_report_leaves_no_run_for_tensorboard(tmp_path):
    suite = _not_a_suite(tmp_path / "suite")
    (suite / "suite.yaml").write_text("variants: {v: {}}\n")
    script = tmp_path / "die.py"
    script.write_text(KILL_AT_THE_EVENT_FILE)
    killed = run([sys.executable, str(script), str(suite)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert tensorboard_runs(suite) == []  # the half-made event file is no run
    done = run([sys.executable, "-m", "gsae_pl.report", str(suite)])
    assert done.returncode == 0, done.stderr
    assert tensorboard_runs(suite) == ["report"]
    assert [p.name for p in (suite / "report").iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- fit

@pytest.mark.slow  # a real process: seconds of imports
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_fit_refuses_a_folder_whose_config_yaml_it_did_not_write(tmp_path, force):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("# my own notes on this experiment\nsae: {d_sae: 64}\n")
    (folder / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    proc = fit_process(tmp_path, "run", *(["--force"] if force else []))
    assert_one_line_refusal(proc, "is not a config gsae_pl.fit wrote")
    assert tree(tmp_path) == before


def test_fit_reruns_its_own_runs_and_those_made_before_the_header(tmp_path, capsys):
    assert fit_main(args(tmp_path, "run", "trainer.max_steps=10")) == 0
    config = tmp_path / "run" / "config.yaml"
    assert config.read_text().startswith("# gsae_pl.fit")
    config.write_text(config.read_text().split("\n", 1)[1])  # as fit wrote it until now
    (tmp_path / "run" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert fit_main(args(tmp_path, "run", "trainer.max_steps=10")) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    assert fit_main([*args(tmp_path, "run", "trainer.max_steps=10"), "--force"]) == 0
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert config.read_text().startswith("# gsae_pl.fit")


# ---------------------------------------------------------------- permissions

@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, mask):
    with umask(mask):
        assert fit_main(args(tmp_path, "run", "trainer.max_steps=10")) == 0
        assert export_main([str(tmp_path / "run"), str(tmp_path / "sae")]) == 0
    run_dir, want = tmp_path / "run", 0o666 & ~mask
    for path in (run_dir / "checkpoints" / "last.ckpt", run_dir / "metrics.json",
                 run_dir / "config.yaml", tmp_path / "sae" / "sae_weights.safetensors",
                 tmp_path / "sae" / "cfg.json"):
        assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(want), path
    assert oct(stat.S_IMODE((tmp_path / "sae").stat().st_mode)) == oct(0o777 & ~mask)
