"""Watching a run: progress lines where stdout is a file, HParams from the run's start, the
pinned TensorBoard layout, the closing summary, start-up noise, and W&B offline."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gsae_pl.commands import python_m, run_tool
from gsae_pl.config import load_config
from gsae_pl.errors import UserError
from gsae_pl.run import quiet
from gsae_pl.run.progress import duration, tokens
from gsae_pl.run.tensorboard import hparams_order, layout
from gsae_pl.run.train import closing_lines
from gsae_pl.run.wandb_logger import wandb_logger
from tests.run.test_resume import KILL_AFTER_STEP_25
from tests.tiny_run import ROOT, args, wrapper_script

# TINY (tests/tiny_run.py): 40 steps of 128 rows, eval every 20 on 512 rows, train windows
# of 20 steps; plus a progress line every 10 steps and one resample at step 20.
# TINY turns the bar off: the lines come regardless.
WATCHED = ["log.progress_every_n_steps=10",
           "resample.every_n_steps=20", "resample.window_steps=10",
           "resample.lr_return_steps=5", "resample.max_resamples=1",
           "output.variant=gated", "output.sweep=loss.sparsity.coefficient"]
NUMBER = r"-?[\d.]+(?:e[-+]?\d+)?"
STEP_LINE = re.compile(
    rf"^step (\d+)/40 \((\d+)%\) \| ({NUMBER}k?) tok/s \| ETA (\d+:\d\d) \| loss ({NUMBER}) "
    rf"\| L0 ({NUMBER}) \| FVU ({NUMBER})(?: \| dead ({NUMBER}) \(last 2\.56k tokens\))?$")
EVAL_LINE = re.compile(rf"^eval at step (\d+): L0 ({NUMBER}) \| FVU ({NUMBER}) \| gamma "
                       rf"({NUMBER}) \| norm_ratio {NUMBER} \| dead ({NUMBER}) "
                       rf"\(of 512 held-out tokens\) \| mmcs ")
RESAMPLE_LINE = re.compile(r"^resample at step 20: (\d+) of 32 features dead \(fired on none "
                           r"of the last 1\.28k training tokens\), (\d+) revived$")
NOISE = ("GPU available", "TPU available", "💡", "LeafSpec", "Epoch 0/")


def fit_to_file(tmp_path: Path, log: str, script: Path | None = None):
    """`python -m gsae_pl.fit` (or a wrapper script) with stdout and stderr in a file."""
    entry = [str(script)] if script else ["-m", "gsae_pl.fit"]
    path = tmp_path / log
    with open(path, "w") as out:
        done = subprocess.run([sys.executable, *entry, *args(tmp_path, "run", *WATCHED)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=240,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.returncode, path.read_text().splitlines()


def step_lines(lines: list[str]) -> dict[int, re.Match]:
    found = {}
    for line in lines:
        if line.startswith("step "):
            match = STEP_LINE.match(line)
            assert match, line
            found[int(match[1])] = match
    return found


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    found.Reload()
    return found


def hparams_of(accumulator):
    from tensorboard.plugins.hparams import metadata

    content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    return experiment, start, metadata.SESSION_END_INFO_TAG in content


FIRST_KEYS = ["output.variant", "sae.architecture", "loss.sparsity.coefficient", "sae.d_sae",
              "seed"]


@pytest.mark.slow
def test_a_killed_run_shows_and_its_resume_reports_global_steps(tmp_path):
    # Killed after step 25: what a researcher sees of a run that never finished.
    script = wrapper_script(tmp_path / "die.py", KILL_AFTER_STEP_25)
    code, lines = fit_to_file(tmp_path, "killed.log", script)
    assert code == -signal.SIGKILL, lines[-20:]
    run = tmp_path / "run"
    assert lines[0] == f"run directory: {run}"
    assert not [line for line in lines if any(noise in line for noise in NOISE)]
    steps = step_lines(lines)
    assert sorted(steps) == [10, 20]
    assert steps[10][2] == "25" and steps[20][2] == "50"
    assert steps[10][8] is None and float(steps[20][8]) >= 0  # the train window ends at 20
    assert sum(bool(RESAMPLE_LINE.match(line)) for line in lines) == 1
    evals = [EVAL_LINE.match(line) for line in lines if line.startswith("eval at")]
    assert [int(m[1]) for m in evals] == [20]

    experiment, start, ended = hparams_of(events(run))
    names = [info.name for info in experiment.hparam_infos]
    assert names[:5] == FIRST_KEYS
    assert [info.differs for info in experiment.hparam_infos[:6]] == [True] * 5 + [False]
    assert len(names) == len(set(names)) == len(start.hparams) > 60
    assert start.hparams["output.variant"].string_value == "gated"
    assert start.hparams["sae.d_sae"].number_value == 32
    assert not ended  # killed: the session never ended
    tags = [m.name.tag for m in experiment.metric_infos]
    assert tags[:4] == ["val/l0", "val/fvu", "val/mmcs", "val/gamma"]  # headline first

    # The same command resumes from step 20; its lines count global steps from there.
    code, lines = fit_to_file(tmp_path, "resumed.log")
    assert code == 0, lines[-20:]
    assert lines[0].startswith(f"resuming {run} from step 20 (")
    steps = step_lines(lines)
    assert sorted(steps) == [30, 40]
    assert steps[30][2] == "75" and steps[40][2] == "100" and steps[40][4] == "0:00"
    evals = [EVAL_LINE.match(line) for line in lines if line.startswith("eval at")]
    assert [int(m[1]) for m in evals] == [40]
    assert lines[-3:] == ["next steps:",
                          f"  {run_tool('tensorboard', '--logdir', tmp_path)}   # curves; "
                          "HParams tab: compare runs",
                          f"  {python_m('gsae_pl.export', run, Path(f'{run}_saelens'))}   "
                          "# SAELens format"]

    accumulator = events(run)
    assert hparams_of(accumulator)[2]  # the session ended with metrics.json
    metrics = __import__("json").loads((run / "metrics.json").read_text())
    assert "relative_reconstruction_bias" in metrics and "gamma" not in metrics
    for tag, key in (("val/l0", "l0"), ("val/gamma", "relative_reconstruction_bias")):
        last = accumulator.Scalars(tag)[-1]
        assert last.step == 39 and last.value == pytest.approx(metrics[key], rel=1e-6), tag
    assert float(evals[0][2]) == pytest.approx(metrics["l0"], rel=1e-3)
    scalars = set(accumulator.Tags()["scalars"])
    assert "epoch" not in scalars and not [t for t in scalars if t.startswith("final/")]


def _cfg(*overrides):
    return load_config([str(ROOT / "configs/base.yaml")], list(overrides))


def test_hparams_put_the_keys_that_tell_runs_apart_first():
    cfg = _cfg("output.variant=no_aux", "output.sweep=sae.d_sae")
    order = hparams_order(cfg)
    # the swept key is d_sae itself: listed once, where the sweep puts it
    assert order[:5] == ["output.variant", "sae.architecture", "sae.d_sae",
                         "loss.sparsity.coefficient", "seed"]
    assert order[5] != "sae.d_sae"
    swept = hparams_order(_cfg("output.sweep=optim.lr"))
    assert swept[:5] == ["output.variant", "sae.architecture", "optim.lr",
                         "loss.sparsity.coefficient", "sae.d_sae"]
    assert len(order) == len(set(order))
    # A plain fit: the sparsity coefficient among the five columns TensorBoard shows.
    assert hparams_order(_cfg())[:5] == ["output.variant", "sae.architecture",
                                         "loss.sparsity.coefficient", "sae.d_sae", "seed"]


def test_a_plain_fits_variant_column_names_the_run():
    from gsae_pl.run.tensorboard import shown_values

    assert shown_values(_cfg())["output.variant"] == "(no suite) gated_l1-0.05_seed0"
    assert shown_values(_cfg("output.variant=no_aux"))["output.variant"] == "no_aux"


def test_the_layout_states_each_dead_fraction_window_in_tokens():
    cfg = _cfg("data.batch_size=100", "eval.rows=5000", "log.histogram_every_n_steps=30",
               "resample.window_steps=20")
    charts = layout(cfg, ["reconstruction", "loss_recovered"])["gsae_pl: what to watch"]
    dead = [title for title in charts if title.startswith("dead fraction")]
    assert dead == ["dead fraction (val: 5,000 held-out tokens; train: last 3,000 tokens; "
                    "resample: last 2,000 tokens)"]
    assert "loss recovered" in charts
    assert not [t for t in charts if t.startswith("true features")]  # no ground truth here


def test_closing_lines_warn_when_most_features_are_dead(tmp_path):
    cfg = _cfg("sae.d_sae=64", "eval.rows=1000", "log.histogram_every_n_steps=10",
               "data.batch_size=100")
    warned = closing_lines(cfg, tmp_path / "r", {"dead_fraction": 0.75}).splitlines()
    assert warned[0].startswith("warning: 75% of the 64 features fired on none of the 1,000 "
                                "held-out tokens (eval.rows); resampling was on (")
    assert "resample.enabled" not in warned[0]  # it is on: no advice to turn it on
    assert closing_lines(cfg, tmp_path / "r", {"dead_fraction": 0.5}).startswith("next steps:")
    # Training's own window saw most of them fire: rare, not dead; the advice is a longer
    # held-out window, not resampling.
    rare = closing_lines(cfg, tmp_path / "r", {"dead_fraction": 0.6}, train_dead=0.04)
    assert rare.splitlines()[0] == (
        "warning: 60% of the 64 features fired on none of the 1,000 held-out tokens "
        "(eval.rows); over the last 1,000 training tokens 4% were dead: most of them are "
        "rare, not dead; a larger eval.rows counts them (resampling was on (4 resamples "
        "every 500 steps))")
    off = closing_lines(_cfg("resample.enabled=false"), tmp_path / "r", {"dead_fraction": 0.9},
                        train_dead=0.8).splitlines()[0]
    assert "resampling was off: try resample.enabled=true" in off


def test_short_numbers():
    assert (tokens(999), tokens(12345), tokens(2.5e6)) == ("999", "12.3k", "2.5M")
    assert (duration(59.6), duration(61), duration(3725)) == ("1:00", "1:01", "1:02:05")


def test_only_the_known_start_up_noise_is_silenced(caplog):
    quiet.silence_startup_noise()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("GPU available: False, used: False")
        logger.info("💡 Tip: For seamless cloud logging ...")
        logger.info("Restoring states from the checkpoint path at x.ckpt")
    assert [r.getMessage() for r in caplog.records] == [
        "Restoring states from the checkpoint path at x.ckpt"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet.silence_startup_noise()  # its filter in front of the catch-all
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                      stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


def test_wandb_missing_is_one_clear_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="log.wandb=offline needs the wandb package"):
        wandb_logger(_cfg("log.wandb=offline"), tmp_path / "run")
    assert wandb_logger(_cfg(), tmp_path / "run") is None  # off: never imported
    with pytest.raises(UserError, match="log.wandb=yes is not one of: off, offline, online"):
        _cfg("log.wandb=yes")


@pytest.mark.slow
def test_wandb_offline_writes_its_run_under_the_run_directory(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    from gsae_pl.fit import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    assert main(args(tmp_path, "run", "log.wandb=offline", "trainer.max_steps=20",
                     "eval.every_n_steps=10", "log.histogram_every_n_steps=10")) == 0
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), offline
    assert f"wandb sync {offline[0]}" in capsys.readouterr().out
    cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert cfg.log.wandb == "offline"
