"""A run folder that already holds a run trained with another config: `fit` refuses it in
one line (exit 2), naming the differing keys and a free output.name; `--force` replaces
it. Real processes, as a user types the commands (`make fit`, then `make fit ARGS=...`)."""

from __future__ import annotations

import json
import sys

import pytest

from gsae_pl.run.run_dir import remove_run_outputs, suggested_name
from tests.tiny_run import args, run


def _fit(out_dir, *extra):
    return run([sys.executable, "-m", "gsae_pl.fit", *args(out_dir, "run", *extra)])


@pytest.mark.slow
def test_a_changed_d_sae_is_refused_with_a_name_and_force_replaces_the_run(tmp_path):
    assert _fit(tmp_path).returncode == 0
    metrics = tmp_path / "run" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    refused = _fit(tmp_path, "sae.d_sae=48")
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr
    assert line.startswith("error: ") and line.count("\n") == 1, line
    assert "different config (sae.d_sae)" in line
    assert "output.name=run_d_sae-48 " in line and "--force" in line
    assert metrics.stat().st_mtime_ns == before  # nothing trained, nothing rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no new folder either
    forced = _fit(tmp_path, "sae.d_sae=48", "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(metrics.read_text())["steps"] == 40
    assert "d_sae: 48" in (tmp_path / "run" / "config.yaml").read_text()
    again = _fit(tmp_path, "sae.d_sae=48")  # the replaced run is now the finished one
    assert again.returncode == 0 and "already holds a finished run" in again.stdout


def test_the_suggested_name_is_free_and_one_plain_folder_name(tmp_path):
    run_dir = tmp_path / "gated_l1-0.05_seed0"
    changed = {"sae.d_sae": 2048, "data.path": "/data/x y.npy", "optim.lr": 1e-3}
    assert suggested_name(run_dir, changed) == "gated_l1-0.05_seed0_d_sae-2048_path--data-x-y.npy"
    (tmp_path / "gated_l1-0.05_seed0_d_sae-2048_path--data-x-y.npy").mkdir()
    assert suggested_name(run_dir, changed) == \
        "gated_l1-0.05_seed0_d_sae-2048_path--data-x-y.npy-2"
    long = suggested_name(tmp_path / ("x" * 250), {"sae.d_sae": 2048})
    assert len(long.encode()) <= 255 and long.startswith("x" * 200)


def test_force_deletes_the_finished_mark_first(tmp_path, monkeypatch):
    """A --force stopped after its first deletion leaves an unfinished run (resumable or
    refused), never a folder that still reads as finished."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("metrics.json", "config.yaml", "checkpoints/last.ckpt"):
        (run_dir / name).write_text("x")
    deleted = []
    real_unlink = type(run_dir).unlink

    def unlink(self, missing_ok=False):
        deleted.append(self.name)
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(type(run_dir), "unlink", unlink)
    remove_run_outputs(run_dir)
    assert deleted[0] == "metrics.json" and set(deleted) == {"metrics.json", "config.yaml",
                                                              "last.ckpt"}
    assert not run_dir.exists()
