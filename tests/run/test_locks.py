"""One process at a time per run folder (fit) and per suite folder (ablate), with a killed
holder's lock blocking nothing; and an ablate's fit children die with it, SIGKILL or
SIGTERM. All with real processes: locks and signals are what the kernel does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gsae_pl.errors import UserError
from gsae_pl.run.lock import RUN_LOCK, SUITE_LOCK, FolderLock
from tests.tiny_run import ROOT, TINY, args, fit_process, run

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
FOREVER = ["trainer.max_steps=1000000", "checkpoint.every_n_steps=10"]  # runs until killed


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def holder(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def alive(pid: int) -> bool:
    """Running, and not a zombie (a container's pid 1 may never reap an orphan)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def one_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr
    assert proc.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1, \
        (proc.returncode, err[-3000:])
    return err


def test_a_second_holder_is_refused_and_release_leaves_nothing(tmp_path):
    folder = tmp_path / "out" / "run"
    with FolderLock(folder, RUN_LOCK, "output.dir", "set output.name to start another run"):
        assert holder(folder / RUN_LOCK) == os.getpid()
        # flock conflicts between two opens of the file even within one process
        with pytest.raises(UserError, match=rf"{folder} is in use by another process "
                                            rf"\(pid {os.getpid()}\); wait for it or set"):
            FolderLock(folder, RUN_LOCK, "output.dir", "set output.name to start another run") \
                .acquire()
    assert list(tmp_path.iterdir()) == []  # the folders it made, empty again, are gone
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with FolderLock(folder, RUN_LOCK, "output.dir", "..."):
        pass
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_a_lock_left_by_a_sigkilled_process_does_not_block(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time\nfrom gsae_pl.run.lock import FolderLock\n"
            f"FolderLock({str(folder)!r}, {RUN_LOCK!r}, 'output.dir', '...').acquire()\n"
            "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=ROOT)
    try:
        wait_for(lambda: holder(folder / RUN_LOCK) == process.pid, 120, "the lock")
        with pytest.raises(UserError, match=f"pid {process.pid}"):
            FolderLock(folder, RUN_LOCK, "output.dir", "...").acquire()
    finally:
        process.kill()
        process.wait()
    assert holder(folder / RUN_LOCK) == process.pid  # the file stays: the lock does not
    with FolderLock(folder, RUN_LOCK, "output.dir", "..."):
        assert holder(folder / RUN_LOCK) == os.getpid()


@pytest.mark.slow
def test_a_second_fit_on_a_running_run_is_refused_and_a_killed_run_reruns(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "gsae_pl.fit", *args(tmp_path, "run",
                              *FOREVER)], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        # last.ckpt, not step10.ckpt: with keep=3 a fast run deletes step10.ckpt at step 40,
        # between two polls (seen once: the wait then ran out)
        wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 240,
                 "the first fit to train")
        second = fit_process(tmp_path, "run", *FOREVER)
        err = one_line(second)
        assert f"{run_dir} is in use by another process (pid {first.pid})" in err
        assert first.poll() is None  # the first trains on, alone
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    finally:
        first.kill()
        first.wait()
    assert holder(run_dir / RUN_LOCK) == first.pid  # SIGKILL left its lock file behind
    rerun = fit_process(tmp_path, "run", "--force")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (run_dir / "metrics.json").is_file() and not (run_dir / RUN_LOCK).exists()


def write_suite(tmp_path: Path, name: str) -> Path:
    shared = {item.split("=")[0]: item.split("=")[1] for item in TINY + FOREVER}
    spec = {"name": name, "output_dir": str(tmp_path / name), "seeds": [0], "overrides": shared,
            "variants": {"gated": {"config": str(ROOT / "ablations/gated.yaml"),
                                   "l1_coefficient": [0.1]}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start_suite(tmp_path: Path, name: str) -> tuple[subprocess.Popen, int]:
    """An ablate whose one run trains until stopped, and that run's fit process id."""
    suite = subprocess.Popen([sys.executable, "-m", "gsae_pl.ablate", "--suite",
                              str(write_suite(tmp_path, name))], env=ENV, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / name / "runs" / "gated_l1-0.1_seed0"
    try:
        # last.ckpt, not step10.ckpt: with keep=3 a fast run deletes step10.ckpt at step 40,
        # between two polls (seen once: the wait then ran out)
        wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 240,
                 "the suite's run to train")
    except AssertionError:
        suite.kill()
        raise
    child = holder(run_dir / RUN_LOCK)
    assert child and alive(child)
    return suite, child


@pytest.mark.slow
def test_a_second_ablate_is_refused_and_sigkill_takes_the_fit_along(tmp_path):
    suite, child = start_suite(tmp_path, "s")
    try:
        assert holder(tmp_path / "s" / SUITE_LOCK) == suite.pid
        second = run([sys.executable, "-m", "gsae_pl.ablate", "--suite", str(tmp_path / "s.yaml")])
        err = one_line(second)
        assert f"{tmp_path / 's'} is in use by another process (pid {suite.pid})" in err
        assert alive(child)  # the second started nothing; the first's run trains on
    finally:
        suite.kill()
        suite.wait()
    wait_for(lambda: not alive(child), 15, "the fit child to die with its suite")


@pytest.mark.slow
def test_sigterm_stops_the_suite_and_its_fit(tmp_path):
    suite, child = start_suite(tmp_path, "s")
    suite.terminate()
    try:
        _, err = suite.communicate(timeout=60)
    finally:
        suite.kill()
    assert suite.returncode == 143  # 128 + SIGTERM, as fit exits
    assert "stopped (SIGTERM)" in err.strip().splitlines()[-1], err[-3000:]
    assert not alive(child)  # the suite waits for its children before it exits
    assert not (tmp_path / "s" / SUITE_LOCK).exists()
