"""README, "Faults": checkpoints, metrics.json, provenance.json, configs, cache shards and
exports are written to a temporary name and renamed, so none is ever half-written; the
temporaries a killed process leaves are swept at the next start.

(1) The disk fills in the middle of each writer's payload: the previous file stays as it
was (or there is none) and no temporary is left. (2) A killed writer's temporary, put in
place by hand (timing a real SIGKILL mid-write is tests/run/test_resume.py's job), is gone
after the next start.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gsae_pl.io
import gsae_pl.saelens
from gsae_pl.data.cache import write_cache
from gsae_pl.fit import main
from gsae_pl.io import atomic_write_json, atomic_write_text, sweep_stale_temporaries
from gsae_pl.run.checkpointing import AtomicCheckpointIO
from gsae_pl.saelens import export
from gsae_pl.suite.report import write_report, write_results_csv
from tests.conftest import make_cfg
from tests.tiny_run import ROOT, TINY, args, run

OLD = b"the previous, complete file\n"


def _enospc():
    return OSError(errno.ENOSPC, "No space left on device")


class _FillsUp:
    """A file that takes half of its first write and then reports a full disk."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: max(1, len(data) // 2)])
        self._fh.flush()  # the partial payload really is on disk, in the temporary
        raise _enospc()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def fill_disk_at(monkeypatch, pattern: str) -> list[Path]:
    """Every io.atomic_write whose target matches `pattern` fails mid-payload; returns the
    temporaries it opened."""
    opened = []

    def open_(file, mode="r", *a, **k):
        fh = builtins.open(file, mode, *a, **k)
        target = re.sub(r"^\.(.+)\.tmp\d+$", r"\1", Path(file).name)
        if "w" in mode and fnmatch.fnmatch(target, pattern):
            opened.append(Path(file))
            return _FillsUp(fh)
        return fh

    monkeypatch.setattr(gsae_pl.io, "open", open_, raising=False)
    return opened


class _RowsLM:
    """The two things write_cache asks of an LM source: a key and a row stream."""

    d_in, buffer_size = 4, 64

    def describe(self) -> dict:
        return {"hook": "fake.hook", "model": "none"}

    def process_batches(self, batch, start, rank, world):
        gen = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(batch, self.d_in, generator=gen)


