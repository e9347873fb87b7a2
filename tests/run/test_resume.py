"""Resume after a kill: atomic checkpoints, the newest kept, a rerun continuing where the
killed run stopped and ending with the metrics of an uninterrupted run."""

from __future__ import annotations

import math
import random
import signal

import pytest
import torch

from gsae_pl.fit import main
from gsae_pl.run.checkpointing import AtomicCheckpointIO, RNGState, latest_checkpoint
from tests.tiny_run import args, fit_process, metrics, wrapper_script

# Dies by SIGKILL right after optimiser step 25 (checkpoints exist for steps 10 and 20).
KILL_AFTER_STEP_25 = """
from gsae_pl.run import faults
_end = faults.NonFiniteMonitor.on_train_batch_end
def _end_then_die(self, trainer, *rest):
    _end(self, trainer, *rest)
    if trainer.global_step == 25:
        os.kill(os.getpid(), signal.SIGKILL)
faults.NonFiniteMonitor.on_train_batch_end = _end_then_die
"""
# Dies by SIGKILL while saving step 20: the data is on disk under the temporary name,
# the rename has not happened.
KILL_MID_SAVE_OF_STEP_20 = """
_replace = os.replace
def _replace_or_die(src, dst):
    if str(dst).endswith("step20.ckpt"):
        os.kill(os.getpid(), signal.SIGKILL)
    _replace(src, dst)
os.replace = _replace_or_die
"""
KILLS = {"after_step_25": (KILL_AFTER_STEP_25, 20), "mid_save": (KILL_MID_SAVE_OF_STEP_20, 10)}


def assert_same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(args(out, "run")) == 0
    return metrics(out, "run")


@pytest.mark.slow
@pytest.mark.parametrize("kill", list(KILLS))
def test_sigkilled_fit_resumes_to_the_uninterrupted_metrics(tmp_path, kill, uninterrupted):
    setup, resume_step = KILLS[kill]
    killed = fit_process(tmp_path, "run", script=wrapper_script(tmp_path / "die.py", setup))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()
    resumed = fit_process(tmp_path, "run")  # the same command, rerun
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run} from step {resume_step}" in resumed.stdout
    assert not list(run.rglob(".*.tmp*"))  # the killed save's temporary file is gone
    assert_same_metrics(metrics(tmp_path, "run"), uninterrupted)


@pytest.mark.slow
def test_rerun_after_a_stop_continues_and_matches(tmp_path, capsys, uninterrupted):
    assert main(args(tmp_path, "run", "trainer.max_steps=20")) == 0
    (tmp_path / "run" / "metrics.json").unlink()  # as if stopped before the end
    assert main(args(tmp_path, "run")) == 0
    assert f"resuming {tmp_path / 'run'} from step 20" in capsys.readouterr().out
    assert_same_metrics(metrics(tmp_path, "run"), uninterrupted)
    # Killed after the last step but before metrics.json: only the evaluation is redone.
    (tmp_path / "run" / "metrics.json").unlink()
    assert main(args(tmp_path, "run")) == 0
    assert "from step 40" in capsys.readouterr().out
    assert_same_metrics(metrics(tmp_path, "run"), uninterrupted)


@pytest.mark.slow
def test_resume_mid_resampling_window_matches(tmp_path):
    # Killed after step 25, resumes from step 20: inside the window counting firing for the
    # resample at step 30, and inside the lr's cosine return from the resample at step 15.
    # (A run stopped by trainer.max_steps cannot end there: a resample must leave
    # lr_return_steps steps before the end.)
    resample = ["resample.enabled=true", "resample.every_n_steps=15",
                "resample.window_steps=15", "resample.max_resamples=2",
                "resample.lr_return_steps=10"]
    assert main(args(tmp_path, "whole", *resample)) == 0
    die = wrapper_script(tmp_path / "die.py", KILL_AFTER_STEP_25)
    assert fit_process(tmp_path, "run", *resample, script=die).returncode == -signal.SIGKILL
    resumed = fit_process(tmp_path, "run", *resample)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from step 20" in resumed.stdout
    assert_same_metrics(metrics(tmp_path, "run"), metrics(tmp_path, "whole"))


def test_checkpoints_every_n_newest_kept_and_one_at_the_end(tmp_path):
    assert main(args(tmp_path, "run", "trainer.max_steps=45", "checkpoint.keep=2")) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step30.ckpt",
                                                        "step40.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["global_step"] == 45 and latest_checkpoint(tmp_path / "run") == ckpts / "last.ckpt"
    assert float(last["state_dict"]["norm_scale"]) != 1.0  # the normalisation travels along


def _unfinished(tmp_path):
    assert main(args(tmp_path, "run", "trainer.max_steps=20")) == 0
    (tmp_path / "run" / "metrics.json").unlink()
    return tmp_path / "run"


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    run = _unfinished(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(args(tmp_path, "run", "sae.d_sae=16", "optim.lr=0.01")) == 2
    err = capsys.readouterr().err
    assert "different config (sae.d_sae, optim.lr)" in err and err.count("\n") == 1
    assert "set output.name=run_d_sae-16_lr-0.01 to start another run" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_damaged_checkpoint_is_one_line_not_a_traceback(tmp_path, capsys):
    run = _unfinished(tmp_path)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    assert main(args(tmp_path, "run")) == 2
    assert "cannot resume from" in capsys.readouterr().err


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def half_then_fail(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_rng_state_round_trips():
    saved = RNGState().state_dict()
    first = (torch.rand(3), random.random(), __import__("numpy").random.rand())
    RNGState().load_state_dict(saved)
    again = (torch.rand(3), random.random(), __import__("numpy").random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


@pytest.fixture(scope="module")
def lm_overrides(tmp_path_factory) -> list[str]:
    """A tiny random LM and text (tests/data/lm_fixtures.py) as the run's data source."""
    from tests.data.lm_fixtures import write_text, write_tiny_gpt2

    root = tmp_path_factory.mktemp("resume_lm")
    model, corpus = write_tiny_gpt2(root / "model"), write_text(root / "corpus", n_docs=300)
    # 4 batches per shuffle-buffer block: the kill at step 25 lands mid-block.
    return ["data.source=transformer_lens", f"data.model={model}", f"data.dataset={corpus}",
            "data.context_size=16", "data.buffer_size=512", "data.lm_batch_size=8",
            "data.normalize_rows=256", "eval.rows=128", "eval.loss_recovered.contexts=4"]


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["stream", "cache"])
def test_sigkilled_lm_fit_resumes_to_the_uninterrupted_run_exactly(tmp_path, lm_overrides,
                                                                    cached):
    """The LM source (streamed, or through the activation cache) resumes bit for bit: the
    same final weights and metrics (loss recovered included) as a run never killed."""
    def cache(name):
        return ["data.cache=true", f"data.cache_dir={tmp_path / name}"] if cached else []

    assert main(args(tmp_path, "whole", *lm_overrides, *cache("acts_whole"))) == 0
    extra = [*lm_overrides, *cache("acts_run")]
    killed = fit_process(tmp_path, "run", *extra, timeout=600,
                         script=wrapper_script(tmp_path / "die.py", KILL_AFTER_STEP_25))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = fit_process(tmp_path, "run", *extra, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {tmp_path / 'run'} from step 20" in resumed.stdout
    final = [torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
             ["state_dict"] for name in ("whole", "run")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0]), "weights differ"
    whole, run = metrics(tmp_path, "whole"), metrics(tmp_path, "run")
    assert "loss_recovered" in whole and whole == run
