"""Files a user may have received: checkpoints, exports' sources, reference CE. Nothing
in them is unpickled into code (weights_only loading), and one that is hostile, damaged
or made for another config is one line naming it, exit 2, nothing written; a damaged
reference CE file (a cache) is recomputed. docs/faults.md, section 1."""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import pytest
import torch

from gsae_pl import load_sae
from gsae_pl.fit import main
from tests.run.test_clean_errors import assert_one_line
from tests.tiny_run import args, fit_process, run


class Hostile:
    """Unpickling it runs a shell command that creates `marker`, as an attacker's would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def make_hostile(ckpt, marker) -> None:
    """`ckpt`, a real checkpoint, rewritten with a code-running object in it."""
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["note"] = Hostile(marker)
    torch.save(state, ckpt)


def edit(ckpt, change) -> None:
    """Rewrite a checkpoint after `change(state)`: what a damaged or foreign one holds."""
    state = torch.load(ckpt, weights_only=True)
    change(state)
    torch.save(state, ckpt)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("untrusted")
    assert main(args(out, "run", "trainer.max_steps=20")) == 0
    return out / "run"


def copy_of(finished, tmp_path, unfinished: bool):
    run_dir = tmp_path / "out" / "run"
    shutil.copytree(finished, run_dir)
    if unfinished:
        (run_dir / "metrics.json").unlink()
    return run_dir


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hostile_copy(finished, tmp_path, unfinished: bool):
    """A copy of the finished run whose every checkpoint is hostile, and the marker file
    their unpickling would create."""
    run_dir, marker = copy_of(finished, tmp_path, unfinished=unfinished), tmp_path / "marker"
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        make_hostile(ckpt, marker)
    return run_dir, marker


def test_the_hostile_checkpoint_runs_code_when_unpickled(finished, tmp_path):
    """The attack the tests below defend against is real: a plain torch.load runs it."""
    ckpt = tmp_path / "x.ckpt"
    shutil.copy(finished / "checkpoints" / "last.ckpt", ckpt)
    make_hostile(ckpt, tmp_path / "marker")
    torch.load(ckpt, weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.slow
def test_fit_never_unpickles_a_hostile_checkpoint_on_resume(finished, tmp_path):
    run_dir, marker = hostile_copy(finished, tmp_path, unfinished=True)
    before = snapshot(run_dir)
    proc = fit_process(tmp_path / "out", "run", "trainer.max_steps=20")
    err = assert_one_line(proc, str(run_dir / "checkpoints" / "last.ckpt"))
    assert "not loaded" in err and "--force" in err
    assert not marker.exists()
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_export_never_unpickles_a_hostile_checkpoint(finished, tmp_path):
    run_dir, marker = hostile_copy(finished, tmp_path, unfinished=False)
    export = [sys.executable, "-m", "gsae_pl.export", str(run_dir), str(tmp_path / "sae")]
    assert_one_line(run(export), str(run_dir / "checkpoints" / "last.ckpt"))
    older = run_dir / "checkpoints" / "step10.ckpt"
    assert_one_line(run([*export, "--checkpoint", str(older)]), str(older))
    assert not marker.exists() and not (tmp_path / "sae").exists()


def test_optimizer_moments_smaller_than_the_parameters_are_refused(finished, tmp_path):
    """Fused Adam would read past the moments' end: a segfault (exit 139) before the fix."""
    run_dir = copy_of(finished, tmp_path, unfinished=True)
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        edit(ckpt, lambda s: s["optimizer_states"][0]["state"][0].update(
            exp_avg=torch.zeros(3, 8), exp_avg_sq=torch.zeros(3, 8)))
    before = snapshot(run_dir)
    proc = fit_process(tmp_path / "out", "run", "trainer.max_steps=20")
    err = assert_one_line(proc, str(run_dir / "checkpoints" / "last.ckpt"))
    assert "exp_avg" in err and "[3, 8]" in err and "[32, 8]" in err
    assert snapshot(run_dir) == before


def _bigger_moments(state):
    state["optimizer_states"][0]["state"][2].update(exp_avg=torch.zeros(8, 64))


def _wrong_weight(state):
    state["state_dict"]["sae.W_enc"] = torch.zeros(8, 16)


def _missing_weight(state):
    del state["state_dict"]["sae.b_gate"]


def _extra_weight(state):
    state["state_dict"]["sae.W_mag"] = torch.zeros(8, 32)


def _integer_weight(state):
    state["state_dict"]["sae.W_dec"] = torch.zeros(32, 8, dtype=torch.int32)


def _missing_optimizer(state):
    del state["optimizer_states"]


def _missing_moment_param(state):
    del state["optimizer_states"][0]["param_groups"][0]["params"][-1]


def _not_a_dict(state):
    state.clear()
    state["global_step"] = 20


CHANGES = {"bigger moments": (_bigger_moments, "exp_avg of sae.W_enc has shape [8, 64]"),
           "weight shape": (_wrong_weight, "sae.W_enc has shape [8, 16]"),
           "missing weight": (_missing_weight, "missing: sae.b_gate"),
           "extra weight": (_extra_weight, "unexpected: sae.W_mag"),
           "integer weight": (_integer_weight, "sae.W_dec is int32"),
           "no optimizer": (_missing_optimizer, "optimizer_states"),
           "param groups": (_missing_moment_param, "parameter group"),
           "no keys": (_not_a_dict, "hyper_parameters")}


