"""Provenance (gsae_pl/run/provenance.py): what made a run's numbers, recorded beside them; and
`python -m gsae_pl.report --verify`, which reruns a suite's points and compares."""

from __future__ import annotations

import csv
import json
import re
import sys
from types import SimpleNamespace

import pytest
import yaml

from gsae_pl.run import provenance
from tests.tiny_run import ROOT, TINY, run


def test_dirty_means_code_or_configs_changed_not_committed_results(tmp_path):
    """A suite rewrites its committed report under tensorboard_logs/ while its runs start:
    that alone must not mark them dirty; a changed source file must."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "tensorboard_logs" / "quick").mkdir(parents=True)
    (tmp_path / "tensorboard_logs" / "quick" / "results.csv").write_text("a\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "config.yaml").write_text("a: 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert provenance.code_state(tmp_path / "src")["dirty"] is False
    (tmp_path / "tensorboard_logs" / "quick" / "results.csv").write_text("b\n")
    assert provenance.code_state(tmp_path / "src")["dirty"] is False
    (tmp_path / "config.yaml").write_text("a: 2\n")  # outside the package's folder too
    assert provenance.code_state(tmp_path / "src")["dirty"] is True
    git("checkout", "config.yaml")
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert provenance.code_state(tmp_path / "src")["dirty"] is True


def test_code_state_in_and_outside_a_checkout(tmp_path):
    state = provenance.code_state(ROOT)
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)
    assert provenance.code_state(tmp_path) == {"commit": "unknown", "dirty": "unknown"}


def test_versions_name_absent_packages(monkeypatch):
    import torch

    monkeypatch.setattr(provenance, "PACKAGES", ("torch", "no-such-package-gsae"))
    assert provenance.versions() == {"torch": torch.__version__, "no-such-package-gsae": "absent"}


def test_weights_hash_follows_the_bytes(tmp_path):
    assert provenance.weights_hash(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")  # not a weight file: not hashed
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 1000)
    first = provenance.weights_hash(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert provenance.weights_hash(tmp_path) == first
    weights.write_bytes(b"\x00" * 999 + b"\x01")
    assert provenance.weights_hash(tmp_path) != first


def test_data_key_adds_weights_and_file_identity(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"abc")
    lm = SimpleNamespace(model_name=str(tmp_path))
    source = SimpleNamespace(lm=lm, describe=lambda: {"source": "tiny_lm", "hook": "h"})
    key = provenance.data_key(source)
    assert key["hook"] == "h" and key["weights_blake2b"] == provenance.weights_hash(tmp_path)
    data = tmp_path / "acts.npy"
    data.write_bytes(b"12345")
    key = provenance.data_key(SimpleNamespace(lm=None, describe=lambda: {"source": "file",
                                                                          "path": str(data)}))
    assert key["bytes"] == 5 and key["mtime_ns"] == data.stat().st_mtime_ns


def test_suite_header_flags_mixed_commits():
    record = {"commit": "c1", "dirty": False, "versions": {}, "data": {}, "device": "cpu",
              "threads": 2}
    same = provenance.suite_header({"a": record, "b": dict(record)})
    assert "- commit: `c1`" in same and not any("Warning" in line for line in same)
    mixed = provenance.suite_header({"a": record, "b": {**record, "commit": "c2"}, "c": None})
    assert mixed[0].startswith("**Warning: the runs come from 2 different commits**")
    assert "- commit: `c1` (1 runs); `c2` (1 runs)" in mixed
    assert any("1 run(s) have no provenance.json" in line for line in mixed)


def _suite(tmp_path):
    """A 2-run synthetic suite file (gated at two coefficients), tiny sizes."""
    overrides = dict(item.split("=", 1) for item in TINY)
    spec = {"name": "tiny", "output_dir": str(tmp_path / "out"), "overrides": overrides,
            "variants": {"gated": {"config": str(ROOT / "ablations" / "gated.yaml"),
                                   "l1_coefficient": [0.01, 0.1]}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, tmp_path / "out"


def _verify(suite_dir, *extra):
    return run([sys.executable, "-m", "gsae_pl.report", str(suite_dir), *extra], timeout=300)


@pytest.mark.slow
def test_runs_record_provenance_and_verify_reruns_a_point(tmp_path):
    path, out = _suite(tmp_path)
    done = run([sys.executable, "-m", "gsae_pl.ablate", "--suite", str(path)], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "runs" / "gated_l1-0.01_seed0" / "provenance.json").read_text())
    assert record["commit"] == provenance.code_state(ROOT)["commit"]
    assert record["device"] == "cpu" and record["threads"] >= 1
    assert record["data"]["source"] == "synthetic" and record["data"]["d_in"] == 8
    assert f"- commit: `{record['commit']}`" in (out / "report.md").read_text()

    done = _verify(out, "--verify", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gated_l1-0.01_seed0: matches" in done.stdout and "verified 1 run(s)" in done.stdout

    # A fresh clone holds results.csv and suite.yaml, not the runs: rebuilt from suite.yaml.
    import shutil

    shutil.rmtree(out / "runs")
    results = out / "results.csv"
    with open(results, newline="") as fh:
        rows = list(csv.DictReader(fh))
    committed = float(rows[1]["fvu"])
    rows[1]["fvu"] = repr(committed * 1.01)  # a result nobody can reproduce
    with open(results, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    done = _verify(out, "--runs", rows[1]["run"])
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("fvu "))
    assert "MISMATCH" in line and f"{committed * 1.01:.6g}" in line
    assert f"{committed:.6g}" in line  # the rerun reproduces the original value
    assert "MISMATCH in fvu" in done.stdout


@pytest.mark.slow  # ~8 s: fit processes
def test_verify_refuses_unknown_runs_and_missing_results(tmp_path):
    (tmp_path / "results.csv").write_text("variant,run\ngated,a\n")
    done = _verify(tmp_path, "--runs", "b")
    assert done.returncode == 2 and "--runs b: not in results.csv" in done.stderr
    done = _verify(tmp_path / "nothing", "--verify", "1")
    assert done.returncode == 2 and "results.csv not found" in done.stderr
