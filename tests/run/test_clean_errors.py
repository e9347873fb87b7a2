"""Bad input and a failing disk end in one line on stderr, never a traceback, and leave
nothing half-written: exit 2 before any work (config, sizes, data, unwritable places),
exit 3 for a disk that fills or turns read-only mid-run, with the checkpoints intact.

Refusals up front run fit's main in this process (`fit_in_process`: the command's own code
path, stderr captured), seconds cheaper than a process each; the disk faults mid-run, export
and the suite keep real processes, and tests/run/test_fit.py checks that bad input from a
shell ends without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_run import BASE, fit_in_process, fit_process, run, wrapper_script


def assert_one_line(proc: subprocess.CompletedProcess, needle: str, code: int = 2) -> str:
    """Exit `code`, stderr exactly one line "error: ..." holding `needle`, no traceback."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert err.startswith("error: ") and err.count("\n") == 1, err[-3000:]
    assert needle in err, err
    return err


def assert_last_line(proc: subprocess.CompletedProcess, needle: str, code: int) -> str:
    """Mid-run: Lightning may have printed before; the end is one line, no traceback."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, err[-3000:]
    return last


# ---------------------------------------------------------------- item 7: file system

def test_output_dir_under_a_regular_file(tmp_path):
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "plain" / "out"
    proc = fit_in_process(out, "run")
    assert_one_line(proc, f"{tmp_path / 'plain'} is a file")
    assert (tmp_path / "plain").read_text() == "x"


def test_output_dir_on_a_read_only_file_system(tmp_path, tmpfs):
    # chmod does not stop root: a read-only mount does.
    disk = tmpfs(tmp_path / "ro", "ro,size=64k")
    proc = fit_in_process(disk / "out", "run")
    assert_one_line(proc, "output.dir")
    assert list(disk.iterdir()) == []


def test_cache_dir_that_is_a_file_is_refused_before_the_lm_runs(tmp_path):
    (tmp_path / "plain").write_text("x")
    proc = fit_in_process(tmp_path / "out", "run", "data.source=tiny_lm", "data.cache=true",
                          f"data.cache_dir={tmp_path / 'plain'}")
    assert_one_line(proc, "data.cache_dir")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_to_a_path_under_a_regular_file(tmp_path):
    assert fit_process(tmp_path / "out", "run", "trainer.max_steps=10").returncode == 0
    (tmp_path / "plain").write_text("x")
    proc = run([sys.executable, "-m", "gsae_pl.export", str(tmp_path / "out" / "run"),
                str(tmp_path / "plain" / "sae")])
    assert_one_line(proc, f"{tmp_path / 'plain'} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]


@pytest.mark.slow
def test_export_of_a_damaged_last_checkpoint_gives_export_advice(tmp_path):
    assert fit_process(tmp_path / "out", "run", "trainer.max_steps=20").returncode == 0
    run_dir = tmp_path / "out" / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    proc = run([sys.executable, "-m", "gsae_pl.export", str(run_dir), str(tmp_path / "sae")])
    err = assert_one_line(proc, f"cannot read checkpoint {last}")
    assert "--force" not in err and "--checkpoint" in err
    assert not (tmp_path / "sae").exists()
    # ... and the advice works: an older checkpoint exports.
    older = run_dir / "checkpoints" / "step10.ckpt"
    proc = run([sys.executable, "-m", "gsae_pl.export", str(run_dir), str(tmp_path / "sae"),
                "--checkpoint", str(older)])
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["gsae_pl"]["step"] == 10


def test_suite_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "plain").write_text("x")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"output_dir: {tmp_path / 'plain'}\nvariants:\n"
                     f"  gated: {{config: {BASE}, l1_coefficient: [0.01]}}\n"
                     "overrides: {data.source: synthetic}\n")
    proc = run([sys.executable, "-m", "gsae_pl.ablate", "--suite", str(suite)])
    assert_one_line(proc, f"{tmp_path / 'plain'}")
    assert (tmp_path / "plain").read_text() == "x"


DISK_FULL_AT_STEP_20 = """
import errno
from gsae_pl.run import checkpointing
_save = checkpointing.AtomicCheckpointIO.save_checkpoint
def save(self, checkpoint, path, storage_options=None):
    if checkpoint["global_step"] >= 20:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _save(self, checkpoint, path, storage_options)