@pytest.mark.parametrize("name", CHANGES)
def test_a_checkpoint_that_does_not_fit_the_run_is_one_line_on_resume(finished, tmp_path,
                                                                     capsys, name):
    change, needle = CHANGES[name]
    run_dir = copy_of(finished, tmp_path, unfinished=True)
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        edit(ckpt, change)
    before = snapshot(run_dir)
    assert main(args(tmp_path / "out", "run", "trainer.max_steps=20")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(run_dir / "checkpoints" / "last.ckpt") in err and needle in err, err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name", ["weight shape", "missing weight", "extra weight",
                                  "integer weight", "no keys"])
def test_export_refuses_a_checkpoint_that_does_not_fit_its_config(finished, tmp_path, capsys,
                                                                 name):
    from gsae_pl.saelens import main as export_main

    change, needle = CHANGES[name]
    run_dir = copy_of(finished, tmp_path, unfinished=True)
    edit(run_dir / "checkpoints" / "last.ckpt", change)
    rc = export_main([str(run_dir), str(tmp_path / "sae"), "--allow-unfinished"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(run_dir / "checkpoints" / "last.ckpt") in err and needle in err, err
    assert not (tmp_path / "sae").exists()


def test_what_export_allow_unfinished_writes_load_sae_loads(finished, tmp_path):
    from gsae_pl.saelens import main as export_main

    run_dir = copy_of(finished, tmp_path, unfinished=True)
    (run_dir / "checkpoints" / "last.ckpt").unlink()  # the newest is now step20.ckpt
    assert export_main([str(run_dir), str(tmp_path / "sae"), "--allow-unfinished"]) == 0
    sae = load_sae(tmp_path / "sae")
    assert sae(torch.randn(4, 8)).shape == (4, 8)


def test_a_finished_run_with_a_damaged_config_yaml_is_one_line(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path, unfinished=False)
    for damaged in ("sae: [unclosed\n", "- a list\n- not a config\n", "\xff\xfe"):
        (run_dir / "config.yaml").write_bytes(damaged.encode("latin-1"))
        before = snapshot(run_dir)
        assert main(args(tmp_path / "out", "run", "trainer.max_steps=20")) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert f"{run_dir / 'config.yaml'}" in err and "output.name" in err, err
        assert snapshot(run_dir) == before


def test_a_finished_run_with_a_damaged_config_yaml_is_one_line_in_a_process(finished,
                                                                          tmp_path):
    run_dir = copy_of(finished, tmp_path, unfinished=False)
    (run_dir / "config.yaml").write_text("sae: [unclosed\n")
    proc = fit_process(tmp_path / "out", "run", "trainer.max_steps=20")
    assert_one_line(proc, str(run_dir / "config.yaml"))
    assert (run_dir / "config.yaml").read_text() == "sae: [unclosed\n"


# ---------------------------------------------------------------- reference CE (a cache)

@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from gsae_pl.data.transformer_lens import build_lm_source
    from tests.data.lm_fixtures import lm_cfg, write_text, write_tiny_gpt2

    root = tmp_path_factory.mktemp("reference_lm")
    return build_lm_source(lm_cfg(write_tiny_gpt2(root / "model"), write_text(root / "corpus"),
                                 "eval.loss_recovered.contexts=12"))


DAMAGES = {"truncated": lambda path, marker: path.write_bytes(path.read_bytes()[:40]),
           "not a tensor": lambda path, marker: torch.save({"clean": 1.0}, path),
           "wrong shape": lambda path, marker: torch.save(torch.zeros(3, 2).double(), path),
           "not finite": lambda path, marker: torch.save(
               torch.full((4, 2), float("nan"), dtype=torch.float64), path),
           "hostile": lambda path, marker: torch.save(Hostile(marker), path)}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_reference_ce_file_is_named_and_recomputed(lm, tmp_path, monkeypatch,
                                                             capsys, damage):
    """The file is a cache of what the LM gives (eval/lm_eval.py): a damaged one is
    recomputed and replaced, with a warning naming it, not a traceback on every rerun."""
    from gsae_pl.eval import lm_eval

    tokens = lm.heldout_tokens(12)[:4]
    plain = lm_eval.ce_sums(lm, tokens, lambda x: 0.5 * x)
    monkeypatch.setattr(lm, "reference_dir", tmp_path / "reference_ce", raising=False)
    lm_eval.ce_sums(lm, tokens, lambda x: 0.5 * x)
    [path] = (tmp_path / "reference_ce").glob("*.pt")
    marker = tmp_path / "marker"
    DAMAGES[damage](path, marker)
    capsys.readouterr()
    again = lm_eval.ce_sums(lm, tokens, lambda x: 0.5 * x)
    assert torch.equal(again, plain) and not marker.exists()
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and err.count("\n") == 1 and str(path) in err, err
    assert "recomputed" in err
    assert torch.load(path, weights_only=True).shape == (4, 2)  # replaced by a good one
    lm_eval.ce_sums(lm, tokens, lambda x: 0.5 * x)
    assert capsys.readouterr().err == ""  # read, not recomputed, from then on