def _cache(folder: Path) -> None:
    write_cache(_RowsLM(), folder, make_cfg("data.cache_rows=100"), progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One tiny finished fit run (~2 s), read-only for the tests that share it."""
    out = tmp_path_factory.mktemp("finished")
    assert main(args(out, "run", "trainer.max_steps=20")) == 0
    return out / "run"


def _suite(tmp_path: Path, run: Path) -> Path:
    shutil.copytree(run, tmp_path / "suite" / "runs" / run.name, dirs_exist_ok=True)
    (tmp_path / "suite" / "suite.yaml").write_text("variants: {gated: {}}\n")  # as ablate's
    return tmp_path / "suite"


# name -> (where it goes, how the product writes it, given tmp_path and a finished run).
# fit.py writes config/provenance/metrics with these io calls inline; ablate's suite.yaml and
# failed/<run>.json use the same two functions.
WRITERS = {
    "checkpoint": ("checkpoints/last.ckpt",  # Lightning's saves, fit.py's plugins=
                   lambda d, run: AtomicCheckpointIO().save_checkpoint(
                       {"global_step": 2}, d / "checkpoints/last.ckpt")),
    "config.yaml": ("config.yaml",  # fit.py, before training
                    lambda d, run: atomic_write_text(d / "config.yaml", "seed: 1\n" * 64)),
    "provenance.json": ("provenance.json",  # fit.py, after training
                        lambda d, run: atomic_write_json(d / "provenance.json", {"a": 1})),
    "metrics.json": ("metrics.json",  # fit.py, last
                     lambda d, run: atomic_write_json(d / "metrics.json", {"l0": 1.0})),
    "cache shard": ("acts/shard_00000.npy", lambda d, run: _cache(d / "acts")),
    "cache metadata.json": ("acts/metadata.json", lambda d, run: _cache(d / "acts")),
    "suite results.csv": ("suite/results.csv", lambda d, run: write_results_csv(d / "suite", [])),
    "suite report.md": ("suite/report.md", lambda d, run: write_report(_suite(d, run))),
    "suite plot": ("suite/plots/*.png", lambda d, run: write_report(_suite(d, run))),
}


@pytest.mark.parametrize("previous", [OLD, None], ids=["over_a_file", "no_file_yet"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_mid_write_leaves_the_previous_file_and_no_temporary(
        tmp_path, monkeypatch, writer, previous, finished):
    where, write = WRITERS[writer]
    target = tmp_path / where
    if previous is not None and "*" in where:  # names the product picks: a real first write
        write(tmp_path, finished)
    elif previous is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(previous)
    before = {p: p.read_bytes() for p in tmp_path.glob(where)}
    assert before or previous is None
    opened = fill_disk_at(monkeypatch, Path(where).name)
    with pytest.raises(OSError) as err:
        write(tmp_path, finished)
    assert err.value.errno == errno.ENOSPC
    assert opened, "the fault never hit: the writer no longer goes through io.atomic_write"
    # it wrote `.<name>.tmp<pid>` beside the target: the name fit's sweep looks for
    assert opened[0].parent == target.parent
    assert re.fullmatch(r"\..+\.tmp\d+", opened[0].name)
    assert not list(tmp_path.rglob(".*.tmp*")), "a temporary was left behind"
    assert {p: p.read_bytes() for p in tmp_path.glob(where)} == before  # as it was, or none


@pytest.mark.parametrize("fault", ["weights_mid_write", "fsync_before_rename"])
def test_a_full_disk_mid_export_leaves_the_previous_export_and_no_temporary(
        tmp_path, monkeypatch, fault, finished):
    out = tmp_path / "sae"
    export(finished, out)  # the previous export, which --force would replace
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if fault == "weights_mid_write":
        real = builtins.open

        def open_(file, mode="r", *a, **k):  # the weights file takes half, then ENOSPC
            fh = real(file, mode, *a, **k)
            return _FillsUp(fh) if Path(file).name == "sae_weights.safetensors" else fh

        monkeypatch.setattr(gsae_pl.saelens, "open", open_, raising=False)
    else:  # cfg.json and the weights are written; the disk says no when they are flushed
        monkeypatch.setattr(gsae_pl.saelens.os, "fsync", lambda fd: (_ for _ in ()).throw(
            _enospc()))
    with pytest.raises(OSError):
        export(finished, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary folder
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _dead_pid() -> int:
    """The pid of a process that has exited: what a killed writer's temporaries carry."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


DEAD = _dead_pid()
STALE_RUN = [f".config.yaml.tmp{DEAD}", f".provenance.json.tmp{DEAD}",
             f".metrics.json.tmp{DEAD}", f"checkpoints/.last.ckpt.tmp{DEAD}",
             f"checkpoints/.step10.ckpt.tmp{DEAD}"]


@pytest.mark.parametrize("state", ["fresh", "resume"])
def test_fit_sweeps_a_killed_writers_temporaries_at_its_next_start(
        tmp_path, capsys, state, finished):
    run = tmp_path / "run"
    if state == "resume":  # killed after step 20's checkpoint, before metrics.json
        shutil.copytree(finished / "checkpoints", run / "checkpoints")
        shutil.copy(finished / "config.yaml", run / "config.yaml")  # fit writes it first
    for stale in STALE_RUN:
        (run / stale).parent.mkdir(parents=True, exist_ok=True)
        (run / stale).write_bytes(b"half a file")
    (run / ".notes.tmp").write_text("a user's own file: no pid suffix, not ours")
    assert main(args(tmp_path, "run", "trainer.max_steps=20")) == 0
    if state == "resume":
        assert f"resuming {run} from step 20" in capsys.readouterr().out
    assert sorted(p.name for p in run.rglob(".*.tmp*")) == [".notes.tmp"]
    assert (run / "metrics.json").is_file()


def test_export_sweeps_a_killed_exports_temporary_folder(tmp_path, finished):
    from gsae_pl.saelens import _temporary_stem

    stem = _temporary_stem(tmp_path / "sae")
    stale = [tmp_path / ".sae.tmp",  # the folder of exports before pids were in the name
             tmp_path / f"{stem}.new.tmp{DEAD}", tmp_path / f"{stem}.old.tmp{DEAD}"]
    for folder in stale:
        folder.mkdir()
        (folder / "sae_weights.safetensors").write_bytes(b"half a file")
    export(finished, tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [
        "cfg.json", "sae_weights.safetensors"]


def test_the_cache_writer_sweeps_a_killed_writes_temporaries(tmp_path):
    folder = tmp_path / "acts"  # killed mid-shard: no metadata.json, so not a cache yet
    folder.mkdir()
    (folder / f".shard_00000.npy.tmp{DEAD}").write_bytes(b"half a shard")
    _cache(folder)  # what `python -m gsae_pl.cache` and fit (data.cache=true) run next
    assert (folder / "metadata.json").is_file()
    assert not list(folder.glob(".*.tmp*"))


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    """Two processes may write one cache or build one model at once: only the temporaries
    of processes that are gone are stale."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as live:
        try:
            (tmp_path / f".shard_00000.npy.tmp{live.pid}").write_bytes(b"being written")
            (tmp_path / f".shard_00001.npy.tmp{DEAD}").write_bytes(b"killed")
            (tmp_path / f".gpt2-2l64d-0.tmp{DEAD}").mkdir()  # a killed tiny-LM build
            sweep_stale_temporaries(tmp_path)
            assert sorted(p.name for p in tmp_path.iterdir()) == [
                f".shard_00000.npy.tmp{live.pid}"]
        finally:
            live.kill()


@pytest.mark.slow
def test_a_suite_sweeps_a_killed_suites_temporaries(tmp_path):
    """A suite killed while writing its report or a failure record leaves temporaries in
    its folder; the rerun removes them before it writes anything."""
    suite = tmp_path / "s.yaml"
    suite.write_text(f"output_dir: {tmp_path / 'out'}\n"
                     f"overrides: {{trainer.max_steps: 4, eval.every_n_steps: 4}}\n"
                     "grids: {g: [0.05]}\n"
                     f"variants: {{gated: {{config: {ROOT / 'ablations/gated.yaml'}, grid: g}}}}\n")
    stale = [f".report.md.tmp{DEAD}", f".results.csv.tmp{DEAD}", f"failed/.x.json.tmp{DEAD}",
             f"plots/.l0_vs_fvu.png.tmp{DEAD}"]
    for name in stale:
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_bytes(b"half a file")
    extra = [a for a in TINY if not a.startswith(("trainer.max_steps", "eval.every_n_steps"))]
    done = run([sys.executable, "-m", "gsae_pl.ablate", "--suite", str(suite), *extra],
               timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list((tmp_path / "out").rglob(".*.tmp*"))
    assert (tmp_path / "out" / "report.md").is_file()