checkpointing.AtomicCheckpointIO.save_checkpoint = save
"""


def _loads(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_and_checkpoints_stay(tmp_path):
    script = wrapper_script(tmp_path / "full.py", DISK_FULL_AT_STEP_20)
    proc = fit_process(tmp_path / "out", "run", script=script)
    assert_last_line(proc, "No space left on device", code=3)
    ckpts = tmp_path / "out" / "run" / "checkpoints"
    assert _loads(ckpts / "step10.ckpt") == 10 and _loads(ckpts / "last.ckpt") == 10
    assert not (tmp_path / "out" / "run" / "metrics.json").exists()
    # Space is back: the same command resumes and finishes.
    again = fit_process(tmp_path / "out", "run")
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]


@pytest.fixture
def tmpfs():
    """mount(directory, options) -> directory: a tmpfs, unmounted after the test. Needs
    root and mount; skipped, with the reason shown, where that is missing."""
    mounted = []

    def mount(directory: Path, options: str) -> Path:
        directory.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(directory)
        return directory

    yield mount
    for directory in mounted:
        subprocess.run(["umount", str(directory)], check=False)


@pytest.mark.slow
def test_a_real_full_disk_mid_run(tmp_path, tmpfs):
    """The disk-full case on a real 1 MB tmpfs: room for the config, the event file and one
    checkpoint, not for the next one. The room is measured on a run of its own (its
    files, each rounded up to tmpfs's 4 kB pages), so a longer config or event file does
    not move the disk-full point past the first checkpoint."""
    extra = ["trainer.max_steps=40", "checkpoint.keep=1", "checkpoint.every_n_steps=5"]
    assert fit_process(tmp_path / "probe", "run", *extra[1:], "trainer.max_steps=5") \
        .returncode == 0
    pages = lambda f: -(-f.stat().st_size // 4096) * 4096  # noqa: E731
    files = [f for f in (tmp_path / "probe" / "run").rglob("*") if f.is_file()]
    checkpoint = max(pages(f) for f in files if f.suffix == ".ckpt")
    room = sum(pages(f) for f in files if f.suffix != ".ckpt") + checkpoint + checkpoint // 2
    disk = tmpfs(tmp_path / "disk", "size=1M")
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush at close
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - room)
    proc = fit_process(disk, "run", *extra)
    last = assert_last_line(proc, "No space left on device", code=3)
    assert str(disk / "run" / "checkpoints") in last  # names the file it was writing
    kept = sorted((disk / "run" / "checkpoints").glob("*.ckpt"))
    assert kept and all(_loads(ckpt) > 0 for ckpt in kept)  # every checkpoint left is whole
    assert not list((disk / "run" / "checkpoints").glob(".*.tmp*"))
    filler.unlink()  # space is back: the same command resumes and finishes
    again = fit_process(disk, "run", *extra)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]


# ---------------------------------------------------------------- item 8: config

@pytest.mark.parametrize("extra,needle", [
    (["seed=-1"], "seed=-1 must lie in [0, 4294967295]"),
    ([f"seed={2**40}"], f"seed={2**40} must lie in [0, 4294967295]"),
    (["output.name=${oc.env:GSAE_PL_SURELY_UNSET}"], "GSAE_PL_SURELY_UNSET"),
    (["sae.d_sae=${nope.key}"], "nope.key"),
], ids=["seed-negative", "seed-too-big", "unset-env", "missing-key"])
def test_bad_config_values_are_one_line(tmp_path, extra, needle):
    proc = fit_in_process(tmp_path / "out", "run", *extra)
    assert_one_line(proc, needle)
    assert not (tmp_path / "out").exists()


def test_duplicate_yaml_keys_are_refused(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text(f"defaults: [{BASE}]\nsae:\n  d_sae: 64\n  d_sae: 128\n")
    # The tiny run's settings, then --config again: the last --config is the one read.
    proc = fit_in_process(tmp_path / "out", "run", "--config", str(config))
    assert_one_line(proc, "d_sae")
    assert "lines 3 and 4" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 9: sizes

@pytest.mark.parametrize("d_sae", [10**7, 10**9])
def test_a_run_too_big_for_memory_is_refused_up_front(tmp_path, d_sae):
    proc = fit_in_process(tmp_path / "out", "run", f"sae.d_sae={d_sae}")
    # Exit 2 and one error line, after Lightning's own device lines (the device it picks is
    # the one whose memory counts).
    err = assert_last_line(proc, "GB is available: lower sae.d_sae", code=2)
    assert f"[128, {d_sae}]" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 10: data

def test_all_zero_activations_are_bad_input(tmp_path):
    np.save(tmp_path / "zeros.npy", np.zeros((1024, 8), np.float32))
    proc = fit_in_process(tmp_path / "out", "run", "data.source=file",
                          f"data.path={tmp_path / 'zeros.npy'}", "eval.rows=256")
    assert_one_line(proc, str(tmp_path / "zeros.npy"))
    assert "NaN" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_width_one_with_a_unit_norm_decoder_is_refused(tmp_path):
    proc = fit_in_process(tmp_path / "out", "run", "data.synthetic.d_in=1",
                          "data.synthetic.n_features=4", "data.synthetic.avg_active=1")
    assert_one_line(proc, "set sae.unit_norm_decoder=false")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 11: report

@pytest.mark.parametrize("content", ['{"l0": "many", "fvu": 0.2}', "[1, 2]"],
                         ids=["string-value", "list"])
def test_report_skips_a_run_with_a_bad_metrics_json(tmp_path, content):
    suite = tmp_path / "suite"
    for name, metrics in (("good", '{"l0": 5.0, "fvu": 0.2}'), ("bad", content)):
        (suite / "runs" / name).mkdir(parents=True)
        (suite / "runs" / name / "config.yaml").write_text(
            f"output: {{variant: v, name: {name}}}\nloss: {{l1_coefficient: 0.1}}\nseed: 0\n")
        (suite / "runs" / name / "metrics.json").write_text(metrics)
    (suite / "suite.yaml").write_text("variants: {v: {}}\n")  # as ablate writes it
    proc = run([sys.executable, "-m", "gsae_pl.report", str(suite)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert str(suite / "runs" / "bad" / "metrics.json") in proc.stderr
    rows = (suite / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("v,")
    assert "bad" in (suite / "report.md").read_text()


def test_a_reader_that_stops_early_gets_no_traceback():
    """`ablate --dry-run | head -1`, where head exits before the command writes: its stdout
    is a pipe nobody reads. The command ends quietly with 141 (128 + SIGPIPE, as a shell
    reports a process SIGPIPE ended), not a traceback."""
    from tests.tiny_run import ROOT

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "gsae_pl.ablate", "--suite",
                               str(ROOT / "ablations/quick.yaml"), "--dry-run"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", done.stderr
